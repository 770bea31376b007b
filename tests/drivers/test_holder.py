"""The simulated holder controller, driven through OpenCellHolder over a pty and over TCP.

Every test that takes the `holder` fixture runs twice: once on the controller's
pseudo-terminal (/dev/pts/N, as a serial port) and once on its TCP socket (socket://).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import tty
from collections.abc import Iterator

import pytest
import serial

from insitu_daq.control.instruments import Holder
from insitu_daq.drivers.holder import (
    ERR_BUSY,
    ERR_FINE_RANGE,
    ERR_NO_CONTACT,
    ERR_OVERTRAVEL,
    HolderError,
    HolderTimeout,
    OpenCellHolder,
)
from insitu_daq.sim.holder import SimulatedHolder
from insitu_daq.sim.station import SimStation

FAST = 100.0  # model seconds per wall second: a 3 um approach takes a few tens of ms
TRANSPORTS = ["serial", "url"]


@pytest.fixture
def station() -> SimStation:
    return SimStation(seed=3, time_scale=FAST)


@pytest.fixture
def sim(station: SimStation) -> Iterator[SimulatedHolder]:
    with SimulatedHolder(station, port=0) as sim:
        yield sim


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def holder(sim: SimulatedHolder, transport: str) -> Iterator[OpenCellHolder]:
    with OpenCellHolder(sim.endpoints[transport], timeout=2.0) as holder:
        yield holder


def _tip(station: SimStation) -> float:
    with station.model() as m:
        return m.tip_position_nm


def _contact(station: SimStation) -> bool:
    with station.model() as m:
        return m.contact


def _touch(holder: OpenCellHolder) -> None:
    """Coarse steps to ~500 nm from the particle, then an approach until contact."""
    holder.coarse_step(25)
    holder.wait_until_idle(timeout=10)
    holder.approach(200.0, 2000.0)
    assert holder.wait_until_idle(timeout=10).contact


def test_identifies_and_starts_idle_at_origin(holder: OpenCellHolder) -> None:
    assert isinstance(holder, Holder)  # what the positioner drives
    assert "OCH-1" in holder.identify()
    status = holder.status()
    assert status.position_nm == 0.0
    assert not status.moving
    assert not status.contact
    assert status.routing == "source_meter"
    assert status.error is None


def test_coarse_then_fine_approach_stops_exactly_at_contact(
    holder: OpenCellHolder, station: SimStation
) -> None:
    gap = -_tip(station)

    holder.coarse_step(25)
    coarse = holder.wait_until_idle(timeout=10)
    assert not coarse.contact and not _contact(station)
    assert coarse.position_nm == pytest.approx(2500.0, rel=0.1)  # stick-slip steps scatter
    assert _tip(station) == pytest.approx(coarse.position_nm - gap, abs=0.05)

    holder.approach(200.0, 2000.0)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        # Contact only switches on during an approach: when the model agrees before and
        # after the query, the controller's answer must be that same value.
        before = _contact(station)
        said = holder.in_contact()
        after = _contact(station)
        if before == after:
            assert said == before
        if said:
            break
    else:
        pytest.fail("the approach never reported contact")

    final = holder.wait_until_idle(timeout=10)
    assert final.contact and not final.overtravel and final.error is None
    with station.model() as m:
        assert m.contact and not m.tip_moving and not m.overtravel
        assert m.tip_position_nm == 0.0  # stopped where it touched, not pressed into it
    assert final.position_nm == pytest.approx(gap, abs=0.05)


def test_approach_without_contact_ends_at_max_travel_and_says_so(
    holder: OpenCellHolder, station: SimStation
) -> None:
    holder.approach(2000.0, 1000.0)  # the particle is 3000 nm away
    status = holder.wait_until_idle(timeout=10)
    assert not status.contact and not _contact(station)
    assert status.position_nm == pytest.approx(1000.0, abs=0.05)
    assert status.error is not None and status.error.code == ERR_NO_CONTACT
    fault = holder.last_error()
    assert fault is not None and fault.code == ERR_NO_CONTACT
    assert holder.last_error() is None  # reading the error cleared it


def test_driving_past_contact_trips_overtravel_until_retracted(
    holder: OpenCellHolder, station: SimStation
) -> None:
    _touch(holder)
    with station.model() as m:
        limit = m.params.overtravel_limit_nm

    holder.move_fine(50.0)
    tripped = holder.wait_until_idle(timeout=10)
    assert tripped.overtravel
    assert tripped.error is not None and tripped.error.code == ERR_OVERTRAVEL
    assert tripped.fine_extension_nm == pytest.approx(limit, abs=0.05)
    with station.model() as m:
        assert m.overtravel
        assert m.tip_position_nm == limit

    for forward in (
        lambda: holder.move_fine(5.0),
        lambda: holder.coarse_step(1),
        lambda: holder.approach(100.0, 100.0),
    ):
        with pytest.raises(HolderError) as refused:
            forward()
        assert refused.value.code == ERR_OVERTRAVEL
    assert _tip(station) == limit

    holder.move_fine(-100.0)
    retracted = holder.wait_until_idle(timeout=10)
    assert not retracted.overtravel and not retracted.contact
    assert _tip(station) == pytest.approx(limit - 100.0)

    holder.approach(200.0, 500.0)  # forward motion is allowed again
    assert holder.wait_until_idle(timeout=10).contact


@pytest.mark.parametrize("routing", ["ground", "float", "source_meter"])
def test_bias_routing_switches_the_models_line(
    holder: OpenCellHolder, station: SimStation, routing: str
) -> None:
    if routing == "source_meter":
        holder.set_bias_routing("ground")  # start from elsewhere so the change is visible
    holder.set_bias_routing(routing)
    assert holder.bias_routing() == routing
    assert holder.status().routing == routing
    with station.model() as m:
        assert m.bias_routing == routing


def test_unknown_routing_is_refused_before_sending(holder: OpenCellHolder) -> None:
    with pytest.raises(ValueError, match="routing"):
        holder.set_bias_routing("earth")
    assert holder.bias_routing() == "source_meter"


def test_moves_take_model_time_and_stop_halts_them(transport: str) -> None:
    slow = SimStation(seed=3, time_scale=2.5)  # a 1000 nm fine move lasts 2 s of wall time
    with SimulatedHolder(slow, port=0) as sim, OpenCellHolder(sim.endpoints[transport]) as holder:
        holder.move_fine(1000.0)
        time.sleep(0.2)
        mid = holder.status()
        assert mid.moving
        assert 0.0 < mid.position_nm < 1000.0
        assert mid.fine_extension_nm == pytest.approx(mid.position_nm, abs=0.15)

        holder.stop()
        stopped = holder.status()
        assert not stopped.moving
        assert stopped.position_nm < 1000.0
        time.sleep(0.1)
        assert holder.position_nm() == stopped.position_nm
        assert holder.fine_extension_nm() == pytest.approx(stopped.position_nm, abs=0.15)


def test_refusals_carry_the_controllers_code(holder: OpenCellHolder, station: SimStation) -> None:
    with pytest.raises(HolderError) as out_of_range:
        holder.move_fine(1500.0)
    assert out_of_range.value.code == ERR_FINE_RANGE
    assert not holder.status().moving

    holder.coarse_step(-1000)  # backward, 50 s of model time: still running when asked again
    with pytest.raises(HolderError) as busy:
        holder.coarse_step(-1)
    assert busy.value.code == ERR_BUSY
    holder.stop()
    assert not holder.status().moving


GARBAGE = [
    (b"\xff\xfe POS?", 105),
    (b"\x01\x02", 105),
    (b"A" * 500, 104),
    (b"FOO", 100),
    (b"STEP abc", 102),
    (b"STEP", 101),
    (b"STEP 0", 103),
    (b"APPR 200 nan", 102),
    (b"ROUT XYZ", 102),
]


def test_garbage_gets_error_replies_and_the_controller_keeps_answering(
    sim: SimulatedHolder, transport: str
) -> None:
    errors_before = sim.errors_total
    with serial.serial_for_url(sim.endpoints[transport], baudrate=115200, timeout=2.0) as port:
        for line, code in GARBAGE:
            port.write(line + b"\n")
            reply = port.read_until(b"\r\n")
            assert reply.startswith(f"ERR {code} ".encode()), (line, reply)
        port.write(b"*idn?\r\n")
        assert port.read_until(b"\r\n").startswith(b"OK INSITU-SIM,OCH-1")
    assert sim.errors_total == errors_before + len(GARBAGE)


def test_silent_pty_raises_holder_timeout() -> None:
    master, slave = os.openpty()  # a serial port with nothing on the other end
    try:
        tty.setraw(slave)
        with OpenCellHolder(os.ttyname(slave), timeout=0.2) as holder, pytest.raises(HolderTimeout):
            holder.identify()
    finally:
        os.close(slave)
        os.close(master)


def test_stop_releases_port_pty_and_threads(station: SimStation) -> None:
    sim = SimulatedHolder(station, port=0)
    sim.start()
    with OpenCellHolder(sim.endpoints["url"]) as holder:
        holder.identify()
    port = int(sim.endpoints["url"].rsplit(":", 1)[1])
    sim.stop()
    sim.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0)
    assert not [t for t in threading.enumerate() if t.name.startswith("holder-")]
