"""The `bias` step: ramp (never step) the bias to a level."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

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
from insitu_daq.core.config import SafetyLimits


class Bias(Step):
    """Ramp (never step) the bias to `volts`; rate None means the station's maximum ramp rate."""

    kind: ClassVar[str] = "bias"
    shorthand: ClassVar[str | None] = "volts"
    volts: Finite
    rate_volts_per_s: Positive | None = None

    def describe(self) -> str:
        return f"ramp bias to {self.volts:+.3f} V at {rate_text(self.rate_volts_per_s, 'V/s')}"


def execute(ctx: StepContext, step: Bias) -> dict[str, Any]:
    ctx.ramp_bias(step.volts, step.rate_volts_per_s)
    return {}


def check_limits(step: Bias, check: SafetyCheck) -> None:
    check.bias(step.volts, step.rate_volts_per_s)


def preflight(step: Bias, station: Station) -> None:
    station.check_bias(step.volts, step.rate_volts_per_s)  # the station's own limits


def max_seconds(step: Bias, state: PlanState, limits: SafetyLimits) -> float:
    rate = step.rate_volts_per_s or limits.max_ramp_rate_volts_per_s
    return abs(step.volts - state.bias_volts) / rate


def after(step: Bias, state: PlanState) -> PlanState:
    return dataclasses.replace(state, bias_volts=step.volts)


SPEC = register(
    StepSpec(
        Bias,
        execute,
        max_seconds=max_seconds,
        check_limits=check_limits,
        preflight=preflight,
        after=after,
    )
)
