"""The simulated camera streams Stream V2 over real ZeroMQ to the real receiver driver.

Everything here runs over TCP on loopback with ephemeral ports: SimulatedCamera (PUSH) ->
Stream2Receiver (PULL). Frames come from the real renderer and the shared model; the ground
truth in each image's user_data is checked against an independent replay of the model.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from insitu_daq.drivers.stream2 import (
    EndMessage,
    ImageMessage,
    Message,
    StartMessage,
    Stream2Receiver,
)
from insitu_daq.sim import stream2_encode as s2
from insitu_daq.sim.camera import DETECTOR_DESCRIPTION, Fault, SimulatedCamera
from insitu_daq.sim.model import NanobatteryModel
from insitu_daq.sim.station import SimStation

TIME_SCALE = 20.0
SMALL = (256, 256)
COMPLIANCE = 1e-7
TIP_SPEED = 1e9  # nm/s: the tip reaches contact within the 10 us setup step


@pytest.fixture
def station() -> SimStation:
    station = SimStation(seed=0, time_scale=TIME_SCALE)
    with station.model() as model:
        model.set_beam(True)
    return station


@pytest.fixture
def cameras() -> Iterator[list[SimulatedCamera]]:
    """Cameras created by a test, all stopped at its end whatever happens."""
    started: list[SimulatedCamera] = []
    yield started
    for camera in started:
        camera.stop()


def _camera(cameras: list[SimulatedCamera], station: SimStation, **kwargs) -> SimulatedCamera:
    kwargs.setdefault("shape", SMALL)
    camera = SimulatedCamera(station, port=0, **kwargs)
    cameras.append(camera)
    camera.start()
    return camera


def _series(receiver: Stream2Receiver, on_image=None) -> list[Message]:
    """Messages up to and including `end` (fails on a 5 s silence)."""
    messages: list[Message] = []
    while not messages or not isinstance(messages[-1], EndMessage):
        msg = receiver.receive(timeout_ms=5000)
        assert msg is not None, f"stream stalled after {len(messages)} messages"
        messages.append(msg)
        if on_image is not None and isinstance(msg, ImageMessage):
            on_image(msg)
    return messages


def _images(messages: list[Message]) -> list[ImageMessage]:
    return [m for m in messages if isinstance(m, ImageMessage)]


def test_series_brings_start_images_end_with_truth_of_the_model(
    station: SimStation, cameras: list[SimulatedCamera]
) -> None:
    # Contact and +4.3 V at a known model time, replayed on an independent model below.
    with station.model() as model:
        t_contact = model.time_s
        model.move_tip_to(2.0, TIP_SPEED)
        model.advance_to(t_contact + 1e-5)
        model.set_source(True, 4.3, COMPLIANCE)
    events: list[tuple[float, str]] = []
    camera = _camera(cameras, station)
    n_images = 12

    def bias_off_after_image_4(msg: ImageMessage) -> None:
        if msg.image_id == 4:
            with station.model() as model:
                model.set_source(False, 0.0, COMPLIANCE)
                events.append((model.time_s, "off"))

    with Stream2Receiver(camera.endpoints["stream2"]) as receiver:
        series_id = camera.arm(n_images=n_images)
        messages = _series(receiver, on_image=bias_off_after_image_4)
        assert receiver.malformed_total == 0

    start, images, end = messages[0], _images(messages), messages[-1]
    assert isinstance(start, StartMessage) and isinstance(end, EndMessage)
    assert len(messages) == n_images + 2
    assert [m.image_id for m in images] == list(range(n_images))
    ids = {(m.series_id, m.series_unique_id) for m in messages}
    assert ids == {(series_id, start.series_unique_id)}

    # The start message describes the series (spec field names).
    assert start.detector_description == DETECTOR_DESCRIPTION
    assert start.image_shape == SMALL
    assert start.channels == ["threshold_1"]
    assert start.number_of_images == n_images
    assert start.frame_time == pytest.approx(1 / 40)
    assert start.count_time == pytest.approx(1 / 40 - 100e-9)
    pixel_m = station.optics.pixel_size_nm * 1e-9
    assert start.pixel_size == (pytest.approx(pixel_m), pytest.approx(pixel_m))
    assert start.user_data["cell_parameters"] == dataclasses.asdict(NanobatteryModel().params)
    assert start.user_data["time_scale"] == TIME_SCALE

    # Each frame's truth is the model at its capture: replay the same inputs independently.
    reference = NanobatteryModel(seed=0)
    reference.advance_to(t_contact)
    reference.move_tip_to(2.0, TIP_SPEED)
    reference.advance_to(t_contact + 1e-5)
    reference.set_source(True, 4.3, COMPLIANCE)
    ((t_off, _),) = events
    biases = []
    for msg in images:
        truth, model_time = msg.user_data["truth"], msg.user_data["model_time_s"]
        assert truth["time_s"] == model_time
        if reference.time_s < t_off <= model_time:
            reference.advance_to(t_off)
            reference.set_source(False, 0.0, COMPLIANCE)
        reference.advance_to(model_time)
        assert truth["bias_volts"] == reference.applied_bias()
        assert truth["x"] == pytest.approx(reference.x, rel=1e-9, abs=1e-15)
        biases.append(truth["bias_volts"])
        # Detector clock: exposure of count_time centred on the capture instant.
        assert msg.real_time_s == pytest.approx(start.count_time, abs=1e-7)
        since_series_date = (msg.user_data["capture_time_ns"] * 1e-9) - msg.series_date.timestamp()
        assert float(msg.mid_time) == pytest.approx(since_series_date, abs=2e-6)
        frame = msg.channel().to_array()
        assert frame.shape == SMALL and frame.dtype == np.dtype("<u2")
    assert biases[0] == 4.3 and biases[-1] == 0.0  # the switch shows in the frames' truth
    xs = [m.user_data["truth"]["x"] for m in images]
    assert xs[0] < xs[4]  # delithiating under +4.3 V
    starts = [m.start_time for m in images]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


def test_compressed_and_uncompressed_streams_carry_identical_frames(
    station: SimStation, cameras: list[SimulatedCamera]
) -> None:
    """Same seed, same frame index, same (static) scene: same pixels, whatever the codec."""
    frames: dict[str | None, list[np.ndarray]] = {}
    for compression in ("bslz4", "lz4", None):
        camera = _camera(cameras, station, compression=compression, seed=3)
        with Stream2Receiver(camera.endpoints["stream2"]) as receiver:
            camera.arm(n_images=3)
            images = _images(_series(receiver))
        assert [m.channel().compression for m in images] == [compression] * 3
        frames[compression] = [m.channel().to_array() for m in images]
    for compression in ("lz4", None):
        for ours, reference in zip(frames[compression], frames["bslz4"], strict=True):
            np.testing.assert_array_equal(ours, reference)
    first, second = frames["bslz4"][:2]
    assert first.max() > 0  # beam on: counts, not an empty detector
    assert not np.array_equal(first, second)  # shot noise differs frame to frame


def test_malformed_message_mid_stream_is_counted_and_the_stream_goes_on(
    station: SimStation, cameras: list[SimulatedCamera]
) -> None:
    camera = _camera(cameras, station)
    with Stream2Receiver(camera.endpoints["stream2"]) as receiver:
        assert camera.send_raw(b"\x00garbage before the series")
        camera.arm(n_images=6, faults={2: Fault.MALFORMED})
        messages = _series(receiver)
        assert receiver.malformed_total == 2
    assert [m.image_id for m in _images(messages)] == list(range(6))
    assert camera.faults_injected_total == 1


def test_injected_stream_faults_reach_the_receiver_as_described(
    station: SimStation, cameras: list[SimulatedCamera]
) -> None:
    camera = _camera(cameras, station)
    faults = {1: "duplicate", 3: "gap", 4: "swap", 6: "stale_series"}
    with Stream2Receiver(camera.endpoints["stream2"]) as receiver:
        series_id = camera.arm(n_images=8, faults=faults)
        images = _images(_series(receiver))
        assert [m.image_id for m in images] == [0, 1, 1, 2, 5, 4, 6, 7]
        stale = [m for m in images if m.series_id != series_id]
        assert [m.image_id for m in stale] == [6]
        assert stale[0].series_unique_id != images[0].series_unique_id
        # inject_fault() applies to the next image produced, here image 0 of a new series
        camera.inject_fault(Fault.DUPLICATE)
        camera.arm(n_images=2)
        assert [m.image_id for m in _images(_series(receiver))] == [0, 0, 1]
        assert receiver.malformed_total == 0
    assert camera.faults_injected_total == 5


def test_replay_streams_fixed_frames_without_rendering(
    station: SimStation, cameras: list[SimulatedCamera]
) -> None:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 4000, (128, 128), dtype=np.uint16) for _ in range(2)]
    camera = _camera(cameras, station)
    with Stream2Receiver(camera.endpoints["stream2"]) as receiver:
        camera.replay(frames, n_images=10)
        messages = _series(receiver)
        start, images = messages[0], _images(messages)
        assert isinstance(start, StartMessage) and start.image_shape == (128, 128)
        assert [m.image_id for m in images] == list(range(10))
        for msg in images:
            np.testing.assert_array_equal(msg.channel().to_array(), frames[msg.image_id % 2])
        assert all(a.stop_time <= b.start_time for a, b in itertools.pairwise(images))

        encoded = s2.encode_channels({"threshold_1": frames[1]}, "lz4")
        camera.replay([encoded], n_images=4, rate_hz=200.0)
        images = _images(_series(receiver))
        assert [m.image_id for m in images] == list(range(4))
        assert {m.channel().payload for m in images} == {
            s2.lz4_compress(frames[1])
        }  # sent as encoded, never recompressed
        np.testing.assert_array_equal(images[-1].channel().to_array(), frames[1])
    assert camera.images_sent_total == 14
    assert camera._renderer is None  # replay never built a renderer


def test_full_size_frames_go_straight_into_hdf5_chunks(
    station: SimStation, cameras: list[SimulatedCamera], tmp_path: Path
) -> None:
    camera = _camera(cameras, station, shape=(1024, 1024))
    with Stream2Receiver(camera.endpoints["stream2"]) as receiver:
        camera.arm(n_images=3)
        images = _images(_series(receiver))
    assert [m.image_id for m in images] == [0, 1, 2]
    channel = images[0].channel()
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        dset = f.create_dataset(
            "data",
            shape=(3, 1024, 1024),
            dtype=channel.dtype,
            chunks=(1, 1024, 1024),
            **channel.hdf5_filter(),
        )
        for msg in images:
            dset.id.write_direct_chunk((msg.image_id, 0, 0), msg.channel().direct_chunk())
        for msg in images:
            np.testing.assert_array_equal(dset[msg.image_id], msg.channel().to_array())
    assert images[0].channel().to_array().max() > 0


def test_disarm_ends_an_open_series_and_stop_never_hangs(
    station: SimStation, cameras: list[SimulatedCamera]
) -> None:
    camera = _camera(cameras, station)
    with Stream2Receiver(camera.endpoints["stream2"]) as receiver:
        camera.arm()  # no image count: runs until disarm
        with pytest.raises(RuntimeError, match="armed"):
            camera.arm()
        first = [receiver.receive(timeout_ms=5000) for _ in range(3)]
        assert isinstance(first[0], StartMessage) and first[0].number_of_images == 0
        assert camera.disarm()
        rest = _series(receiver)
        ids = [m.image_id for m in _images(first + rest)]
        assert ids == list(range(len(ids))) and len(ids) >= 2
        assert not camera.armed

    # Nobody listening: the series waits on the PUSH socket; stop() must still return.
    lonely = _camera(cameras, station)
    lonely.arm()
    lonely.stop()
    lonely.stop()  # idempotent
    assert not lonely.armed
