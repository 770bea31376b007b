"""Short bursts in another imaging mode during a hold or wait (not a step kind: a setting)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from insitu_daq.control.steps.base import Positive


class Interleave(BaseModel):
    """Short bursts in another imaging mode during a hold or wait (one camera, two views).

    Every `every_s` seconds of the step's clock (pauses excluded) the runner switches the
    microscope to `mode` for `dwell_s`, then back to the mode the protocol had set before the
    step; each switch is a `microscope` event. The dose rate in `mode` is the one that mode
    last had in this protocol, or `dose_rate_e_per_a2_s`. Bursts start at k * every_s
    (k >= 1) and last dwell_s from the completed switch (runner._Bursts); a burst still running
    when the step ends is cut short there.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["lm", "hrtem"]
    every_s: Positive
    dwell_s: Positive
    dose_rate_e_per_a2_s: Positive | None = None

    @model_validator(mode="after")
    def _dwell_shorter_than_period(self) -> Interleave:
        if self.dwell_s >= self.every_s:
            raise ValueError(
                f"dwell_s ({self.dwell_s:g} s) must be shorter than every_s ({self.every_s:g} s)"
            )
        return self

    def describe(self) -> str:
        return f"{self.mode.upper()} bursts of {self.dwell_s:g} s every {self.every_s:g} s"
