"""What live analysis measured next to what the simulator knows, at the same run times.

The demo polls the simulated microscope's `truth` request during the run and stamps each
answer on the run clock (`TruthSample`); after the run it reads the analysis from the run file
(report.read_analysis) and `format_comparison` sets the two side by side: the spacings (d, and
whether present at the start and at the end), the phase fractions of the HRTEM field at the
hold's start, middle and end, the front's speed and position, the expansion, and what ended
the hold. Measured values are medians over a short window before the compared time (a live
value is a recent one), and the truth of a phase fraction is the median over the same window;
a quantity that was never measured says "not measured".

No simulator import: the truth is plain JSON from the microscope's socket (sim/microscope.py).
`save_truth` / `load_truth` keep the samples next to the run file as `RUN.truth.json`, a JSON
list of {"time": run-clock s, ...the truth reply's fields}, so a run can be compared later
(verify/accuracy.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from insitu_daq.analysis.quantities import (
    DRIFT_RATE,
    DRIFT_X,
    DRIFT_Y,
    EXPANSION,
    FRONT_POSITION,
    FRONT_VELOCITY,
)
from insitu_daq.report.analysis import AnalysisRecord, ReflectionSeries, Series
from insitu_daq.report.events import HoldSpan

# Measured values near a compared time: the median over this many run seconds before it.
WINDOW_S = 4.0
# A spacing counts as present when detected in at least this share of the window's results.
PRESENT_SHARE = 0.5
# A truth spacing matches a table reflection within this relative difference.
D_MATCH = 0.02


@dataclass(frozen=True)
class TruthSample:
    """The simulator's `truth` answer, stamped with the run clock when it was asked."""

    time_s: float
    truth: dict[str, Any]

    def field_fraction(self, phase: str) -> float | None:
        value = self.truth.get("field_phase_fractions", {}).get(phase)
        return float(value) if isinstance(value, (int, float)) else None

    def has_spacing(self, d_angstrom: float) -> bool:
        for entry in self.truth.get("field_d_spacings", []):
            d = entry.get("d_m")
            if isinstance(d, (int, float)) and abs(d * 1e10 / d_angstrom - 1) <= D_MATCH:
                return True
        return False


def truth_path(run_file: Path) -> Path:
    """Where a run's truth samples are kept: RUN.truth.json next to RUN.h5."""
    return run_file.with_suffix(".truth.json")


def save_truth(path: Path, samples: Sequence[TruthSample]) -> None:
    records = [{"time": s.time_s, **{k: v for k, v in s.truth.items() if k != "time"}}
               for s in samples]  # fmt: skip
    path.write_text(json.dumps(records))


def load_truth(path: Path) -> list[TruthSample]:
    """The samples `save_truth` wrote, in time order (ValueError if the file is not that)."""
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path}: not a JSON list of truth samples")
    samples = []
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("time"), (int, float)):
            raise ValueError(f"{path}: a truth sample without a run time: {record!r:.80}")
        truth = {k: v for k, v in record.items() if k != "time"}
        samples.append(TruthSample(float(record["time"]), truth))
    return sorted(samples, key=lambda s: s.time_s)


def nearest(samples: Sequence[TruthSample], time_s: float) -> TruthSample | None:
    if not samples:
        return None
    return min(samples, key=lambda s: abs(s.time_s - time_s))


def window_median(
    samples: Sequence[TruthSample], start_s: float, stop_s: float, phase: str
) -> float | None:
    """The median true field fraction of `phase` over [start_s, stop_s] (the window a measured
    median covers), or the nearest sample's when none falls inside."""
    inside = [s.field_fraction(phase) for s in samples if start_s <= s.time_s <= stop_s]
    values = [v for v in inside if v is not None]
    if values:
        return float(np.median(values))
    sample = nearest(samples, stop_s)
    return sample.field_fraction(phase) if sample is not None else None


def _fmt(value: float | None, spec: str, unit: str = "", scale: float = 1.0) -> str:
    if value is None or not math.isfinite(value):
        return "not measured"
    return f"{value * scale:{spec}}{unit}"


def _present(reflection: ReflectionSeries, start: float, stop: float) -> bool | None:
    """Detected in most results of [start, stop]; None if no result there."""
    inside = (reflection.time >= start) & (reflection.time <= stop)
    if not np.any(inside):
        return None
    return bool(np.mean(reflection.detected[inside]) >= PRESENT_SHARE)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _median_d(reflection: ReflectionSeries) -> float | None:
    detected = reflection.detected
    return float(np.median(reflection.d_m[detected])) if np.any(detected) else None


def comparison_times(analysis: AnalysisRecord, hold: HoldSpan | None) -> tuple[float, float] | None:
    """The run times called "start" and "end": the first HRTEM results and the hold's end."""
    times = [r.time for r in analysis.reflections.values() if len(r.time)]
    if not times:
        return None
    first = min(float(t[0]) for t in times)
    last = max(float(t[-1]) for t in times)
    end = hold.end_s if hold is not None and hold.end_s is not None else last
    return first + WINDOW_S, min(end, last)


def format_comparison(
    analysis: AnalysisRecord, truth: Sequence[TruthSample], hold: HoldSpan | None
) -> str:
    lines = ["", "live analysis (run file) next to the simulator's truth (same run times)"]
    if not analysis.present or analysis.results == 0:
        lines.append("  no live-analysis results in the run file: nothing measured")
    if not truth:
        lines.append("  no truth samples (simulated microscope not answering `truth`)")
    lines += _spacings(analysis, truth, hold)
    lines += _phases(analysis, truth, hold)
    lines += _front(analysis, truth, hold)
    lines += _expansion(analysis, truth)
    lines += _drift(analysis, truth)
    lines += _hold(hold, truth)
    return "\n".join(lines)


def _spacings(
    analysis: AnalysisRecord, truth: Sequence[TruthSample], hold: HoldSpan | None
) -> list[str]:
    lines = [
        f"  {'lattice spacing (HRTEM FFT)':<32} {'measured d':<18} {'present start/end':<18}"
        " truth start/end"
    ]
    span = comparison_times(analysis, hold)
    if not analysis.reflections or span is None:
        return [*lines, "    not measured"]
    start, end = span
    first_truth, last_truth = nearest(truth, start), nearest(truth, end)
    for reflection in analysis.reflections.values():
        d_ref, name = reflection.d_angstrom, reflection.title
        d = _median_d(reflection)
        measured = "not detected" if d is None else f"{d * 1e10:.3f} A"
        if d is not None and d_ref:
            measured += f" ({(d * 1e10 / d_ref - 1) * 100:+.1f}%)"
        at_start = _present(reflection, start - WINDOW_S, start)
        at_end = _present(reflection, end - WINDOW_S, end)
        if d_ref and first_truth is not None and last_truth is not None:
            was, now = first_truth.has_spacing(d_ref), last_truth.has_spacing(d_ref)
            true_presence = f"{_yes_no(was)}/{_yes_no(now)}"
        else:
            true_presence = "-"
        presence = f"{_yes_no(at_start)}/{_yes_no(at_end)}"
        lines.append(f"    {name:<30} {measured:<18} {presence:<18} {true_presence}")
    lines.append(f"    (start = {start:.1f} s, end = {end:.1f} s of the run)")
    return lines


def _phases(
    analysis: AnalysisRecord, truth: Sequence[TruthSample], hold: HoldSpan | None
) -> list[str]:
    lines = ["  phase fractions of the HRTEM field, measured (truth)"]
    if not analysis.phase_fractions:
        return [*lines, "    not measured"]
    if hold is not None:
        end = hold.end_s if hold.end_s is not None else hold.start_s
        times = [("hold start", hold.start_s + WINDOW_S), ("middle", 0.5 * (hold.start_s + end)),
                 ("hold end", end)]  # fmt: skip
    else:
        last = max(float(s.time[-1]) for s in analysis.phase_fractions.values())
        times = [("end", last)]
    for label, at in times:
        parts = []
        for phase in ("layered", "disordered", "rock_salt"):
            series = analysis.phase_fractions.get(phase)
            measured = series.at(at, WINDOW_S) if series is not None else None
            true = window_median(truth, at - WINDOW_S, at, phase)
            true_text = "-" if true is None else f"{true:.2f}"
            parts.append(f"{phase.replace('_', ' ')} {_fmt(measured, '.2f')} ({true_text})")
        lines.append(f"    {label:<10} {at:6.1f} s  " + ", ".join(parts))
    return lines


def _truth_at(truth: Sequence[TruthSample], times: np.ndarray, key: str) -> np.ndarray:
    values = []
    for t in times:
        sample = nearest(truth, float(t))
        value = sample.truth.get(key) if sample is not None else None
        values.append(float(value) if isinstance(value, (int, float)) else math.nan)
    return np.array(values)


def _measured_vs_true(
    series: Series | None,
    truth: Sequence[TruthSample],
    key: str,
    hold_only: tuple[float, float] | None,
) -> tuple[float | None, float | None]:
    """Medians of the measured values and of the truth at the same times (within the hold)."""
    low, high = hold_only if hold_only is not None else (-math.inf, math.inf)
    if series is None or not series.measured:
        # Nothing measured: the truth over the hold still says what there was to measure.
        true = np.array(
            [s.truth.get(key, math.nan) for s in truth if low <= s.time_s <= high], dtype=float
        )
        return None, (float(np.nanmedian(true)) if np.any(np.isfinite(true)) else None)
    keep = np.isfinite(series.value) & (series.time >= low) & (series.time <= high)
    if not np.any(keep):
        return None, None
    true = _truth_at(truth, series.time[keep], key)
    true_median = float(np.nanmedian(true)) if np.any(np.isfinite(true)) else None
    return float(np.median(series.value[keep])), true_median


def _front(
    analysis: AnalysisRecord, truth: Sequence[TruthSample], hold: HoldSpan | None
) -> list[str]:
    span = None
    if hold is not None:
        span = (hold.start_s, hold.end_s if hold.end_s is not None else math.inf)
    speed, true_speed = _measured_vs_true(
        analysis.series.get(FRONT_VELOCITY.key), truth, "front_velocity_nm_s", span
    )
    lines = [
        f"  {'front speed, median over the hold':<35} {_fmt(speed, '.2f', ' nm/s')}"
        f"  (truth {_fmt(true_speed, '.2f', ' nm/s')})"
    ]
    position = analysis.series.get(FRONT_POSITION.key)
    if position is not None and position.measured:
        finite = np.isfinite(position.value)
        at = float(position.time[finite][-1])
        sample = nearest(truth, at)
        true = sample.truth.get("front_position_nm") if sample is not None else None
        where = f"front position, last at {at:.1f} s"
        lines.append(
            f"  {where:<35} {_fmt(position.last(1.0), '.0f', ' nm')}"
            f"  (truth {_fmt(true, '.0f', ' nm')})"
        )
    else:
        lines.append(f"  {'front position':<35} not measured")
    return lines


def _expansion(analysis: AnalysisRecord, truth: Sequence[TruthSample]) -> list[str]:
    series = analysis.series.get(EXPANSION.key)
    if series is None or not series.measured:
        return [f"  {'expansion':<35} not measured"]
    finite = np.isfinite(series.value)
    at = float(series.time[finite][-1])
    sample = nearest(truth, at)
    true = sample.truth.get("expansion") if sample is not None else None
    where = f"expansion, last at {at:.1f} s"
    return [
        f"  {where:<35} {_fmt(series.last(1.0), '+.1f', ' %', 100)}"
        f"  (truth {_fmt(true, '+.1f', ' %', 100)})"
    ]


def _drift(analysis: AnalysisRecord, truth: Sequence[TruthSample]) -> list[str]:
    """The drift since the first measured frame, and the rate, next to the truth's offset
    (`drift_x_nm`, `drift_y_nm`) moved over the same run times. Nothing when the run did
    not measure drift (a station without `[analysis] drift`)."""
    x, y = analysis.series.get(DRIFT_X.key), analysis.series.get(DRIFT_Y.key)
    if x is None or y is None or not x.measured:
        return []
    finite = np.isfinite(x.value) & np.isfinite(y.value)
    first, last = float(x.time[finite][0]), float(x.time[finite][-1])
    start, end = nearest(truth, first), nearest(truth, last)
    true_text = "no truth"
    if start is not None and end is not None:
        moved = [
            float(end.truth.get(key, math.nan)) - float(start.truth.get(key, math.nan))
            for key in ("drift_x_nm", "drift_y_nm")
        ]
        true_text = f"truth x {_fmt(moved[0], '+.1f', ' nm')}, y {_fmt(moved[1], '+.1f', ' nm')}"
        if end.time_s > start.time_s:
            true_rate = math.hypot(*moved) / (end.time_s - start.time_s)
            true_text += f", mean {_fmt(true_rate, '.2f', ' nm/s')}"
    where = f"drift, last at {last:.1f} s"
    measured_x = float(x.value[finite][-1] - x.value[finite][0])
    measured_y = float(y.value[finite][-1] - y.value[finite][0])
    rate = analysis.series.get(DRIFT_RATE.key)
    rate_text = _fmt(rate.last(1.0) if rate is not None and rate.measured else None, ".2f", " nm/s")
    return [
        f"  {where:<35} x {measured_x:+.1f} nm, y {measured_y:+.1f} nm, rate {rate_text}"
        f"  ({true_text})"
    ]


def first_reached(truth: Sequence[TruthSample], phase: str, fraction: float) -> float | None:
    """The first run time the truth's HRTEM field was at least `fraction` `phase`."""
    for sample in truth:
        if (sample.field_fraction(phase) or 0.0) >= fraction:
            return sample.time_s
    return None


def _hold(hold: HoldSpan | None, truth: Sequence[TruthSample]) -> list[str]:
    if hold is None:
        return ["  hold: none in this run"]
    lines = [f"  hold ended by: {hold.ended_by}  ({hold.message})"]
    at = first_reached(truth, "rock_salt", 0.9)
    if at is not None:
        lines.append(
            f"  truth: the HRTEM field was >= 90 % rock salt from {at:.1f} s "
            f"({at - hold.start_s:.1f} s into the hold)"
        )
    return lines
