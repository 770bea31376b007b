"""The simulated Keithley 2400 driven through the PyVISA driver over real TCP (pyvisa-py).

Each test starts the simulator on an ephemeral port; raw-socket tests talk SCPI the way any
client would, to check the parser answers like an instrument.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator

import pytest

from insitu_daq.control.instruments import SourceMeter
from insitu_daq.drivers.sourcemeter import (
    ERROR_DATA_OUT_OF_RANGE,
    OutputOffError,
    Reading,
    SourceMeterError,
)
from insitu_daq.drivers.sourcemeter.keithley2400 import (
    ERROR_OUTPUT_OFF,
    STATUS_COMPLIANCE,
    Keithley2400,
)
from insitu_daq.sim.sourcemeter import SimulatedSourceMeter
from insitu_daq.sim.station import SimStation

TIME_SCALE = 10.0
COMPLIANCE_A = 100e-9  # SCIENCE.md default
BIAS_V = 4.3


@pytest.fixture
def station() -> SimStation:
    return SimStation(seed=3, time_scale=TIME_SCALE)


@pytest.fixture
def sim(station: SimStation) -> Iterator[SimulatedSourceMeter]:
    with SimulatedSourceMeter(station, port=0, serial_number="1234567") as server:
        yield server


@pytest.fixture
def smu(sim: SimulatedSourceMeter) -> Iterator[Keithley2400]:
    with Keithley2400(sim.endpoints["visa"], timeout_s=1.0) as driver:
        yield driver


class RawScpi:
    """A bare TCP client: one line out, and one line back for queries."""

    def __init__(self, sim: SimulatedSourceMeter) -> None:
        _, host, port, _ = sim.endpoints["visa"].split("::")
        self._sock = socket.create_connection((host, int(port)), timeout=2.0)
        self._file = self._sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def write(self, line: str) -> None:
        self.send(line.encode("ascii") + b"\n")

    def query(self, line: str) -> str:
        self.write(line)
        return self._file.readline().decode("ascii").rstrip("\n")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@pytest.fixture
def raw(sim: SimulatedSourceMeter) -> Iterator[RawScpi]:
    client = RawScpi(sim)
    yield client
    client.close()


def _wait_for_contact(station: SimStation, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with station.model() as m:
            if m.contact:
                return
        time.sleep(0.01)
    raise AssertionError("tip never reached contact")


def test_identify(smu: Keithley2400) -> None:
    assert isinstance(smu, SourceMeter)  # what the bias controller and the guardian drive
    identity = smu.identify()
    assert identity.manufacturer == "KEITHLEY INSTRUMENTS INC."
    assert identity.model == "MODEL 2400"
    assert identity.serial == "1234567"
    assert identity.firmware.startswith("C30")


def test_current_at_noise_floor_before_contact_and_nanoamperes_in_contact(
    smu: Keithley2400, station: SimStation
) -> None:
    smu.configure_voltage_source(compliance_amperes=COMPLIANCE_A)
    smu.set_voltage(BIAS_V)
    smu.output_on()

    open_circuit = smu.read()
    assert open_circuit.voltage == pytest.approx(BIAS_V, abs=1e-3)
    assert abs(open_circuit.current) < 20e-12  # noise floor, no cell connected
    assert not open_circuit.in_compliance

    with station.model() as m:
        m.move_tip_to(5.0, 1e6)
    _wait_for_contact(station)
    in_contact = smu.read()
    with station.model() as m:
        _, model_current, _ = m.terminal()
    assert 0.1e-9 < in_contact.current < 20e-9
    # The cell drifts slowly (OCV rises with x); the reading must be the model's current.
    assert in_contact.current == pytest.approx(model_current, rel=0.05)
    assert in_contact.voltage == pytest.approx(BIAS_V, abs=1e-3)
    assert not in_contact.in_compliance
    assert in_contact.half_width_ns > 0
    assert abs(in_contact.time_ns - time.time_ns()) < 5e9


def test_mnemonics_any_form_and_compound_messages(raw: RawScpi) -> None:
    raw.write(":SOURce:VOLTage:LEVel:IMMediate:AMPLitude 1.5")
    assert raw.query("sour:volt?") == "+1.500000E+00"
    raw.write("SoUr:VoLtAgE 2.5E-1")
    assert raw.query(":SOUR:VOLT:LEV?") == "+2.500000E-01"
    raw.write("VOLT 125e-2")  # [:SOURce] is optional
    assert raw.query(":SOURCE:VOLTAGE?") == "+1.250000E+00"
    # Relative path: NPLC and PROT? resolve under :SENS:CURR.
    raw.write(":SENS:CURR:PROT 2e-7;NPLC 5")
    assert raw.query(":SENSe:CURRent:NPLCycles?;PROTection?") == "+5.000000E+00;+2.000000E-07"
    # Common commands neither need nor change the path; replies are joined by ';'.
    reply = raw.query("*IDN?;:OUTP?;*OPC?")
    assert reply.startswith("KEITHLEY INSTRUMENTS INC.,MODEL 2400,1234567,C30")
    assert reply.endswith(";0;1")
    # MIN / MAX / DEF, booleans as words or numbers.
    raw.write(":SENS:CURR:NPLC MAX")
    assert raw.query(":SENS:CURR:NPLC?") == "+1.000000E+01"
    assert raw.query(":SOUR:VOLT? MAX") == "+2.100000E+02"
    raw.write(":SYST:BEEP:STAT 0;:SYST:RSEN ON")
    assert raw.query(":SYST:BEEP:STAT?;:SYST:RSEN?") == "0;1"
    raw.write(':SENS:FUNC "VOLT:DC","CURR"')
    assert raw.query(":SENS:FUNC?") == '"VOLT:DC","CURR:DC"'
    assert raw.query(":FORM:ELEM?") == "VOLT,CURR,RES,TIME,STAT"  # the 2400's default
    assert raw.query(":SYST:ERR?") == '0,"No error"'


def test_undefined_header_is_queued_and_discards_the_rest_of_the_message(
    raw: RawScpi, smu: Keithley2400
) -> None:
    raw.write(":SOUR:VOLT:FOO 1")
    raw.write(":BOGUS;:SOUR:VOLT 3")  # the error stops the message: no level change
    raw.write(":SOUR:VOLT 1;RANG 2")  # relative to :SOUR, so :SOUR:RANG: undefined
    assert raw.query("*OPC?") == "1"  # this connection's lines are all done
    assert smu.errors() == [(-113, "Undefined header")] * 3
    assert smu.voltage_setpoint() == 1.0
    assert smu.errors() == []


def test_out_of_range_level_is_refused_and_level_kept(smu: Keithley2400) -> None:
    smu.configure_voltage_source(compliance_amperes=COMPLIANCE_A, voltage_range_volts=2.0)
    smu.set_voltage(1.0)
    with pytest.raises(SourceMeterError) as refused:
        smu.set_voltage(5.0)  # beyond the fixed 2 V range (2.1 V with over-range)
    assert refused.value.codes == [ERROR_DATA_OUT_OF_RANGE]
    assert smu.voltage_setpoint() == 1.0

    smu.configure_voltage_source(compliance_amperes=COMPLIANCE_A)  # auto range
    smu.set_voltage(150.0)
    with pytest.raises(SourceMeterError) as refused:
        smu.set_voltage(250.0)  # beyond the 2400's 210 V
    assert refused.value.codes == [ERROR_DATA_OUT_OF_RANGE]
    assert smu.voltage_setpoint() == 150.0


def test_read_with_output_off_raises_the_2400_error(smu: Keithley2400) -> None:
    smu.configure_voltage_source(compliance_amperes=COMPLIANCE_A)
    with pytest.raises(OutputOffError) as refused:  # what the bias controller acts on
        smu.read()
    assert refused.value.codes == [ERROR_OUTPUT_OFF]
    assert "Not permitted with OUTPUT off" in str(refused.value)
    smu.output_on()
    assert smu.read().voltage == pytest.approx(0.0, abs=1e-3)  # the session still works


def test_short_drives_the_source_into_compliance(
    smu: Keithley2400, sim: SimulatedSourceMeter, station: SimStation
) -> None:
    smu.configure_voltage_source(compliance_amperes=COMPLIANCE_A)
    smu.set_voltage(BIAS_V)
    smu.output_on()
    assert not smu.in_compliance()

    sim.inject_short(True)
    reading = smu.read()
    assert reading.current == pytest.approx(COMPLIANCE_A, rel=0.02)
    assert reading.status & STATUS_COMPLIANCE
    assert reading.in_compliance
    assert reading.voltage < 0.1  # the source backs off to hold the current limit
    assert smu.in_compliance()
    with station.model() as m:
        assert m.terminal()[2]

    sim.inject_short(False)
    assert not smu.in_compliance()
    assert not smu.read().in_compliance


def test_current_beyond_fixed_range_reads_as_overflow(
    smu: Keithley2400, sim: SimulatedSourceMeter
) -> None:
    smu.configure_voltage_source(compliance_amperes=1e-3, current_range_amperes=1e-6)
    smu.set_voltage(1.0)
    smu.output_on()
    sim.inject_short(True)  # 1 V over 10 kOhm: 100 uA, far beyond the 1 uA range
    reading = smu.read()
    assert reading.overflow
    assert reading.current == math.inf


def test_longer_integration_makes_readings_slower(smu: Keithley2400) -> None:
    def fastest_read_s(nplc: float) -> float:
        smu.configure_voltage_source(compliance_amperes=COMPLIANCE_A, nplc=nplc)
        durations = []
        for _ in range(3):
            began = time.perf_counter()
            smu.read()
            durations.append(time.perf_counter() - began)
        return min(durations)

    smu.output_on()
    # Ratio only: 10 PLC of V and I at 50 Hz integrate for 0.4 s, 0.01 PLC for 0.4 ms.
    assert fastest_read_s(10.0) > 4 * fastest_read_s(0.01)


def test_garbage_is_counted_and_the_server_keeps_serving(
    raw: RawScpi, sim: SimulatedSourceMeter, smu: Keithley2400
) -> None:
    raw.send(b"\xff\xfe\x80garbage\n")
    raw.send(b":SOUR:VOLT " + b"1" * 5000 + b"\n")
    raw.send(b":OUTP OFF;;\n")
    raw.send(b"\x01\x02\n")
    assert raw.query("*IDN?").startswith("KEITHLEY INSTRUMENTS INC.")
    assert sim.malformed_total == 4
    assert sim.errors_total == 4
    codes = [code for code, _ in smu.errors()]
    assert codes == [-101, -363, -102, -101]


def test_error_queue_overflow_ends_with_350(raw: RawScpi, smu: Keithley2400) -> None:
    for _ in range(12):
        raw.write(":NOPE")
    assert raw.query("*OPC?") == "1"  # this connection's lines are all done
    codes = [code for code, _ in smu.errors()]
    assert codes == [-113] * 9 + [-350]


def test_output_off_removes_the_source_from_the_model(
    smu: Keithley2400, station: SimStation
) -> None:
    smu.configure_voltage_source(compliance_amperes=COMPLIANCE_A)
    smu.set_voltage(1.0)
    smu.output_on()
    with station.model() as m:
        assert m.applied_bias() == pytest.approx(1.0)
    assert smu.output_enabled()

    smu.output_off()
    assert not smu.output_enabled()
    with station.model() as m:
        assert m.terminal() == (0.0, 0.0, False)
        assert m.applied_bias() == 0.0
        assert m.bias_history[-1][1] == 0.0


def test_clients_share_one_instrument(sim: SimulatedSourceMeter, smu: Keithley2400) -> None:
    with Keithley2400(sim.endpoints["visa"], timeout_s=1.0) as other:
        smu.set_voltage(0.75)
        assert other.voltage_setpoint() == 0.75


def test_a_status_word_reaching_bit_31_is_refused() -> None:
    # Bit 31 marks the bias log's level-change rows (core/records.py): no reading may set it.
    with pytest.raises(ValueError, match="bits 0-30"):
        Reading(0.0, 0.0, 1 << 31, 0.0, 0, 0)
    assert Reading(0.0, 0.0, (1 << 31) - 1, 0.0, 0, 0).status == (1 << 31) - 1
