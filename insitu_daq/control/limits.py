"""The station's safety limits as one check, used wherever a bias is asked for or written.

One rule set, one wording: a protocol's bias step is checked at load (`Protocol.
validate_against`), a ramp the bias controller is asked for before its goal is set
(`BiasController.check`/`ramp_to`), and every level written to the source-meter with the output
on before the write (the controller's goal loop, and the staircase ramp the guardian,
`insitu-daq safe` and a controller without its I/O thread ramp down with); a heating holder's
temperature target and ramp rate likewise, at load and before every setpoint written
(control/heater.py). A refusal is one
line naming the field and the limit (`volts: +4.3 V is beyond the station's maximum bias of
4 V (limits.max_bias_volts)`); a protocol error prefixes the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from insitu_daq.core.config import SafetyLimits

# Float slack on the step bound: a staircase level is `level + step`, whose difference from
# `level` may miss `step` by an ulp; a nanovolt is far below any source-meter's resolution.
STEP_SLACK_V = 1e-9


class LimitError(ValueError):
    """A request beyond a safety limit; refused before any instrument is touched.

    `field` names what was asked for (`volts`, `rate_volts_per_s`, `step`).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SafetyCheck:
    """The station's `SafetyLimits` as checks that raise LimitError and touch nothing."""

    limits: SafetyLimits

    def bias(self, volts: float, rate_volts_per_s: float | None = None) -> float:
        """A ramp to `volts` at that rate (None: the maximum); returns the rate to ramp at."""
        limits = self.limits
        if not math.isfinite(volts):
            raise LimitError(f"volts: {volts} V is not a finite number", "volts")
        if abs(volts) > limits.max_bias_volts:
            raise LimitError(
                f"volts: {volts:+g} V is beyond the station's maximum bias of "
                f"{limits.max_bias_volts:g} V (limits.max_bias_volts)",
                "volts",
            )
        if rate_volts_per_s is None:
            return limits.max_ramp_rate_volts_per_s
        if not math.isfinite(rate_volts_per_s) or rate_volts_per_s <= 0:
            raise LimitError(
                f"rate_volts_per_s: {rate_volts_per_s} V/s must be a positive number",
                "rate_volts_per_s",
            )
        if rate_volts_per_s > limits.max_ramp_rate_volts_per_s:
            raise LimitError(
                f"rate_volts_per_s: {rate_volts_per_s:g} V/s is beyond the station's maximum "
                f"ramp rate of {limits.max_ramp_rate_volts_per_s:g} V/s "
                "(limits.max_ramp_rate_volts_per_s)",
                "rate_volts_per_s",
            )
        return rate_volts_per_s

    def step(self, from_volts: float, to_volts: float) -> None:
        """One level write with the output on: from `from_volts` (the level now) to `to_volts`.

        At most `ramp_step_volts` of change, to a level within `max_bias_volts`, or closer to
        0 V than the level now: an output found beyond the limit (set from the front panel)
        must still be ramped down.
        """
        limits = self.limits
        if not math.isfinite(to_volts):
            raise LimitError(f"step: {to_volts} V is not a finite number", "step")
        change = abs(to_volts - from_volts)
        if not change <= limits.ramp_step_volts + STEP_SLACK_V:  # a NaN level fails too
            raise LimitError(
                f"step: {from_volts:+g} V -> {to_volts:+g} V changes the level by {change:g} V,"
                f" beyond the station's largest ramp step of {limits.ramp_step_volts:g} V"
                " (limits.ramp_step_volts)",
                "step",
            )
        if abs(to_volts) > limits.max_bias_volts and abs(to_volts) >= abs(from_volts):
            raise LimitError(
                f"step: {to_volts:+g} V is beyond the station's maximum bias of "
                f"{limits.max_bias_volts:g} V (limits.max_bias_volts)",
                "step",
            )

    def temperature(
        self, celsius: float, rate_c_per_s: float | None = None, field: str = "celsius"
    ) -> float:
        """A heating holder's setpoint ramp to `celsius` at that rate (None: the maximum);
        returns the rate to ramp at. The controller ramps its setpoint itself (never a step),
        so a target and a rate within the limits are all there is to check before writing.
        `field`: what the caller calls the target (a staircase's `to_celsius`)."""
        limits = self.limits
        if not math.isfinite(celsius):
            raise LimitError(f"{field}: {celsius} C is not a finite number", field)
        if celsius > limits.max_temperature_c:
            raise LimitError(
                f"{field}: {celsius:g} C is beyond the station's maximum temperature of "
                f"{limits.max_temperature_c:g} C (limits.max_temperature_c)",
                field,
            )
        if rate_c_per_s is None:
            return limits.max_temperature_rate_c_per_s
        if not math.isfinite(rate_c_per_s) or rate_c_per_s <= 0:
            raise LimitError(
                f"rate_c_per_s: {rate_c_per_s} C/s must be a positive number", "rate_c_per_s"
            )
        if rate_c_per_s > limits.max_temperature_rate_c_per_s:
            raise LimitError(
                f"rate_c_per_s: {rate_c_per_s:g} C/s is beyond the station's maximum "
                f"temperature ramp rate of {limits.max_temperature_rate_c_per_s:g} C/s "
                "(limits.max_temperature_rate_c_per_s)",
                "rate_c_per_s",
            )
        return rate_c_per_s


def check_dose(planned_e_per_a2: float, budget_e_per_a2: float, field: str) -> None:
    """A region's planned dose against its budget (the config's `[dose]`, at the temperature
    that holds); LimitError naming `field` (the budget's config key) if it is beyond it."""
    if not planned_e_per_a2 <= budget_e_per_a2:
        raise LimitError(
            f"dose: {planned_e_per_a2:.0f} e/A^2 planned in one region by the end of this step is"
            f" beyond the station's dose budget of {budget_e_per_a2:g} e/A^2 ({field})",
            "dose",
        )
