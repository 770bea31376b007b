"""The `approach` step: drive the tip toward the particle until contact."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from insitu_daq.control.station import StationError, Stopped
from insitu_daq.control.steps.base import PlanState, Positive, Step, StepContext, StepSpec, register
from insitu_daq.core.config import SafetyLimits

log = logging.getLogger(__name__)


class Approach(Step):
    """Drive the tip toward the particle until contact, never further than `max_travel_nm`."""

    kind: ClassVar[str] = "approach"
    speed_nm_s: Positive = 100.0
    max_travel_nm: Positive

    def describe(self) -> str:
        return (
            f"approach at {self.speed_nm_s:g} nm/s until contact"
            f" (at most {self.max_travel_nm:g} nm)"
        )


def execute(ctx: StepContext, step: Approach) -> dict[str, Any]:
    """After a pause the approach is re-issued with only the travel left."""
    remaining = step.max_travel_nm
    travelled = 0.0
    while True:
        stop = ctx.checkpoint()
        try:
            travelled += ctx.station.approach(step.speed_nm_s, remaining, stop)
        except Stopped as exc:
            ctx.check_stopped(exc, stop)
            if exc.moved_nm is None:
                log.warning("approach stopped without saying how far it went")
            else:
                travelled += exc.moved_nm
                remaining -= exc.moved_nm
            if remaining <= 0:
                raise StationError(
                    f"no contact within the maximum travel of {step.max_travel_nm:g} nm"
                ) from None
            continue
        return {"travel_nm": travelled, "summary": f"contact after {travelled:.0f} nm"}


def max_seconds(step: Approach, state: PlanState, limits: SafetyLimits) -> float:
    return step.max_travel_nm / step.speed_nm_s  # the whole travel


SPEC = register(StepSpec(Approach, execute, max_seconds=max_seconds))
