"""The `retract` step: back the tip off the particle."""

from __future__ import annotations

from typing import Any, ClassVar

from insitu_daq.control.station import Stopped
from insitu_daq.control.steps.base import PlanState, Positive, Step, StepContext, StepSpec, register
from insitu_daq.core.config import SafetyLimits


class Retract(Step):
    """Back the tip off the particle."""

    kind: ClassVar[str] = "retract"
    distance_nm: Positive
    speed_nm_s: Positive = 200.0

    def describe(self) -> str:
        return f"retract {self.distance_nm:g} nm at {self.speed_nm_s:g} nm/s"


def execute(ctx: StepContext, step: Retract) -> dict[str, Any]:
    """After a pause the retract is re-issued with only the distance left."""
    remaining = step.distance_nm
    while True:
        stop = ctx.checkpoint()
        try:
            ctx.station.retract(remaining, step.speed_nm_s, stop)
        except Stopped as exc:
            ctx.check_stopped(exc, stop)
            if exc.moved_nm is not None:
                remaining -= exc.moved_nm
            if remaining <= 0:
                return {}
            continue
        return {}


def max_seconds(step: Retract, state: PlanState, limits: SafetyLimits) -> float:
    return step.distance_nm / step.speed_nm_s


SPEC = register(StepSpec(Retract, execute, max_seconds=max_seconds))
