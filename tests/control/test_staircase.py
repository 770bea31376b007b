"""The one ramp staircase (control/staircase.py) driving the simulated Keithley 2400 over real TCP.

The levels are written through the real PyVISA driver; the simulator's model keeps every level
that reached the sample (`bias_history`, in model seconds), which is what these tests check.
The same staircase is the bias controller's goal loop (test_bias) and the guardian's and
`insitu-daq safe`'s ramp-down (test_guardian).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest

from insitu_daq.control import staircase
from insitu_daq.control.limits import LimitError, SafetyCheck
from insitu_daq.core.config import SafetyLimits
from insitu_daq.drivers.sourcemeter.keithley2400 import Keithley2400
from insitu_daq.sim.sourcemeter import SimulatedSourceMeter
from insitu_daq.sim.station import SimStation

TIME_SCALE = 10.0  # model seconds per wall second
COMPLIANCE_A = 100e-9


@pytest.fixture
def station() -> SimStation:
    return SimStation(seed=3, time_scale=TIME_SCALE)


@pytest.fixture
def smu(station: SimStation) -> Iterator[Keithley2400]:
    with (
        SimulatedSourceMeter(station, port=0) as sim,
        Keithley2400(sim.endpoints["visa"], timeout_s=1.0) as driver,
    ):
        driver.configure_voltage_source(compliance_amperes=COMPLIANCE_A)
        driver.output_on()
        yield driver


def _history_length(station: SimStation) -> int:
    with station.model() as m:
        return len(m.bias_history)


def _history_since(station: SimStation, index: int) -> list[tuple[float, float]]:
    with station.model() as m:
        return list(m.bias_history)[index:]


@pytest.mark.parametrize(
    ("level", "target", "expected"),
    [
        (0.0, 1.0, 0.1),  # a full step up
        (0.0, -1.0, -0.1),  # down
        (0.95, 1.0, 1.0),  # the remainder, to the target exactly
        (1.0, 1.0, 1.0),  # there
    ],
)
def test_next_level_is_a_full_step_or_the_remainder(
    level: float, target: float, expected: float
) -> None:
    assert staircase.next_level(level, target, 0.1) == pytest.approx(expected)


def test_ramp_is_full_steps_then_the_remainder_never_faster_than_the_rate(
    smu: Keithley2400, station: SimStation
) -> None:
    since = _history_length(station) - 1  # the level it starts from
    levels: list[float] = []
    wall_rate = 20.0  # V per wall second: 2 V per model second

    assert staircase.ramp(smu.set_voltage, 0.0, 0.95, 0.1, wall_rate, on_step=levels.append)

    assert levels == pytest.approx([0.1 * i for i in range(1, 10)] + [0.95])
    assert smu.voltage_setpoint() == pytest.approx(0.95)
    history = _history_since(station, since)
    assert [v for _, v in history] == pytest.approx([0.0, *levels])
    # Each step at least |step| / rate after the previous one (model seconds), the first too.
    for (t0, v0), (t1, v1) in itertools.pairwise(history[1:]):
        assert t1 - t0 >= 0.99 * abs(v1 - v0) / (wall_rate / TIME_SCALE), f"too fast at {t1}"


def test_ramp_stops_when_asked_and_leaves_the_level_where_it_was(smu: Keithley2400) -> None:
    stop = threading.Event()
    levels: list[float] = []

    def on_step(level: float) -> None:
        levels.append(level)
        if len(levels) == 3:
            stop.set()

    assert not staircase.ramp(smu.set_voltage, 0.0, 2.0, 0.1, 50.0, stop=stop, on_step=on_step)
    assert smu.voltage_setpoint() == pytest.approx(0.3)


def test_a_step_beyond_the_station_limits_is_refused_before_it_is_written(
    smu: Keithley2400, station: SimStation
) -> None:
    check = SafetyCheck(SafetyLimits(ramp_step_volts=0.05))
    since = _history_length(station)
    with pytest.raises(LimitError, match=r"limits\.ramp_step_volts"):
        staircase.ramp(smu.set_voltage, 0.0, 1.0, 0.5, 100.0, check=check)  # 0.5 V steps
    assert _history_since(station, since) == []
    assert smu.voltage_setpoint() == 0.0
