"""The MEMS heating chip's physics (sim/heating.py): pure, no I/O, on model time.

What the heating study relies on: the setpoint ramps at the rate asked (never a step), the
chip follows it with a bounded overshoot and settles within seconds of each step's end, the
heater's resistance and power follow the temperature, and the temperature history the
renderer and drift read is the chip's.
"""

from __future__ import annotations

import numpy as np
import pytest

from insitu_daq.sim.heating import ChipParameters, HeatingChip

ROOM = ChipParameters().room_temperature_c


def _follow(chip: HeatingChip, until_s: float, dt: float = 0.01) -> tuple[np.ndarray, ...]:
    """(times, temperatures, setpoints) sampled every dt up to `until_s`."""
    times = np.arange(chip.time_s + dt, until_s + dt / 2, dt)
    temperatures, setpoints = [], []
    for t in times:
        chip.advance_to(float(t))
        temperatures.append(chip.temperature_c)
        setpoints.append(chip.setpoint_c)
    return times, np.array(temperatures), np.array(setpoints)


def _heat(rate: float, target: float) -> HeatingChip:
    chip = HeatingChip()
    chip.switch_heater(True)
    chip.set_ramp_rate(rate)
    chip.set_target(target)
    return chip


@pytest.mark.parametrize("rate", [0.1, 2.0])
def test_the_setpoint_ramps_at_the_rate_asked_and_the_chip_follows_it(rate: float) -> None:
    chip = _heat(rate, ROOM + 15.0)
    ramp_s = 15.0 / rate
    times, temperatures, setpoints = _follow(chip, ramp_s + 10.0, dt=max(0.01, ramp_s / 2000))
    ramping = times < ramp_s
    # The setpoint is a straight line at the rate (never a step), then stays at the target.
    np.testing.assert_allclose(setpoints[ramping], ROOM + rate * times[ramping], atol=1e-9)
    np.testing.assert_allclose(setpoints[~ramping], ROOM + 15.0, atol=1e-6)
    # The chip lags the setpoint by 2 zeta r / omega once the ramp is under way.
    steady = (times > 5.0) & ramping
    lag = setpoints[steady] - temperatures[steady]
    np.testing.assert_allclose(lag, 2 * 0.5 * rate / 2.0, rtol=0.02)


@pytest.mark.parametrize(
    ("rate", "max_overshoot_c"),
    [(0.1, 0.05), (10.0, 2.0), (1000.0, 0.2 * 15.0)],  # the last is a step: 16 % overshoot
)
def test_overshoot_is_bounded_and_the_chip_settles_within_seconds(
    rate: float, max_overshoot_c: float
) -> None:
    target = ROOM + 15.0
    chip = _heat(rate, target)
    ramp_end = 15.0 / rate
    times, temperatures, _ = _follow(chip, ramp_end + 10.0)
    overshoot = temperatures.max() - target
    assert 0.0 <= overshoot <= max_overshoot_c
    outside = times[np.abs(temperatures - target) > 0.3]
    settled_after = outside.max() - ramp_end if len(outside) else 0.0
    assert settled_after < 5.0, f"still {0.3} C off {settled_after:.2f} s after the ramp"
    assert chip.temperature_c == pytest.approx(target, abs=1e-3)


def test_heater_off_cools_the_membrane_to_room_temperature_in_milliseconds() -> None:
    chip = _heat(1000.0, 500.0)
    chip.advance_to(20.0)
    assert chip.temperature_c == pytest.approx(500.0, abs=0.01)
    chip.switch_heater(False)
    chip.advance_to(20.05)
    assert chip.temperature_c == pytest.approx(ROOM, abs=0.1)
    assert chip.power_w() == 0.0
    assert chip.setpoint_c == chip.temperature_c  # the setpoint follows the chip
    with pytest.raises(ValueError, match="heater is off"):
        chip.set_target(100.0)


def test_switching_the_heater_on_starts_the_setpoint_where_the_chip_is() -> None:
    chip = HeatingChip()
    chip.advance_to(3.0)
    chip.switch_heater(True)
    assert chip.setpoint_c == chip.target_c == chip.temperature_c == ROOM
    chip.advance_to(10.0)
    assert chip.temperature_c == ROOM  # on, with nowhere to go: nothing moves


def test_heater_resistance_and_power_follow_the_temperature() -> None:
    params = ChipParameters()
    chip = _heat(1000.0, 422.0)
    chip.advance_to(20.0)
    rise = chip.temperature_c - ROOM
    assert chip.resistance_ohm() == pytest.approx(params.r0_ohm * (1 + params.alpha_per_k * rise))
    # Settled: the power only holds the membrane above room temperature.
    assert chip.power_w() == pytest.approx(rise / params.thermal_resistance_k_per_w, rel=1e-4)
    assert 0.02 < chip.power_w() < 0.04  # ~25 mW at 422 C: a Fusion-class chip's order


def test_the_temperature_history_is_the_chips_temperature_at_past_times() -> None:
    chip = _heat(5.0, ROOM + 50.0)
    times, temperatures, _ = _follow(chip, 20.0, dt=0.05)
    # Read back later (the renderer asks for frame times in the past): within the
    # interpolation error of the 0.05 s history.
    past = np.array([chip.temperature_at(float(t)) for t in times[:-1]])
    np.testing.assert_allclose(past, temperatures[:-1], atol=0.02)
    assert chip.temperature_at(-1.0) == ROOM  # before the history: where it began
    assert chip.temperature_at(99.0) == chip.temperature_c  # the future: now
