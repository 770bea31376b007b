"""The live analysis a run file holds (/entry/analysis, written by runfile/analysislog.py).

Reads only, tolerant of a file without it or with some logs empty: a quantity nobody measured is
`None` and is reported as "not measured", never a made-up number.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from insitu_daq.analysis.quantities import (
    D_SPACING,
    INTENSITY,
    PHASE_FRACTION,
    PHASE_PRESENCE,
    Quantity,
    registered,
)
from insitu_daq.runfile import layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Series:
    """One NXlog: times (run clock, s) and values; NaN values are "analysed, not measurable"."""

    time: np.ndarray
    value: np.ndarray

    @property
    def measured(self) -> bool:
        return bool(np.any(np.isfinite(self.value)))

    def at(self, time_s: float, window_s: float = 3.0) -> float | None:
        """The median of the finite values within `window_s` before `time_s` (None if none)."""
        near = (self.time <= time_s) & (self.time >= time_s - window_s) & np.isfinite(self.value)
        return float(np.median(self.value[near])) if np.any(near) else None

    def first(self, window_s: float = 3.0) -> float | None:
        finite = np.isfinite(self.value)
        if not np.any(finite):
            return None
        start = float(self.time[finite][0])
        near = finite & (self.time <= start + window_s)
        return float(np.median(self.value[near]))

    def last(self, window_s: float = 3.0) -> float | None:
        finite = np.isfinite(self.value)
        return self.at(float(self.time[finite][-1]), window_s) if np.any(finite) else None


@dataclass(frozen=True)
class ReflectionSeries:
    """A tracked reflection: its table entry and its measured d [m] and intensity over time."""

    name: str
    label: str
    d_angstrom: float | None  # the table's (expected) spacing
    phase: str | None
    time: np.ndarray
    d_m: np.ndarray  # NaN: not detected in that result
    intensity: np.ndarray

    @property
    def title(self) -> str:
        """The label with the table's spacing, e.g. "NiO (200) 2.1 A" (once, if it has it)."""
        if self.d_angstrom is None or f"{self.d_angstrom:g} A" in self.label:
            return self.label
        return f"{self.label} {self.d_angstrom:g} A"

    @property
    def detected(self) -> np.ndarray:
        return np.isfinite(self.d_m)

    def d_series(self) -> Series:
        return Series(self.time, self.d_m)

    def intensity_series(self) -> Series:
        return Series(self.time, self.intensity)


@dataclass(frozen=True)
class AnalysisRecord:
    """What live analysis wrote into a run file; absent or empty logs are left out."""

    present: bool  # /entry/analysis exists
    results: int  # analysed frames
    reflections: dict[str, ReflectionSeries]
    # Every other declared quantity's log by its result key (analysis/quantities.py), a
    # family's members each under their own key ("rock_salt_fraction").
    series: dict[str, Series]
    parameters: dict[str, Any] = field(default_factory=dict)

    def members(self, quantity: Quantity) -> dict[str, Series]:
        """A family's logs by member, e.g. phase -> fraction over the particle (HRTEM)."""
        found = ((quantity.member_of(key), series) for key, series in self.series.items())
        return {member: series for member, series in found if member}

    @property
    def phase_fractions(self) -> dict[str, Series]:
        return self.members(PHASE_FRACTION)

    @property
    def phase_presence(self) -> dict[str, Series]:  # phase -> share of the tiles it is seen in
        return self.members(PHASE_PRESENCE)


def _series(group: h5py.Group | None, column: str = "value") -> Series | None:
    if group is None or "time" not in group or column not in group:
        return None
    time, value = group["time"][:], group[column][:]
    n = min(len(time), len(value))  # SWMR: one may run ahead of the other
    if n == 0:
        return None
    return Series(time[:n].astype(float), value[:n].astype(float))


def _child(group: h5py.Group | None, name: str) -> Any:
    if group is None:
        return None
    try:
        return group.get(name)
    except (KeyError, OSError):  # a dangling soft link, a group still being created
        return None


def read_analysis(entry: h5py.Group) -> AnalysisRecord:
    """The /entry/analysis logs of an open run file (missing pieces become None / empty)."""
    process = _child(entry, layout.ANALYSIS)
    parameters: dict[str, Any] = {}
    note = _child(_child(process, "parameters"), "data")
    if note is not None:
        try:
            raw = note[()]
            parameters = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except (ValueError, TypeError):
            log.warning("analysis parameters are not JSON; ignored")
    table = {}
    for record in parameters.get("reflections", []) if isinstance(parameters, dict) else []:
        if isinstance(record, dict) and "name" in record:
            table[str(record["name"])] = record
    reflections: dict[str, ReflectionSeries] = {}
    d_spacing = _child(process, D_SPACING.group)
    for name in d_spacing or ():
        group = d_spacing[name]
        if not {"time", D_SPACING.column} <= set(group):
            continue
        time, d_m = group["time"][:], group[D_SPACING.column][:]
        if INTENSITY.column in group:
            intensity = group[INTENSITY.column][:]
        else:
            intensity = np.full(len(d_m), np.nan)
        n = min(len(time), len(d_m), len(intensity))
        entry_of_table = table.get(name, {})
        d_ref = entry_of_table.get("d_angstrom")
        reflections[name] = ReflectionSeries(
            name=name,
            label=str(entry_of_table.get("label", name)),
            d_angstrom=float(d_ref) if isinstance(d_ref, (int, float)) else None,
            phase=entry_of_table.get("phase"),
            time=time[:n].astype(float),
            d_m=d_m[:n].astype(float),
            intensity=intensity[:n].astype(float),
        )
    series: dict[str, Series] = {}
    for quantity in registered():
        if quantity.per == "reflection":  # read above, with the table's labels
            continue
        group = _child(process, quantity.group)
        if quantity.per:  # an NXcollection of one NXlog per member
            logs = [(member, _child(group, member)) for member in group or ()]
        else:
            logs = [("", group)]
        for member, log_group in logs:
            found = _series(log_group, quantity.column)
            if found is not None:
                series[quantity.key_for(member)] = found
    results = _child(_child(process, "results"), "time")
    return AnalysisRecord(
        present=process is not None,
        results=len(results) if results is not None else 0,
        reflections=reflections,
        series=series,
        parameters=parameters if isinstance(parameters, dict) else {},
    )


EDGE_RESULTS = 5  # results at each end of a run that say whether a reflection is there


def format_analysis(analysis: AnalysisRecord) -> str:
    """Live analysis in a few lines: what was measured and its first and last values."""
    if not analysis.present:
        return "analysis     none in this file"
    lines = [f"analysis     {analysis.results} analysed frames"]
    for reflection in analysis.reflections.values():
        detected = reflection.detected
        if not np.any(detected):
            lines.append(f"  {reflection.title:<32} not detected")
            continue
        d = float(np.median(reflection.d_m[detected])) * 1e10
        # Present at the start / end: in most of the first / last few results that measured
        # something (NaN intensity too: no usable frame, e.g. the beam blanked at the end).
        usable = detected[np.isfinite(reflection.intensity) | detected]
        first = np.mean(usable[:EDGE_RESULTS]) >= 0.5
        last = np.mean(usable[-EDGE_RESULTS:]) >= 0.5
        lines.append(
            f"  {reflection.title:<32} d {d:.3f} A, detected in {detected.mean():.0%} of results"
            f" (at the start {'yes' if first else 'no'}, at the end {'yes' if last else 'no'})"
        )
    for quantity in registered():
        text = quantity.text
        if text is None:
            continue
        if quantity.per:  # a line per member measured, e.g. "rock salt fraction"
            lines_of = [
                (text.label.format(member.replace("_", " ")), series)
                for member, series in analysis.members(quantity).items()
            ]
        else:
            lines_of = [(text.label, analysis.series.get(quantity.key))]
        for name, series in lines_of:
            if series is None or not series.measured:
                lines.append(f"  {name:<32} not measured")
                continue
            first, last = series.first(), series.last()
            scale, unit = text.scale, text.unit
            lines.append(
                f"  {name:<32} first {first * scale:.3g}{unit}, last {last * scale:.3g}{unit}"
            )
    return "\n".join(lines)
