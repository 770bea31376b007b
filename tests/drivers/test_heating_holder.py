"""The simulated heating holder controller, driven through MemsHeatingHolder over a pty and TCP.

The tests take the controller's pseudo-terminal (as a serial port); one drives it over its
TCP socket (socket://) too. The station runs 100x faster than real time, so a 15 C ramp at
5 C/s takes 30 ms of wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from insitu_daq.control.heater import heater_off, heats, start_ramp
from insitu_daq.control.instruments import HeatingHolder, Holder
from insitu_daq.drivers.heating_holder import (
    ERR_HEATER_OFF,
    ERR_NO_POSITIONER,
    ERR_OUT_OF_RANGE,
    HeatingHolderStatus,
    MemsHeatingHolder,
)
from insitu_daq.drivers.holder import HolderError
from insitu_daq.sim.heating_holder import SimulatedHeatingHolder
from insitu_daq.sim.station import SimStation

FAST = 100.0


@pytest.fixture
def station() -> SimStation:
    return SimStation(time_scale=FAST)


@pytest.fixture
def sim(station: SimStation) -> Iterator[SimulatedHeatingHolder]:
    with SimulatedHeatingHolder(station, port=0) as sim:
        yield sim


@pytest.fixture
def holder(sim: SimulatedHeatingHolder) -> Iterator[MemsHeatingHolder]:
    """On the pseudo-terminal, as a serial port (the TCP socket: its own test below; closing
    pySerial's socket:// costs 0.3 s a test)."""
    with MemsHeatingHolder(sim.endpoints["serial"], timeout=2.0) as holder:
        yield holder


def _wait_settled(holder: MemsHeatingHolder, target: float) -> HeatingHolderStatus:
    """The status once the chip has stayed within 0.02 C of `target` for 5 model seconds (the
    loop is underdamped: a single reading in the band may be the chip passing through it)."""
    deadline = time.monotonic() + 5.0
    since = None
    while time.monotonic() < deadline:
        status = holder.status()
        if status.ramping or abs(status.temperature_c - target) > 0.02:
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since >= 5.0 / FAST:
            return status
        time.sleep(0.005)
    raise AssertionError(f"not settled at {target} C: {holder.status()}")


def test_it_is_a_holder_with_a_heater(holder: MemsHeatingHolder) -> None:
    assert isinstance(holder, Holder) and isinstance(holder, HeatingHolder)
    assert heats(holder) and heats(MemsHeatingHolder)
    assert holder.identify().startswith("INSITU-SIM,MHC-1")


def test_heats_at_the_rate_set_and_reads_temperature_power_resistance(
    holder: MemsHeatingHolder, station: SimStation
) -> None:
    status = holder.status()
    assert not status.heater_on and status.power_w == 0.0
    room = status.temperature_c
    start_ramp(holder, room + 15.0, 5.0)  # heater on, rate, target
    assert holder.heater_enabled() and holder.ramp_rate_c_per_s() == 5.0
    ramping = holder.status()
    assert ramping.ramping and ramping.target_c == room + 15.0
    assert room <= ramping.setpoint_c < room + 15.0
    settled = _wait_settled(holder, room + 15.0)
    assert settled.power_w > 0.0 and settled.resistance_ohm > 100.0  # Pt: R grows with T
    assert holder.temperature_c() == pytest.approx(settled.temperature_c, abs=0.03)
    assert holder.setpoint_c() == room + 15.0
    assert holder.power_w() == pytest.approx(settled.power_w, rel=0.01)
    # What the controller reports is the station's chip (the renderer reads that one).
    with station.lock:
        assert station.chip.temperature_c == pytest.approx(room + 15.0, abs=0.05)


def test_hold_stops_the_setpoint_where_it_is(holder: MemsHeatingHolder) -> None:
    room = holder.temperature_c()
    start_ramp(holder, room + 100.0, 5.0)  # 20 model s, 0.2 wall s
    time.sleep(0.05)
    holder.hold()
    held = holder.setpoint_c()
    assert room < held < room + 100.0
    time.sleep(0.05)
    status = holder.status()
    assert not status.ramping and status.setpoint_c == held == status.target_c


def test_refusals_carry_the_controllers_code_and_change_nothing(
    holder: MemsHeatingHolder,
) -> None:
    with pytest.raises(HolderError) as off:
        holder.set_temperature(100.0)
    assert off.value.code == ERR_HEATER_OFF
    holder.heater_on()
    with pytest.raises(HolderError) as beyond:
        holder.set_temperature(1300.0)
    assert beyond.value.code == ERR_OUT_OF_RANGE
    with pytest.raises(HolderError) as below:
        holder.set_temperature(5.0)  # a heater cannot cool
    assert below.value.code == ERR_OUT_OF_RANGE
    with pytest.raises(HolderError) as rate:
        holder.set_ramp_rate(5000.0)
    assert rate.value.code == ERR_OUT_OF_RANGE
    assert holder.last_error() is not None and holder.last_error() is None  # read, cleared
    status = holder.status()
    assert status.ramp_rate_c_per_s == 1.0 and not status.ramping  # nothing changed


def test_heater_off_is_confirmed_and_the_chip_is_back_at_room_temperature(
    holder: MemsHeatingHolder,
) -> None:
    room = holder.temperature_c()
    start_ramp(holder, room + 30.0, 50.0)
    _wait_settled(holder, room + 30.0)
    found = heater_off(holder)
    assert found.heater_on and found.temperature_c == pytest.approx(room + 30.0, abs=0.1)
    time.sleep(0.01)  # 1 model second: a MEMS membrane cools in milliseconds
    status = holder.status()
    assert not status.heater_on and status.temperature_c == pytest.approx(room, abs=0.01)


def test_bias_routing_and_no_positioner(holder: MemsHeatingHolder, station: SimStation) -> None:
    holder.set_bias_routing("ground")
    assert holder.bias_routing() == "ground" and holder.status().routing == "ground"
    with station.model() as m:
        assert m.bias_routing == "ground"  # the chip's contacts carry the cell's bias line
    status = holder.status()
    assert status.contact and not status.moving  # an approach step finds contact at once
    for verb in (lambda: holder.approach(100.0, 1000.0), lambda: holder.move_fine(10.0)):
        with pytest.raises(HolderError) as refused:
            verb()
        assert refused.value.code == ERR_NO_POSITIONER


def test_the_tcp_socket_serves_the_same_controller(
    sim: SimulatedHeatingHolder, holder: MemsHeatingHolder
) -> None:
    with MemsHeatingHolder(sim.endpoints["url"], timeout=2.0) as over_tcp:
        assert over_tcp.identify() == holder.identify()
        over_tcp.heater_on()
        assert holder.heater_enabled()  # one controller, one state, either transport
