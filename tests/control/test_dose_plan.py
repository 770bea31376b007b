"""A protocol's planned dose against the dose budget, at load (control/dose.py): refused in one
line naming the step, and the shipped protocols fit SCIENCE.md's budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from insitu_daq.control.dose import BeamAtLoad, check_planned_dose, interleave_burst_seconds
from insitu_daq.control.protocol import Protocol, ProtocolError
from insitu_daq.core.config import DoseConfig, SafetyLimits

LIMITS = SafetyLimits(max_ramp_rate_volts_per_s=1.0)
PROTOCOLS = Path(__file__).resolve().parents[2] / "deploy" / "protocols"
BLANKED = BeamAtLoad(beam_on=False, mode="lm", dose_rates={"lm": 2.0})


def _check(text: str, budget: float = 5000.0, start: BeamAtLoad = BLANKED) -> float:
    protocol = Protocol.parse(text, "yaml")
    return check_planned_dose(protocol, LIMITS, start, 35.0, budget, "dose.budget_e_per_a2")


def test_the_step_that_breaks_the_budget_is_named_in_one_line() -> None:
    text = """
name: too_long
steps:
  - microscope: {mode: hrtem, beam: on, dose_rate_e_per_a2_s: 35}
  - acquire: start
  - hold: 100
  - mark: halfway
  - hold: 100
  - acquire: stop
"""
    assert _check(text, budget=7000) == pytest.approx(35 * 200)
    with pytest.raises(ProtocolError) as refused:
        _check(text, budget=5000)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("step 5 (hold): dose: 7000 e/A^2 planned")
    assert "dose budget of 5000 e/A^2 (dose.budget_e_per_a2)" in message
    assert refused.value.step == 5 and refused.value.field == "dose"


def test_only_beam_on_time_counts_at_each_mode_s_rate() -> None:
    text = """
name: blanked_and_bursts
steps:
  - hold: 1000
  - microscope: {mode: hrtem, beam: on}
  - hold: {duration_s: 100, interleave: {mode: lm, every_s: 4, dwell_s: 1}}
  - microscope: {beam: off}
  - hold: 1000
"""
    # Blanked at load: the first hold gives nothing. HRTEM at the config's 35 (the microscope
    # could not say its rate before switching to it), its 24 s of LM bursts at LM's 2.
    assert _check(text) == pytest.approx(35 * 76 + 2 * 24)
    unknown = BeamAtLoad()  # the microscope could not be read: the beam counts as on
    with pytest.raises(ProtocolError, match=r"^step 1 \(hold\)"):
        _check(text, start=unknown)
    hot_bursts = text.replace("dwell_s: 1}", "dwell_s: 1, dose_rate_e_per_a2_s: 135}")
    assert _check(hot_bursts, budget=10000) == pytest.approx(35 * 76 + 135 * 24)


def test_bursts_last_their_dwell_at_each_period_cut_at_the_step_s_end() -> None:
    assert interleave_burst_seconds(120, 4, 1) == 29  # at 4, 8, ..., 116 s
    assert interleave_burst_seconds(3, 1.5, 1) == 1  # at 1.5 s only
    assert interleave_burst_seconds(10, 4, 3) == 3 + 2  # at 4 and at 8 (cut at 10)


def test_the_shipped_protocols_fit_science_md_s_budget() -> None:
    budget = DoseConfig().budget_e_per_a2
    for name in ("lno_4v3.yaml", "lno_4v3_until_rocksalt.yaml", "lno_control_0v.yaml"):
        protocol = Protocol.load(PROTOCOLS / name)
        planned = check_planned_dose(protocol, LIMITS, BLANKED, 35.0, budget, "b")
        assert 0 < planned <= budget, name
