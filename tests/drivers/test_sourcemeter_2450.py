"""The Keithley 2450's native SCPI: its driver against the simulated 2450 over real TCP (pyvisa-py).

What the 2450 does differently from the 2400 (tests/drivers/test_sourcemeter.py keeps the 2400's):
the current limit under `:SOUR:VOLT:ILIM`, its trip query, the elements named in `:READ?`, the
limit flag in the source status (the measure status' bit 3 is the front terminals), a reading
with the output off that says so instead of being refused, and the 2400's headers refused.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from insitu_daq.control.instruments import SourceMeter
from insitu_daq.control.instruments.factory import open_source_meter
from insitu_daq.core.config import SourceMeterConfig
from insitu_daq.drivers.sourcemeter import OutputOffError
from insitu_daq.drivers.sourcemeter.keithley2450 import (
    MEASURE_STATUS_FRONT_TERMINALS,
    SOURCE_STATUS_OUTPUT_ON,
    Keithley2450,
)
from insitu_daq.sim.sourcemeter import SimulatedSourceMeter
from insitu_daq.sim.station import SimStation

COMPLIANCE_A = 100e-9
BIAS_V = 4.3


@pytest.fixture
def station() -> SimStation:
    return SimStation(seed=3, time_scale=10.0)


@pytest.fixture
def sim(station: SimStation) -> Iterator[SimulatedSourceMeter]:
    with SimulatedSourceMeter(station, port=0, model="keithley2450") as server:
        yield server


@pytest.fixture
def smu(sim: SimulatedSourceMeter) -> Iterator[SourceMeter]:
    config = SourceMeterConfig(model="keithley2450", resource=sim.endpoints["visa"])
    driver = open_source_meter(config)
    yield driver
    driver.close()


def raw_query(sim: SimulatedSourceMeter, *lines: str) -> list[str]:
    """Send SCPI lines on a bare socket; the reply of each query, in order."""
    _, host, port, _ = sim.endpoints["visa"].split("::")
    with socket.create_connection((host, int(port)), timeout=2.0) as sock:
        replies = sock.makefile("rb")
        answers = []
        for line in lines:
            sock.sendall(line.encode("ascii") + b"\n")
            if "?" in line:
                answers.append(replies.readline().decode("ascii").rstrip("\n"))
        return answers


def test_the_factory_opens_the_2450_driver(smu: SourceMeter) -> None:
    assert isinstance(smu, Keithley2450) and isinstance(smu, SourceMeter)
    identity = smu.identify()
    assert identity.model == "MODEL 2450"


def test_current_limit_is_set_with_ilim_and_tripped_is_its_trip_query(
    smu: SourceMeter, sim: SimulatedSourceMeter
) -> None:
    smu.configure_voltage_source(compliance_amperes=COMPLIANCE_A, nplc=0.1)
    assert sim.instrument.settings.current_compliance == COMPLIANCE_A
    assert raw_query(sim, ":SOUR:VOLT:ILIM?") == ["+1.000000E-07"]
    smu.set_voltage(BIAS_V)
    smu.output_on()
    assert not smu.in_compliance()

    sim.inject_short(True)
    reading = smu.read()
    assert reading.in_compliance
    assert reading.current == pytest.approx(COMPLIANCE_A, rel=0.02)
    assert smu.in_compliance()
    assert raw_query(sim, ":SOUR:VOLT:ILIM:TRIP?") == ["1"]
    sim.inject_short(False)
    assert not smu.in_compliance()
    assert smu.errors() == []


def test_read_names_its_elements_and_front_terminals_are_not_compliance(
    smu: SourceMeter, sim: SimulatedSourceMeter
) -> None:
    smu.configure_voltage_source(compliance_amperes=COMPLIANCE_A, nplc=0.1)
    smu.set_voltage(1.0)
    smu.output_on()
    # Current, readback voltage, relative time, measure status, source status.
    (reply,) = raw_query(sim, ':READ? "defbuffer1", READ, SOUR, REL, STAT, SOURSTAT')
    amperes, volts, _, status, source_status = (float(f) for f in reply.split(","))
    assert abs(amperes) < 20e-12 and volts == pytest.approx(1.0, abs=1e-3)
    assert int(status) & MEASURE_STATUS_FRONT_TERMINALS  # bit 3: the 2400's compliance bit
    assert int(source_status) == SOURCE_STATUS_OUTPUT_ON  # on, and not in the current limit
    (alone,) = raw_query(sim, ":READ?")  # no element named: the reading alone
    assert len(alone.split(",")) == 1

    reading = smu.read()
    assert reading.status & MEASURE_STATUS_FRONT_TERMINALS
    assert not reading.in_compliance  # read with the 2400's meaning it would be a trip
    assert reading.voltage == pytest.approx(1.0, abs=1e-3)
    assert reading.status < 1 << 16  # clear of the bias log's level-change bit


def test_a_reading_with_the_output_off_raises_output_off(smu: SourceMeter) -> None:
    smu.configure_voltage_source(compliance_amperes=COMPLIANCE_A, nplc=0.1)
    with pytest.raises(OutputOffError, match="output off"):
        smu.read()
    smu.output_on()
    assert smu.read().voltage == pytest.approx(0.0, abs=1e-3)  # the session still works


@pytest.mark.parametrize(
    "header",
    [":FORM:ELEM VOLT,CURR", ":SENS:CURR:PROT 1e-7", ":SENS:FUNC:CONC ON", ":SOUR:CLE:AUTO OFF"],
)
def test_the_2400_headers_are_refused_as_undefined(
    header: str, sim: SimulatedSourceMeter, smu: SourceMeter
) -> None:
    assert raw_query(sim, header, "*OPC?") == ["1"]  # processed before the errors are read
    assert smu.errors() == [(-113, "Undefined header")]
