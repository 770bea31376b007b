"""The one ramp staircase: how a bias level moves toward a target, never stepped, never fast.

The rule (the bias controller's since issue 3, now everyone's): full steps of `max_step`
toward the target, then the remainder; each step is due |step| / rate after the previous write
ended, the first one |step| / rate after the ramp started (the level may have changed just
before). A write that takes long delays the next one, never hurries it, so the ramp is never
faster than the rate; when the writes cannot keep up it runs slower.

Users: the bias controller's goal loop takes one step per turn with `next_level` and
`step_interval_s` (it samples between steps and may change its goal at any time); whoever
ramps without that loop calls `ramp`: the guardian and `insitu-daq safe` (guardian.
make_source_meter_safe), and a bias controller whose I/O thread is gone. Nothing here talks to
an instrument: `ramp` writes through the `set_level` it is given.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from insitu_daq.control.limits import SafetyCheck


def next_level(level: float, target: float, max_step: float) -> float:
    """The level after one step from `level` toward `target`: a full step, or the remainder."""
    span = target - level
    if abs(span) <= max_step:
        return target
    return level + math.copysign(max_step, span)


def step_interval_s(step: float, rate: float) -> float:
    """How long after the previous write a step of `step` volts is due, at `rate` V/s."""
    return abs(step) / rate


def ramp(
    set_level: Callable[[float], None],
    start: float,
    target: float,
    max_step: float,
    rate_per_wall_s: float,
    stop: threading.Event | None = None,
    on_step: Callable[[float], None] | None = None,
    check: SafetyCheck | None = None,
) -> bool:
    """Step from `start` (the level now) to `target`, writing each level with `set_level`.

    `rate_per_wall_s` is in volts per wall second (a time-scaled station's rate x its time
    scale). `check`, if given, checks each step against the station's limits before it is
    written (LimitError, nothing written). `on_step(level)` follows each write. Returns True
    once at the target, False when `stop` was set (the level stays where the last step left
    it).
    """
    if not (rate_per_wall_s > 0 and max_step > 0):
        raise ValueError("rate and step must be positive")
    level = start
    last_change = time.monotonic()
    while level != target:
        to = next_level(level, target, max_step)
        delay = last_change + step_interval_s(to - level, rate_per_wall_s) - time.monotonic()
        if stop is not None:
            if stop.wait(max(0.0, delay)):
                return False
        elif delay > 0:
            time.sleep(delay)
        if check is not None:
            check.step(level, to)
        set_level(to)
        last_change = time.monotonic()
        level = to
        if on_step is not None:
            on_step(level)
    return True
