"""Series that start late, restart or change geometry mid-run, end to end: the real EIGER2
messages (shared/testdata) through a real ZeroMQ PUSH (the simulated camera's socket,
`send_raw`) -> the ingest process (real, spawned) -> the run file, read back with h5py.

Nothing of a well-formed series is dropped and every frame is stored bit for bit as the
detector sent it, whichever geometry the run opened with. The recorded series have no `start`
message (as when a receiver connects after arming); one test gives a series its `start`.
Restarted series are the recorded messages with a new series_id/series_unique_id written
into their CBOR envelope: their payloads stay the detector's bytes.

Last, the per-frame imaging state over the ingest's wire: the daemon's `set_imaging` and
`imaging_watermark` records reach the ingest after the frames they cover, and each frame's
mode is still the one by its own time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters for reading)
import numpy as np
import pytest
from ingest_setup import DETECTOR, GEOMETRY, SHAPE
from test_ingest import Harness, _delivered

from insitu_daq.core.imaging import ImagingState
from insitu_daq.core.records import EventKind
from insitu_daq.drivers.stream2 import ImageMessage, decode_message
from insitu_daq.sim import stream2_encode as s2

FOLDERS = ("r500k_bm_bslz4_8bit", "r500k_bm_bslz4_16bit", "r500k_bm_bslz4_32bit")


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    made = Harness(tmp_path)
    yield made
    made.close()


def _messages(folder: Path) -> list[bytes]:
    """A recorded series: its image messages and its end, as the detector sent them."""
    return [p.read_bytes() for p in sorted(folder.glob("*.cbor"))]


def _images(messages: list[bytes]) -> list[ImageMessage]:
    return [m for m in map(decode_message, messages) if isinstance(m, ImageMessage)]


def _restarted(messages: list[bytes], series_id: int, unique_id: str) -> list[bytes]:
    """The same messages as a series the detector was armed for again: new identity in the
    CBOR envelope, payloads untouched."""
    out = []
    for raw in messages:
        fields = dict(cbor2.loads(raw))
        fields["series_id"], fields["series_unique_id"] = series_id, unique_id
        out.append(cbor2.dumps(cbor2.CBORTag(55799, fields)))
    return out


def _send(harness: Harness, messages: list[bytes]) -> None:
    for message in messages:
        assert harness.camera.send_raw(message)


def _assert_stored(detector: h5py.Group, images: list[ImageMessage]) -> None:
    """`detector` holds exactly these images, each channel's chunk the detector's bytes."""
    assert list(detector["image_id"][()]) == [m.image_id for m in images]
    assert list(detector["series_id"][()]) == [m.series_id for m in images]
    channels = list(images[0].channels)
    for name in channels:
        dataset = detector["data" if name == channels[0] else f"data_{name}"]
        assert dataset.shape == (len(images), *images[0].channels[name].shape)
        for i, image in enumerate(images):
            assert dataset.id.read_direct_chunk((i, 0, 0))[1] == image.channels[name].payload


def _events(path: Path) -> list[tuple[str, str]]:
    with h5py.File(path, "r") as f:
        kinds = [k.decode() for k in f["/entry/events/kind"][()]]
        messages = [m.decode() for m in f["/entry/events/message"][()]]
    return list(zip(kinds, messages, strict=True))


def _nothing_lost(summary: dict, frames: int) -> None:
    assert summary["closed"] and summary["frames_written"] == frames
    assert summary["frames_received"] == frames
    assert summary["frames_dropped"] == summary["frames_missing"] == summary["gaps"] == 0


def test_a_series_beginning_3_s_after_the_run_opened_is_stored_whole(
    harness: Harness, stream2_testdata: Path
) -> None:
    messages = _messages(stream2_testdata / "r500k_bm_bslz4_16bit")
    path, _, reply = harness.open_run("late", geometry=None)  # the detector is silent
    assert reply["geometry_source"] == "the config"
    assert tuple(reply["geometry"]["channels"]) == ("threshold_1",)
    assert tuple(reply["geometry"]["shape"]) == (1024, 1024)
    harness.ingest.start_recording()
    time.sleep(3.0)
    _send(harness, messages)
    _delivered(harness)
    summary = harness.ingest.close_run()

    _nothing_lost(summary, 3)
    assert summary["file_layout_changes"] == 1
    with h5py.File(path, "r") as f:
        _assert_stored(f[DETECTOR], _images(messages))  # the contract's paths hold them
        assert "detector_1" not in f["/entry/instrument"]
    assert any(kind == EventKind.LAYOUT and "re-made" in m for kind, m in _events(path))
    assert any(e["kind"] == EventKind.LAYOUT for e in harness.events)


def test_a_series_restarted_with_a_new_id_continues_in_the_same_datasets(
    harness: Harness, stream2_testdata: Path
) -> None:
    recorded = _messages(stream2_testdata / "r500k_bm_bslz4_16bit")
    first = recorded[:-1]  # aborted: no `end`
    second = _restarted(recorded, 2, "RESTARTED-2")  # re-armed, a new series_id
    third = _restarted(recorded, 1, "RESTARTED-1")  # a rebooted detector counting from 1
    path, _, _ = harness.open_run("restart", geometry=None)
    harness.ingest.start_recording()
    for series in (first, second, third):
        _send(harness, series)
    _delivered(harness)
    summary = harness.ingest.close_run()

    _nothing_lost(summary, 9)
    assert summary["file_layout_changes"] == 1  # the config geometry, re-made once
    assert [s["series_unique_id"] for s in summary["series"]] == [
        "01GRXWT80JSDY2FNW8SGCCDZD9",
        "RESTARTED-2",
        "RESTARTED-1",
    ]
    with h5py.File(path, "r") as f:
        _assert_stored(f[DETECTOR], _images(first + second + third))
        assert np.all(np.diff(f[f"{DETECTOR}/frame_time"][()]) >= 0)  # (never decreasing)


def test_each_pixel_type_and_compression_mid_run_gets_datasets_of_its_own(
    harness: Harness, stream2_testdata: Path
) -> None:
    # Four recorded series, one after the other (each with its `end`; all are series_id 1,
    # as the detector numbered them): uint8, uint16, uint32 bslz4, then uint16 lz4.
    series = [_messages(stream2_testdata / folder) for folder in FOLDERS]
    series.append(_messages(stream2_testdata / "r500k_bm_lz4_16bit"))
    path, _, _ = harness.open_run("dtypes", geometry=None)
    harness.ingest.start_recording()
    for messages in series:
        _send(harness, messages)
    _delivered(harness)
    summary = harness.ingest.close_run()

    _nothing_lost(summary, 12)
    assert [g["dtype"] for g in summary["geometries"]] == ["|u1", "<u2", "<u4", "<u2"]
    assert [g["compression"] for g in summary["geometries"]] == ["bslz4"] * 3 + ["lz4"]
    with h5py.File(path, "r") as f:
        for k, messages in enumerate(series):
            _assert_stored(f[DETECTOR if k == 0 else f"{DETECTOR}_{k}"], _images(messages))
        for k in (1, 2, 3):
            assert f[f"/entry/frames_{k}/data"].shape == (3, 514, 1030)
    layout = [m for kind, m in _events(path) if kind == EventKind.LAYOUT]
    assert len(layout) == 4  # the config geometry re-made, then detector_1, _2, _3


def test_a_change_of_shape_and_channels_mid_run_and_back(
    harness: Harness, stream2_testdata: Path
) -> None:
    camera, ingest = harness.camera, harness.ingest
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 3000, SHAPE, dtype=np.uint16) for _ in range(4)]
    eiger = _messages(stream2_testdata / "r500k_bm_bslz4_16bit")
    path, _, _ = harness.open_run("shapes", geometry=GEOMETRY)  # 1 channel 128 x 128
    ingest.start_recording()
    camera.replay(frames[:2], n_images=2, rate_hz=100.0)
    assert camera.wait(5.0)
    _send(harness, eiger)  # 3 channels 514 x 1030
    camera.replay(frames[2:], n_images=2, rate_hz=100.0)  # the first geometry again
    assert camera.wait(5.0)
    _delivered(harness)
    summary = ingest.close_run()

    _nothing_lost(summary, 7)
    with h5py.File(path, "r") as f:
        data = f[f"{DETECTOR}/data"]
        assert data.shape == (4, *SHAPE)
        for i, frame in enumerate(frames):
            assert data.id.read_direct_chunk((i, 0, 0))[1] == s2.bslz4_compress(frame)
        assert list(f[f"{DETECTOR}/image_id"][()]) == [0, 1, 0, 1]
        _assert_stored(f[f"{DETECTOR}_1"], _images(eiger))
        frame_time = np.concatenate(
            [f[f"{DETECTOR}/frame_time"][:2], f[f"{DETECTOR}_1/frame_time"][()]]
        )
        # one run clock across the stacks (never decreasing; the recorded series is sent
        # faster than it was taken, so its frames may share the floor of the one before)
        assert np.all(np.diff(frame_time) >= 0)
        assert f[f"{DETECTOR}/frame_time"][2] > frame_time[-1]


def test_a_series_with_its_start_message_gives_the_run_its_geometry(
    harness: Harness, stream2_testdata: Path
) -> None:
    recorded = _messages(stream2_testdata / "r500k_bm_bslz4_32bit")
    images = _images(recorded)
    first = images[0]
    start = s2.start_message(
        first.series_id,
        first.series_unique_id,
        first.series_date,
        channels=list(first.channels),
        image_size_x=1030,
        image_size_y=514,
        image_dtype="uint32le",
        compression="bslz4",
        number_of_images=3,
    )
    _send(harness, [start])
    _delivered(harness)
    path, _, reply = harness.open_run("started", geometry=None)
    assert reply["geometry_source"] == "the stream"
    assert reply["geometry"]["dtype"] == "<u4" and len(reply["geometry"]["channels"]) == 3
    harness.ingest.start_recording()
    _send(harness, recorded)
    _delivered(harness)
    summary = harness.ingest.close_run()

    _nothing_lost(summary, 3)
    assert summary["file_layout_changes"] == 0  # the datasets were right from the start
    with h5py.File(path, "r") as f:
        _assert_stored(f[DETECTOR], images)


def test_each_frames_imaging_state_is_by_its_time_though_the_records_come_late(
    harness: Harness,
) -> None:
    camera, ingest = harness.camera, harness.ingest
    path, clock, _ = harness.open_run("imaging", geometry=GEOMETRY)
    ingest.set_imaging(ImagingState(-math.inf, -math.inf, "hrtem", 0.06e-9, 35.0), 1)
    ingest.start_recording()
    camera.arm(n_images=60)  # 0.6 s at 100 frames/s
    deadline = time.monotonic() + 10.0
    while camera.images_sent_total < 20:  # (the camera's first frame may take a while)
        assert time.monotonic() < deadline, "the camera sent no frames"
        time.sleep(0.005)
    switch_start = clock.now()  # the microscope goes to LM ...
    time.sleep(0.08)
    switch_end = clock.now()  # ... and is there; the daemon is slow to say so:
    assert camera.wait(5.0)
    _delivered(harness)
    ingest.sync()  # every frame is in the file before the switch is announced
    ingest.set_imaging(ImagingState(switch_start, switch_end, "lm", 1e-9, 2.0), 2)
    ingest.imaging_watermark(clock.now(), 2)
    summary = ingest.close_run()

    assert summary["frames_written"] == 60
    with h5py.File(path, "r") as f:
        detector = f[DETECTOR]
        t = detector["frame_time"][()]
        half = (detector["detector_stop_time"][()] - detector["detector_start_time"][()]) / 2
        modes = [m.decode() for m in detector["imaging_mode"][()]]
        pixel = detector["pixel_size"][()]
    period = float(np.median(np.diff(t)))
    before = t + half <= switch_start
    after = t - half >= switch_end + period
    expected = np.where(before, "hrtem", np.where(after, "lm", "settling"))
    # The ingest decides with the frame period it has learnt from the frames so far and the
    # frame times it had then (the clock map may retime them a little at close), so a frame
    # within a quarter period of either boundary may take the neighbouring verdict; every
    # other frame must be exactly as its time says.
    tolerance = 0.25 * period
    near = (np.abs(t + half - switch_start) < tolerance) | (
        np.abs(t - half - (switch_end + period)) < tolerance
    )
    for mode, want, borderline in zip(modes, expected.tolist(), near, strict=True):
        assert mode == want or (borderline and "settling" in (mode, want)), (modes, want)
    assert near.sum() <= 2
    assert before.sum() >= 10 and after.sum() >= 10 and 1 <= (~before & ~after).sum() <= 20
    np.testing.assert_array_equal(pixel[before], 0.06e-9)
    np.testing.assert_array_equal(pixel[after], 1e-9)
    with h5py.File(path, "r") as f:
        assert f["/entry/images_lm/x"].attrs["units"] == "nm"
        assert f["/entry/images_lm/data"].shape[0] == after.sum()
        assert f["/entry/images_hrtem/data"].shape[0] == before.sum()


def test_an_image_whose_channels_disagree_is_refused_without_touching_the_layout(
    harness: Harness, stream2_testdata: Path
) -> None:
    recorded = _messages(stream2_testdata / "r500k_bm_bslz4_8bit")
    # A recorded image of a new series whose first channel is another shape (64 x 64 raw
    # uint8) than the others: no frame geometry holds it (and the first channel alone would
    # describe one the file does not have).
    fields = dict(cbor2.loads(recorded[0]))
    fields["series_id"], fields["series_unique_id"] = 5, "ODD"
    channels = dict(fields["data"])
    channels["threshold_1"] = cbor2.CBORTag(40, [[64, 64], cbor2.CBORTag(64, bytes(64 * 64))])
    fields["data"] = channels
    odd = cbor2.dumps(cbor2.CBORTag(55799, fields))
    path, _, _ = harness.open_run("odd", geometry=None)
    harness.ingest.start_recording()
    _send(harness, [*recorded, odd, s2.end_message(5, "ODD")])
    _delivered(harness)
    summary = harness.ingest.close_run()

    assert summary["frames_written"] == 3
    assert summary["dropped_by_reason"]["geometry"] == 1
    assert summary["file_layout_changes"] == 1  # the config geometry re-made, nothing more
    with h5py.File(path, "r") as f:
        assert [name for name in f["/entry/instrument"] if name.startswith("detector")] == [
            "detector"
        ]
    assert any("'threshold_2'" in m for kind, m in _events(path) if kind == EventKind.ERROR)
