"""The ingest process end to end: simulated camera -> Stream V2 over real ZeroMQ (TCP) ->
IngestProcess (a real spawned process, fed by the IngestClient over real ipc sockets) ->
real HDF5 run file, read back with h5py (SWMR while it is written, and after a SIGKILL).

Small frames (128 x 128 at 100 frames/s) keep each test to a few seconds. One camera and
one ingest process serve the tests that share them (each opens its own run); a test that
kills its process or needs another config gets its own camera and process (a PUSH socket
deals its frames out round-robin, so every ingest process has a camera of its own).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters for reading)
import numpy as np
import pytest
from ingest_setup import DETECTOR, GEOMETRY, SHAPE, ingest_config

from insitu_daq.core.clock import RunClock
from insitu_daq.core.records import Event, EventKind, bias_samples
from insitu_daq.drivers.stream2 import ImageMessage, decode_message
from insitu_daq.ingest import IngestClient, IngestError, geometry_of_image
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata
from insitu_daq.sim import stream2_encode as s2
from insitu_daq.sim.camera import SimulatedCamera
from insitu_daq.sim.station import SimStation

RATE_HZ = 100.0


def _camera(**kwargs: Any) -> SimulatedCamera:
    station = SimStation(seed=0)
    with station.model() as model:
        model.set_beam(True)
    kwargs.setdefault("shape", SHAPE)
    kwargs.setdefault("frame_rate_hz", RATE_HZ)
    camera = SimulatedCamera(station, port=0, **kwargs)
    camera.start()
    return camera


class Harness:
    """A camera and the ingest process listening to it; events from the callback."""

    def __init__(self, tmp: Path, camera_kwargs: dict | None = None, **detector: Any) -> None:
        self.tmp = tmp
        self.camera = _camera(**(camera_kwargs or {}))
        self.events: list[dict[str, Any]] = []
        config = ingest_config(self.camera.endpoints["stream2"], tmp, **detector)
        self.ingest = IngestClient(config, on_event=self.events.append)
        try:
            self.ingest.start()
        except BaseException:
            self.camera.stop()
            raise

    def open_run(
        self, name: str, geometry: FrameGeometry | None = GEOMETRY, time_scale: float = 1.0
    ) -> tuple:
        clock = RunClock(
            time_scale, start_ns=time.time_ns(), start_monotonic_ns=time.monotonic_ns()
        )
        meta = RunMetadata(run_id=name, title=f"ingest test {name}", start_time_ns=clock.start_ns)
        path = self.tmp / f"{name}.h5"
        reply = self.ingest.open_run(meta, path, clock, geometry)
        return path, clock, reply

    def close(self) -> None:
        self.camera.stop()
        self.ingest.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    harness = Harness(tmp_path_factory.mktemp("ingest"))
    yield harness
    harness.close()


@pytest.fixture
def own(tmp_path: Path) -> Iterator[list[Harness]]:
    """Harnesses a test makes for itself, closed at its end whatever happens."""
    made: list[Harness] = []
    yield made
    for harness in made:
        harness.close()


def _sample(clock: RunClock) -> np.ndarray:
    """One bias sample now: voltage and current linear in run time (exactly interpolable)."""
    batch = bias_samples(1)
    t = clock.now()
    batch["time"], batch["time_error"] = t, 1e-4
    batch["voltage"], batch["setpoint"] = 0.5 + 0.1 * t, 0.5
    batch["current"], batch["status"] = 1e-9 * (1 + t), 0
    return batch


def _delivered(harness: Harness) -> None:
    """Wait until the ingest process has read every message the camera sent."""
    _wait_for(
        lambda: (
            harness.ingest.sync()["messages_received_total"] >= harness.camera.messages_sent_total
        ),
        what="the camera's messages to reach the ingest process",
    )


def _wait_for(predicate, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _columns(f: h5py.File) -> dict[str, np.ndarray]:
    detector = f[DETECTOR]
    names = ("image_id", "series_id", "frame_time", "detector_start_time", "detector_stop_time")
    names += ("received_time", "bias_voltage", "current", "detector_clock_offset")
    return {name: detector[name][()] for name in names}


def _events(f: h5py.File) -> list[tuple[str, str]]:
    kinds = [k.decode() for k in f["/entry/events/kind"][()]]
    messages = [m.decode() for m in f["/entry/events/message"][()]]
    return list(zip(kinds, messages, strict=True))


# ----- the healthy path -----------------------------------------------------------------------
def test_every_frame_sent_is_in_the_file_in_order_on_one_clock_with_its_bias(
    shared: Harness,
) -> None:
    camera, ingest = shared.camera, shared.ingest
    path, clock, reply = shared.open_run("healthy")
    assert reply["geometry_source"] == "the daemon"
    ingest.start_recording()
    sent_before = camera.images_sent_total
    ingest.write_samples(_sample(clock))
    samples_sent = 1
    series_id = camera.arm(n_images=60)
    while camera.armed:  # bias samples at ~50 Hz while the camera streams
        ingest.write_samples(_sample(clock))
        samples_sent += 1
        time.sleep(0.02)
    _delivered(shared)
    ingest.write_samples(_sample(clock))
    samples_sent += 1
    ingest.write_event(Event(clock.now(), EventKind.MARK, "hello from the daemon"))
    positions_before = ingest.sync()["holder_positions_written_total"]
    ingest.write_series("holder_position", [(clock.now(), 0.002, 1234.5)])
    with pytest.raises(ValueError, match="unknown time series 'temperature'; known: holder_pos"):
        ingest.write_series("temperature", [(clock.now(), 300.0)])  # no log declares it
    ingest.sync()
    ingest.stop_recording()
    summary = ingest.close_run()

    assert camera.images_sent_total - sent_before == 60
    assert summary["closed"] and summary["frames_written"] == 60
    assert summary["frames_dropped"] == summary["frames_missing"] == summary["gaps"] == 0
    with h5py.File(path, "r") as f:
        c = _columns(f)
        assert list(c["image_id"]) == list(range(60))
        assert set(c["series_id"]) == {series_id}
        assert np.all(np.diff(c["frame_time"]) > 0)
        # one mapping per series: frame_time steps exactly as the detector's own midpoints
        midpoints = (c["detector_start_time"] + c["detector_stop_time"]) / 2
        np.testing.assert_allclose(np.diff(c["frame_time"]), np.diff(midpoints), atol=1e-6)
        # ... and that mapping is the lower envelope of (arrival - detector stop time)
        envelope = np.min(c["received_time"] - c["detector_stop_time"])
        np.testing.assert_allclose(c["detector_clock_offset"], envelope, atol=1e-7)
        # The simulated camera's series_date is the wall instant of its detector time zero,
        # so here it is the truth: the mapping is late by the fastest transport, never early.
        date = f[f"{DETECTOR}/detector_series_date"][0].decode()
        truth = clock.from_wall_ns(round(datetime.fromisoformat(date).timestamp() * 1e9))
        assert 0 <= envelope - truth < 2e-3
        assert np.all(f[f"{DETECTOR}/detector_clock_offset_errors"][()] < 2e-3)
        # per-frame bias and current interpolated from the log at frame_time
        np.testing.assert_allclose(c["bias_voltage"], 0.5 + 0.1 * c["frame_time"], atol=1e-9)
        np.testing.assert_allclose(c["current"], 1e-9 * (1 + c["frame_time"]), rtol=1e-9)
        log_times = f["/entry/sample/bias_voltage/time"][()]
        assert len(log_times) == summary["samples_written"] == samples_sent
        assert log_times[0] < c["frame_time"][0] and log_times[-1] > c["frame_time"][-1]
        assert ("mark", "hello from the daemon") in _events(f)
        assert f["/entry/instrument/holder/position/value"][()].tolist() == [1234.5]
        data = f[f"{DETECTOR}/data"]
        assert data.shape == (60, *SHAPE)
        assert data[59].max() > 0  # stored bslz4 chunks decompress through the filter
    stats = ingest.sync()
    assert stats["holder_positions_written_total"] == positions_before + 1
    histogram = stats["hdf5_write_seconds"]  # one observation per write into HDF5
    assert histogram["count"] >= 60 + samples_sent + 2  # frames, sample batches, event, holder
    assert histogram["sum"] > 0
    assert histogram["cumulative_counts"] == sorted(histogram["cumulative_counts"])


def test_a_time_scaled_run_clock_counts_frame_times_in_station_seconds(shared: Harness) -> None:
    # `insitu-daq sim --time-scale 20`: the camera still runs in wall time (100 frames/s),
    # the run clock counts station seconds, so frames are 0.2 run-clock seconds apart.
    camera, ingest = shared.camera, shared.ingest
    path, clock, _ = shared.open_run("scaled", time_scale=20.0)
    ingest.start_recording()
    ingest.write_samples(_sample(clock))
    camera.arm(n_images=10)
    assert camera.wait(5.0)
    _delivered(shared)
    ingest.write_samples(_sample(clock))
    summary = ingest.close_run()
    assert summary["frames_written"] == 10
    with h5py.File(path, "r") as f:
        c = _columns(f)
    midpoints = (c["detector_start_time"] + c["detector_stop_time"]) / 2
    np.testing.assert_allclose(np.diff(c["frame_time"]), 20.0 * np.diff(midpoints), atol=1e-6)
    # arrival - midpoint = half an exposure + transport delay, whose envelope is the zero
    lag = c["received_time"] - c["frame_time"]
    assert lag.min() == pytest.approx(20.0 * camera.count_time_s / 2, abs=1e-6)
    np.testing.assert_allclose(c["bias_voltage"], 0.5 + 0.1 * c["frame_time"], atol=1e-9)


def test_camera_faults_are_counted_evented_and_ingest_goes_on(shared: Harness) -> None:
    camera, ingest = shared.camera, shared.ingest
    path, _, _ = shared.open_run("faults")
    ingest.start_recording()
    shared.events.clear()
    assert camera.send_raw(b"\x00 not a Stream V2 message")
    faults = {3: "malformed", 6: "duplicate", 10: "gap", 14: "swap", 20: "stale_series"}
    camera.arm(n_images=30, faults=faults)
    assert camera.wait(10.0)
    _delivered(shared)
    summary = ingest.close_run()

    assert summary["malformed"] == 2  # the garbage and the truncated copy of image 3
    assert summary["dropped_by_reason"]["duplicate"] == 1
    assert summary["dropped_by_reason"]["stale_series"] == 1
    assert summary["out_of_order"] == 1
    assert (summary["gaps"], summary["frames_missing"]) == (2, 2)  # 10 never sent, 20 stale
    expected_ids = [i for i in range(30) if i not in (10, 20)]
    assert summary["frames_written"] == len(expected_ids)
    with h5py.File(path, "r") as f:
        c = _columns(f)
        assert list(c["image_id"]) == expected_ids
        assert np.all(np.diff(c["frame_time"]) > 0)
        kinds = [kind for kind, _ in _events(f)]
    for kind, count in [
        (EventKind.MALFORMED, 2),
        (EventKind.DUPLICATE, 1),
        (EventKind.STALE, 1),
        (EventKind.GAP, 2),
        (EventKind.OUT_OF_ORDER, 1),
    ]:
        assert kinds.count(kind) == count, kind
        assert [e["kind"] for e in shared.events].count(kind) == count, kind
    assert all(e["data"]["source"] == "ingest" for e in shared.events)
    # A corrupt record on the daemon's channel (the client never sends one: injected here
    # through its private sender) is an error event, not the end of the process.
    errors_before = ingest.sync()["errors_total"]
    ingest._send_record([b"samples", b"\x00" * 7])  # 7 bytes: not a whole sample
    assert ingest.sync()["errors_total"] == errors_before + 1
    assert shared.events[-1]["kind"] == EventKind.ERROR
    assert ingest.alive
    # ... and the next series goes through untouched
    path, _, _ = shared.open_run("after-faults")
    ingest.start_recording()
    camera.arm(n_images=5)
    assert camera.wait(5.0)
    _delivered(shared)
    assert ingest.close_run()["frames_written"] == 5


def test_another_series_than_the_armed_one_is_not_written_nor_a_sign_of_the_detector(
    own: list[Harness], tmp_path: Path
) -> None:
    # [detector] control = "simplon": the daemon armed the detector for series 7 and told the
    # ingest so, but series 1 streams (someone else armed it): none of it is written, and the
    # recording says the detector is silent.
    harness = Harness(tmp_path, silent_after_s=0.3)
    own.append(harness)
    camera, ingest = harness.camera, harness.ingest
    camera.arm()
    _wait_for(lambda: ingest.sync()["frames_received_total"] > 5, what="series 1 streaming")
    harness.open_run("armed")
    ingest.start_recording(series_id=7)
    _wait_for(
        lambda: any(e["message"].startswith("detector silent") for e in harness.events),
        what="a detector silent event",
    )
    assert camera.disarm()
    _delivered(harness)
    summary = ingest.close_run()
    assert summary["frames_written"] == 0
    assert summary["dropped_by_reason"]["stale_series"] > 5  # series 1 went on all along


def test_only_frames_received_between_start_and_stop_recording_are_written(
    shared: Harness,
) -> None:
    camera, ingest = shared.camera, shared.ingest
    camera.arm()  # open-ended series, streaming before the run exists
    _wait_for(lambda: ingest.stats().get("detector", {}).get("geometry"), what="first frames")
    path, _, reply = shared.open_run("window", geometry=None)
    assert reply["geometry_source"] == "the stream"
    assert tuple(reply["geometry"]["shape"]) == SHAPE
    time.sleep(0.3)
    started = ingest.start_recording()
    time.sleep(0.4)
    stopped = ingest.stop_recording()
    time.sleep(0.3)
    assert camera.disarm()
    _delivered(shared)
    summary = ingest.close_run()

    with h5py.File(path, "r") as f:
        c = _columns(f)
    ids = c["image_id"]
    assert len(ids) == summary["frames_written"] > 10
    assert np.all(np.diff(ids) == 1)  # one unbroken stretch
    assert ids[0] > 0  # the frames before start_recording were not written ...
    assert summary["frames_not_recording"] > 0  # ... but received and counted
    # written frames arrived inside the recording window
    assert c["received_time"][0] >= started["time"] and c["received_time"][-1] <= stopped["time"]


def test_run_file_is_readable_while_it_is_written(shared: Harness) -> None:
    camera, ingest = shared.camera, shared.ingest
    path, clock, _ = shared.open_run("swmr")
    ingest.start_recording()
    camera.arm()
    try:
        with h5py.File(path, "r", swmr=True) as f:
            image_id = f[f"{DETECTOR}/image_id"]
            data = f[f"{DETECTOR}/data"]
            seen = []
            deadline = time.monotonic() + 5.0
            while len(seen) < 3 and time.monotonic() < deadline:
                ingest.write_samples(_sample(clock))
                time.sleep(0.25)
                image_id.refresh()
                data.refresh()
                n = image_id.shape[0]
                if n and (not seen or n > seen[-1]):
                    seen.append(n)
                    assert data.shape[0] >= n
                    assert list(image_id[:n]) == list(range(image_id[0], image_id[0] + n))
                    assert data[n - 1].max() > 0  # the newest flushed frame reads back
            assert len(seen) == 3, f"file did not grow while written: {seen}"
    finally:
        camera.disarm()
        ingest.close_run()


# ----- own processes --------------------------------------------------------------------------
def test_sigkill_leaves_a_file_with_everything_up_to_the_last_flush(
    own: list[Harness], tmp_path: Path
) -> None:
    harness = Harness(tmp_path)
    own.append(harness)
    camera, ingest = harness.camera, harness.ingest
    path, clock, _ = harness.open_run("killed")
    ingest.start_recording()
    camera.arm()
    deadline = time.monotonic() + 8.0
    while True:  # until a flush holds 30 frames and 20 samples
        ingest.write_samples(_sample(clock))
        time.sleep(0.02)
        run = ingest.stats().get("run") or {}
        if run.get("frames_flushed", 0) >= 30 and run.get("samples_flushed", 0) >= 20:
            break
        assert time.monotonic() < deadline, "no flush with 30 frames"
    flushed = ingest.stats()["run"]
    os.kill(ingest.pid, signal.SIGKILL)
    ingest.process.join(5.0)
    assert not ingest.alive
    camera.stop()  # (a disarm would wait for a receiver to take the frame in hand)

    # The writer died with the file open for SWMR writing: an SWMR reader opens it.
    with h5py.File(path, "r", swmr=True) as f:
        c = _columns(f)
        n = len(c["image_id"])
        assert n >= flushed["frames_flushed"]
        assert list(c["image_id"]) == list(range(c["image_id"][0], c["image_id"][0] + n))
        assert np.all(np.diff(c["frame_time"]) > 0)
        assert f[f"{DETECTOR}/data"].shape[0] >= n
        assert f[f"{DETECTOR}/data"][flushed["frames_flushed"] - 1].max() > 0
        assert len(f["/entry/sample/bias_voltage/value"]) >= flushed["samples_flushed"]
    # the client notices instead of hanging
    summary = ingest.close_run(timeout_s=2.0)
    assert summary["closed"] is False and "not running" in summary["error"]
    ingest.write_samples(_sample(clock))
    assert ingest.records_dropped_total >= 1


@pytest.mark.parametrize("archive", ["as_received", "none"])
def test_archive_stores_the_stream_bytes_or_raw_pixels_per_config(
    own: list[Harness], tmp_path: Path, archive: str
) -> None:
    harness = Harness(tmp_path, archive_compression=archive, default_shape=[64, 32])
    own.append(harness)
    camera, ingest = harness.camera, harness.ingest

    # Nothing from the detector yet: the geometry comes from the config after the timeout.
    path, _, reply = harness.open_run("defaults", geometry=None)
    assert reply["geometry_source"] == "the config"
    assert ingest.close_run()["frames_written"] == 0
    with h5py.File(path, "r") as f:
        assert f[f"{DETECTOR}/data"].shape == (0, 64, 32)
    with pytest.raises(IngestError, match="never overwritten"):
        harness.open_run("defaults")

    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 3000, SHAPE, dtype=np.uint16) for _ in range(3)]
    camera.replay(frames[:1], n_images=1)  # the detector announces its geometry
    assert camera.wait(5.0)
    _delivered(harness)
    path, _, reply = harness.open_run("archive", geometry=None)
    assert reply["geometry_source"] == "the stream"
    assert reply["geometry"]["compression"] == (None if archive == "none" else "bslz4")
    ingest.start_recording()
    camera.replay(frames, n_images=6, rate_hz=100.0)
    assert camera.wait(5.0)
    _delivered(harness)
    assert ingest.close_run()["frames_written"] == 6

    with h5py.File(path, "r") as f:
        data = f[f"{DETECTOR}/data"]
        plist = data.id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        for i in range(6):
            np.testing.assert_array_equal(data[i], frames[i % 3])
            _, chunk = data.id.read_direct_chunk((i, 0, 0))
            if archive == "none":
                assert chunk == frames[i % 3].tobytes()  # raw pixels in the chunk
            else:
                assert chunk == s2.bslz4_compress(frames[i % 3])  # the bytes the camera sent
    assert filters == ([] if archive == "none" else [32008])


@pytest.mark.parametrize("folder", ["r500k_bm_lz4_16bit", "r500k_bm_bslz4_32bit"])
def test_recorded_eiger2_series_without_start_is_stored_bit_exact_in_three_channels(
    own: list[Harness], tmp_path: Path, stream2_testdata: Path, folder: str
) -> None:
    messages = [p.read_bytes() for p in sorted((stream2_testdata / folder).glob("*.cbor"))]
    images = [m for m in map(decode_message, messages) if isinstance(m, ImageMessage)]
    harness = Harness(tmp_path)
    own.append(harness)
    config = harness.ingest.config.detector
    path, _, _ = harness.open_run("eiger2", geometry=geometry_of_image(images[0], config))
    harness.ingest.start_recording()
    for message in messages:  # the real detector's bytes, through the camera's PUSH socket
        assert harness.camera.send_raw(message)
    _delivered(harness)
    summary = harness.ingest.close_run()

    assert summary["frames_written"] == len(images) == 3
    assert summary["frames_dropped"] == summary["gaps"] == 0
    with h5py.File(path, "r") as f:
        detector = f[DETECTOR]
        assert list(detector["image_id"][()]) == [m.image_id for m in images]
        for name in images[0].channels:
            dataset = detector["data" if name == "threshold_1" else f"data_{name}"]
            for i, image in enumerate(images):
                channel = image.channels[name]
                assert dataset.id.read_direct_chunk((i, 0, 0))[1] == channel.payload
                np.testing.assert_array_equal(dataset[i], channel.to_array())


def test_an_unusable_detector_endpoint_is_refused_at_start_naming_the_field(
    tmp_path: Path,
) -> None:
    ingest = IngestClient(ingest_config("tcp://no-port-here", tmp_path))
    with pytest.raises(IngestError, match=r"^detector\.endpoint 'tcp://no-port-here': "):
        ingest.start()
    assert not ingest.alive
