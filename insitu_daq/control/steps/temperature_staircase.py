"""The `temperature_staircase` step: the heating study's staircase in one step.

    - temperature_staircase: {to_celsius: 500, step_c: 15, rate_c_per_s: 0.1,
                              settle_s: 300, acquire_s: 20}

From `from_celsius` (default: where the chip is when the step starts; at room temperature after
a fresh start) toward `to_celsius` in levels `step_c` apart, the last one `to_celsius` itself.
At each level: ramp at `rate_c_per_s` and settle within `tolerance_c` (the `temperature` step's
`ramp_and_settle`), hold `settle_s`, then, if `acquire_s` is given, record frames for
`acquire_s` (recording on, then off). With `blank_between`, the beam is blanked from the start
of the step and unblanked only while acquiring: a low-dose study irradiates the specimen for its
acquisitions, not for the hours of ramps and holds between them. Each level is a `temperature`
event. A pause stops the setpoint or the hold where it is; resuming goes on from there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator

from insitu_daq.control.limits import SafetyCheck
from insitu_daq.control.station import Station
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
from insitu_daq.control.steps.temperature import PLAN_ROOM_C, ramp_seconds, settle_at
from insitu_daq.core.config import SafetyLimits
from insitu_daq.core.records import EventKind

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
MAX_LEVELS = 1000  # a typo'd step_c (0.01 C to 500 C) is refused, not run for a week


def levels(start_c: float, to_c: float, step_c: float) -> list[float]:
    """The levels after `start_c`, `step_c` apart toward `to_c`, the last one `to_c` (a last
    step shorter than `step_c/100` is merged into the one before)."""
    span = to_c - start_c
    count = max(1, math.ceil(abs(span) / step_c - 0.01))
    direction = math.copysign(step_c, span)
    return [start_c + direction * k for k in range(1, count)] + [to_c]


class TemperatureStaircase(Step):
    """Levels `step_c` apart up (or down) to `to_celsius`: ramp, settle, hold, acquire each."""

    kind: ClassVar[str] = "temperature_staircase"
    to_celsius: Finite
    step_c: Positive
    rate_c_per_s: Positive | None = None
    settle_s: NonNegative = 0.0
    acquire_s: NonNegative = 0.0
    from_celsius: Finite | None = None
    tolerance_c: Positive = 1.0
    blank_between: bool = False

    @model_validator(mode="after")
    def _not_too_many_levels(self) -> TemperatureStaircase:
        start = PLAN_ROOM_C if self.from_celsius is None else self.from_celsius
        count = len(levels(start, self.to_celsius, self.step_c))
        if count > MAX_LEVELS:
            raise ValueError(f"step_c: {count} levels; at most {MAX_LEVELS}")
        if self.blank_between and not self.acquire_s:
            raise ValueError("blank_between: the beam would never be on; set acquire_s")
        return self

    def describe(self) -> str:
        rate = rate_text(self.rate_c_per_s, "C/s")
        start = "" if self.from_celsius is None else f"from {self.from_celsius:g} C "
        text = f"temperature staircase {start}to {self.to_celsius:g} C in {self.step_c:g} C steps"
        text += f" at {rate}, {self.settle_s:g} s settle"
        text += f", {self.acquire_s:g} s acquire" if self.acquire_s else ""
        return text + (", beam blanked between" if self.blank_between else "")

    def plan_levels(self, start_c: float | None) -> list[float]:
        """Every level it ramps to: `from_celsius` first when given (then the levels from
        there), else the levels from `start_c` (the chip's; None: taken as PLAN_ROOM_C)."""
        if self.from_celsius is not None:
            return [self.from_celsius, *levels(self.from_celsius, self.to_celsius, self.step_c)]
        return levels(PLAN_ROOM_C if start_c is None else start_c, self.to_celsius, self.step_c)


def execute(ctx: StepContext, step: TemperatureStaircase) -> dict[str, Any]:
    stop = ctx.checkpoint()
    start: float | None = None  # from_celsius given: plan_levels starts there
    if step.from_celsius is None:
        status = ctx.station.holder_call(lambda d: d.status(), stop)
        start = status.setpoint_c if status.heater_on else status.temperature_c
    planned = step.plan_levels(start)
    reached = math.nan
    if step.blank_between:
        ctx.set_microscope("temperature_staircase", beam=False)
    for number, level in enumerate(planned, 1):
        ctx.emit(
            EventKind.TEMPERATURE,
            f"level {number}/{len(planned)}: {level:g} C",
            {"level": number, "levels": len(planned), "celsius": level},
        )
        reached = settle_at(ctx, level, step.rate_c_per_s, step.tolerance_c)
        if step.settle_s:
            ctx.timed(ctx.step_time() + step.settle_s, None, None)
        if step.acquire_s:
            if step.blank_between:
                ctx.set_microscope("temperature_staircase", beam=True)
            ctx.set_recording(True)
            ctx.timed(ctx.step_time() + step.acquire_s, None, None)
            ctx.set_recording(False)
            if step.blank_between:
                ctx.set_microscope("temperature_staircase", beam=False)
    return {
        "levels": len(planned),
        "temperature_c": reached,
        "summary": f"{len(planned)} levels, last settled at {reached:.1f} C",
    }


def check_limits(step: TemperatureStaircase, check: SafetyCheck) -> None:
    # Every level lies between the start and to_celsius: the highest of the two is the one
    # that can break the limit (the start, when given, is a level too).
    check.temperature(step.to_celsius, step.rate_c_per_s, field="to_celsius")
    if step.from_celsius is not None:
        check.temperature(step.from_celsius, step.rate_c_per_s, field="from_celsius")


def preflight(step: TemperatureStaircase, station: Station) -> None:
    station.check_temperature(step.to_celsius, step.rate_c_per_s)


def max_seconds(step: TemperatureStaircase, state: PlanState, limits: SafetyLimits) -> float:
    planned = step.plan_levels(state.temperature_c)
    seconds = 0.0
    previous = state.temperature_c
    for level in planned:
        seconds += ramp_seconds(previous, level, step.rate_c_per_s, limits)
        seconds += step.settle_s + step.acquire_s
        previous = level
    return seconds


def recorded_seconds(step: TemperatureStaircase, state: PlanState, limits: SafetyLimits) -> float:
    if not step.acquire_s:  # it leaves recording as it is
        return max_seconds(step, state, limits) if state.recording else 0.0
    return len(step.plan_levels(state.temperature_c)) * step.acquire_s


def after(step: TemperatureStaircase, state: PlanState) -> PlanState:
    recording = False if step.acquire_s else state.recording
    return dataclasses.replace(state, temperature_c=step.to_celsius, recording=recording)


SPEC = register(
    StepSpec(
        TemperatureStaircase,
        execute,
        max_seconds=max_seconds,
        check_limits=check_limits,
        preflight=preflight,
        after=after,
        recorded_seconds=recorded_seconds,
    )
)
