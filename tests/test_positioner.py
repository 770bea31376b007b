"""The daemon's holder and microscope controls against the simulators over their real transports."""

from __future__ import annotations

import threading

import pytest

from insitu_daq.control.instruments.positioner import HolderControl, MicroscopeControl
from insitu_daq.control.station import StationError, Stopped
from insitu_daq.core.config import HolderConfig, MicroscopeConfig, RetryConfig
from insitu_daq.sim.holder import SimulatedHolder
from insitu_daq.sim.microscope import SimulatedMicroscope
from insitu_daq.sim.station import SimStation

FAST_RETRY = RetryConfig(attempts=3, first_delay_s=0.05, max_delay_s=0.1)


@pytest.fixture
def station() -> SimStation:
    return SimStation(time_scale=100.0)


@pytest.fixture
def holder(station: SimStation):
    sim = SimulatedHolder(station, port=0, pty=False)
    with sim:
        control = HolderControl(HolderConfig(port=sim.endpoints["url"]), FAST_RETRY)
        control.connect()
        yield control, sim
        control.close()


def test_approach_stops_at_contact_and_retract_leaves_it(holder, station: SimStation) -> None:
    control, _ = holder
    travel = control.approach(2000.0, 5000.0, threading.Event())
    with station.model() as m:
        assert m.contact
        assert travel == pytest.approx(m.params.initial_gap_nm, abs=1.0)
    control.retract(500.0, 200.0, threading.Event())
    with station.model() as m:
        assert not m.contact
        assert m.tip_position_nm == pytest.approx(-500.0, abs=60.0)


def test_approach_without_contact_fails_the_step(holder) -> None:
    control, _ = holder
    with pytest.raises(StationError, match="no contact"):
        control.approach(2000.0, 500.0, threading.Event())


def test_stop_event_interrupts_an_approach(holder, station: SimStation) -> None:
    control, _ = holder
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    with pytest.raises(Stopped) as stopped:
        control.approach(1.0, 5000.0, stop)  # 1 nm/s: would take ~30 s of wall time
    assert not control.status().moving
    with station.model() as m:
        travelled = m.tip_position_nm + m.params.initial_gap_nm
    assert stopped.value.moved_nm == pytest.approx(travelled, abs=0.2)


def test_lost_holder_is_retried_then_fails_with_station_error(holder) -> None:
    _, sim = holder
    retries: list[str] = []
    control = HolderControl(
        HolderConfig(port=sim.endpoints["url"]), FAST_RETRY, on_retry=retries.append
    )
    control.connect()
    sim.stop()
    with pytest.raises(StationError, match="not answering"):
        control.status()
    assert len(retries) == FAST_RETRY.attempts - 1
    control.close()


def test_microscope_control_applies_mode_beam_and_dose(station: SimStation) -> None:
    with SimulatedMicroscope(station, port=0) as sim:
        host, port = sim.endpoints["tcp"].rsplit(":", 1)
        control = MicroscopeControl(MicroscopeConfig(host=host, port=int(port)), FAST_RETRY)
        assert control.connect()
        control.apply(mode="hrtem", beam=True, dose_rate_e_per_a2_s=50.0, pixel_size_nm=0.05)
        assert station.optics.mode.value == "hrtem"
        assert station.optics.pixel_size_nm == 0.05
        with station.model() as m:
            assert m.beam_on
            assert m.dose_rate_e_per_a2_s == 50.0
        control.close()
