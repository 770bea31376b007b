"""Each frame's imaging state in the run file, decided by the frame's own time (RunWriter with
real EIGER2 frames; the imaging records in several arrival orders).

The run: 30 frames of 0.1 s (exposure = period) at run times 0.05 + 0.1 i; HRTEM at 0.06 nm/px
from the run's start; a switch to low magnification (1 nm/px) commanded at 1.02 s and done at
1.31 s; a switch back to HRTEM at 0.05 nm/px from 2.23 to 2.26 s. A frame is "settling" when
its exposure overlaps a switch or the frame period after it. By hand:
frames 0-9 HRTEM (exposures end by 1.0 s), 10-14 settling (starts before 1.41 s), 15-21 LM,
22-23 settling (starts before 2.36 s), 24-29 HRTEM at the new pixel size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters for reading)
import numpy as np
import pytest

from insitu_daq.core.config import DetectorConfig
from insitu_daq.core.imaging import ImagingState
from insitu_daq.drivers.stream2 import ImageMessage, decode_message
from insitu_daq.ingest.frames import chunks_for_file, geometry_of_image
from insitu_daq.report.summary import summarize
from insitu_daq.runfile.writer import RunMetadata, RunWriter

DETECTOR = "/entry/instrument/detector"
N, PERIOD = 30, 0.1
HRTEM = ImagingState(-math.inf, -math.inf, "hrtem", 0.06e-9, 35.0)
LM = ImagingState(1.02, 1.31, "lm", 1e-9, 2.0)
HRTEM_FINER = ImagingState(2.23, 2.26, "hrtem", 0.05e-9, 35.0)
EXPECTED = ["hrtem"] * 10 + ["settling"] * 5 + ["lm"] * 7 + ["settling"] * 2 + ["hrtem"] * 6
EXPECTED_PIXEL = [0.06e-9] * 10 + [math.nan] * 5 + [1e-9] * 7 + [math.nan] * 2 + [0.05e-9] * 6


def frame_time(i: int) -> float:
    return 0.05 + PERIOD * i


class Run:
    """A RunWriter fed with real EIGER2 frames at the run times above."""

    def __init__(self, path: Path, folder: Path) -> None:
        messages = [decode_message(p.read_bytes()) for p in sorted(folder.glob("*.cbor"))]
        self.images = [m for m in messages if isinstance(m, ImageMessage)]
        self.path = path
        geometry = geometry_of_image(self.images[0], DetectorConfig())
        meta = RunMetadata(run_id=path.stem, title="imaging test", start_time_ns=time.time_ns())
        self.writer = RunWriter(path, meta, geometry)
        self.written = 0

    def frames(self, upto: int) -> None:
        """Write the frames before `upto` not written yet."""
        for i in range(self.written, upto):
            image = self.images[i % len(self.images)]
            chunks, _ = chunks_for_file(image, self.writer.geometry)
            t = frame_time(i)
            self.writer.write_frame(i, 1, chunks, t, t, t, t, 0.0, 0.0, half_exposure=PERIOD / 2)
        self.written = max(self.written, upto)

    def modes(self) -> list[str]:
        with h5py.File(self.path, "r", libver="latest", swmr=True) as f:
            return [m.decode() for m in f[f"{DETECTOR}/imaging_mode"][()]]


# Arrival orders of the same records: each step is applied in turn, with a flush after it.
Step = Callable[[Run], None]


def _state(state: ImagingState) -> Step:
    return lambda run: run.writer.add_imaging_state(state)


def _watermark(t: float) -> Step:
    return lambda run: run.writer.advance_imaging(t)


def _frames(upto: int) -> Step:
    return lambda run: run.frames(upto)


ORDERS: dict[str, list[Step]] = {
    # each switch announced before the frames it covers arrive, the watermark following
    "as_it_happened": [
        _state(HRTEM),
        _frames(11),
        _state(LM),
        _watermark(1.5),
        _frames(23),
        _state(HRTEM_FINER),
        _watermark(2.5),
        _frames(N),
        _watermark(3.2),
    ],
    # the states arrive after all the frames they cover, newest first, then one watermark
    "states_after_their_frames": [
        _frames(N),
        _state(HRTEM_FINER),
        _state(LM),
        _state(HRTEM),
        _watermark(3.2),
    ],
    # frames lag behind: every state known before any frame arrives; the watermark late
    "frames_after_everything": [
        _state(LM),
        _state(HRTEM_FINER),
        _state(HRTEM),
        _frames(12),
        _frames(N),
        _watermark(3.2),
    ],
}


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_each_frames_mode_is_decided_by_its_time_in_any_arrival_order(
    tmp_path: Path, stream2_testdata: Path, order: str
) -> None:
    run = Run(tmp_path / f"{order}.h5", stream2_testdata / "r500k_bm_bslz4_8bit")
    for step in ORDERS[order]:
        step(run)
        run.writer.flush()
    run.writer.close(time.time_ns())
    with h5py.File(run.path, "r") as f:
        detector = f[DETECTOR]
        assert [m.decode() for m in detector["imaging_mode"][()]] == EXPECTED
        np.testing.assert_array_equal(detector["pixel_size"][()], EXPECTED_PIXEL)
        dose = detector["dose_rate"][()]
        assert dose[0] == 35.0 and dose[16] == 2.0 and np.isnan(dose[12])
        assert detector["pixel_size"].attrs["units"] == "m"
        assert detector["dose_rate"].attrs["units"] == "e/angstrom^2/s"
    summary = summarize(run.path)
    assert summary.imaging_frames == {"hrtem": 16, "lm": 7, "settling": 7}


def test_frames_wait_for_the_watermark_and_are_unknown_if_it_never_passes_them(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    run = Run(tmp_path / "late.h5", stream2_testdata / "r500k_bm_bslz4_8bit")
    run.writer.add_imaging_state(HRTEM)
    run.frames(N)
    run.writer.flush()
    assert run.modes() == [""] * N  # nothing decided before the watermark says so
    run.writer.add_imaging_state(LM)
    run.writer.advance_imaging(1.5)  # exposures ending by 1.5 s: frames 0-13
    run.writer.flush()
    assert run.modes() == EXPECTED[:14] + [""] * (N - 14)
    run.writer.close(time.time_ns())  # no later watermark: the rest is not known
    assert run.modes() == EXPECTED[:14] + ["unknown"] * (N - 14)
    with h5py.File(run.path, "r") as f:
        assert np.isnan(f[f"{DETECTOR}/pixel_size"][14:]).all()


def test_a_retimed_frame_is_decided_again_at_its_new_time(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    run = Run(tmp_path / "retimed.h5", stream2_testdata / "r500k_bm_bslz4_8bit")
    for state in (HRTEM, LM):
        run.writer.add_imaging_state(state)
    run.frames(20)
    run.writer.advance_imaging(2.2)
    run.writer.flush()
    assert run.modes()[10] == "settling"  # exposure 1.0-1.1 s: the switch began at 1.02
    # A better clock mapping: every frame was 0.1 s earlier than first written.
    run.writer.retime_frames(0, np.array([frame_time(i) - PERIOD for i in range(20)]), 0.0, 0.0)
    run.writer.flush()
    modes = run.modes()
    assert modes[10] == "hrtem"  # now 0.9-1.0 s: before the switch
    assert modes[11:16] == ["settling"] * 5 and modes[16] == "lm"
    run.writer.close(time.time_ns())


def test_each_mode_and_pixel_size_gets_an_nxdata_with_calibrated_axes(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    run = Run(tmp_path / "groups.h5", stream2_testdata / "r500k_bm_bslz4_16bit")
    for step in ORDERS["as_it_happened"]:
        step(run)
    run.writer.close(time.time_ns())
    assert run.writer.finished is not None
    assert run.writer.finished.imaging_groups == [
        "/entry/images_hrtem",
        "/entry/images_lm",
        "/entry/images_hrtem_2",
    ]
    expected_rows = {
        "images_hrtem": (list(range(10)), 0.06),
        "images_lm": (list(range(15, 22)), 1.0),
        "images_hrtem_2": (list(range(24, 30)), 0.05),
    }
    with h5py.File(run.path, "r") as f:
        detector = f[DETECTOR]
        for name, (rows, pixel_nm) in expected_rows.items():
            group = f[f"/entry/{name}"]
            assert group.attrs["NX_class"] == "NXdata" and group.attrs["signal"] == "data"
            assert list(group.attrs["axes"]) == ["frame_time", "y", "x"]
            assert group.attrs["detector"] == DETECTOR
            assert group["data"].is_virtual
            assert group["data"].shape == (len(rows), 514, 1030)
            assert list(group["image_id"][()]) == rows
            np.testing.assert_array_equal(group["frame_time"][()], [frame_time(i) for i in rows])
            for axis, size in (("y", 514), ("x", 1030)):
                values = group[axis][()]
                assert values.shape == (size,) and group[axis].attrs["units"] == "nm"
                np.testing.assert_allclose(np.diff(values), pixel_nm)
            assert group["pixel_size"][()] == pytest.approx(pixel_nm * 1e-9)
            assert list(group.attrs["auxiliary_signals"]) == ["data_difference", "data_threshold_2"]
            for channel in ("data", "data_threshold_2", "data_difference"):
                np.testing.assert_array_equal(group[channel][-1], detector[channel][rows[-1]])
        assert f["/entry"].attrs["default"] == "data"
        assert f["/entry/data/data"].shape[0] == N  # the contract: the whole stack


def test_frames_the_watermark_leaves_behind_for_a_minute_are_given_up_on(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    # No watermark for 100 s (a daemon without a microscope, or one that stopped sending):
    # what waits stays bounded; the frames more than IMAGING_KEEP_S behind become "unknown".
    run = Run(tmp_path / "stalled.h5", stream2_testdata / "r500k_bm_bslz4_8bit")
    writer = run.writer
    writer.add_imaging_state(HRTEM)
    for i in range(101):  # one frame a second, run time 0 to 100 s
        image = run.images[i % len(run.images)]
        chunks, _ = chunks_for_file(image, writer.geometry)
        writer.write_frame(i, 1, chunks, float(i), 0, 0, 0, 0.0, 0.0, half_exposure=0.05)
    writer.flush()
    assert run.modes() == ["unknown"] * 40 + [""] * 61  # 0-39 s: more than 60 s behind
    assert writer.frames_without_imaging == 40
    writer.advance_imaging(200.0)
    writer.close(time.time_ns())
    assert run.modes() == ["unknown"] * 40 + ["hrtem"] * 61
