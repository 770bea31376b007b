"""`insitu-daq report RUN.h5` draws RUN.png; the analysis reader tolerates what is missing.

The run file is a real one (tests/run_files.py `write_run`): written by `RunWriter`, with the
events a real `ProtocolRunner` recorded, so the figure and the report read back exactly the
messages the runner writes. Its frames are synthetic (HRTEM: lattice fringes; LM: flat), so
which kind a key frame is can be told from its pixels.
"""

from __future__ import annotations

import struct
from pathlib import Path

import h5py
import pytest
from run_files import FRAME_RATE_HZ, HRTEM_MEAN, write_run

from insitu_daq.app.cli import main
from insitu_daq.report.analysis import format_analysis, read_analysis
from insitu_daq.report.events import hold_span, imaging_modes, read_events
from insitu_daq.report.figure import DPI, FIGURE_SIZE_IN, KEY_IMAGE_SPAN_S, draw_report_figure


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
