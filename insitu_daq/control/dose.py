"""A protocol's planned electron dose against the station's dose budget, before it runs.

The planned dose is what the protocol would give a region of the specimen at most: each
step's longest duration (its kind's `max_seconds`, as the recording plan counts it) while the
beam is on, at the dose rate of the mode it images in (the rate a microscope step set for
that mode in this protocol, else the microscope's own for it at load, else the config's
`[dose] dose_rate_e_per_a2_s`), an interleave's bursts as scheduled at theirs (each
`dwell_s` at every `every_s`), plus the ramp-down every run ends with. Time with the beam
on counts whether or not frames are recorded: the specimen takes the dose either way (a
recording step with the beam blanked takes none). All of it is counted against one region:
a protocol cannot move the field, and the low-magnification field holds the HRTEM field, so
the region imaged most takes it all.

The first step by whose end the plan is beyond the budget is named in a one-line refusal
(control/limits.py `check_dose`), as a bias beyond a limit is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from insitu_daq.control.limits import LimitError, check_dose
from insitu_daq.control.protocol import Protocol, ProtocolError
from insitu_daq.control.steps import STEPS, PlanState
from insitu_daq.core.config import SafetyLimits


@dataclass(frozen=True)
class BeamAtLoad:
    """The microscope as a protocol finds it: beam, mode, and each mode's dose rate known."""

    beam_on: bool | None = None  # None: not known (counted as on)
    mode: str | None = None
    dose_rates: dict[str, float] = field(default_factory=dict)


def interleave_burst_seconds(duration_s: float, every_s: float, dwell_s: float) -> float:
    """The longest time a step of `duration_s` spends in interleave bursts: one burst of
    `dwell_s` at each k * every_s (k >= 1) before the step ends (control/runner.py `_Bursts`),
    the last one cut at the end."""
    starts = max(0, math.ceil(duration_s / every_s) - 1)
    bursts = (min(dwell_s, duration_s - k * every_s) for k in range(1, starts + 1))
    return min(duration_s, sum(bursts))


def planned_doses(
    protocol: Protocol, limits: SafetyLimits, start: BeamAtLoad, fallback_rate: float
) -> list[float]:
    """The planned dose (e/A^2) by the end of each step, cumulative; one more entry for the
    ramp-down the runner ends every run with."""
    state = PlanState(mode=start.mode, beam=start.beam_on)

    def rate(mode: str | None, given: float | None = None) -> float:
        if given is not None:
            return given
        rates = dict(state.dose_rates)
        if mode in rates:
            return rates[mode]
        return start.dose_rates.get(mode or "", fallback_rate)

    total, doses = 0.0, []
    for step in protocol.steps:
        spec = STEPS[step.kind]
        seconds = spec.max_seconds(step, state, limits)
        if state.beam is not False and seconds > 0:
            home = rate(state.mode)
            dose = seconds * home
            interleave = getattr(step, "interleave", None)
            if interleave is not None:
                burst = rate(interleave.mode, interleave.dose_rate_e_per_a2_s)
                bursts = interleave_burst_seconds(seconds, interleave.every_s, interleave.dwell_s)
                dose += (burst - home) * bursts  # the bursts as scheduled
            total += dose
        state = spec.after(step, state)
        doses.append(total)
    end_s = abs(state.bias_volts) / limits.max_ramp_rate_volts_per_s
    if state.beam is not False:
        total += end_s * rate(state.mode)
    doses.append(total)
    return doses


def check_planned_dose(
    protocol: Protocol,
    limits: SafetyLimits,
    start: BeamAtLoad,
    fallback_rate: float,
    budget_e_per_a2: float,
    budget_field: str,
) -> float:
    """Refuse (ProtocolError naming the step) a protocol whose planned dose breaks the budget;
    returns the planned dose."""
    doses = planned_doses(protocol, limits, start, fallback_rate)
    for number, dose in enumerate(doses, 1):
        try:
            check_dose(dose, budget_e_per_a2, budget_field)
        except LimitError as exc:
            if number > len(protocol.steps):  # the ramp-down after the last step
                raise ProtocolError(
                    f"the ramp-down at the end: {exc}", None, None, exc.field
                ) from None
            kind = protocol.steps[number - 1].kind
            raise ProtocolError(f"step {number} ({kind}): {exc}", number, kind, exc.field) from None
    return doses[-1]


__all__ = ["BeamAtLoad", "check_planned_dose", "interleave_burst_seconds", "planned_doses"]
