"""The `microscope` step: imaging mode, beam, dose rate, pixel size."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from insitu_daq.control.steps.base import PlanState, Positive, Step, StepContext, StepSpec, register


class Microscope(Step):
    """Set the microscope: imaging mode, beam on/off (unblanked/blanked), dose rate, pixel size."""

    kind: ClassVar[str] = "microscope"
    mode: Literal["lm", "hrtem"] | None = None
    beam: bool | None = None
    dose_rate_e_per_a2_s: Positive | None = None
    pixel_size_nm: Positive | None = None

    @model_validator(mode="after")
    def _something_to_set(self) -> Microscope:
        if not self.settings():
            raise ValueError("set at least one of mode, beam, dose_rate_e_per_a2_s, pixel_size_nm")
        return self

    def describe(self) -> str:
        parts = []
        if self.mode is not None:
            parts.append(f"mode {self.mode}")
        if self.beam is not None:
            parts.append("beam on" if self.beam else "beam off")
        if self.dose_rate_e_per_a2_s is not None:
            parts.append(f"dose rate {self.dose_rate_e_per_a2_s:g} e/A^2/s")
        if self.pixel_size_nm is not None:
            parts.append(f"pixel size {self.pixel_size_nm:g} nm")
        return "microscope: " + ", ".join(parts)


def execute(ctx: StepContext, step: Microscope) -> dict[str, Any]:
    ctx.checkpoint()
    ctx.set_microscope(
        "step",
        mode=step.mode,
        beam=step.beam,
        dose_rate_e_per_a2_s=step.dose_rate_e_per_a2_s,
        pixel_size_nm=step.pixel_size_nm,
    )
    return {}


def after(step: Microscope, state: PlanState) -> PlanState:
    mode = state.mode if step.mode is None else step.mode
    beam = state.beam if step.beam is None else step.beam
    rates = state.dose_rates
    if step.dose_rate_e_per_a2_s is not None and mode is not None:  # the mode's own rate
        rates = (*((m, r) for m, r in rates if m != mode), (mode, step.dose_rate_e_per_a2_s))
    return dataclasses.replace(state, mode=mode, beam=beam, dose_rates=rates)


SPEC = register(StepSpec(Microscope, execute, after=after))
