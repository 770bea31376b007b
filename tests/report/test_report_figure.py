"""`insitu-daq report RUN.h5` draws RUN.png; the analysis reader tolerates what is missing.

The run file is a real one written by `RunWriter` (HDF5 on disk, its AnalysisLog for the live
results), and its events are the ones a real `ProtocolRunner` recorded while running an
interleaved closed-loop hold against test_runner's in-memory station: the figure and the
report read back exactly the messages the runner writes. The frames are synthetic (HRTEM:
lattice fringes; LM: flat), so which kind a key frame is can be told from its pixels.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_runner import RecordingStation

from insitu_daq.analysis.quantities import D_SPACING, INTENSITY
from insitu_daq.app.cli import main
from insitu_daq.control.protocol import Acquire, Bias, Hold, Interleave, Microscope, Protocol
from insitu_daq.control.runner import ProtocolRunner, RunState
from insitu_daq.core.records import EventKind
from insitu_daq.report.analysis import format_analysis, read_analysis
from insitu_daq.report.events import hold_span, imaging_modes, read_events
from insitu_daq.report.figure import DPI, FIGURE_SIZE_IN, KEY_IMAGE_SPAN_S, draw_report_figure
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata, RunWriter

SHAPE = (64, 64)
FRAME_RATE_HZ = 5.0  # run-clock frames per second (enough to find frames in 1 s bursts)
HRTEM_MEAN, LM_LEVEL = 100.0, 1000


class RockSaltAfterTwoBursts(RecordingStation):
    """Reports the rock-salt fraction as reached once two LM bursts are over."""

    def live_value(self, name: str) -> float | None:
        bursts = [c for c in self.events(EventKind.MICROSCOPE) if c.args[2]["cause"] != "step"]
        return 0.95 if len(bursts) >= 4 else 0.2


def run_protocol() -> RecordingStation:
    station = RockSaltAfterTwoBursts(time_scale=50.0)
    protocol = Protocol(
        name="figure",
        steps=[
            Microscope(mode="lm", beam=True, dose_rate_e_per_a2_s=2.0),
            Microscope(mode="hrtem", dose_rate_e_per_a2_s=35.0),
            Acquire(action="start"),
            Bias(volts=4.3, rate_volts_per_s=1.0),
            Hold(
                duration_s=60.0,
                until="rock_salt_fraction >= 0.9",
                interleave=Interleave(mode="lm", every_s=5.0, dwell_s=1.0),
            ),
            Bias(volts=0.0, rate_volts_per_s=1.0),
            Acquire(action="stop"),
        ],
    )
    runner = ProtocolRunner(station)
    runner.start(protocol)
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED
    return station


def hrtem_frame(rng: np.random.Generator) -> np.ndarray:
    cols = np.arange(SHAPE[1])
    fringes = HRTEM_MEAN * (1 + 0.3 * np.sin(2 * np.pi * cols / 8.0))
    return rng.poisson(np.broadcast_to(fringes, SHAPE)).astype("<u2")


def write_run(path: Path, with_analysis: bool = True) -> RecordingStation:
    station = run_protocol()
    start = station.calls("start_recording")[0].time
    stop = station.calls("stop_recording")[0].time
    meta = RunMetadata(
        run_id="figure-test",
        title="report figure test",
        start_time_ns=time.time_ns(),
        microscope={"mode": "lm"},
        reflections=("lno_003", "nio_200") if with_analysis else (),
        analysis_parameters={
            "reflections": [
                {"name": "lno_003", "label": "LiNiO2 (003)", "d_angstrom": 4.8, "phase": "layered"},
                {"name": "nio_200", "label": "NiO (200)", "d_angstrom": 2.1, "phase": "rock_salt"},
            ]
        },
    )
    writer = RunWriter(path, meta, FrameGeometry(("threshold_1",), SHAPE, "<u2", None))
    for call in station.events():
        writer.write_event(call.time, call.args[0], call.args[1])
    modes = imaging_modes([(c.time, c.args[0], c.args[1]) for c in station.events()], "lm")
    rng = np.random.default_rng(1)
    times = np.arange(start, stop, 1.0 / FRAME_RATE_HZ)
    for index, t in enumerate(times):
        mode = [m for when, m in modes if when <= t][-1]
        frame = hrtem_frame(rng) if mode == "hrtem" else np.full(SHAPE, LM_LEVEL, "<u2")
        writer.write_frame(index, 1, {"threshold_1": frame}, t, t, t, t, 0.0, 0.0)
        if with_analysis:
            writer.write_analysis(result_at(t, mode, index, start, stop))
    t = np.linspace(0.0, stop + 1.0, 200)
    volts = np.where((t > start + 4.3) & (t < stop - 4.3), 4.3, 0.0)
    writer.write_bias_samples(t, t * 0 + 1e-3, volts, volts, volts * 1e-10, np.zeros(len(t)))
    writer.close(time.time_ns())
    return station


def result_at(t: float, mode: str, image_id: int, start: float, stop: float) -> dict[str, Any]:
    progress = (t - start) / (stop - start)
    if mode == "hrtem":
        values: dict[str, Any] = {
            D_SPACING.key_for("lno_003"): 4.8e-10 if progress < 0.7 else None,
            INTENSITY.key_for("lno_003"): 10.0 * (1 - progress),
            D_SPACING.key_for("nio_200"): 2.1e-10 if progress > 0.3 else None,
            INTENSITY.key_for("nio_200"): 10.0 * progress,
            "layered_fraction": 1 - progress,
            "disordered_fraction": 0.0,
            "rock_salt_fraction": progress,
        }
    else:
        values = {
            "expansion": 0.3 * progress,
            "front_position_nm": 400.0 * progress,
            "front_velocity_nm_s": 4.5,
            "projected_area_m2": 2e-13,
        }
    return {"time": t, "image_id": image_id, "latency_s": 0.01, "skipped": 0, "values": values}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


EXPECTED_SIZE = (round(FIGURE_SIZE_IN[0] * DPI), round(FIGURE_SIZE_IN[1] * DPI))


def test_figure_of_a_run_with_analysis_shows_every_panel_and_hrtem_key_frames(
    tmp_path: Path,
) -> None:
    run_file = tmp_path / "run.h5"
    station = write_run(run_file)
    drawn = draw_report_figure(run_file, tmp_path / "run.png")
    assert png_size(drawn.path) == EXPECTED_SIZE
    assert drawn.panels == dict.fromkeys(
        ("bias", "reflections", "phase_fractions", "front_position", "expansion"), True
    )
    # Three key frames inside the hold (start, middle, end), each an HRTEM frame (fringes).
    hold_start = station.step_event("hold", "start").time
    hold_end = station.step_event("hold", "end").time
    assert [k.label for k in drawn.key_frames] == ["hold start", "hold middle", "hold end"]
    for key in drawn.key_frames:
        assert hold_start <= key.time_s <= hold_end
        assert key.mode == "hrtem"
        # a sum of HRTEM frames (fringes, mean 100 each), no LM one (flat, 1000) among them
        assert 1 <= key.frames <= FRAME_RATE_HZ * KEY_IMAGE_SPAN_S
        assert abs(float(key.image.mean()) / key.frames - HRTEM_MEAN) < 10
        assert float(key.image.std()) > 0.2 * HRTEM_MEAN * key.frames
    assert drawn.key_frames[0].time_s < drawn.key_frames[1].time_s < drawn.key_frames[2].time_s


def test_the_reader_sees_the_hold_s_end_the_bursts_and_the_analysis(tmp_path: Path) -> None:
    run_file = tmp_path / "run.h5"
    station = write_run(run_file)
    with h5py.File(run_file, "r") as f:
        events = read_events(f["entry"])
        analysis = read_analysis(f["entry"])
    hold = hold_span(events)
    assert hold is not None and hold.ended_by == "condition"
    assert hold.start_s == pytest.approx(station.step_event("hold", "start").time)
    modes = [mode for _, mode in imaging_modes(events)]
    assert modes[:2] == ["lm", "hrtem"]
    assert modes[2:] == ["lm", "hrtem"] * ((len(modes) - 2) // 2) and len(modes) >= 6
    assert analysis.present and analysis.results > 0
    assert set(analysis.reflections) == {"lno_003", "nio_200"}
    assert analysis.reflections["nio_200"].label == "NiO (200)"
    assert analysis.reflections["nio_200"].d_angstrom == 2.1
    lno = analysis.reflections["lno_003"]
    assert lno.detected[0] and not lno.detected[-1]  # present at the start, gone at the end
    expansion = analysis.series["expansion"]
    assert expansion.last() > expansion.first()  # from the LM bursts
    assert analysis.series["front_velocity_nm_s"].last() == pytest.approx(4.5)


def test_a_run_without_analysis_still_gives_a_figure_saying_not_measured(tmp_path: Path) -> None:
    run_file = tmp_path / "run.h5"
    write_run(run_file, with_analysis=False)
    drawn = draw_report_figure(run_file, tmp_path / "run.png")
    assert png_size(drawn.path) == EXPECTED_SIZE
    assert drawn.panels["bias"]
    with h5py.File(run_file, "r") as f:
        text = format_analysis(read_analysis(f["entry"]))
    assert "expansion                        not measured" in text
    assert not any(v for k, v in drawn.panels.items() if k != "bias")
    # An older file with no /entry/analysis group at all.
    with h5py.File(run_file, "r+") as f:
        del f["entry/analysis"]
    with h5py.File(run_file, "r") as f:
        assert not read_analysis(f["entry"]).present
    drawn = draw_report_figure(run_file, tmp_path / "older.png")
    assert png_size(drawn.path) == EXPECTED_SIZE
    assert len(drawn.key_frames) == 3


def test_report_command_writes_the_figure_next_to_the_file_or_where_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_file = tmp_path / "run.h5"
    write_run(run_file)
    assert main(["report", str(run_file), "--no-figure"]) == 0
    out = capsys.readouterr().out
    assert "figure-test" in out
    assert not (tmp_path / "run.png").exists()
    # the text says what live analysis measured, and what it did not
    assert "NiO (200) 2.1 A" in out and "(at the start no, at the end yes)" in out
    assert "LiNiO2 (003) 4.8 A" in out and "(at the start yes, at the end no)" in out
    assert "front speed                      first 4.5 nm/s, last 4.5 nm/s" in out
    assert "disordered fraction              first 0, last 0" in out
    assert main(["report", str(run_file)]) == 0
    assert f"figure       {tmp_path / 'run.png'}" in capsys.readouterr().out
    assert png_size(tmp_path / "run.png") == EXPECTED_SIZE
    elsewhere = tmp_path / "figures" / "a.png"
    assert main(["report", str(run_file), "--figure", str(elsewhere)]) == 0
    assert png_size(elsewhere) == EXPECTED_SIZE
