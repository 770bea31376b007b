"""The `acquire` step: start or stop recording frames into the run file."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from insitu_daq.control.steps.base import PlanState, Step, StepContext, StepSpec, register


class Acquire(Step):
    """Start or stop recording frames into the run file."""

    kind: ClassVar[str] = "acquire"
    shorthand: ClassVar[str | None] = "action"
    action: Literal["start", "stop"]

    def describe(self) -> str:
        return f"{self.action} recording"


def execute(ctx: StepContext, step: Acquire) -> dict[str, Any]:
    ctx.checkpoint()
    ctx.set_recording(step.action == "start")
    return {}


def after(step: Acquire, state: PlanState) -> PlanState:
    return dataclasses.replace(state, recording=step.action == "start")


SPEC = register(StepSpec(Acquire, execute, after=after))
