"""Run files read back for the web view (insitu_daq/web/replay.py): the runs list, a run as a
replay state, and previews at a run time.

The run files are real ones (tests/run_files.py `write_run`: RunWriter, a real ProtocolRunner's
events, live-analysis results, HRTEM fringes and flat LM frames): "newer" with the imaging
states the daemon announces (each frame's mode and pixel size decided in the file), "older"
without them and without analysis (modes only from the microscope events, as in a run whose
microscope never reported its state). A run still being written is read while its RunWriter
holds it open, with large bitshuffle/LZ4 frames.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from run_files import FRINGE_PERIOD_PX, PIXEL_M, write_run

from insitu_daq.analysis.display import ring_radius_fraction
from insitu_daq.core.imaging import ImagingState
from insitu_daq.report.analysis import read_analysis
from insitu_daq.report.events import imaging_modes, read_events
from insitu_daq.report.frames import SETTLE_S
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata, RunWriter
from insitu_daq.web import replay

DETECTOR = "/entry/instrument/detector"
NEWER_SHAPE = (128, 128)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two runs, a run's figure, an HDF5 file that is no run file, a truncated run file and a
    text file, with mtimes in a known order: newer, notes, broken, older."""
    folder = tmp_path_factory.mktemp("data")
    write_run(folder / "older.h5", with_analysis=False, run_id="older")
    write_run(folder / "newer.h5", shape=NEWER_SHAPE, imaging=True, run_id="newer")
    (folder / "newer.png").write_bytes(b"\x89PNG")
    with h5py.File(folder / "notes.h5", "w") as f:
        f["x"] = 1
    whole = (folder / "newer.h5").read_bytes()
    (folder / "broken.h5").write_bytes(whole[: len(whole) // 2])
    (folder / "readme.txt").write_text("not a run")
    for name, mtime in [("older", 1000), ("broken", 1500), ("notes", 2000), ("newer", 3000)]:
        os.utime(folder / f"{name}.h5", (mtime, mtime))
    return folder


def _decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def _file_frames(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        detector = f[DETECTOR]
        modes = np.array([m.decode() for m in detector["imaging_mode"][:]])
        return detector["frame_time"][:], modes, detector["image_id"][:]


# ----- the runs list -----------------------------------------------------------------------
def test_runs_are_listed_newest_first_with_summaries_and_unreadable_files_with_an_error(
    data_dir: Path,
) -> None:
    runs = replay.list_runs(data_dir)
    json.dumps(runs, allow_nan=False)  # the web server's JSON refuses NaN
    assert [r["name"] for r in runs] == ["newer", "notes", "broken", "older"]
    newer, notes, broken, older = runs
    assert newer["file"] == "newer.h5" and newer["figure"] and not older["figure"]
    assert newer["size_bytes"] == (data_dir / "newer.h5").stat().st_size
    assert newer["modified"] == "1970-01-01T00:50:00+00:00"
    summary = newer["summary"]
    frame_time, modes, _ = _file_frames(data_dir / "newer.h5")
    assert summary["run_id"] == "newer" and summary["protocol"] == "figure"
    assert summary["outcome"] == "finished"
    assert summary["frames"] == len(frame_time)
    assert summary["imaging_frames"]["hrtem"] == int(np.sum(modes == "hrtem"))
    assert summary["frame_rate_hz"] == pytest.approx(5.0)
    assert summary["bias_samples"] == 200 and summary["missing_image_ids"] == 0
    assert len(summary["holds"]) == 1 and summary["holds"][0]["setpoint_volts"] == 4.3
    assert summary["end_time"] and summary["duration_s"] >= frame_time[-1]
    assert older["summary"]["imaging_frames"] == {
        "unknown": len(_file_frames(data_dir / "older.h5")[0])
    }
    for unreadable in (notes, broken):
        assert "summary" not in unreadable
        assert unreadable["error"] and "\n" not in unreadable["error"]
    assert notes["error"].startswith("not a run file")


def test_listing_reads_each_file_once_until_it_changes(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5):
        shutil.copy(data_dir / "older.h5", tmp_path / f"run{i}.h5")
    read: list[Path] = []
    summarize = replay.summarize

    def counted(path: Path) -> object:
        read.append(Path(path))
        return summarize(path)

    monkeypatch.setattr(replay, "summarize", counted)
    first = replay.list_runs(tmp_path)
    assert replay.list_runs(tmp_path) == first
    assert sorted(p.name for p in read) == [f"run{i}.h5" for i in range(5)]
    later = time.time() + 60
    os.utime(tmp_path / "run3.h5", (later, later))  # e.g. a run still being written grew
    again = replay.list_runs(tmp_path)
    assert [p.name for p in read[5:]] == ["run3.h5"]
    assert again[0]["name"] == "run3"


def test_a_run_name_cannot_reach_outside_the_data_dir(data_dir: Path) -> None:
    assert replay.resolve_run(data_dir, "newer") == data_dir / "newer.h5"
    (data_dir.parent / "x.h5").write_bytes(b"")
    for name in ("../x", "a/b", "..", ".", "", "a\\b", "/etc/passwd", ".hidden", "missing"):
        with pytest.raises(ValueError):
            replay.resolve_run(data_dir, name)


# ----- a run as a state object -------------------------------------------------------------
def test_replay_state_holds_the_file_s_series_events_and_frame_times(data_dir: Path) -> None:
    path = data_dir / "newer.h5"
    state = replay.replay_state(path)
    json.dumps(state, allow_nan=False)
    assert state["mode"] == "replay"
    # Where the rings fall on the spectra the page will ask for (preview_at), known at once.
    _, spectrum = replay.preview_at(path, "fft", state["frame_times"]["hrtem"][-1])
    assert state["previews"] == {
        "fft": {"q_max_per_nm": spectrum["q_max_per_nm"], "rings": spectrum["rings"]}
    }
    assert state["status"]["run_id"] == "newer"
    assert state["status"]["protocol"] == {"protocol": "figure", "state": "finished"}
    with h5py.File(path, "r") as f:
        bias_t = f["/entry/sample/bias_voltage/time"][:]
        bias_v = f["/entry/sample/bias_voltage/value"][:]
        events = read_events(f["entry"])
    bias = state["series"]["bias"]
    assert bias["t"] == pytest.approx(bias_t.tolist()) and bias["voltage"] == pytest.approx(bias_v)
    assert len(bias["setpoint"]) == len(bias["current"]) == len(bias_t)
    assert [(e["time"], e["kind"], e["message"]) for e in state["events"]] == events
    frame_time, modes, _ = _file_frames(path)
    for mode in ("hrtem", "lm"):
        assert state["frame_times"][mode] == pytest.approx(frame_time[modes == mode].tolist())
        assert state["frame_times"][mode]
    assert state["duration_s"] == pytest.approx(max(bias_t[-1], frame_time[-1], events[-1][0]))


def test_replay_analysis_is_on_one_time_axis_with_none_where_a_log_has_no_row(
    data_dir: Path,
) -> None:
    path = data_dir / "newer.h5"
    state = replay.replay_state(path)
    with h5py.File(path, "r") as f:
        analysis = read_analysis(f["entry"])
    series = state["series"]["analysis"]
    t = np.array(series["t"])
    logs = [analysis.series["expansion"].time, analysis.reflections["lno_003"].time]
    assert t == pytest.approx(np.union1d(*logs))
    keys = [q["key"] for q in state["quantities"]]
    assert set(keys) <= set(series) and all(len(series[k]) == len(t) for k in series)
    # an LM quantity: its values at its log's times, None at the HRTEM results' times
    expansion = analysis.series["expansion"]
    at = np.searchsorted(t, expansion.time)
    assert [series["expansion"][i] for i in at] == pytest.approx(expansion.value.tolist())
    assert sum(v is not None for v in series["expansion"]) == len(expansion.time)
    # a reflection's d in angstrom, None where it was not detected (NaN in the file)
    lno = analysis.reflections["lno_003"]
    shown = [series["d_spacing_a.lno_003"][i] for i in np.searchsorted(t, lno.time)]
    assert [v is None for v in shown] == (~lno.detected).tolist()
    detected = [v for v in shown if v is not None]
    assert detected == pytest.approx([4.8] * len(detected))
    d_entries = [q for q in state["quantities"] if q["key"] == "d_spacing_a.lno_003"]
    assert d_entries == [
        {"key": "d_spacing_a.lno_003", "panel": "d_spacings", "label": "LiNiO2 (003)",
         "unit": "Å", "scale": 1.0, "ylabel": "d (Å)"}
    ]  # fmt: skip
    intensity = next(q for q in state["quantities"] if q["key"] == "intensity.nio_200")
    assert intensity["panel"] == "reflections" and intensity["label"] == "NiO (200)"
    expansion_entry = next(q for q in state["quantities"] if q["key"] == "expansion")
    assert expansion_entry["unit"] == "%" and expansion_entry["scale"] == 100.0
    assert [r["name"] for r in state["reflections"]] == ["lno_003", "nio_200"]


def test_without_imaging_states_the_microscope_events_give_the_frames_modes(
    data_dir: Path,
) -> None:
    path = data_dir / "older.h5"
    state = replay.replay_state(path)
    with h5py.File(path, "r") as f:
        changes = imaging_modes(read_events(f["entry"]), "lm")
    times = np.array([t for t, _ in changes])
    for mode in ("hrtem", "lm"):
        shown = np.array(state["frame_times"][mode])
        assert len(shown)
        last_change = np.searchsorted(times, shown, side="right") - 1
        assert all(changes[i][1] == mode for i in last_change)
        assert np.all(shown - times[last_change] >= SETTLE_S)
    # no analysis in this run: the plotted keys are there, with no points
    assert state["series"]["analysis"]["t"] == []
    assert state["series"]["analysis"]["expansion"] == []


def test_a_long_bias_log_is_thinned_to_the_page_s_limit_keeping_its_ends() -> None:
    kept = replay.thinned(123_457)
    assert len(kept) <= replay.MAX_SERIES_POINTS
    assert kept[0] == 0 and kept[-1] == 123_456 and np.all(np.diff(kept) > 0)
    assert np.array_equal(replay.thinned(50), np.arange(50))


# ----- previews ----------------------------------------------------------------------------
@pytest.mark.parametrize("asked", [0.0, 9.93, 20.0, 1e6])
def test_an_hrtem_preview_is_the_frame_nearest_the_asked_time(data_dir: Path, asked: float) -> None:
    path = data_dir / "newer.h5"
    png, meta = replay.preview_at(path, "hrtem", asked)
    frame_time, modes, image_id = _file_frames(path)
    hrtem = np.flatnonzero(modes == "hrtem")
    nearest = hrtem[np.argmin(np.abs(frame_time[hrtem] - asked))]
    assert meta["time"] == pytest.approx(frame_time[nearest])
    assert meta["image_id"] == image_id[nearest]
    assert meta["integrated_frames"] == 1
    assert meta["shape"] == meta["shown_shape"] == list(NEWER_SHAPE)
    assert meta["pixel_nm"] == pytest.approx(PIXEL_M["hrtem"] * 1e9)
    assert 0 < meta["scale_bar"]["fraction"] < 1
    image = _decoded(png)
    assert image.mode == "L" and image.size == NEWER_SHAPE[::-1]
    # the fringes (columns) are in the picture: rows alike, columns not
    pixels = np.asarray(image, dtype=float)
    assert pixels.mean(axis=0).std() > 3 * pixels.mean(axis=1).std()
    json.dumps(meta, allow_nan=False)


def test_an_lm_preview_sums_the_lm_frames_within_a_quarter_second(data_dir: Path) -> None:
    path = data_dir / "newer.h5"
    png, meta = replay.preview_at(path, "lm", 17.0)
    frame_time, modes, _ = _file_frames(path)
    lm_times = frame_time[modes == "lm"]
    used = lm_times[np.argmin(np.abs(lm_times - 17.0))]
    assert meta["time"] == pytest.approx(used)
    assert meta["integrated_frames"] == np.sum(np.abs(lm_times - used) <= replay.LM_SUM_S)
    assert meta["pixel_nm"] == pytest.approx(PIXEL_M["lm"] * 1e9)
    assert _decoded(png).size == NEWER_SHAPE[::-1]


def test_the_fft_preview_shows_the_lattice_and_the_table_s_rings(data_dir: Path) -> None:
    path = data_dir / "newer.h5"
    png, meta = replay.preview_at(path, "fft", 10.0)
    rings = {ring["name"]: ring for ring in meta["rings"]}
    assert set(rings) == {"lno_003", "nio_200"}
    q_max = meta["q_max_per_nm"]
    # up to 1.25 x the largest 1/d of the table (NiO 200, 2.1 A), to within a transform step
    step = 1 / (NEWER_SHAPE[0] * meta["pixel_nm"])
    assert q_max == pytest.approx(1.25 * 10 / 2.1, abs=step)
    assert rings["lno_003"]["radius_fraction"] == pytest.approx(ring_radius_fraction(4.8, q_max))
    assert rings["lno_003"]["label"] == "LiNiO2 (003)" and rings["lno_003"]["d_angstrom"] == 4.8
    assert 1 < meta["integrated_frames"] <= replay.FFT_MAX_FRAMES
    assert meta["scale_bar"] is None
    image = np.asarray(_decoded(png), dtype=float)
    side = image.shape[0]
    assert image.shape == (side, side) and meta["shown_shape"] == [side, side]
    # the brightest spot is the fringes' (period 8 px along x: q = 1 / (8 px)), in the row
    # through the centre (the stretch saturates a spot: the middle of its brightest pixels)
    fringe_fraction = 1 / (FRINGE_PERIOD_PX * meta["pixel_nm"]) / q_max
    right = image[side // 2, side // 2 + 3 :]  # the zero frequency left out
    spot = 3 + np.flatnonzero(right == right.max()).mean()
    assert spot / (side / 2) == pytest.approx(fringe_fraction, abs=1.5 / side)


def test_preview_refuses_an_unknown_kind_and_a_mode_without_frames(
    data_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError):
        replay.preview_at(data_dir / "newer.h5", "phase", 1.0)
    with pytest.raises(ValueError):
        replay.preview_at(data_dir / "newer.h5", "hrtem", math.nan)
    path = tmp_path / "hrtem-only.h5"
    writer = _growing_run(path, frames=2)
    writer.close(time.time_ns())
    with pytest.raises(KeyError):
        replay.preview_at(path, "lm", 1.0)


# ----- a run still being written -----------------------------------------------------------
BIG_SHAPE = (514, 1030)  # an EIGER2 500K frame: larger than a preview on both sides
BIG_PIXEL_M = 0.05e-9


def _growing_run(path: Path, frames: int) -> RunWriter:
    """A run file being written: large bslz4 HRTEM frames whose imaging the ingest has not
    decided yet (no watermark), a protocol started and not ended."""
    meta = RunMetadata(
        run_id=path.stem,
        title="growing",
        start_time_ns=time.time_ns(),
        protocol_name="growing",
        microscope={"mode": "hrtem"},
        pixel_size_m=(BIG_PIXEL_M, BIG_PIXEL_M),
    )
    writer = RunWriter(path, meta, FrameGeometry(("threshold_1",), BIG_SHAPE, "<u2", "bslz4"))
    writer.add_imaging_state(ImagingState(-math.inf, -math.inf, "hrtem", BIG_PIXEL_M, 35.0))
    writer.write_event(0.0, "state", "protocol growing started (1 steps)")
    rng = np.random.default_rng(2)
    for i in range(frames):
        t = 0.5 + 0.1 * i
        frame = rng.poisson(100.0, BIG_SHAPE).astype("<u2")
        writer.write_frame(i, 1, {"threshold_1": frame}, t, t, t, t, 0.0, 0.0, half_exposure=0.05)
    writer.flush()
    return writer


def test_a_run_being_written_is_listed_replayed_and_previewed_as_far_as_it_got(
    tmp_path: Path,
) -> None:
    path = tmp_path / "growing.h5"
    writer = _growing_run(path, frames=4)
    try:
        (listed,) = replay.list_runs(tmp_path)
        assert listed["summary"]["frames"] == 4 and listed["summary"]["end_time"] is None
        assert listed["summary"]["outcome"] == "unknown"
        state = replay.replay_state(path)
        assert state["frame_times"]["hrtem"] == pytest.approx([0.5, 0.6, 0.7, 0.8])
        assert state["status"]["protocol"]["state"] == "unknown"
        png, meta = replay.preview_at(path, "hrtem", 0.62)
        assert meta["time"] == pytest.approx(0.6) and meta["shape"] == list(BIG_SHAPE)
        assert meta["pixel_nm"] == pytest.approx(BIG_PIXEL_M * 1e9)
        assert max(_decoded(png).size) <= replay.PREVIEW_MAX_SIDE
        assert meta["shown_shape"] == list(_decoded(png).size[::-1])
        png, meta = replay.preview_at(path, "hrtem", 0.62, full=True)
        assert _decoded(png).size == BIG_SHAPE[::-1] and meta["shown_shape"] == list(BIG_SHAPE)
        png, meta = replay.preview_at(path, "fft", 0.62)
        assert meta["integrated_frames"] == 4 and meta["rings"] == []  # no reflection table
        writer.write_event(1.0, "state", "protocol growing finished")
        writer.close(time.time_ns())
        (listed,) = replay.list_runs(tmp_path)  # grew since: read again
        assert listed["summary"]["outcome"] == "finished" and listed["summary"]["end_time"]
    finally:
        writer.close(time.time_ns())
