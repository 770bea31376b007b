"""Temperature steps (control/steps/temperature*.py) and the temperature limits (control/limits.py).

The limits and the plan are pure checks. The steps run in the real ProtocolRunner against
test_runner's in-memory RecordingStation, whose `holder_call` reaches a real MemsHeatingHolder
driver talking to the simulated controller over TCP (sim/heating_holder.py), both on one
time-scaled clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_runner import RecordingStation

from insitu_daq.control.limits import LimitError, SafetyCheck
from insitu_daq.control.protocol import Protocol, ProtocolError
from insitu_daq.control.runner import ProtocolRunner, RunState
from insitu_daq.control.steps.temperature_staircase import levels
from insitu_daq.core.config import SafetyLimits, load_config
from insitu_daq.core.records import EventKind
from insitu_daq.drivers.heating_holder import MemsHeatingHolder
from insitu_daq.service.recording_plan import protocol_seconds
from insitu_daq.sim.heating_holder import SimulatedHeatingHolder
from insitu_daq.sim.station import SimStation

REPO = Path(__file__).resolve().parents[2]
LIMITS = SafetyLimits(max_temperature_c=300.0, max_temperature_rate_c_per_s=2.0)
SCALE = 200.0  # station seconds per wall second, for the sim and the runner's clock alike


def _load(steps: str) -> Protocol:
    return Protocol.parse(f"name: heat\nsteps:\n{steps}", "yaml")


@pytest.mark.parametrize(
    ("steps", "number", "field", "message"),
    [
        ("  - temperature: 350\n", 1, "celsius",
         "step 1 (temperature): celsius: 350 C is beyond the station's maximum temperature of"
         " 300 C (limits.max_temperature_c)"),
        ("  - mark: hot\n  - temperature: {celsius: 200, rate_c_per_s: 5}\n", 2, "rate_c_per_s",
         "step 2 (temperature): rate_c_per_s: 5 C/s is beyond the station's maximum"
         " temperature ramp rate of 2 C/s (limits.max_temperature_rate_c_per_s)"),
        ("  - temperature_staircase: {to_celsius: 500, step_c: 15}\n", 1, "to_celsius",
         "step 1 (temperature_staircase): to_celsius: 500 C is beyond the station's maximum"),
        ("  - temperature_staircase: {to_celsius: 250, step_c: 15, rate_c_per_s: 3}\n", 1,
         "rate_c_per_s", "step 1 (temperature_staircase): rate_c_per_s: 3 C/s is beyond"),
    ],
)  # fmt: skip
def test_a_protocol_beyond_the_temperature_limits_is_refused_naming_step_and_field(
    steps: str, number: int, field: str, message: str
) -> None:
    with pytest.raises(ProtocolError) as refused:
        _load(steps).validate_against(LIMITS)
    assert str(refused.value).startswith(message), str(refused.value)
    assert (refused.value.step, refused.value.field) == (number, field)


def test_a_temperature_within_the_limits_gets_its_rate_or_the_maximum() -> None:
    check = SafetyCheck(LIMITS)
    assert check.temperature(250.0, 0.1) == 0.1
    assert check.temperature(250.0) == 2.0
    with pytest.raises(LimitError, match="celsius: nan C is not a finite number"):
        check.temperature(float("nan"))


def test_staircase_levels_end_at_the_target() -> None:
    assert levels(22.0, 67.0, 15.0) == [37.0, 52.0, 67.0]
    assert levels(22.0, 60.0, 15.0) == [37.0, 52.0, 60.0]
    assert levels(100.0, 70.0, 15.0) == [85.0, 70.0]  # down as well
    assert len(levels(22.0, 500.0, 15.0)) == 32


def test_the_shipped_heating_protocol_passes_the_example_stations_limits_and_plans_4_h(
    tmp_path: Path,
) -> None:
    # The example station config with its holder switched to the heating one.
    example = (REPO / "deploy" / "station.example.toml").read_text()
    heating = tmp_path / "station.toml"
    heating.write_text(example.replace('model = "open_cell"', 'model = "mems_heating"', 1))
    config = load_config(heating)
    assert config.holder.model == "mems_heating"
    protocol = Protocol.load(REPO / "deploy" / "protocols" / "ncm_heating_staircase.yaml")
    protocol.validate_against(config.limits)
    run_s, recorded_s = protocol_seconds(protocol, config.limits)
    # 32 levels of (150 s ramp + 300 s settle + 2 s acquire + the settling allowance), the
    # cool-down from 500 C at 1 C/s; recording only while acquiring: 32 x 2 s.
    assert 4.0 * 3600 < run_s < 4.7 * 3600
    assert recorded_s == 64.0


# ----- the steps in the runner, on the simulated controller -------------------------------------
@dataclass
class HeatedStation(RecordingStation):
    """RecordingStation with a heating holder: the simulator's controller through its driver."""

    time_scale: float = SCALE
    sim_station: SimStation = field(init=False)
    driver: MemsHeatingHolder = field(init=False)
    limits: SafetyLimits = LIMITS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sim_station = SimStation(time_scale=self.time_scale)
        self.sim = SimulatedHeatingHolder(self.sim_station, port=0, pty=False)
        self.sim.start()
        self.driver = MemsHeatingHolder(self.sim.endpoints["url"], timeout=2.0)
        self._holder_lock = threading.Lock()

    def holder_call(self, action: Callable[[Any], Any], stop: threading.Event | None) -> Any:
        with self._holder_lock:
            return action(self.driver)

    def check_temperature(self, celsius: float, rate_c_per_s: float | None) -> float:
        self._record("check_temperature", celsius, rate_c_per_s)
        return SafetyCheck(self.limits).temperature(celsius, rate_c_per_s)

    def chip(self) -> tuple[float, float, bool]:
        with self.sim_station.model():
            chip = self.sim_station.chip
            return chip.temperature_c, chip.setpoint_c, chip.heater_on

    def close(self) -> None:
        self.driver.close()
        self.sim.stop()


@pytest.fixture
def heated() -> Iterator[HeatedStation]:
    station = HeatedStation()
    yield station
    station.close()


def _run(station: HeatedStation, protocol: Protocol) -> ProtocolRunner:
    runner = ProtocolRunner(station)
    runner.start(protocol)
    return runner


def test_a_staircase_ramps_settles_and_acquires_at_each_level_with_the_beam_on_only_then(
    heated: HeatedStation,
) -> None:
    protocol = _load(
        "  - temperature_staircase: {to_celsius: 52, step_c: 15, rate_c_per_s: 2, settle_s: 5,"
        " acquire_s: 3, blank_between: true}\n"
    )
    runner = _run(heated, protocol)
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED, runner.progress.reason
    levels_seen = [c.args[2]["celsius"] for c in heated.events(EventKind.TEMPERATURE)]
    assert levels_seen == [37.0, 52.0]
    # Limits checked before the run (the highest level), then before each setpoint written;
    # the beam on only around each acquisition.
    assert [c.args[0] for c in heated.calls("check_temperature")] == [52.0, 37.0, 52.0]
    toggles = [
        (c.name, c.args[1]) if c.name == "set_microscope" else (c.name, None)
        for c in heated.calls("set_microscope", "start_recording", "stop_recording")
    ]
    each = [("set_microscope", True), ("start_recording", None), ("stop_recording", None)]
    each += [("set_microscope", False)]
    assert toggles == [("set_microscope", False), *each, *each]
    # Recording started at each level only once the chip had settled and held settle_s.
    starts = [c.time for c in heated.calls("start_recording")]
    for call, level in zip(heated.calls("start_recording"), (37.0, 52.0), strict=True):
        assert heated.sim_station.chip.temperature_at(call.time) == pytest.approx(level, abs=1.0)
    assert starts[1] - starts[0] >= 15 / 2 + 5 + 3  # ramp, settle, the acquisition before
    temperature, setpoint, heater_on = heated.chip()
    assert heater_on and setpoint == 52.0 and temperature == pytest.approx(52.0, abs=1.0)


def test_a_pause_stops_the_setpoint_where_it_is_and_resume_ramps_on(heated: HeatedStation) -> None:
    runner = _run(heated, _load("  - temperature: {celsius: 200, rate_c_per_s: 2}\n"))
    time.sleep(0.2)  # 40 station s into the 89 s ramp
    assert runner.pause("look")
    time.sleep(0.1)
    _, held, on = heated.chip()
    assert on and 40.0 < held < 190.0
    time.sleep(0.1)  # 20 station s paused: the setpoint stays
    assert heated.chip()[1] == held
    assert runner.resume()
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED, runner.progress.reason
    temperature, setpoint, _ = heated.chip()
    assert setpoint == 200.0 and temperature == pytest.approx(200.0, abs=1.0)
