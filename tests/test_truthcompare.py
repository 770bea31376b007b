"""The demo's "measured next to truth" printout, from a real run file and truth samples.

The run file is test_report_figure's (RunWriter + AnalysisLog, events from a real
ProtocolRunner); the truth samples are shaped like the simulated microscope's `truth` reply
(tests/test_microscope.py checks that reply against the model).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from test_report_figure import write_run

from insitu_daq.report import AnalysisRecord, HoldSpan, hold_span, read_analysis, read_events
from insitu_daq.truthcompare import TruthSample, format_comparison


def truth_samples(start: float, stop: float, end: float) -> list[TruthSample]:
    samples = []
    for t in np.arange(0.0, end, 0.5):
        progress = min(1.0, max(0.0, (t - start) / (stop - start)))
        spacings = [{"d_m": 2.4e-10, "names": ["(006)", "(111)"], "phases": ["layered"]}]
        if progress < 0.7:
            spacings.append({"d_m": 4.8e-10, "names": ["(003)"], "phases": ["layered"]})
        if progress > 0.3:
            spacings.append({"d_m": 2.1e-10, "names": ["(200)"], "phases": ["rock_salt"]})
        samples.append(
            TruthSample(
                float(t),
                {
                    "field_phase_fractions": {
                        "layered": 1 - progress,
                        "disordered": 0.0,
                        "rock_salt": progress,
                    },
                    "field_d_spacings": spacings,
                    "front_velocity_nm_s": 4.0,
                    "front_position_nm": 400.0 * progress,
                    "expansion": 0.3 * progress,
                },
            )
        )
    return samples


def read(run_file: Path) -> tuple[AnalysisRecord, HoldSpan | None]:
    with h5py.File(run_file, "r") as f:
        return read_analysis(f["entry"]), hold_span(read_events(f["entry"]))


def line_with(text: str, output: str) -> str:
    (line,) = [line for line in output.splitlines() if text in line]
    return line


def test_measured_spacings_phases_front_and_expansion_stand_next_to_the_truth(
    tmp_path: Path,
) -> None:
    station = write_run(tmp_path / "run.h5")
    start = station.calls("start_recording")[0].time
    stop = station.calls("stop_recording")[0].time
    analysis, hold = read(tmp_path / "run.h5")
    out = format_comparison(analysis, truth_samples(start, stop, stop + 2), hold)

    # (003) present at the start only, (200) at the end only: measured and true agree.
    assert line_with("LiNiO2 (003) 4.8 A", out).split()[-3:] == ["(+0.0%)", "yes/no", "yes/no"]
    assert line_with("NiO (200) 2.1 A", out).split()[-3:] == ["(+0.0%)", "no/yes", "no/yes"]
    # Phase fractions at the hold's end: measured, then the truth of the same run time.
    fractions = line_with("    hold end ", out)
    measured = float(fractions.split("rock salt ")[1].split()[0])
    true = float(fractions.split("rock salt ")[1].split("(")[1].rstrip(")"))
    assert abs(measured - true) < 0.05
    assert "front speed, median over the hold" in out and "4.50 nm/s  (truth 4.00 nm/s)" in out
    assert line_with("expansion, last at", out).endswith(
        "(truth " + line_with("expansion, last at", out).split("(truth ")[1]
    )
    assert "hold ended by: condition" in out
    assert "not measured" not in out


def test_missing_analysis_says_not_measured_and_still_gives_the_truth(tmp_path: Path) -> None:
    station = write_run(tmp_path / "run.h5", with_analysis=False)
    start = station.calls("start_recording")[0].time
    stop = station.calls("stop_recording")[0].time
    analysis, hold = read(tmp_path / "run.h5")
    out = format_comparison(analysis, truth_samples(start, stop, stop + 2), hold)
    assert "no live-analysis results in the run file" in out
    assert "front speed, median over the hold   not measured  (truth 4.00 nm/s)" in out
    assert line_with("expansion", out).split()[-2:] == ["not", "measured"]
    assert "hold ended by: condition" in out
