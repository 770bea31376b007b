"""The shared nanobattery model reproduces SCIENCE.md's +4.3 V timeline and the 0 V control."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from insitu_daq.sim.model import BiasRouting, NanobatteryModel, Phase
from insitu_daq.sim.station import SimStation

COMPLIANCE = 100e-9


def _in_contact(seed: int = 0) -> NanobatteryModel:
    model = NanobatteryModel(seed=seed)
    model.move_tip_to(2.0, 1e6)
    model.advance_to(0.01)
    assert model.contact
    return model


def _biased(volts: float, seed: int = 0) -> NanobatteryModel:
    model = _in_contact(seed)
    model.set_source(True, volts, COMPLIANCE)
    return model


def _run(model: NanobatteryModel, seconds: float, step: float = 0.5) -> list:
    """Snapshots every `step` s of model time from the model's present time."""
    start = model.time_s
    states = []
    for t in np.arange(step, seconds + step / 2, step):
        model.advance_to(start + t)
        states.append(model.snapshot())
    return states


def _first_time(states, predicate, origin: float) -> float:
    return next(s.time_s - origin for s in states if predicate(s))


def test_4v3_timeline_matches_science() -> None:
    model = _biased(4.3)
    t0 = model.time_s
    states = _run(model, 120.0, step=1.0)

    front_visible = _first_time(states, lambda s: s.front_position_nm >= 20.0, t0)
    assert front_visible <= 15.0

    expansion_onset = _first_time(states, lambda s: s.expansion >= 0.005, t0)
    assert 25.0 <= expansion_onset <= 30.0

    at_60_to_70 = [s.expansion for s in states if 60.0 <= s.time_s - t0 <= 70.0]
    assert min(at_60_to_70) >= 0.26
    assert max(at_60_to_70) <= 0.31

    full = _first_time(states, lambda s: s.phase_fractions["rock_salt"] >= 0.99, t0)
    assert 100.0 <= full <= 115.0
    # (003) still visible at 64 s: pristine layered material remains.
    at_64 = next(s for s in states if s.time_s - t0 >= 64.0)
    assert at_64.phase_fractions["layered"] > 0.05


def test_current_is_nanoamperes_and_falls_as_ocv_rises() -> None:
    model = _biased(4.3)
    states = _run(model, 100.0, step=10.0)
    currents = [s.current_amperes for s in states]
    assert min(currents) >= 0.1e-9
    assert max(currents) <= 20e-9
    assert all(later < earlier for earlier, later in itertools.pairwise(currents))


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(lambda m: m.set_source(True, 0.0, COMPLIANCE), id="contact-0V"),
        pytest.param(lambda m: m.set_source(False, 4.3, COMPLIANCE), id="output-off"),
        pytest.param(
            lambda m: (m.set_source(True, 4.3, COMPLIANCE), m.set_bias_routing(BiasRouting.FLOAT)),
            id="routing-float",
        ),
        pytest.param(
            lambda m: (m.set_source(True, 4.3, COMPLIANCE), m.set_bias_routing(BiasRouting.GROUND)),
            id="routing-ground",
        ),
    ],
)
def test_no_bias_control_changes_nothing_in_60s(setup) -> None:
    model = _in_contact()
    before = model.snapshot()
    setup(model)
    after = _run(model, 60.0)[-1]
    assert after.x == before.x == 0.0
    assert after.expansion == 0.0
    assert after.phase_fractions == before.phase_fractions
    assert after.front_position_nm == 0.0


def test_no_contact_means_open_circuit() -> None:
    model = NanobatteryModel()
    model.set_source(True, 4.3, COMPLIANCE)
    state = _run(model, 30.0)[-1]
    assert not state.contact
    assert state.current_amperes == 0.0
    assert state.x == 0.0


def test_short_drives_source_into_compliance() -> None:
    model = _biased(4.3)
    model.set_short_circuit(True)
    volts, amps, in_compliance = model.terminal()
    assert in_compliance
    assert amps == pytest.approx(COMPLIANCE)
    assert 0.0 < volts < 4.3  # the source lowers its output to hold the limit
    model.set_short_circuit(False)
    assert not model.terminal()[2]


def test_same_seed_same_schedule_is_deterministic() -> None:
    a, b = _biased(4.3, seed=7), _biased(4.3, seed=7)
    for model in (a, b):
        _run(model, 40.0, step=0.25)
    assert a.snapshot() == b.snapshot()
    assert a.rng.random() == b.rng.random()


def test_integration_does_not_depend_on_call_pattern() -> None:
    coarse, fine = _biased(4.3), _biased(4.3)
    end = coarse.time_s + 50.0
    coarse.advance_to(end)
    for t in np.arange(fine.time_s, end, 0.013):
        fine.advance_to(float(t))
    fine.advance_to(end)
    assert coarse.x == pytest.approx(fine.x, abs=1e-9)


def test_tip_stops_at_overtravel_limit() -> None:
    model = NanobatteryModel()
    model.move_tip_to(500.0, 1e5)
    model.advance_to(1.0)
    assert model.overtravel
    assert model.tip_position_nm == model.params.overtravel_limit_nm
    model.move_tip_to(-100.0, 1e4)
    assert not model.overtravel
    model.advance_to(2.0)
    assert not model.contact


def test_moves_take_time() -> None:
    model = NanobatteryModel()
    start = model.tip_position_nm
    model.move_tip_to(start + 1000.0, 100.0)
    model.advance_to(5.0)
    assert model.tip_position_nm == pytest.approx(start + 500.0)
    assert model.tip_moving


def test_phase_map_geometry() -> None:
    model = _biased(4.3)
    model.advance_to(model.time_s + 40.0)
    radius = model.particle_radius_nm
    xs = np.array([-50.0, 1.0, radius, 2 * radius - 1.0, 2 * radius + 30.0])
    labels = model.phase_at(xs, np.zeros_like(xs))
    # needle / vacuum, then rock salt at the contact side, pristine core at the far side
    assert labels[0] == Phase.TIP
    assert labels[1] == Phase.ROCK_SALT
    assert labels[3] == Phase.DISORDERED  # the surface layer of the pristine core
    assert labels[4] == Phase.VACUUM
    inner = model.phase_at(np.array([2 * radius - 30.0]), np.array([0.0]))
    assert inner[0] == Phase.LAYERED


def test_bias_history_gives_bias_at_past_times() -> None:
    model = _in_contact()
    model.set_source(True, 1.0, COMPLIANCE)
    t1 = model.time_s
    model.advance_to(t1 + 1.0)
    model.set_source(True, 2.0, COMPLIANCE)
    assert model.bias_at(t1 + 0.5) == 1.0
    assert model.bias_at(t1 + 1.5) == 2.0
    assert model.bias_at(t1 - 0.001) == 0.0


def test_station_clock_is_time_scaled() -> None:
    station = SimStation(time_scale=200.0)
    start = time.monotonic()
    time.sleep(0.1)
    with station.model() as model:
        elapsed_wall = time.monotonic() - start
        assert model.time_s == pytest.approx(elapsed_wall * 200.0, rel=0.2)
