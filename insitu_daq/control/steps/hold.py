"""The `hold` step: keep everything as it is for a time, or until a condition over live values."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import field_validator

from insitu_daq.control.conditions import HOLDER_QUANTITIES, ConditionError, Until, parse_until
from insitu_daq.control.station import Station
from insitu_daq.control.steps.base import (
    PlanState,
    Positive,
    Step,
    StepContext,
    StepRefused,
    StepSpec,
    register,
)
from insitu_daq.control.steps.interleave import Interleave
from insitu_daq.control.steps.temperature import PLAN_ROOM_C
from insitu_daq.core.config import SafetyLimits


class Hold(Step):
    """Keep everything as it is for `duration_s` run-clock seconds (pauses excluded).

    With `until`, the hold ends once the condition over live values has held for its
    persistence (`... for N s`, by default 2 s for analysis quantities: control/conditions.py), and
    `duration_s` is its timeout (mandatory: a condition that never comes true must not hold
    a biased particle forever).
    """

    kind: ClassVar[str] = "hold"
    shorthand: ClassVar[str | None] = "duration_s"
    duration_s: Positive
    until: str | None = None
    interleave: Interleave | None = None

    @field_validator("until")
    @classmethod
    def _parse_until(cls, text: str | None) -> str | None:
        if text is None:
            return None
        try:
            return str(parse_until(text))  # normalised spelling, persistence included
        except ConditionError as exc:
            raise ValueError(str(exc)) from None

    @property
    def condition(self) -> Until | None:
        return None if self.until is None else parse_until(self.until)

    def describe(self) -> str:
        if self.until is None:
            text = f"hold {self.duration_s:g} s"
        else:
            text = f"hold until {self.until} (at most {self.duration_s:g} s)"
        return text if self.interleave is None else f"{text}, {self.interleave.describe()}"


def execute(ctx: StepContext, step: Hold) -> dict[str, Any]:
    return ctx.timed(step.duration_s, step.condition, step.interleave)


def preflight(step: Hold, station: Station) -> None:
    if step.until is not None and not callable(getattr(station, "live_updates", None)):
        raise StepRefused("this station reports no live values", "until")
    condition = step.condition
    if condition is not None and not condition.quantities.isdisjoint(HOLDER_QUANTITIES):
        # Only a heating holder measures the chip: elsewhere the hold would silently run to
        # its timeout. The station's heater check answers (at room temperature, any limit).
        try:
            station.check_temperature(PLAN_ROOM_C, None)
        except StepRefused as exc:
            raise StepRefused(f"{exc}: nothing measures its temperature", "until") from None


def max_seconds(step: Hold, state: PlanState, limits: SafetyLimits) -> float:
    return step.duration_s  # a condition met early only shortens it


SPEC = register(StepSpec(Hold, execute, max_seconds=max_seconds, preflight=preflight, timed=True))
