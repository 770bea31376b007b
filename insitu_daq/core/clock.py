"""The run clock: one time axis for every record of a run.

A record's time is seconds since the run's start (`/entry/start_time`), taken from the
monotonic clock so intervals never jump; the start itself is wall time (`time.time_ns()`).

`time_scale` exists for simulated stations only: `insitu-daq sim --time-scale S` fast-forwards
the physics S times, and a daemon configured with the same S counts run-clock seconds as
station seconds (wall seconds x S), so protocol durations, ramp rates and the times in the run
file read as in a real experiment. Transport rates (bias sampling, flushes) stay wall-clock
rates. On a real station S is 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunClock:
    """Seconds since `start_ns` on the monotonic clock, scaled by `time_scale`."""

    time_scale: float = 1.0
    start_ns: int = field(default_factory=time.time_ns)
    start_monotonic_ns: int = field(default_factory=time.monotonic_ns)

    def now(self) -> float:
        return self.from_monotonic_ns(time.monotonic_ns())

    def from_monotonic_ns(self, monotonic_ns: int) -> float:
        """Run-clock seconds of a `time.monotonic_ns()` reading."""
        return (monotonic_ns - self.start_monotonic_ns) * 1e-9 * self.time_scale

    def from_wall_ns(self, wall_ns: int) -> float:
        """Run-clock seconds of a `time.time_ns()` reading (for stamps taken in wall time)."""
        return (wall_ns - self.start_ns) * 1e-9 * self.time_scale

    def wall_seconds(self, run_seconds: float) -> float:
        """How long `run_seconds` of run time lasts on the wall."""
        return run_seconds / self.time_scale

    def to_dict(self) -> dict[str, float | int]:
        return {
            "time_scale": self.time_scale,
            "start_ns": self.start_ns,
            "start_monotonic_ns": self.start_monotonic_ns,
        }
