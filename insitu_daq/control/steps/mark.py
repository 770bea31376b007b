"""The `mark` step: an annotation in the run's events."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import Field

from insitu_daq.control.steps.base import Step, StepContext, StepSpec, register
from insitu_daq.core.records import EventKind


class Mark(Step):
    """Write an annotation into the run's events."""

    kind: ClassVar[str] = "mark"
    shorthand: ClassVar[str | None] = "text"
    text: Annotated[str, Field(min_length=1)]

    def describe(self) -> str:
        return f"mark: {self.text}"


def execute(ctx: StepContext, step: Mark) -> dict[str, Any]:
    ctx.checkpoint()
    ctx.emit(EventKind.MARK, step.text)
    return {}


SPEC = register(StepSpec(Mark, execute))
