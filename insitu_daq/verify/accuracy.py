"""Issue 4's accuracy figures, measured from a run file's analysis record against the truth.

Pure functions: the live analysis as the run file holds it (report.read_analysis) and the
simulator's truth polled during the run (truthcompare.TruthSample, RUN.truth.json) in,
`Verdict`s out (measured, true, difference, tolerance, met or not). The demo prints them and
tests/verify/test_accuracy_e2e.py asserts them on a real end-to-end run. No simulator import.

The figures and how each is defined (both sides the same way, at the same run times):
- d-spacings: per tracked reflection of 1.5-5 A detected in at least MIN_DETECTIONS results,
  the median measured d against the true d (the truth's drawn spacing that matches the
  table's within 2 %, else the table's): within 1 %.
- Rock-salt onset: the first run time rock salt is *persistently* present, i.e. the first of
  ONSET_RUN consecutive observations that all show it: on the measured side the phase maps
  that see rock salt in at least one particle tile (`rock_salt_presence` > 0: NiO (200) spots
  in a tile, phasemap.py), on the truth side the truth samples whose HRTEM field holds rock
  salt (the 2.1 A spacing drawn). Within 2 s. A run of ONSET_RUN, not one observation, so a
  single noise peak is not an onset. Reported with it: the truth's field fraction of rock salt
  at the measured onset (what the map needed to see it), and when the whole-field (200) ring
  of the spectrum became persistent (it needs ~20-30 % of the field, several seconds later:
  why the onset is not judged on it).
- Front speed: the median over the hold of the live speed (a Theil-Sen fit over the last
  `front_window_s`, pipeline.py) against the median of the true mean speed over the same
  windows ((position(t) - position(t - window)) / window, truth interpolated): within 15 %.
- Expansion: at every LM look of the hold (the look's last result) and at the hold's end
  (the last result before it), measured against the truth interpolated at that result's
  time: the largest difference within 2 percentage points.
- No-bias control (the truth never saw a bias): no persistent (200) and no persistent
  disordered 1.95 A in the spectrum, no persistent rock-salt presence in the phase maps (the
  onset detector above), the rock-salt and disordered fractions of every phase map at most
  CONTROL_MAX_FRACTION, |expansion| at most 2 percentage points throughout.
A figure that cannot be computed (nothing measured, no truth) is a failed verdict saying why,
never a pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from insitu_daq.analysis.quantities import EXPANSION, FRONT_VELOCITY
from insitu_daq.report.analysis import AnalysisRecord, ReflectionSeries, Series
from insitu_daq.report.events import HoldSpan
from insitu_daq.verify.truth import TruthSample

D_TOLERANCE = 0.01  # relative
D_RANGE_ANGSTROM = (1.5, 5.0)
ONSET_TOLERANCE_S = 2.0
FRONT_SPEED_TOLERANCE = 0.15  # relative
EXPANSION_TOLERANCE = 0.02  # absolute (2 percentage points)
CONTROL_MAX_FRACTION = 0.05  # a phase map's rock-salt or disordered share: "none"

MIN_DETECTIONS = 5  # results detecting a reflection before its median d is judged
ONSET_RUN = 3  # consecutive observations that make a spacing "present"
ROCK_SALT = "nio_200"
ROCK_SALT_D_ANGSTROM = 2.1
DISORDERED = "disordered_195"
DISORDERED_D_ANGSTROM = 1.95
BIASED_VOLTS = 0.1  # the truth saw a bias above this: a biased run, not the control
LM_LOOK_GAP_S = 1.0  # LM results further apart than this belong to different looks


@dataclass(frozen=True)
class Verdict:
    """One accuracy figure: what was measured, the truth, and whether it is within tolerance."""

    quantity: str  # e.g. "d LiNiO2 (003)", "rock-salt onset"
    measured: float | None
    true: float | None
    tolerance: float  # on `error`, in the same unit
    unit: str  # for display, e.g. " s", " %", " A"
    ok: bool
    note: str = ""  # extra context or why it could not be computed
    summary: str = ""  # replaces "measured .., truth .." where that says nothing (the control)

    @property
    def error(self) -> float | None:
        """measured - true, in `unit` (the line shows d and speed relative)."""
        if self.measured is None or self.true is None:
            return None
        return self.measured - self.true

    def line(self) -> str:
        return f"{self.quantity}: {self.text()}"

    def text(self) -> str:
        if self.summary:
            return self.summary
        if self.measured is None or self.true is None:
            return f"not judged ({self.note})"
        inside = "within" if self.ok else "NOT within"
        body = (
            f"measured {self.measured:.4g}{self.unit}, truth {self.true:.4g}{self.unit} "
            f"({self._difference()}, {inside} {self._tolerance()})"
        )
        return f"{body}; {self.note}" if self.note else body

    def _difference(self) -> str:
        if self.unit in (" A", " nm/s"):
            return f"{(self.measured / self.true - 1) * 100:+.1f} %"  # type: ignore[operator]
        return f"{self.error:+.2f}{self.unit}"

    def _tolerance(self) -> str:
        if self.unit in (" A", " nm/s"):
            return f"{self.tolerance * 100:g} %"
        return f"{self.tolerance:g}{self.unit}"


def _relative_verdict(
    quantity: str,
    measured: float | None,
    true: float | None,
    tolerance: float,
    unit: str,
    note: str = "",
) -> Verdict:
    ok = measured is not None and true is not None and true != 0
    ok = ok and abs(measured / true - 1) <= tolerance  # type: ignore[operator]
    return Verdict(quantity, measured, true, tolerance, unit, bool(ok), note)


def _absolute_verdict(
    quantity: str,
    measured: float | None,
    true: float | None,
    tolerance: float,
    unit: str,
    note: str = "",
) -> Verdict:
    ok = measured is not None and true is not None and abs(measured - true) <= tolerance
    return Verdict(quantity, measured, true, tolerance, unit, bool(ok), note)


# ----- truth helpers ---------------------------------------------------------------------------
def truth_series(truth: Sequence[TruthSample], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(times, values) of a numeric truth field, samples without it left out."""
    pairs = [
        (s.time_s, float(value))
        for s in truth
        if isinstance(value := s.truth.get(key), (int, float)) and not isinstance(value, bool)
    ]
    if not pairs:
        return np.empty(0), np.empty(0)
    times, values = np.array(pairs).T
    return times, values


def truth_at(truth: Sequence[TruthSample], key: str, times: np.ndarray) -> np.ndarray:
    """The truth field `key` linearly interpolated at `times` (NaN outside the samples)."""
    t, v = truth_series(truth, key)
    if len(t) == 0:
        return np.full(len(times), math.nan)
    return np.interp(times, t, v, left=math.nan, right=math.nan)


def was_biased(truth: Sequence[TruthSample]) -> bool:
    _, volts = truth_series(truth, "bias_volts")
    return bool(len(volts) and np.max(np.abs(volts)) > BIASED_VOLTS)


# ----- onsets ------------------------------------------------------------------------------------
def persistent_onset(times: np.ndarray, present: np.ndarray, run: int = ONSET_RUN) -> float | None:
    """The time of the first of `run` consecutive observations that are all present."""
    count = 0
    for index, is_present in enumerate(present):
        count = count + 1 if is_present else 0
        if count == run:
            return float(times[index - run + 1])
    return None


def measured_onset(reflection: ReflectionSeries, run: int = ONSET_RUN) -> float | None:
    """When the whole-field spectrum first detects `reflection` persistently."""
    return persistent_onset(reflection.time, reflection.detected, run)


def presence_onset(presence: Series | None, run: int = ONSET_RUN) -> float | None:
    """When the phase maps first see a phase persistently (presence > 0 in `run` maps)."""
    if presence is None:
        return None
    mapped = np.isfinite(presence.value)  # a map that was not measurable is no observation
    return persistent_onset(presence.time[mapped], presence.value[mapped] > 0, run)


def true_onset(
    truth: Sequence[TruthSample], d_angstrom: float, run: int = ONSET_RUN
) -> float | None:
    times = np.array([s.time_s for s in truth])
    present = np.array([s.has_spacing(d_angstrom) for s in truth], dtype=bool)
    return persistent_onset(times, present, run)


def onset_verdict(analysis: AnalysisRecord, truth: Sequence[TruthSample]) -> Verdict:
    name = "rock-salt onset (rock salt persistently seen in the phase map)"
    presence = analysis.phase_presence.get("rock_salt")
    measured = presence_onset(presence)
    true = true_onset(truth, ROCK_SALT_D_ANGSTROM)
    if measured is None or true is None:
        if presence is None:
            why = "no phase map presence logged"
        else:
            why = "never seen persistently" if measured is None else "no rock salt in the truth"
        return Verdict(name, measured, true, ONSET_TOLERANCE_S, " s", False, why)
    notes = []
    fraction = _field_fraction_at(truth, "rock_salt", measured)
    if fraction is not None:
        notes.append(f"field {fraction:.1%} rock salt then")
    reflection = analysis.reflections.get(ROCK_SALT)
    ring = measured_onset(reflection) if reflection is not None else None
    if ring is not None:
        notes.append(f"whole-field (200) ring from {ring:.1f} s")
    return _absolute_verdict(name, measured, true, ONSET_TOLERANCE_S, " s", "; ".join(notes))


def _field_fraction_at(truth: Sequence[TruthSample], phase: str, time_s: float) -> float | None:
    pairs = [(s.time_s, s.field_fraction(phase)) for s in truth]
    pairs = [(t, v) for t, v in pairs if v is not None]
    if not pairs:
        return None
    t, v = np.array(pairs).T
    return float(np.interp(time_s, t, v))


# ----- d-spacings --------------------------------------------------------------------------------
def true_d_angstrom(truth: Sequence[TruthSample], table_d: float) -> float:
    """The simulator's drawn spacing matching the table's (within 2 %), else the table's."""
    for sample in truth:
        for entry in sample.truth.get("field_d_spacings", []):
            d = entry.get("d_m") if isinstance(entry, dict) else None
            if isinstance(d, (int, float)) and abs(d * 1e10 / table_d - 1) <= 0.02:
                return float(d * 1e10)
    return table_d


def spacing_verdicts(
    analysis: AnalysisRecord, truth: Sequence[TruthSample], min_detections: int = MIN_DETECTIONS
) -> list[Verdict]:
    """One verdict per tracked reflection of 1.5-5 A detected in `min_detections` results."""
    verdicts = []
    low, high = D_RANGE_ANGSTROM
    for reflection in analysis.reflections.values():
        table_d = reflection.d_angstrom
        if table_d is None or not low <= table_d <= high:
            continue
        detected = reflection.detected
        if int(np.sum(detected)) < min_detections:
            continue
        measured = float(np.median(reflection.d_m[detected])) * 1e10
        note = f"median of {int(np.sum(detected))} results"
        verdicts.append(
            _relative_verdict(
                f"d {reflection.title}",
                measured,
                true_d_angstrom(truth, table_d),
                D_TOLERANCE,
                " A",
                note,
            )
        )
    return verdicts


# ----- front speed -------------------------------------------------------------------------------
def true_mean_speed(truth: Sequence[TruthSample], times: np.ndarray, window_s: float) -> np.ndarray:
    """(position(t) - position(t - window)) / window from the truth, at each of `times`."""
    now = truth_at(truth, "front_position_nm", times)
    before = truth_at(truth, "front_position_nm", times - window_s)
    return (now - before) / window_s


def front_speed_verdict(
    analysis: AnalysisRecord, truth: Sequence[TruthSample], hold: HoldSpan | None
) -> Verdict:
    name = "front speed (median over the hold)"
    series = analysis.series.get(FRONT_VELOCITY.key)
    window = float(analysis.parameters.get("front_window_s", 10.0))
    if hold is None:
        return Verdict(name, None, None, FRONT_SPEED_TOLERANCE, " nm/s", False, "no hold")
    keep = _in_hold(series, hold)
    if series is None or not np.any(keep):
        return Verdict(
            name, None, None, FRONT_SPEED_TOLERANCE, " nm/s", False, "never measured in the hold"
        )
    times = series.time[keep]
    true = true_mean_speed(truth, times, window)
    if not np.any(np.isfinite(true)):
        return Verdict(name, None, None, FRONT_SPEED_TOLERANCE, " nm/s", False, "no truth")
    measured = float(np.median(series.value[keep]))
    note = f"{int(np.sum(keep))} results, true = mean speed over the {window:g} s fit window"
    return _relative_verdict(
        name, measured, float(np.nanmedian(true)), FRONT_SPEED_TOLERANCE, " nm/s", note
    )


def _in_hold(series: Series | None, hold: HoldSpan) -> np.ndarray:
    if series is None:
        return np.zeros(0, dtype=bool)
    end = hold.end_s if hold.end_s is not None else math.inf
    return np.isfinite(series.value) & (series.time >= hold.start_s) & (series.time <= end)


# ----- expansion ---------------------------------------------------------------------------------
def look_ends(times: np.ndarray, gap_s: float = LM_LOOK_GAP_S) -> np.ndarray:
    """Indices of the last result of each LM look (results closer than `gap_s` are one look)."""
    if len(times) == 0:
        return np.zeros(0, dtype=int)
    breaks = np.flatnonzero(np.diff(times) > gap_s)
    return np.r_[breaks, len(times) - 1].astype(int)


def expansion_verdicts(
    analysis: AnalysisRecord, truth: Sequence[TruthSample], hold: HoldSpan | None
) -> list[Verdict]:
    """At the hold's end, and the worst over the LM looks of the hold."""
    series = analysis.series.get(EXPANSION.key)
    if hold is None or series is None:
        why = "no hold" if hold is None else "never measured"
        return [Verdict("expansion", None, None, EXPANSION_TOLERANCE * 100, " %", False, why)]
    keep = _in_hold(series, hold)
    if not np.any(keep):
        return [
            Verdict(
                "expansion",
                None,
                None,
                EXPANSION_TOLERANCE * 100,
                " %",
                False,
                "never measured in the hold",
            )
        ]
    times, values = series.time[keep], series.value[keep]
    true = truth_at(truth, "expansion", times)
    ends = look_ends(times)
    end = ends[-1]
    verdicts = [
        _absolute_verdict(
            f"expansion at the hold's end ({times[end]:.1f} s)",
            values[end] * 100,
            true[end] * 100,
            EXPANSION_TOLERANCE * 100,
            " %",
        )
    ]
    judged = ends[np.isfinite(true[ends])]
    if len(judged):
        worst = judged[np.argmax(np.abs(values[judged] - true[judged]))]
        verdicts.append(
            _absolute_verdict(
                f"expansion, worst of {len(judged)} LM looks ({times[worst]:.1f} s)",
                values[worst] * 100,
                true[worst] * 100,
                EXPANSION_TOLERANCE * 100,
                " %",
            )
        )
    return verdicts


# ----- the no-bias control -----------------------------------------------------------------------
def control_verdicts(analysis: AnalysisRecord, truth: Sequence[TruthSample]) -> list[Verdict]:
    """No phase change seen where none happened (each: measured against the expected 0)."""
    verdicts = []
    for name, d in ((ROCK_SALT, ROCK_SALT_D_ANGSTROM), (DISORDERED, DISORDERED_D_ANGSTROM)):
        reflection = analysis.reflections.get(name)
        if reflection is None or len(reflection.time) == 0:
            verdicts.append(Verdict(f"{name} onset", None, None, 0, "", False, "no results"))
            continue
        detections = int(np.sum(reflection.detected))
        verdicts.append(
            _nothing_persistent(
                f"{reflection.title} (none expected)",
                measured_onset(reflection),
                detections,
                f"{detections} single detections of {len(reflection.time)} results",
                true_onset(truth, d),
            )
        )
    presence = analysis.phase_presence.get("rock_salt")
    label = "rock salt seen in the phase map (none expected)"
    if presence is None or not presence.measured:
        verdicts.append(Verdict(label, None, 0.0, 0.0, "", False, "never mapped"))
    else:
        seen = int(np.sum(presence.value > 0))
        maps = int(np.sum(np.isfinite(presence.value)))
        verdicts.append(
            _nothing_persistent(
                label,
                presence_onset(presence),
                seen,
                f"{seen} single maps of {maps}",
                true_onset(truth, ROCK_SALT_D_ANGSTROM),
            )
        )
    for phase in ("rock_salt", "disordered"):
        series = analysis.phase_fractions.get(phase)
        label = f"{phase.replace('_', ' ')} fraction, largest (none expected)"
        if series is None or not series.measured:
            verdicts.append(
                Verdict(label, None, 0.0, CONTROL_MAX_FRACTION, "", False, "never measured")
            )
            continue
        largest = float(np.nanmax(series.value))
        maps = int(np.sum(np.isfinite(series.value)))
        verdicts.append(
            _absolute_verdict(label, largest, 0.0, CONTROL_MAX_FRACTION, "", f"{maps} phase maps")
        )
    series = analysis.series.get(EXPANSION.key)
    label = "|expansion|, largest (none expected)"
    if series is None or not series.measured:
        verdicts.append(
            Verdict(label, None, 0.0, EXPANSION_TOLERANCE * 100, " %", False, "never measured")
        )
    else:
        finite = np.isfinite(series.value)
        largest = float(np.max(np.abs(series.value[finite]))) * 100
        verdicts.append(
            _absolute_verdict(
                label,
                largest,
                0.0,
                EXPANSION_TOLERANCE * 100,
                " %",
                f"{int(np.sum(finite))} LM results",
            )
        )
    return verdicts


def _nothing_persistent(
    label: str, onset: float | None, sightings: int, counted: str, truth_onset: float | None
) -> Verdict:
    """A control's verdict: never persistently seen (`counted` says how often it was seen
    once), and nothing in the truth either."""
    note = (
        f"never persistently ({counted})" if onset is None else f"persistently from {onset:.1f} s"
    )
    ok = onset is None and truth_onset is None
    return Verdict(label, float(sightings), 0.0, 0.0, "", ok, note, summary=note)


def accuracy_verdicts(
    analysis: AnalysisRecord, truth: Sequence[TruthSample], hold: HoldSpan | None
) -> list[Verdict]:
    """All figures for a run: the biased ones, or the control's when the truth saw no bias."""
    if not truth:
        return [Verdict("accuracy", None, None, 0, "", False, "no truth samples")]
    if not was_biased(truth):
        return control_verdicts(analysis, truth)
    return [
        *spacing_verdicts(analysis, truth),
        onset_verdict(analysis, truth),
        front_speed_verdict(analysis, truth, hold),
        *expansion_verdicts(analysis, truth, hold),
    ]


def format_verdicts(verdicts: Sequence[Verdict]) -> str:
    met = sum(v.ok for v in verdicts)
    lines = [f"accuracy against the truth (issue 4 figures): {met} of {len(verdicts)} met"]
    lines += [f"  {'ok ' if v.ok else 'NO '} {v.line()}" for v in verdicts]
    return "\n".join(lines)
