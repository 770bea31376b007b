"""The station's one safety check (control/limits.py): what it refuses, and in which words.

Pure checks, no instrument: the same SafetyCheck guards a protocol at load (test_protocol), a
ramp asked of the bias controller and each level it writes (test_bias), and the guardian's and
`insitu-daq safe`'s ramp-down (test_guardian, test_staircase).
"""

from __future__ import annotations

import math

import pytest

from insitu_daq.control.limits import LimitError, SafetyCheck
from insitu_daq.core.config import SafetyLimits

LIMITS = SafetyLimits(max_bias_volts=5.0, max_ramp_rate_volts_per_s=1.0, ramp_step_volts=0.05)


@pytest.mark.parametrize(
    ("volts", "rate", "field", "message"),
    [
        (5.5, None, "volts", "volts: +5.5 V is beyond the station's maximum bias of 5 V"
         " (limits.max_bias_volts)"),
        (-5.01, 0.5, "volts", "volts: -5.01 V is beyond the station's maximum bias of 5 V"),
        (1.0, 2.5, "rate_volts_per_s", "rate_volts_per_s: 2.5 V/s is beyond the station's"
         " maximum ramp rate of 1 V/s (limits.max_ramp_rate_volts_per_s)"),
        (1.0, 0.0, "rate_volts_per_s", "rate_volts_per_s: 0.0 V/s must be a positive number"),
        (math.nan, None, "volts", "volts: nan V is not a finite number"),
    ],
)  # fmt: skip
def test_a_ramp_beyond_the_limits_is_refused_naming_the_field_and_limit(
    volts: float, rate: float | None, field: str, message: str
) -> None:
    with pytest.raises(LimitError) as excinfo:
        SafetyCheck(LIMITS).bias(volts, rate)
    assert str(excinfo.value).startswith(message), str(excinfo.value)
    assert excinfo.value.field == field


def test_a_ramp_within_the_limits_gets_its_rate_or_the_maximum() -> None:
    check = SafetyCheck(LIMITS)
    assert check.bias(-5.0, 0.25) == 0.25
    assert check.bias(4.3) == LIMITS.max_ramp_rate_volts_per_s


@pytest.mark.parametrize(
    ("from_volts", "to_volts"),
    [
        (0.0, 0.05),  # one full step up
        (1.0, 0.95),  # one full step down
        (0.3, 0.1 + 0.2),  # float noise around a level
        (5.2, 5.15),  # beyond the limit (front panel): the ramp down must go on
        (0.02, -0.02),  # through zero
    ],
)
def test_a_level_write_within_one_step_is_allowed(from_volts: float, to_volts: float) -> None:
    SafetyCheck(LIMITS).step(from_volts, to_volts)


@pytest.mark.parametrize(
    ("from_volts", "to_volts", "named"),
    [
        (0.0, 0.06, "limits.ramp_step_volts"),  # a step larger than the staircase's
        (3.0, 0.0, "limits.ramp_step_volts"),  # a jump to 0 V is a step too
        (4.98, 5.03, "limits.max_bias_volts"),  # within one step, but beyond the bias limit
        (5.2, 5.21, "limits.max_bias_volts"),  # beyond the limit, and away from 0 V
        (1.0, math.nan, "finite"),
        (math.nan, 0.0, "limits.ramp_step_volts"),  # a level not known: no step from it
    ],
)
def test_a_level_write_beyond_the_limits_is_refused(
    from_volts: float, to_volts: float, named: str
) -> None:
    with pytest.raises(LimitError, match=named) as excinfo:
        SafetyCheck(LIMITS).step(from_volts, to_volts)
    assert excinfo.value.field == "step"
