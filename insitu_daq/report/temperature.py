"""A heating holder's temperature log read back: the run's range and the levels it held.

Pure functions over the log's arrays (run s, degC) and the frames' times, so the report, the
demo and the tests share one reading of "a level": a stretch in which the controller's setpoint
stays at one value for at least MIN_LEVEL_S of run time. The controller ramps its setpoint
(control/heater.py), so a ramp is a setpoint that changes at every reading and is no level;
with the heater off the setpoint follows the chip (sim/heating.py), which at room temperature
is one more level. The chip's temperature during a level (its overshoot and settling included)
is what `min_c`/`max_c` show. The frames recorded at a level are those from its first reading
up to the first reading at another setpoint (the end of the log for the last one): the
controller is read every poll interval, and a staircase's acquisition ends a level, so frames
after its last reading but before the next ramp's first belong to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from insitu_daq.runfile import layout
from insitu_daq.runfile.h5util import read_column

MIN_LEVEL_S = 1.0  # run seconds at one setpoint for a stretch to count as a level


@dataclass(frozen=True)
class TemperatureLevel:
    """One stretch at a constant setpoint."""

    setpoint_c: float
    start_s: float
    duration_s: float
    mean_c: float  # the chip, over the stretch
    min_c: float
    max_c: float
    frames: int  # frames recorded from its first reading to the next setpoint's


@dataclass(frozen=True)
class TemperatureSummary:
    readings: int
    span_s: float
    min_c: float
    max_c: float
    max_setpoint_c: float
    levels: list[TemperatureLevel]


def temperature_levels(
    time: np.ndarray,
    celsius: np.ndarray,
    setpoint: np.ndarray,
    frame_time: np.ndarray,
    min_level_s: float = MIN_LEVEL_S,
) -> list[TemperatureLevel]:
    """The stretches of constant setpoint lasting at least `min_level_s`, in time order,
    with the chip's temperature over each and the frames recorded at it (module docstring)."""
    levels: list[TemperatureLevel] = []
    if len(time) < 2:
        return levels
    change = np.flatnonzero(np.diff(setpoint) != 0) + 1
    for start, stop in zip(np.r_[0, change], np.r_[change, len(time)], strict=True):
        t, chip = time[start:stop], celsius[start:stop]
        if stop - start < 2 or t[-1] - t[0] < min_level_s:
            continue  # one reading of a ramp, or a stretch too short to be held
        until = time[stop] if stop < len(time) else np.inf
        frames = int(np.count_nonzero((frame_time >= t[0]) & (frame_time < until)))
        levels.append(
            TemperatureLevel(
                setpoint_c=float(setpoint[start]),
                start_s=float(t[0]),
                duration_s=float(t[-1] - t[0]),
                mean_c=float(np.mean(chip)),
                min_c=float(np.min(chip)),
                max_c=float(np.max(chip)),
                frames=frames,
            )
        )
    return levels


def summarize_temperature(
    time: np.ndarray, celsius: np.ndarray, setpoint: np.ndarray, frame_time: np.ndarray
) -> TemperatureSummary | None:
    """The log's range and levels; None for a run without a temperature log."""
    n = min(len(time), len(celsius), len(setpoint))  # SWMR: one column may run ahead
    if n == 0:
        return None
    time, celsius, setpoint = time[:n], celsius[:n], setpoint[:n]
    return TemperatureSummary(
        readings=n,
        span_s=float(time[-1] - time[0]),
        min_c=float(np.nanmin(celsius)),
        max_c=float(np.nanmax(celsius)),
        max_setpoint_c=float(np.nanmax(setpoint)),
        levels=temperature_levels(time, celsius, setpoint, np.sort(frame_time)),
    )


def read_temperature(f: h5py.File) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time, temperature, setpoint) of the run file's temperature log; empty without one."""
    log = layout.TEMPERATURE
    return (
        read_column(f, log.time),
        read_column(f, log.column("value")),
        read_column(f, log.column("setpoint")),
    )


def temperature_lines(summary: TemperatureSummary) -> list[str]:
    """The report's lines: the range, then one line a level."""
    lines = [
        f"temperature  {summary.readings} readings over {summary.span_s:.1f} s: chip "
        f"{summary.min_c:.1f} to {summary.max_c:.1f} C, setpoint up to "
        f"{summary.max_setpoint_c:.1f} C, {len(summary.levels)} levels"
    ]
    for level in summary.levels:
        lines.append(
            f"level        {level.setpoint_c:6.1f} C from {level.start_s:.1f} s for "
            f"{level.duration_s:.1f} s: chip {level.min_c:.1f} to {level.max_c:.1f} C "
            f"(mean {level.mean_c:.1f}), {level.frames} frames"
        )
    return lines
