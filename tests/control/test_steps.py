"""The step registry (control/steps/): the protocol's kinds, and a new kind added in one place.

A kind registered here, in the test, is parsed from a protocol file, checked against the
station's limits at load, preflighted against the station, planned by the recording plan and
executed by the runner, with no edit to control/protocol.py, control/runner.py or
service/recording_plan.py. The runner drives test_runner's in-memory RecordingStation (its logic is
independent of transports; the real station is covered by the daemon's end-to-end tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from test_runner import RecordingStation

from insitu_daq.control import protocol as protocol_module
from insitu_daq.control import steps as steps_package
from insitu_daq.control.limits import LimitError
from insitu_daq.control.protocol import Protocol, ProtocolError
from insitu_daq.control.runner import ProtocolRunner, RunState
from insitu_daq.control.station import Station
from insitu_daq.control.steps import (
    STEPS,
    PlanState,
    Step,
    StepContext,
    StepRefused,
    StepSpec,
    register,
    unregister,
)
from insitu_daq.control.steps.base import Finite, Positive
from insitu_daq.core.config import SafetyLimits
from insitu_daq.core.records import EventKind
from insitu_daq.service.recording_plan import protocol_seconds


def test_the_registered_kinds_are_the_protocols_vocabulary_in_the_operators_order() -> None:
    shipped = ["approach", "retract", "bias", "hold", "acquire", "microscope", "wait", "mark"]
    # Every module of control/steps/ but the registry and the interleave setting is a kind.
    modules = {p.stem for p in Path(steps_package.__file__).parent.glob("*.py")}
    assert list(STEPS)[: len(shipped)] == shipped
    assert set(STEPS) == modules - {"__init__", "base", "interleave"}
    # Each shipped kind's model is the class a protocol is written with in Python.
    for kind in shipped:
        spec = STEPS[kind]
        assert spec.kind == kind
        assert getattr(protocol_module, spec.model.__name__) is spec.model


# ----- a kind the code base does not have: a bias pulse ---------------------------------------
class Pulse(Step):
    """Ramp to `volts`, stay `width_s`, ramp back to the level before."""

    kind: ClassVar[str] = "pulse"
    volts: Finite
    width_s: Positive

    def describe(self) -> str:
        return f"pulse to {self.volts:+.3f} V for {self.width_s:g} s"


def _execute(ctx: StepContext, step: Pulse) -> dict[str, Any]:
    before = ctx.station.bias_setpoint()
    ctx.ramp_bias(step.volts, None)
    ctx.timed(step.width_s, None, None)
    ctx.ramp_bias(before, None)
    ctx.emit(EventKind.MARK, "pulse done")
    return {"summary": f"back at {before:+.3f} V"}


def _max_seconds(step: Pulse, state: PlanState, limits: SafetyLimits) -> float:
    ramps = 2 * abs(step.volts - state.bias_volts) / limits.max_ramp_rate_volts_per_s
    return ramps + step.width_s


def _preflight(step: Pulse, station: Station) -> None:
    station.check_bias(step.volts, None)
    if step.width_s > 60:
        raise StepRefused("longer than this station's pulse generator allows", "width_s")


PULSE = StepSpec(
    Pulse,
    _execute,
    max_seconds=_max_seconds,
    check_limits=lambda step, check: check.bias(step.volts),
    preflight=_preflight,
)  # `after` left as it is: a pulse ends at the level it began

PULSE_PROTOCOL = """\
name: pulsed
steps:
  - acquire: start
  - bias: 1
  - pulse: {volts: 3, width_s: 10}
  - acquire: stop
"""


@pytest.fixture
def pulse_kind() -> Iterator[None]:
    register(PULSE)
    try:
        yield
    finally:
        unregister("pulse")


def test_a_new_kind_is_parsed_checked_planned_and_executed_with_no_edit_elsewhere(
    pulse_kind: None,
) -> None:
    protocol = Protocol.parse(PULSE_PROTOCOL, "yaml")
    assert protocol.steps[2] == Pulse(volts=3.0, width_s=10.0)
    assert protocol.to_data()["steps"][2] == {"pulse": {"volts": 3.0, "width_s": 10.0}}

    # At load, against the station's limits; pydantic's errors name the step and field.
    limits = SafetyLimits(max_bias_volts=5.0, max_ramp_rate_volts_per_s=1.0)
    protocol.validate_against(limits)
    too_high = Protocol.parse(PULSE_PROTOCOL.replace("volts: 3", "volts: 6"), "yaml")
    with pytest.raises(ProtocolError, match=r"^step 3 \(pulse\): volts: \+6 V is beyond"):
        too_high.validate_against(limits)
    with pytest.raises(ProtocolError, match=r"^step 3 \(pulse\): width_s: Input should be"):
        Protocol.parse(PULSE_PROTOCOL.replace("width_s: 10", "width_s: -1"), "yaml")

    # Planned: 1 s to 1 V, 2 x 2 s of pulse ramps + 10 s, all recorded; then 1 s of ramp-down.
    assert protocol_seconds(protocol, limits) == pytest.approx((16.0, 15.0))

    # Preflighted against the station, then executed by the runner.
    station = RecordingStation()
    runner = ProtocolRunner(station)
    with pytest.raises(ProtocolError, match=r"^step 3 \(pulse\): width_s: longer than"):
        runner.start(Protocol.parse(PULSE_PROTOCOL.replace("width_s: 10", "width_s: 90")))
    with pytest.raises(LimitError, match=r"^step 3 \(pulse\): \+6 V beyond"):
        runner.start(too_high)
    assert station.hardware() == []  # refused before anything moved
    runner.start(protocol)
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED
    assert [c.args[0] for c in station.calls("ramp_bias")] == [1.0, 3.0, 1.0]
    end = station.step_event("pulse", "end")
    assert end.args[1] == "step 3/4 pulse done: back at +1.000 V"
    assert "pulse done" in [c.args[1] for c in station.events(EventKind.MARK)]


def test_an_unregistered_kind_is_unknown_again() -> None:
    register(PULSE)
    unregister("pulse")
    with pytest.raises(ProtocolError, match="unknown step 'pulse'"):
        Protocol.parse(PULSE_PROTOCOL, "yaml")
    with pytest.raises(ValueError, match="already registered"):
        register(STEPS["bias"])
