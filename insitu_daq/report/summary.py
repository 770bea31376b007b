"""`insitu-daq report RUN.h5`: what a run file holds, in numbers a microscopist checks first.

Reads only: works on a finished file and on one still being written (SWMR). `summarize` is the
acquisition (frames, bias, holds, events). The live analysis is read by report/analysis.py, the
events' story (modes, the hold) by report/events.py; the figure is drawn by report/figure.py from
these.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from insitu_daq.report.dose import DoseSummary, format_dose, read_dose
from insitu_daq.report.events import read_events
from insitu_daq.report.frames import frame_stacks
from insitu_daq.report.temperature import (
    TemperatureSummary,
    read_temperature,
    summarize_temperature,
    temperature_lines,
)
from insitu_daq.runfile import layout
from insitu_daq.runfile.h5util import open_for_reading, read_column


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
    # Frames of later geometries (runfile/frames.py): (NXdetector path, frames, frame shape).
    other_geometries: list[tuple[str, int, tuple[int, ...]]] = field(default_factory=list)
    imaging_frames: dict[str, int] = field(default_factory=dict)  # per-frame imaging_mode
    # Run s of the file's last record (frame, bias reading or event): how long the run has
    # lasted on its own clock (end_time - start_time is wall time, which the demo's
    # time-scaled run clock outruns).
    last_time_s: float = 0.0
    # A heating holder's temperature log (report/temperature.py); None: the run has none.
    temperature: TemperatureSummary | None = None
    dose: DoseSummary | None = None  # per region against its budget (report/dose.py)

    @property
    def frame_rate_hz(self) -> float | None:
        if self.frames < 2 or self.first_frame_time_s is None or self.last_frame_time_s is None:
            return None
        span = self.last_frame_time_s - self.first_frame_time_s
        return (self.frames - 1) / span if span > 0 else None


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
    with open_for_reading(path) as f:
        detector = f[layout.DETECTOR]
        frame_time = detector["frame_time"][:]
        image_id = detector["image_id"][:]
        series_id = detector["series_id"][:]
        others = _other_geometries(f)
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
        t = read_column(f, layout.BIAS_VOLTAGE.time)
        volts = read_column(f, layout.BIAS_VOLTAGE.column("value"))
        setpoint = read_column(f, layout.BIAS_VOLTAGE.column("setpoint"))
        amps = read_column(f, layout.CURRENT.column("value"))
        events = read_events(f[layout.ENTRY])
        all_frame_times = np.concatenate([frame_time, *(g["frame_time"][:] for g in others)])
        temperature = summarize_temperature(*read_temperature(f), all_frame_times)
        last_times = [x[-1] for x in (t, frame_time) if len(x)]
        last_times += [g["frame_time"][-1] for g in others if len(g["frame_time"])]
        last_times += [max(time for time, _, _ in events)] if events else []
        return RunSummary(
            path=path,
            run_id=_text(f[layout.RUN_ID]),
            title=_text(f[layout.TITLE]),
            start_time=_text(f[layout.START_TIME]),
            end_time=_text(f[layout.END_TIME]),
            protocol_name=_text(f[layout.PROTOCOL_FILE_NAME]),
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
            event_counts=dict(Counter(kind for _, kind, _ in events)),
            events=events,
            other_geometries=[
                (g.name, len(g["frame_time"]), tuple(g["data"].shape[1:])) for g in others
            ],
            imaging_frames=dict(modes),
            last_time_s=float(max(last_times, default=0.0)),
            temperature=temperature,
            dose=read_dose(f),
        )


def _other_geometries(file: h5py.File) -> list[h5py.Group]:
    """The NXdetector groups of frame geometries after the first (detector_1, detector_2...)."""
    return frame_stacks(file)[1:]


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
    if summary.temperature is not None:
        lines += temperature_lines(summary.temperature)
    if summary.dose is not None:
        lines += format_dose(summary.dose)
    counts = ", ".join(f"{kind} {n}" for kind, n in sorted(summary.event_counts.items()))
    lines.append(f"events       {counts or 'none'}")
    for time, kind, message in summary.events[:events]:
        lines.append(f"  {time:9.3f} s  {kind:<18} {message}")
    if len(summary.events) > events:
        lines.append(f"  ... {len(summary.events) - events} more")
    return "\n".join(lines)
