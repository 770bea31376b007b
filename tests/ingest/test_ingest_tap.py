"""The frame tap and the analysis record: the ingest process offers each image of an open run
to the live analysis over a real ZeroMQ PUSH socket it binds (holding offers back while it is
behind the detector, but for a floor rate), and takes analysis results back for the run file
through the daemon's ordered channel (real camera simulator over TCP, a real spawned ingest
process, a real HDF5 file read back with h5py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters for reading)
import numpy as np
import pytest
import zmq
from ingest_setup import DETECTOR, GEOMETRY, SHAPE, ingest_config

from insitu_daq.core.clock import RunClock
from insitu_daq.core.config import AnalysisConfig
from insitu_daq.drivers.stream2 import ImageMessage, decode_message
from insitu_daq.ingest import AnalysisTap, IngestClient, IngestError
from insitu_daq.runfile.writer import RunMetadata
from insitu_daq.service.metrics import DaemonMetrics
from insitu_daq.sim import stream2_encode as s2
from insitu_daq.sim.camera import SimulatedCamera
from insitu_daq.sim.station import SimStation

TAP = "tcp://127.0.0.1:0"


class Tapped:
    """A camera, the ingest process listening to it with its tap bound, and runs to open."""

    def __init__(self, tmp: Path, analysis: AnalysisConfig | None = None) -> None:
        self.tmp = tmp
        self.camera = SimulatedCamera(SimStation(seed=0), port=0, shape=SHAPE, frame_rate_hz=100.0)
        self.camera.start()
        config = ingest_config(self.camera.endpoints["stream2"], tmp)
        if analysis is not None:
            config = config.model_copy(update={"analysis": analysis})
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
        self.ingest.stop()
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
    series_id = camera.replay(frames, n_images=12, rate_hz=40.0)  # the camera's pace
    assert camera.wait(5.0)
    stats = tapped.delivered()
    offered = _receive(pull, 12)
    ingest.close_run()

    assert stats["analysis_offers_sent"] == 12 and stats["analysis_offers_skipped"] == 0
    assert stats["analysis_offers_withheld"] == 0  # caught up after every frame
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
            # retimed, only ever earlier, as the clock envelope improved (ingest/sequence.py); and
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
    # Nobody connected: every offer is skipped (or withheld, should the ingest fall behind).
    camera.replay(frames, n_images=20, rate_hz=200.0)
    assert camera.wait(5.0)
    stats = tapped.delivered()
    assert stats["analysis_offers_sent"] == 0
    assert stats["analysis_offers_skipped"] + stats["analysis_offers_withheld"] == 20
    assert stats["analysis_last_offered_id"] == 19  # the newest is offered once caught up
    # A PULL that connects and never reads: the first ones fill the queues (ZeroMQ's and the
    # kernel's TCP buffers: noise frames, which do not compress), the rest are skipped.
    pull = tapped.puller(hwm=1)
    time.sleep(0.2)
    noise = np.random.default_rng(1).integers(0, 60000, (8, *SHAPE), dtype=np.uint16)
    camera.replay(list(noise), n_images=200, rate_hz=200.0)
    assert camera.wait(10.0)
    stats = tapped.delivered()
    summary = ingest.close_run()

    assert summary["frames_written"] == 220
    assert summary["frames_dropped"] == summary["frames_missing"] == 0
    sent, skipped = stats["analysis_offers_sent"], stats["analysis_offers_skipped"]
    assert sent + skipped + stats["analysis_offers_withheld"] == 220
    assert sent > 0 and skipped > 20
    with h5py.File(path, "r") as f:
        assert f[f"{DETECTOR}/data"].shape[0] == 220
    pull.close(linger=0)


def test_a_backlog_withholds_offers_but_the_floor_feeds_the_analysis_and_the_newest_comes_last(
    tmp_path: Path,
) -> None:
    floor_hz = 50.0
    tapped = Tapped(tmp_path, AnalysisConfig(max_rate_hz=100.0, min_rate_hz=floor_hz))
    try:
        camera, ingest = tapped.camera, tapped.ingest
        pull = tapped.puller(hwm=5000)  # takes all it is sent
        time.sleep(0.2)
        path = tapped.open_run("backlog")
        ingest.start_recording()
        rng = np.random.default_rng(5)
        frames = [rng.integers(0, 4000, SHAPE, dtype=np.uint16) for _ in range(4)]
        n_frames = 3000
        camera.replay(frames, n_images=n_frames)  # as fast as the ingest takes them: a backlog
        assert camera.wait(15.0)
        stats = tapped.delivered()
        summary = ingest.close_run()
        offered: list[int] = []
        while pull.poll(500):
            header, _ = pull.recv_multipart()
            offered.append(json.loads(header)["image_id"])
        metrics = DaemonMetrics("127.0.0.1", 0)  # not started: its registry is read directly
        metrics.observe_ingest_stats(stats)
    finally:
        tapped.close()

    # Nothing of the archive given up for the analysis.
    assert summary["frames_written"] == n_frames
    assert summary["frames_dropped"] == summary["frames_missing"] == 0
    sent, withheld = stats["analysis_offers_sent"], stats["analysis_offers_withheld"]
    # (a few skips: on a loaded PC the ingest's ZeroMQ I/O thread may not have moved the
    # last two sent out of the tap's queue of 2 before the next send)
    skipped = stats["analysis_offers_skipped"]
    assert sent + skipped + withheld == n_frames
    assert withheld > n_frames // 2  # behind most of the time: offers held back
    assert offered == sorted(offered) and len(offered) == sent
    # The floor: while the ingest worked through the backlog, the analysis still had a frame
    # every 1/floor_hz s (a third of that allowed for scheduling), far more than the moments
    # the ingest happened to catch up would give.
    with h5py.File(path, "r") as f:
        received = f[f"{DETECTOR}/received_time"][()]
    busy_s = float(received[-1] - received[0])
    assert sent >= busy_s * floor_hz / 3
    # Once caught up, the newest frame (held back until then) is offered.
    assert stats["analysis_last_offered_id"] == n_frames - 1
    value = metrics.registry.get_sample_value
    metric = "insitu_daq_analysis_frames_skipped_total"
    assert value(metric, {"reason": "ingest_busy"}) == withheld
    assert value(metric, {"reason": "tap_full"}) == skipped


def test_a_run_closed_during_a_backlog_gives_its_held_frame_to_no_one(tmp_path: Path) -> None:
    """The image held back while the ingest was behind is counted as withheld when its run
    closes, and never sent: every image offered during the run is accounted for once, and
    nothing more reaches the analysis after the close."""
    tapped = Tapped(tmp_path, AnalysisConfig(max_rate_hz=100.0, min_rate_hz=1.0))
    try:
        camera, ingest = tapped.camera, tapped.ingest
        pull = tapped.puller(hwm=5000)
        time.sleep(0.2)
        tapped.open_run("closed_early")
        ingest.start_recording()
        rng = np.random.default_rng(6)
        frames = [rng.integers(0, 4000, SHAPE, dtype=np.uint16) for _ in range(4)]
        camera.replay(frames, n_images=4000)  # a backlog...
        time.sleep(0.3)
        summary = ingest.close_run()  # ... closed in its middle
        at_close = ingest.sync()
        assert camera.wait(20.0)
        after = tapped.delivered()
        received: list[int] = []
        while pull.poll(500):
            header, _ = pull.recv_multipart()
            received.append(json.loads(header)["image_id"])
    finally:
        tapped.close()

    written = summary["frames_written"]
    assert 0 < written < 4000  # closed while frames were still coming
    sent, skipped = at_close["analysis_offers_sent"], at_close["analysis_offers_skipped"]
    withheld = at_close["analysis_offers_withheld"]
    assert withheld > 0 and sent + skipped + withheld == written  # the held one included
    # No run, no offers: the frames after the close reached the ingest but not the analysis.
    for key in ("analysis_offers_sent", "analysis_offers_skipped", "analysis_offers_withheld"):
        assert after[key] == at_close[key]
    assert len(received) == sent and max(received) < written


def _image(image_id: int) -> ImageMessage:
    frame = np.full(SHAPE, image_id, dtype=np.uint16)
    stamp = (image_id, 40)
    raw = s2.image_message(1, "TAP", image_id, datetime.now(timezone.utc), stamp, stamp, (1, 40),
                           {"threshold_1": frame})  # fmt: skip
    image = decode_message(raw, time.time_ns())
    assert isinstance(image, ImageMessage)
    return image


def test_the_tap_holds_the_newest_image_while_behind_and_sends_it_once_caught_up() -> None:
    context = zmq.Context()
    tap = AnalysisTap(context, "tcp://127.0.0.1:0", min_rate_hz=0.01)  # floor: every 100 s
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(tap.bound_endpoint)
    try:
        time.sleep(0.2)  # connected before the first send

        def received() -> int:
            """The image id the analysis gets; then a pause as between frames: the tap sees
            its queue of 2 drained only when ZeroMQ next reads its commands (at most every
            ~1 ms of sends), and a send before that would be a skip."""
            assert pull.poll(5000)
            image_id = json.loads(pull.recv_multipart()[0])["image_id"]
            time.sleep(0.02)
            return image_id

        assert tap.offer(_image(0), 0.0, behind=True)  # the analysis had nothing yet: the floor
        assert received() == 0
        assert not tap.offer(_image(1), 0.025, behind=True)  # held...
        assert not tap.offer(_image(2), 0.050, behind=True)  # ...replaced by a newer one
        assert tap.holding and tap.offers_withheld == 1
        assert tap.caught_up()  # the ingest has caught up: the newest goes
        assert received() == 2
        assert not tap.holding and not tap.caught_up()
        assert not tap.offer(_image(3), 0.075, behind=True)
        tap.discard_held()  # its run closed
        assert tap.offer(_image(4), 0.100)  # caught up: sent at once
        assert received() == 4
        assert not pull.poll(100)  # nothing else: 1 and 3 never went
        assert (tap.offers_sent, tap.offers_withheld, tap.offers_skipped) == (3, 2, 0)
    finally:
        tap.close()
        pull.close(linger=0)
        context.term()


def test_the_floor_sends_an_image_while_behind_once_its_interval_has_passed() -> None:
    context = zmq.Context()
    tap = AnalysisTap(context, "tcp://127.0.0.1:0", min_rate_hz=20.0)  # every 50 ms
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(tap.bound_endpoint)
    try:
        time.sleep(0.2)
        assert tap.offer(_image(0), 0.0, behind=True)
        assert pull.poll(5000) and json.loads(pull.recv_multipart()[0])["image_id"] == 0
        time.sleep(0.06)  # longer than 1 / min_rate_hz: the next one is due
        assert tap.offer(_image(1), 0.025, behind=True)
        assert pull.poll(5000) and json.loads(pull.recv_multipart()[0])["image_id"] == 1
        with pytest.raises(ValueError, match="min_rate_hz"):
            AnalysisTap(context, "tcp://127.0.0.1:0", min_rate_hz=0.0)
    finally:
        tap.close()
        pull.close(linger=0)
        context.term()


def test_at_a_steady_camera_rate_every_frame_is_offered_and_none_withheld(
    tapped: Tapped,
) -> None:
    camera, ingest = tapped.camera, tapped.ingest
    pull = tapped.puller()
    time.sleep(0.2)
    tapped.open_run("paced")
    ingest.start_recording()
    frames = [np.full(SHAPE, i, dtype=np.uint16) for i in range(5)]
    camera.replay(frames, n_images=40, rate_hz=40.0)  # 1 s at the camera's frame rate
    assert camera.wait(5.0)
    stats = tapped.delivered()
    offered = _receive(pull, 40)
    ingest.close_run()
    assert stats["analysis_offers_withheld"] == 0
    assert stats["analysis_offers_sent"] == 40
    assert [header["image_id"] for header, _ in offered] == list(range(40))


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
