"""The `wait` step: let time pass (settling, drift)."""

from __future__ import annotations

from typing import Any, ClassVar

from insitu_daq.control.steps.base import PlanState, Positive, Step, StepContext, StepSpec, register
from insitu_daq.control.steps.interleave import Interleave
from insitu_daq.core.config import SafetyLimits


class Wait(Step):
    """Let time pass (settling, drift) for `duration_s` run-clock seconds (pauses excluded)."""

    kind: ClassVar[str] = "wait"
    shorthand: ClassVar[str | None] = "duration_s"
    duration_s: Positive
    interleave: Interleave | None = None

    def describe(self) -> str:
        text = f"wait {self.duration_s:g} s"
        return text if self.interleave is None else f"{text}, {self.interleave.describe()}"


def execute(ctx: StepContext, step: Wait) -> dict[str, Any]:
    return ctx.timed(step.duration_s, None, step.interleave)


def max_seconds(step: Wait, state: PlanState, limits: SafetyLimits) -> float:
    return step.duration_s


SPEC = register(StepSpec(Wait, execute, max_seconds=max_seconds, timed=True))
