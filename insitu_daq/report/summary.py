"""`insitu-daq report RUN.h5`: what a run file holds, in numbers a microscopist checks first.

Reads only: works on a finished file and on one still being written (SWMR). `summarize` is the
acquisition (frames, bias, holds, events); `read_analysis` the live analysis under
/entry/analysis (analysislog.py), tolerant of a file without it or with some logs empty: a
quantity nobody measured is `None` and is reported as "not measured", never a made-up number.
`imaging_modes` and `hold_span` read back, from the events, when the microscope was in which
mode (the runner's `microscope` events) and when the hold ran and what ended it. The figure
is drawn by figure.py from these.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HoldSummary:
    """One stretch of constant non-zero setpoint."""

    setpoint_volts: float
    start_s: float
    duration_s: float
    max_deviation_volts: float  # max |measured - setpoint|
    rms_deviation_volts: float
    mean_current_amperes: float
    charge_coulomb: float


@dataclass(frozen=True)
class RunSummary:
    path: Path
    run_id: str
    title: str
    start_time: str
    end_time: str
    protocol_name: str
    frames: int
    frame_shape: tuple[int, ...]
    first_frame_time_s: float | None
    last_frame_time_s: float | None
    frame_time_monotonic: bool
    missing_image_ids: int
    bias_samples: int
    bias_span_s: float
    charge_coulomb: float
    holds: list[HoldSummary]
    event_counts: dict[str, int]
    events: list[tuple[float, str, str]] = field(default_factory=list)
    # Frames of later geometries (runfile_frames.py): (NXdetector path, frames, frame shape).
    other_geometries: list[tuple[str, int, tuple[int, ...]]] = field(default_factory=list)
    imaging_frames: dict[str, int] = field(default_factory=dict)  # per-frame imaging_mode

    @property
    def frame_rate_hz(self) -> float | None:
        if self.frames < 2 or self.first_frame_time_s is None or self.last_frame_time_s is None:
            return None
        span = self.last_frame_time_s - self.first_frame_time_s
        return (self.frames - 1) / span if span > 0 else None


def read_column(group: h5py.Group, path: str, dtype: str = "<f8") -> np.ndarray:
    """A dataset's values; empty when absent (a closed run file leaves out a log nobody
    wrote: runfile_finish.py)."""
    dataset = group.get(path)
    return np.zeros(0, dtype=dtype) if dataset is None else dataset[:]


def _text(dataset: h5py.Dataset) -> str:
    value = dataset[()]
    return value.decode() if isinstance(value, bytes) else str(value)


MIN_HOLD_S = 1.0  # run seconds at one setpoint for a stretch to count as a hold


def _holds(time: np.ndarray, volts: np.ndarray, setpoint: np.ndarray, amps: np.ndarray):
    """Stretches where the setpoint stays at one non-zero value (the ramps excluded)."""
    holds = []
    if len(time) < 2:
        return holds
    change = np.flatnonzero(np.diff(setpoint) != 0) + 1
    for start, stop in zip(np.r_[0, change], np.r_[change, len(time)], strict=True):
        if stop - start < 2 or setpoint[start] == 0:
            continue
        if time[stop - 1] - time[start] < MIN_HOLD_S:
            continue  # a step of a ramp's staircase, not a hold
        t, v, i = time[start:stop], volts[start:stop], amps[start:stop]
        deviation = v - setpoint[start]
        holds.append(
            HoldSummary(
                setpoint_volts=float(setpoint[start]),
                start_s=float(t[0]),
                duration_s=float(t[-1] - t[0]),
                max_deviation_volts=float(np.max(np.abs(deviation))),
                rms_deviation_volts=float(np.sqrt(np.mean(deviation**2))),
                mean_current_amperes=float(np.mean(i)),
                charge_coulomb=float(np.trapezoid(i, t)),
            )
        )
    return holds


def summarize(path: str | Path) -> RunSummary:
    path = Path(path)
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        entry = f["entry"]
        detector = entry["instrument/detector"]
        frame_time = detector["frame_time"][:]
        image_id = detector["image_id"][:]
        series_id = detector["series_id"][:]
        others = _other_geometries(entry["instrument"])
        modes = Counter(
            m.decode() or "undecided" for m in read_column(detector, "imaging_mode", "S1")
        )
        for group in others:
            image_id = np.r_[image_id, group["image_id"][:]]
            series_id = np.r_[series_id, group["series_id"][:]]
            modes.update(
                m.decode() or "undecided" for m in read_column(group, "imaging_mode", "S1")
            )
        missing = 0
        for series in np.unique(series_id):
            ids = np.sort(image_id[series_id == series])
            missing += int(ids[-1] - ids[0] + 1 - len(np.unique(ids))) if len(ids) else 0
        t = read_column(entry, "sample/bias_voltage/time")
        volts = read_column(entry, "sample/bias_voltage/value")
        setpoint = read_column(entry, "sample/bias_voltage/setpoint")
        amps = read_column(entry, "sample/current/value")
        event_time = read_column(entry, "events/time")
        kinds = [k.decode() for k in read_column(entry, "events/kind", "S1")]
        messages = [m.decode() for m in read_column(entry, "events/message", "S1")]
        return RunSummary(
            path=path,
            run_id=_text(entry["run_id"]),
            title=_text(entry["title"]),
            start_time=_text(entry["start_time"]),
            end_time=_text(entry["end_time"]),
            protocol_name=_text(entry["protocol/file_name"]),
            # frame_time, not data: per-frame columns trail the pixel data until a flush.
            frames=len(frame_time),
            frame_shape=tuple(detector["data"].shape[1:]),
            first_frame_time_s=float(frame_time[0]) if len(frame_time) else None,
            last_frame_time_s=float(frame_time[-1]) if len(frame_time) else None,
            frame_time_monotonic=bool(np.all(np.diff(frame_time) > 0)),
            missing_image_ids=missing,
            bias_samples=len(t),
            bias_span_s=float(t[-1] - t[0]) if len(t) else 0.0,
            # NaN current: not measured (output off), so no current flowed through the source.
            charge_coulomb=float(np.trapezoid(np.nan_to_num(amps), t)) if len(t) > 1 else 0.0,
            holds=_holds(t, volts, setpoint, amps),
            event_counts=dict(Counter(kinds)),
            events=list(zip(event_time.tolist(), kinds, messages, strict=True)),
            other_geometries=[
                (g.name, len(g["frame_time"]), tuple(g["data"].shape[1:])) for g in others
            ],
            imaging_frames=dict(modes),
        )


def _other_geometries(instrument: h5py.Group) -> list[h5py.Group]:
    """The NXdetector groups of frame geometries after the first (detector_1, detector_2...)."""
    names = [name for name in instrument if re.fullmatch(r"detector_\d+", name)]
    return [instrument[name] for name in sorted(names, key=lambda n: int(n.split("_")[1]))]


def format_summary(summary: RunSummary, events: int = 12) -> str:
    lines = [
        f"run          {summary.run_id}  ({summary.title})",
        f"file         {summary.path}",
        f"started      {summary.start_time}",
        f"ended        {summary.end_time or '(still open or not closed)'}",
        f"protocol     {summary.protocol_name or '-'}",
    ]
    rate = summary.frame_rate_hz
    frames = f"{summary.frames} of {'x'.join(map(str, summary.frame_shape))}"
    if rate and summary.first_frame_time_s is not None and summary.last_frame_time_s is not None:
        span = summary.last_frame_time_s - summary.first_frame_time_s
        frames += f", {rate:.1f} frames/s over {span:.1f} s"
    lines.append(f"frames       {frames} written")
    for path, count, shape in summary.other_geometries:
        lines.append(f"             and {count} of {'x'.join(map(str, shape))} in {path}")
    if summary.imaging_frames:
        modes = ", ".join(f"{mode} {n}" for mode, n in sorted(summary.imaging_frames.items()))
        lines.append(f"imaging      frames by mode: {modes}")
    lines.append(
        f"             lost (missing image ids) {summary.missing_image_ids}, frame_time "
        f"monotonic: {'yes' if summary.frame_time_monotonic else 'NO'}"
    )
    lines.append(
        f"bias log     {summary.bias_samples} samples over {summary.bias_span_s:.1f} s, "
        f"charge passed {summary.charge_coulomb:.3e} C"
    )
    for hold in summary.holds:
        lines.append(
            f"hold         {hold.setpoint_volts:+.3f} V from {hold.start_s:.1f} s for "
            f"{hold.duration_s:.1f} s: max |V - set| {hold.max_deviation_volts * 1e3:.3f} mV, "
            f"rms {hold.rms_deviation_volts * 1e3:.3f} mV, mean current "
            f"{hold.mean_current_amperes * 1e9:.3f} nA, charge {hold.charge_coulomb:.3e} C"
        )
    counts = ", ".join(f"{kind} {n}" for kind, n in sorted(summary.event_counts.items()))
    lines.append(f"events       {counts or 'none'}")
    for time, kind, message in summary.events[:events]:
        lines.append(f"  {time:9.3f} s  {kind:<18} {message}")
    if len(summary.events) > events:
        lines.append(f"  ... {len(summary.events) - events} more")
    return "\n".join(lines)


# ----- live analysis ---------------------------------------------------------------------------
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
    """What live analysis wrote into a run file; absent or empty logs are None / empty."""

    present: bool  # /entry/analysis exists
    results: int  # analysed frames
    reflections: dict[str, ReflectionSeries]
    phase_fractions: dict[str, Series]  # phase -> fraction over the particle (HRTEM)
    front_position_nm: Series | None
    front_velocity_nm_s: Series | None
    expansion: Series | None
    parameters: dict[str, Any] = field(default_factory=dict)
    phase_presence: dict[str, Series] = field(default_factory=dict)  # phase -> share seen


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
    process = _child(entry, "analysis")
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
    d_spacing = _child(process, "d_spacing")
    for name in d_spacing or ():
        group = d_spacing[name]
        if not {"time", "value"} <= set(group):
            continue
        time, d_m = group["time"][:], group["value"][:]
        intensity = group["intensity"][:] if "intensity" in group else np.full(len(d_m), np.nan)
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
    fractions_group = _child(process, "phase_fraction")
    fractions, presence = {}, {}
    for phase in fractions_group or ():
        series = _series(fractions_group[phase])
        if series is not None:
            fractions[phase] = series
        seen = _series(fractions_group[phase], "presence")
        if seen is not None:
            presence[phase] = seen
    results = _child(_child(process, "results"), "time")
    return AnalysisRecord(
        present=process is not None,
        results=len(results) if results is not None else 0,
        reflections=reflections,
        phase_fractions=fractions,
        phase_presence=presence,
        front_position_nm=_series(_child(process, "front_position")),
        front_velocity_nm_s=_series(_child(process, "front_velocity")),
        expansion=_series(_child(process, "expansion")),
        parameters=parameters if isinstance(parameters, dict) else {},
    )


# ----- what the events say -------------------------------------------------------------------
# The runner's microscope events: "microscope: mode hrtem -> lm, dose rate 2 e/A^2/s (interleave)"
# or "microscope: mode lm, beam on, ... (step)"; a setting without a mode changes no mode.
_MODE_IN_MESSAGE = re.compile(r"^microscope: mode (?:\S+ -> )?(?P<mode>[a-z]+)\b")
_STEP_MESSAGE = re.compile(r"^step (?P<number>\d+)/\d+ (?P<kind>[a-z]+)(?P<done> done)?\b")


def imaging_modes(
    events: list[tuple[float, str, str]], initial: str | None = None
) -> list[tuple[float, str]]:
    """(time, mode) at each imaging-mode change, in time order, from the microscope events.

    `initial` (the mode at the run's start, from /entry/instrument/microscope/mode) is the
    first entry at -inf when known.
    """
    changes: list[tuple[float, str]] = [(-math.inf, initial)] if initial else []
    for time, kind, message in events:
        if kind != "microscope":
            continue
        match = _MODE_IN_MESSAGE.match(message)
        if match:
            changes.append((time, match["mode"]))
    return changes


def mode_at(changes: list[tuple[float, str]], time_s: float) -> str | None:
    mode = None
    for time, changed_to in changes:
        if time > time_s:
            break
        mode = changed_to
    return mode


@dataclass(frozen=True)
class HoldSpan:
    """The protocol's (first) hold step as the events recorded it."""

    start_s: float
    end_s: float | None  # None: the run ended (aborted, or still running) inside it
    ended_by: str  # "duration", "condition", "timeout" or "not ended"
    message: str  # the step's end message (or start message if it has none)


def hold_span(events: list[tuple[float, str, str]]) -> HoldSpan | None:
    """When the first hold step ran and what ended it (its end message says it)."""
    start: tuple[float, str, str] | None = None
    for time, kind, message in events:
        if kind != "step":
            continue
        match = _STEP_MESSAGE.match(message)
        if not match or match["kind"] != "hold":
            continue
        if not match["done"]:
            if start is None:
                start = (time, match["number"], message)
            continue
        if start is None or match["number"] != start[1]:
            continue
        if " not met within " in message:
            ended_by = "timeout"
        elif " met after " in message:
            ended_by = "condition"
        else:
            ended_by = "duration"
        return HoldSpan(start[0], time, ended_by, message)
    if start is None:
        return None
    return HoldSpan(start[0], None, "not ended", start[2])


def read_events(entry: h5py.Group) -> list[tuple[float, str, str]]:
    times = read_column(entry, "events/time")
    kinds = [k.decode() for k in read_column(entry, "events/kind", "S1")]
    messages = [m.decode() for m in read_column(entry, "events/message", "S1")]
    n = min(len(times), len(kinds), len(messages))
    return list(zip(times[:n].tolist(), kinds[:n], messages[:n], strict=True))


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
    quantities = [
        *((f"{phase.replace('_', ' ')} fraction", series, 1.0, "")
          for phase, series in analysis.phase_fractions.items()),
        ("front position", analysis.front_position_nm, 1.0, " nm"),
        ("front speed", analysis.front_velocity_nm_s, 1.0, " nm/s"),
        ("expansion", analysis.expansion, 100.0, " %"),
    ]  # fmt: skip
    for name, series, scale, unit in quantities:
        if series is None or not series.measured:
            lines.append(f"  {name:<32} not measured")
            continue
        first, last = series.first(), series.last()
        lines.append(f"  {name:<32} first {first * scale:.3g}{unit}, last {last * scale:.3g}{unit}")
    return "\n".join(lines)
