"""The frame tap and the analysis record: the ingest process offers each image of an open run
to the live analysis over a real ZeroMQ PUSH socket it binds, and takes analysis results back
for the run file through the daemon's ordered channel (real camera simulator over TCP, a real
spawned ingest process, a real HDF5 file read back with h5py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters for reading)
import numpy as np
import pytest
import zmq
from ingest_setup import DETECTOR, GEOMETRY, SHAPE, ingest_config

from insitu_daq.clock import RunClock
from insitu_daq.ingest import IngestClient, IngestError
from insitu_daq.runfile import RunMetadata
from insitu_daq.sim import stream2_encode as s2
from insitu_daq.sim.camera import SimulatedCamera
from insitu_daq.sim.station import SimStation

TAP = "tcp://127.0.0.1:0"


class Tapped:
    """A camera, the ingest process listening to it with its tap bound, and runs to open."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.camera = SimulatedCamera(SimStation(seed=0), port=0, shape=SHAPE, frame_rate_hz=100.0)
        self.camera.start()
        config = ingest_config(self.camera.endpoints["stream2"], tmp)
        self.ingest = IngestClient(config, analysis_endpoint=TAP)
        try:
            self.ingest.start()
        except BaseException:
            self.camera.stop()
            raise
        self.context = zmq.Context()

    @property
    def tap_endpoint(self) -> str:
        endpoint = self.ingest.bound_analysis_endpoint
        assert endpoint is not None and endpoint.startswith("tcp://127.0.0.1:")
        assert not endpoint.endswith(":0")  # the port actually bound, for the analysis
        return endpoint

    def puller(self, hwm: int = 1000) -> zmq.Socket:
        sock = self.context.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.tap_endpoint)
        return sock

    def open_run(self, name: str) -> Path:
        clock = RunClock(1.0, start_ns=time.time_ns(), start_monotonic_ns=time.monotonic_ns())
        meta = RunMetadata(run_id=name, title=f"tap test {name}", start_time_ns=clock.start_ns)
        path = self.tmp / f"{name}.h5"
        self.ingest.open_run(meta, path, clock, GEOMETRY)
        self.run_clock = clock
        return path

    def delivered(self) -> dict[str, Any]:
        """Stats once the ingest process has read every message the camera sent."""
        deadline = time.monotonic() + 10.0
        while True:
            stats = self.ingest.sync()
            if stats["messages_received_total"] >= self.camera.messages_sent_total:
                return stats
            assert time.monotonic() < deadline, "camera's messages did not reach the ingest"
            time.sleep(0.02)

    def close(self) -> None:
        self.camera.stop()
        self.ingest.shutdown()
        self.context.destroy(linger=0)


@pytest.fixture
def tapped(tmp_path: Path) -> Iterator[Tapped]:
    harness = Tapped(tmp_path)
    yield harness
    harness.close()


def _receive(sock: zmq.Socket, count: int) -> list[tuple[dict[str, Any], bytes]]:
    out = []
    while len(out) < count:
        assert sock.poll(5000), f"the tap sent {len(out)} of {count} frames"
        header, payload = sock.recv_multipart()
        out.append((json.loads(header), payload))
    return out


def test_the_tap_delivers_each_written_frame_as_its_header_and_the_chunk_bytes(
    tapped: Tapped,
) -> None:
    camera, ingest = tapped.camera, tapped.ingest
    pull = tapped.puller()
    time.sleep(0.2)  # the PULL connects asynchronously: let it be there for the first frame
    path = tapped.open_run("tapped")
    ingest.start_recording()
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 4000, SHAPE, dtype=np.uint16) for _ in range(4)]
    series_id = camera.replay(frames, n_images=12, rate_hz=100.0)
    assert camera.wait(5.0)
    stats = tapped.delivered()
    offered = _receive(pull, 12)
    ingest.close_run()

    assert stats["analysis_offers_sent"] == 12 and stats["analysis_offers_skipped"] == 0
    with h5py.File(path, "r") as f:
        detector = f[DETECTOR]
        image_ids = list(detector["image_id"][()])
        frame_times = detector["frame_time"][()]
        received_times = detector["received_time"][()]
        data = detector["data"]
        assert image_ids == list(range(12))
        for row, (header, payload) in enumerate(offered):
            assert header["image_id"] == image_ids[row] and header["series_id"] == series_id
            assert header["shape"] == list(SHAPE) and header["dtype"] == "<u2"
            assert header["compression"] == "bslz4"
            # the bytes the detector sent, which are the run file's chunk
            assert payload == s2.bslz4_compress(frames[row % 4])
            assert payload == data.id.read_direct_chunk((row, 0, 0))[1]
            # frame_time on the run clock as it was written; the file's may since have been
            # retimed, only ever earlier, as the clock envelope improved (sequence.py); and
            # an exposure's midpoint comes before the image arrives
            arrival = tapped.run_clock.from_wall_ns(header["received_ns"])
            assert arrival == pytest.approx(received_times[row], abs=1e-6)
            assert frame_times[row] - 1e-9 <= header["frame_time"] < arrival


def test_a_tap_nobody_reads_never_holds_ingest_back_and_counts_what_it_skipped(
    tapped: Tapped,
) -> None:
    camera, ingest = tapped.camera, tapped.ingest
    frames = [np.full(SHAPE, i, dtype=np.uint16) for i in range(3)]
    path = tapped.open_run("unread")
    ingest.start_recording()
    # Nobody connected: every offer is skipped.
    camera.replay(frames, n_images=20, rate_hz=200.0)
    assert camera.wait(5.0)
    stats = tapped.delivered()
    assert (stats["analysis_offers_sent"], stats["analysis_offers_skipped"]) == (0, 20)
    # A PULL that connects and never reads: the first ones fill the queues (ZeroMQ's and the
    # kernel's TCP buffers), the rest are skipped.
    pull = tapped.puller(hwm=1)
    time.sleep(0.2)
    camera.replay(frames, n_images=200)  # as fast as the ingest takes them
    assert camera.wait(10.0)
    stats = tapped.delivered()
    summary = ingest.close_run()

    assert summary["frames_written"] == 220
    assert summary["frames_dropped"] == summary["frames_missing"] == 0
    sent, skipped = stats["analysis_offers_sent"], stats["analysis_offers_skipped"]
    assert sent + skipped == 220
    assert sent > 0 and skipped > 20
    with h5py.File(path, "r") as f:
        assert f[f"{DETECTOR}/data"].shape[0] == 220
    pull.close(linger=0)


def test_frames_of_an_open_run_are_offered_while_not_recording_and_never_without_a_run(
    tapped: Tapped,
) -> None:
    camera, ingest = tapped.camera, tapped.ingest
    pull = tapped.puller()
    time.sleep(0.2)
    frames = [np.zeros(SHAPE, dtype=np.uint16)]
    camera.replay(frames, n_images=5, rate_hz=100.0)  # no run
    assert camera.wait(5.0)
    assert tapped.delivered()["analysis_offers_sent"] == 0
    tapped.open_run("not-recording")  # open, not recording: offered, not written
    camera.replay(frames, n_images=5, rate_hz=100.0)
    assert camera.wait(5.0)
    stats = tapped.delivered()
    offered = _receive(pull, 5)
    summary = ingest.close_run()
    assert stats["analysis_offers_sent"] == 5 and summary["frames_written"] == 0
    assert [header["image_id"] for header, _ in offered] == list(range(5))
    assert all(np.isfinite(header["frame_time"]) for header, _ in offered)


def test_analysis_results_go_to_the_open_run_and_are_counted_without_one(tapped: Tapped) -> None:
    ingest = tapped.ingest
    ingest.sync()  # records never wait: before the channel is up they are dropped (counted)
    ingest.write_analysis({"kind": "spectrum", "frame_time": 1.5, "d_spacing_nm": 0.236})
    stats = ingest.sync()
    assert stats["analysis_results_without_run_total"] == 1
    assert stats["analysis_results_written_total"] == 0
    tapped.open_run("results")
    ingest.write_analysis({"kind": "front", "frame_time": 2.0, "position_nm": 41.0})
    ingest.write_analysis({"kind": "front", "frame_time": 2.5, "position_nm": float("nan")})
    stats = ingest.sync()
    ingest.close_run()
    assert stats["analysis_results_written_total"] == 2
    assert stats["errors_total"] == 0
    with pytest.raises(TypeError):
        ingest.write_analysis({"not json": object()})


def test_an_unusable_analysis_endpoint_is_refused_at_start_naming_it(tmp_path: Path) -> None:
    context = zmq.Context()
    taken = context.socket(zmq.PUSH)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    camera = SimulatedCamera(SimStation(seed=0), port=0, shape=SHAPE)
    camera.start()
    try:
        config = ingest_config(camera.endpoints["stream2"], tmp_path)
        ingest = IngestClient(config, analysis_endpoint=f"tcp://127.0.0.1:{port}")
        with pytest.raises(IngestError, match=r"^analysis endpoint 'tcp://127\.0\.0\.1:\d+': "):
            ingest.start()
        assert not ingest.alive
    finally:
        camera.stop()
        taken.close(linger=0)
        context.term()
