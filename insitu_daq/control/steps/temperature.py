"""The `temperature` step: ramp a heating holder's chip to a temperature and let it settle.

`temperature: {celsius: 250, rate_c_per_s: 0.1}` (or `temperature: 250` at the station's
maximum rate). The controller ramps its own setpoint (control/heater.py: ramps, never steps);
the step checks target and rate against the station's limits at load and again just before
writing them (`Station.check_temperature`), then watches the chip until it is within
`tolerance_c` of the target, after the setpoint has arrived, for SETTLED_FOR_S. A pause
stops the setpoint where it is (`HOLD`); resuming ramps on from there. The heater stays on
after the step: a protocol holds or acquires at the temperature with the existing steps
(`hold`, `wait`, `acquire`); every run's end switches it off (control/heater.py says why).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, ClassVar

from insitu_daq.control.heater import start_ramp
from insitu_daq.control.limits import SafetyCheck
from insitu_daq.control.station import Station, StationError, Stopped
from insitu_daq.control.steps.base import (
    Finite,
    PlanState,
    Positive,
    Step,
    StepContext,
    StepSpec,
    rate_text,
    register,
)
from insitu_daq.core.config import SafetyLimits

log = logging.getLogger(__name__)

# Settled: within the tolerance for this long (run-clock s) once the setpoint has arrived; a
# second-order loop's overshoot passes through the band, so one reading in it is not enough.
SETTLED_FOR_S = 2.0
# The chip must settle within this long (run-clock s) of its setpoint arriving, or the step
# fails (a heater that cannot reach its target: a broken chip, a lost contact): a few times
# the loop's settling time of seconds (sim/heating.py).
SETTLE_TIMEOUT_S = 30.0
POLL_S = 0.1  # wall seconds between status reads while waiting
# A run starts with the heater off (every run ends with it off): the chip at room temperature,
# taken low so that a planned ramp up is never shorter than the real one.
PLAN_ROOM_C = 20.0


class Temperature(Step):
    """Ramp the chip to `celsius` at `rate_c_per_s` (None: the station's maximum) and wait
    until it has settled within `tolerance_c`."""

    kind: ClassVar[str] = "temperature"
    shorthand: ClassVar[str | None] = "celsius"
    celsius: Finite
    rate_c_per_s: Positive | None = None
    tolerance_c: Positive = 1.0

    def describe(self) -> str:
        rate = rate_text(self.rate_c_per_s, "C/s")
        return f"ramp chip to {self.celsius:g} C at {rate}, settle within {self.tolerance_c:g} C"


def ramp_and_settle(
    station: Station,
    celsius: float,
    rate_c_per_s: float | None,
    tolerance_c: float,
    stop: threading.Event,
) -> float:
    """Checked, then ramped and watched until settled (see the module docstring); returns
    the chip's temperature then. Stopped when `stop` is set (the setpoint held where it is),
    StationError when the heater goes off or the chip does not settle."""
    rate = station.check_temperature(celsius, rate_c_per_s)  # before anything is written
    station.holder_call(lambda d: start_ramp(d, celsius, rate), stop)
    clock = station.clock
    arrived: float | None = None  # run time the setpoint reached the target
    settled_since: float | None = None
    while True:
        status = station.holder_call(lambda d: d.status(), stop)
        now = clock.now()
        if not status.heater_on:
            raise StationError(f"heater off at {status.temperature_c:.1f} C while ramping")
        if not status.ramping:
            arrived = now if arrived is None else arrived
            if abs(status.temperature_c - celsius) <= tolerance_c:
                settled_since = now if settled_since is None else settled_since
                if now - settled_since >= SETTLED_FOR_S:
                    return float(status.temperature_c)
            else:
                settled_since = None
                if now - arrived > SETTLE_TIMEOUT_S:
                    raise StationError(
                        f"chip at {status.temperature_c:.1f} C, not within {tolerance_c:g} C of"
                        f" {celsius:g} C {SETTLE_TIMEOUT_S:g} s after its setpoint arrived"
                    )
        if stop.wait(POLL_S):
            try:  # nothing moves while paused: the setpoint stays where it got to
                station.holder_call(lambda d: d.hold(), threading.Event())
            except StationError as exc:
                log.warning("holding the setpoint on a stop failed: %s", exc)
            raise Stopped("temperature ramp interrupted")


def settle_at(
    ctx: StepContext, celsius: float, rate_c_per_s: float | None, tolerance_c: float
) -> float:
    """`ramp_and_settle` as the runner's move (a pause holds the setpoint, a resume ramps on
    from there): the temperature steps' one way to a temperature."""
    return ctx.move(
        lambda stop: ramp_and_settle(ctx.station, celsius, rate_c_per_s, tolerance_c, stop)
    )


def execute(ctx: StepContext, step: Temperature) -> dict[str, Any]:
    reached = settle_at(ctx, step.celsius, step.rate_c_per_s, step.tolerance_c)
    return {"temperature_c": reached, "summary": f"settled at {reached:.1f} C"}


def check_limits(step: Temperature, check: SafetyCheck) -> None:
    check.temperature(step.celsius, step.rate_c_per_s)


def preflight(step: Temperature, station: Station) -> None:
    station.check_temperature(step.celsius, step.rate_c_per_s)  # limits, and a heater at all


def ramp_seconds(
    from_c: float | None, to_c: float, rate_c_per_s: float | None, limits: SafetyLimits
) -> float:
    """The longest a ramp and its settling take (run-clock s)."""
    rate = rate_c_per_s or limits.max_temperature_rate_c_per_s
    start = PLAN_ROOM_C if from_c is None else from_c
    return abs(to_c - start) / rate + SETTLE_TIMEOUT_S + SETTLED_FOR_S


def max_seconds(step: Temperature, state: PlanState, limits: SafetyLimits) -> float:
    return ramp_seconds(state.temperature_c, step.celsius, step.rate_c_per_s, limits)


def after(step: Temperature, state: PlanState) -> PlanState:
    return dataclasses.replace(state, temperature_c=step.celsius)


SPEC = register(
    StepSpec(
        Temperature,
        execute,
        max_seconds=max_seconds,
        check_limits=check_limits,
        preflight=preflight,
        after=after,
    )
)
