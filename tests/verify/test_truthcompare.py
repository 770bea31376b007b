"""The demo's "measured next to truth" printout, from a real run file and truth samples.

The run file is tests/run_files.py's (RunWriter + AnalysisLog, events from a real
ProtocolRunner); the truth samples are shaped like the simulated microscope's `truth` reply
(tests/drivers/test_microscope.py checks that reply against the model).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from run_files import write_run

from insitu_daq.report.analysis import AnalysisRecord, Series, read_analysis
from insitu_daq.report.events import HoldSpan, hold_span, read_events
from insitu_daq.verify.truth import TruthSample, format_comparison


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


# ----- verify/accuracy.py: the issue-4 figures from an analysis record and truth samples
# -----------
def reflection(name: str, d_angstrom: float, times: np.ndarray, d_m: np.ndarray):
    from insitu_daq.report.analysis import ReflectionSeries

    return ReflectionSeries(name, name, d_angstrom, None, times, d_m, np.ones(len(times)))


def synthetic_run(
    onset_s: float, d_003_m: float = 4.8e-10, speed_scale: float = 1.0, expansion_bias: float = 0
) -> tuple[AnalysisRecord, list[TruthSample], HoldSpan]:
    """A biased run: rock salt enters the HRTEM field at 50 s; the front moves at 4 nm/s from
    20 s; the expansion ramps 0 -> 0.3 over 20-60 s. The "measured" side sees (200) from
    `onset_s` (in the phase map's rock-salt presence; the whole-field (200) ring 3 s later),
    (003) at `d_003_m`, the speed x `speed_scale`, the expansion + `expansion_bias`."""
    from insitu_daq.report.analysis import Series

    truth = []
    for t in np.arange(0.0, 100.0, 0.5):
        position = 4.0 * max(0.0, t - 20.0)
        spacings = [{"d_m": 4.8e-10}] + ([{"d_m": 2.1e-10}] if t >= 50.0 else [])
        truth.append(
            TruthSample(
                float(t),
                {
                    "bias_volts": 4.3 if t >= 15 else 0.0,
                    "front_position_nm": position,
                    "expansion": 0.3 * min(1.0, max(0.0, (t - 20.0) / 40.0)),
                    "field_d_spacings": spacings,
                    "field_phase_fractions": {"rock_salt": min(1.0, max(0.0, (t - 50) / 20))},
                },
            )
        )
    hrtem = np.arange(1.0, 99.0, 0.25)
    lm = np.array([t + dt for t in np.arange(22.0, 98.0, 4.0) for dt in (0.0, 0.3, 0.6)])
    analysis = AnalysisRecord(
        present=True,
        results=len(hrtem) + len(lm),
        reflections={
            "lno_003": reflection("lno_003", 4.8, hrtem, np.full(len(hrtem), d_003_m)),
            "nio_200": reflection(
                "nio_200", 2.1, hrtem, np.where(hrtem >= onset_s + 3.0, 2.1e-10, np.nan)
            ),
        },
        series={
            "rock_salt_presence": Series(hrtem, np.where(hrtem >= onset_s, 0.05, 0.0)),
            "front_velocity_nm_s": Series(lm, np.full(len(lm), 4.0 * speed_scale)),
            "expansion": Series(lm, 0.3 * np.clip((lm - 20.0) / 40.0, 0, 1) + expansion_bias),
        },
        parameters={"front_window_s": 10.0},
    )
    return analysis, truth, HoldSpan(20.0, 95.0, "duration", "step 5/9 hold done")


def verdict(verdicts: list, starts_with: str):
    (found,) = [v for v in verdicts if v.quantity.startswith(starts_with)]
    return found


def test_an_accurate_run_meets_every_figure_and_says_so() -> None:
    from insitu_daq.verify.accuracy import accuracy_verdicts, format_verdicts

    analysis, truth, hold = synthetic_run(onset_s=51.0)
    verdicts = accuracy_verdicts(analysis, truth, hold)
    assert all(v.ok for v in verdicts), format_verdicts(verdicts)
    onset = verdict(verdicts, "rock-salt onset")
    assert (onset.measured, onset.true) == (51.0, 50.0)
    assert "measured 51 s, truth 50 s (+1.00 s, within 2 s)" in onset.line()
    assert "whole-field (200) ring from 54.0 s" in onset.line()
    assert {v.quantity.split(" ", 1)[1] for v in verdicts if v.quantity.startswith("d ")} == {
        "lno_003 4.8 A",
        "nio_200 2.1 A",
    }


def test_each_figure_fails_outside_its_tolerance() -> None:
    from insitu_daq.verify.accuracy import accuracy_verdicts

    late = accuracy_verdicts(*synthetic_run(onset_s=52.5))
    assert not verdict(late, "rock-salt onset").ok
    off_d = accuracy_verdicts(*synthetic_run(onset_s=51.0, d_003_m=4.8e-10 * 1.012))
    assert not verdict(off_d, "d lno_003").ok and verdict(off_d, "d nio_200").ok
    fast = accuracy_verdicts(*synthetic_run(onset_s=51.0, speed_scale=1.2))
    assert not verdict(fast, "front speed").ok
    assert verdict(accuracy_verdicts(*synthetic_run(51.0, speed_scale=1.1)), "front speed").ok
    grown = accuracy_verdicts(*synthetic_run(onset_s=51.0, expansion_bias=0.025))
    assert not verdict(grown, "expansion at the hold's end").ok
    assert not verdict(grown, "expansion, worst of").ok


def test_a_single_noise_detection_is_not_an_onset() -> None:
    from insitu_daq.verify.accuracy import persistent_onset

    times = np.arange(10.0)
    blip = np.array([0, 1, 0, 0, 1, 1, 0, 1, 1, 1], dtype=bool)
    assert persistent_onset(times, blip, run=3) == 7.0
    assert persistent_onset(times, blip[:9], run=3) is None


def test_front_speed_truth_is_the_mean_over_the_fit_window() -> None:
    from insitu_daq.verify.accuracy import true_mean_speed

    _, truth, _ = synthetic_run(onset_s=51.0)
    # The front starts at 20 s: at 25 s the 10 s window holds 5 s of motion at 4 nm/s.
    speeds = true_mean_speed(truth, np.array([25.0, 40.0]), 10.0)
    assert np.allclose(speeds, [2.0, 4.0])


def control_run(
    rock_salt_at: float | None,
) -> tuple[AnalysisRecord, list[TruthSample]]:
    from insitu_daq.report.analysis import Series

    truth = [
        TruthSample(float(t), {"bias_volts": 0.0, "expansion": 0.0, "field_d_spacings": []})
        for t in np.arange(0.0, 60.0, 0.5)
    ]
    hrtem = np.arange(1.0, 59.0, 0.25)
    d_200 = np.full(len(hrtem), np.nan)
    d_200[::40] = 2.1e-10  # isolated noise detections: not a phase change
    if rock_salt_at is not None:
        d_200[hrtem >= rock_salt_at] = 2.1e-10
    maps = hrtem[::10]
    presence = np.where(maps >= (rock_salt_at or 1e9), 0.4, 0.0)
    presence[5] = 0.02  # one noise tile in one map: not a phase change
    analysis = AnalysisRecord(
        present=True,
        results=len(hrtem),
        reflections={
            "nio_200": reflection("nio_200", 2.1, hrtem, d_200),
            "disordered_195": reflection(
                "disordered_195", 1.95, hrtem, np.full(len(hrtem), np.nan)
            ),
        },
        series={
            "rock_salt_fraction": Series(maps, np.where(maps >= (rock_salt_at or 1e9), 0.3, 0.0)),
            "disordered_fraction": Series(maps, np.zeros(len(maps))),
            "rock_salt_presence": Series(maps, presence),
            "expansion": Series(np.array([0.5, 1.0, 1.5]), np.array([0.0, 0.004, -0.003])),
        },
    )
    return analysis, truth


def test_the_control_passes_without_a_phase_change_and_fails_on_a_false_one() -> None:
    from insitu_daq.verify.accuracy import accuracy_verdicts, format_verdicts

    analysis, truth = control_run(rock_salt_at=None)
    verdicts = accuracy_verdicts(analysis, truth, None)
    assert all(v.ok for v in verdicts), format_verdicts(verdicts)
    assert "never persistently (6 single detections of 232 results)" in format_verdicts(verdicts)
    assert "never persistently (1 single maps of 24)" in format_verdicts(verdicts)
    false_change = accuracy_verdicts(*control_run(rock_salt_at=30.0), None)
    failed = {v.quantity for v in false_change if not v.ok}
    assert failed == {
        "nio_200 2.1 A (none expected)",
        "rock salt seen in the phase map (none expected)",
        "rock salt fraction, largest (none expected)",
    }


def test_no_truth_or_nothing_measured_is_never_a_pass(tmp_path: Path) -> None:
    from insitu_daq.verify.accuracy import accuracy_verdicts

    analysis, truth, hold = synthetic_run(onset_s=51.0)
    assert not any(v.ok for v in accuracy_verdicts(analysis, [], hold))
    empty = AnalysisRecord(False, 0, {}, {})
    verdicts = accuracy_verdicts(empty, truth, hold)
    assert verdicts and not any(v.ok for v in verdicts)


def test_truth_samples_survive_the_truth_file(tmp_path: Path) -> None:
    from insitu_daq.verify.truth import load_truth, save_truth

    samples = truth_samples(10.0, 20.0, 25.0)
    path = tmp_path / "run.truth.json"
    save_truth(path, samples)
    assert load_truth(path) == samples
    assert json.loads(path.read_text())[3]["time"] == samples[3].time_s
    path.write_text('{"time": 1}')
    with pytest.raises(ValueError, match="not a JSON list"):
        load_truth(path)


def test_drift_stands_next_to_the_truths_offset_and_is_left_out_when_not_measured() -> None:
    """The drift measured since the first frame next to the truth's offset moved over the same
    run times (the simulated microscope's `drift_x_nm`, `drift_y_nm`)."""
    times = np.arange(2.0, 12.01, 0.5)
    drift = {
        "drift_x_nm": Series(times, 0.5 * (times - 2.0) + 0.1),
        "drift_y_nm": Series(times, np.zeros_like(times)),
        "drift_rate_nm_s": Series(times, np.full_like(times, 0.49)),
    }
    truth = [
        TruthSample(float(t), {"drift_x_nm": 100.0 + 0.5 * t, "drift_y_nm": -3.0})
        for t in np.arange(0.0, 13.0, 0.5)
    ]
    out = format_comparison(AnalysisRecord(True, 21, {}, drift), truth, None)
    line = line_with("drift, last at 12.0 s", out)
    assert "x +5.0 nm, y +0.0 nm, rate 0.49 nm/s" in line
    assert "truth x +5.0 nm, y +0.0 nm, mean 0.50 nm/s" in line
    assert "drift" not in format_comparison(AnalysisRecord(True, 21, {}, {}), truth, None)
