"""Simulated Keithley 2400 SourceMeter: its SCPI state machine and a raw-socket server.

`Keithley2400Simulator` is the instrument: settings, the 2400 command tree (declared on the
generic parser in `scpi.py`), error queue and readings. `SimulatedSourceMeter` serves it on a
TCP socket (newline-terminated SCPI, `TCPIP::host::port::SOCKET` for VISA), one thread per
client, all clients sharing the one instrument, as on a real 2400 behind a GPIB-LAN bridge.

What comes from the 2400 manual (2400S-900-01): the *IDN? format, voltage source ranges
0.2/2/20/200 V and current measure ranges 1 uA..1 A (each usable to 105 %, queries report
105 % of nominal as the 2400 does), *RST defaults (compliance 105 uA, NPLC 1, auto ranges on,
output off-mode NORMal, all five FORM:ELEM items), the reading format and its status word
(bit 0 overflow, bit 2 front terminals, bit 3 real compliance, bits 11-13 V/I/R measured,
bit 14/15 V/I source, bit 22 remote sense), overflow readings of +9.9E37 and +9.91E37 for
"not measured", error +803 "Not permitted with OUTPUT off" for a reading with the output off,
and the error queue of 10 with -350 on overflow.

The physics stays in the model: whenever output, level or compliance change the simulator
calls `m.set_source(...)`; a reading takes `m.terminal()` and adds measurement noise from
`m.rng`, both under the station lock. The integration time (NPLC / line frequency per measured
quantity) is spent in real wall time with the instrument busy but the station lock free, since
transport latency does not scale with the station clock.

Simplifications, each refused loudly rather than faked: the current source function can be
selected but not switched on (-221); sweep/list modes, binary data formats and the trigger
model beyond INIT/FETC?/READ? are not simulated (-224 or -113). INIT measures at once (as if
followed by *WAI). Where the manual's optional roots overlap (`:VOLT:RANG` is both
[:SOURce] and [:SENSe]), SENSe wins, SCPI's default root, except for headers only SOURce has.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

from .lineserver import ServedInstrument, TcpLineServer
from .model import NanobatteryModel
from .scpi import (
    CommandTree,
    Dispatcher,
    ScpiError,
    StatusSystem,
    format_bool,
    format_error,
    format_number,
    parse_bool,
    parse_choice,
    parse_number,
    parse_string,
    split_outside_quotes,
)
from .station import SimStation

log = logging.getLogger(__name__)

DEFAULT_PORT = 5025
MAX_LINE = 4096  # bytes of one program message; longer ones are refused with -363
DEFAULT_SERIAL = "4104473"
FIRMWARE = "C30   Mar 17 2006 09:29:29/A02  /K/J"
MANUFACTURER = "KEITHLEY INSTRUMENTS INC."
MODEL = "MODEL 2400"

# Ranges (nominal); each range reaches OVER_RANGE times its nominal value.
VOLTAGE_RANGES = (0.2, 2.0, 20.0, 200.0)
CURRENT_RANGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
OVER_RANGE = 1.05
MAX_SOURCE_VOLTS = 210.0
MAX_SOURCE_AMPERES = 1.05
COMPLIANCE_LIMITS = (1e-9, 1.05)  # amperes, :SENS:CURR:PROT
VOLTAGE_COMPLIANCE_LIMITS = (0.2, 210.0)  # volts, :SENS:VOLT:PROT
NPLC_LIMITS = (0.01, 10.0)
LINE_FREQUENCIES = (50.0, 60.0)

# Special reading values.
OVERFLOW = 9.9e37
NOT_MEASURED = 9.91e37

# Status word bits (FORM:ELEM STAT).
STATUS_OVERFLOW = 1 << 0
STATUS_FRONT_TERMINALS = 1 << 2
STATUS_COMPLIANCE = 1 << 3
STATUS_VOLTAGE_MEASURED = 1 << 11
STATUS_CURRENT_MEASURED = 1 << 12
STATUS_RESISTANCE_MEASURED = 1 << 13
STATUS_VOLTAGE_SOURCE = 1 << 14
STATUS_CURRENT_SOURCE = 1 << 15
STATUS_REMOTE_SENSE = 1 << 22

# Device-specific errors of the 2400 (manual, table B-1).
ERROR_OUTPUT_OFF = 803
DEVICE_ERRORS = {ERROR_OUTPUT_OFF: "Not permitted with OUTPUT off"}

# Measurement model. *Model choice*: noise of the order of the 2400's specified resolution on
# the low ranges, shrinking with the square root of the integration time.
CURRENT_NOISE_FLOOR_A = 1e-12
CURRENT_NOISE_PER_RANGE = 1e-6  # rms noise as a fraction of the present range
VOLTAGE_NOISE_V = 10e-6
READING_OVERHEAD_S = 0.0015  # A/D setup and formatting per reading, on top of integration

# Reading elements in the order the 2400 sends them, and sense functions.
ELEMENTS = ("VOLTage", "CURRent", "RESistance", "TIME", "STATus")
FUNCTIONS = ("VOLT", "CURR", "RES")
_FUNCTION_NAMES = {"VOLT": "VOLT:DC", "CURR": "CURR:DC", "RES": "RES"}
_FUNCTION_WORDS = {
    "VOLT": "VOLT",
    "VOLTAGE": "VOLT",
    "VOLT:DC": "VOLT",
    "VOLTAGE:DC": "VOLT",
    "CURR": "CURR",
    "CURRENT": "CURR",
    "CURR:DC": "CURR",
    "CURRENT:DC": "CURR",
    "RES": "RES",
    "RESISTANCE": "RES",
}
_LIMIT_WORDS = ("MINimum", "MAXimum", "DEFault")


def range_for(value: float, ranges: tuple[float, ...]) -> float | None:
    """The smallest nominal range that holds |value| (with over-range), None if none does."""
    for nominal in ranges:
        if abs(value) <= nominal * OVER_RANGE * (1 + 1e-12):
            return nominal
    return None


@dataclass
class Settings:
    """Everything *RST sets (defaults from the manual's command summary tables)."""

    source_function: str = "VOLTage"
    voltage_level: float = 0.0
    voltage_range: float = 20.0
    voltage_range_auto: bool = True
    voltage_mode: str = "FIXed"
    current_level: float = 0.0
    current_compliance: float = 1.05e-4
    current_range: float = 1e-4
    current_range_auto: bool = True
    voltage_compliance: float = 21.0
    voltage_measure_range: float = 20.0
    voltage_measure_range_auto: bool = True
    nplc: float = 1.0
    functions: list[str] = field(default_factory=lambda: ["CURR"])
    concurrent: bool = True
    elements: set[str] = field(default_factory=lambda: set(ELEMENTS))
    output: bool = False
    output_off_mode: str = "NORMal"
    auto_output_off: bool = False
    beeper: bool = True
    remote_sense: bool = False
    autozero: str = "ON"


@dataclass(frozen=True)
class Reading:
    volts: float
    amperes: float
    ohms: float
    time_s: float
    status: int

    def format(self, elements: set[str]) -> str:
        values = (self.volts, self.amperes, self.ohms, self.time_s, float(self.status))
        return ",".join(
            format_number(value)
            for name, value in zip(ELEMENTS, values, strict=True)
            if name in elements
        )


class Keithley2400Simulator:
    """The SourceMeter's state machine: one program message in, its reply line out."""

    def __init__(self, station: SimStation, serial_number: str = DEFAULT_SERIAL) -> None:
        self._station = station
        self.serial_number = serial_number
        self._lock = threading.Lock()  # one message at a time, as the instrument does
        self.settings = Settings()
        self.line_frequency = 50.0  # a system setting: *RST keeps it
        self._time_origin = time.monotonic()
        self._last_reading: Reading | None = None
        self.status = StatusSystem(DEVICE_ERRORS)
        self._dispatcher = Dispatcher(self._build_tree(), self.status, name="sourcemeter")
        self.messages_total = 0
        self.garbage_total = 0  # lines refused before parsing: non-ASCII, control chars, overlong
        self.readings_total = 0
        self._apply_source()

    # ----- counters ----------------------------------------------------------------------------
    @property
    def errors_total(self) -> int:
        """Every error put in the error queue (garbage included)."""
        return self.status.errors_total

    @property
    def malformed_total(self) -> int:
        """Lines that were not valid SCPI: garbage plus command (syntax/header) errors."""
        return self.garbage_total + self._dispatcher.command_errors_total

    # ----- transport entry point ---------------------------------------------------------------
    def handle_line(self, raw: bytes, too_long: bool) -> bytes | None:
        with self._lock:
            if too_long:
                return self._refuse_garbage(-363, f"line over {MAX_LINE} bytes", raw)
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                return self._refuse_garbage(-101, "non-ASCII bytes", raw)
            if any(not (char.isprintable() or char == "\t") for char in text):
                return self._refuse_garbage(-101, "control characters", raw)
            if not text.strip():
                return None  # an empty program message is legal and does nothing
            self.messages_total += 1
            replies = self._dispatcher.execute(text)
            if not replies:
                return None
            return (";".join(replies) + "\n").encode("ascii")

    def _refuse_garbage(self, code: int, why: str, raw: bytes) -> None:
        self.garbage_total += 1
        self.status.push(code)
        log.warning("sourcemeter: error %d (%s): %r", code, why, raw[:80])
        return None

    # ----- the model ---------------------------------------------------------------------------
    def _apply_source(self) -> None:
        """Tell the model what the output terminals now source (off-modes all disconnect it)."""
        s = self.settings
        with self._station.model() as m:
            m.set_source(s.output, s.voltage_level, s.current_compliance)

    def _set_output(self, on: bool) -> None:
        s = self.settings
        if on and s.source_function == "CURRent":
            raise ScpiError(-221, "current sourcing is not simulated")
        if on != s.output:
            log.info("sourcemeter: output %s", "on" if on else "off")
        s.output = on
        self._apply_source()

    def _integration_seconds(self) -> float:
        s = self.settings
        quantities = set(s.functions)
        if "RES" in quantities:  # ohms needs a voltage and a current conversion
            quantities = (quantities - {"RES"}) | {"VOLT", "CURR"}
        conversions = max(1, len(quantities))  # with none on, the source still measures one
        return conversions * s.nplc / self.line_frequency + READING_OVERHEAD_S

    def _measure(self) -> Reading:
        """One reading: the integration in wall time, the sample at its middle."""
        s = self.settings
        switched_on = False
        if not s.output:
            if not s.auto_output_off:
                raise ScpiError(ERROR_OUTPUT_OFF, "reading with the output off")
            self._set_output(True)
            switched_on = True
        try:
            half = self._integration_seconds() / 2
            time.sleep(half)
            with self._station.model() as m:
                reading = self._sample(m)
            time.sleep(half)
        finally:
            if switched_on:
                self._set_output(False)
        self._last_reading = reading
        self.readings_total += 1
        return reading

    def _sample(self, m: NanobatteryModel) -> Reading:
        s = self.settings
        volts, amperes, in_compliance = m.terminal()
        averaging = 1.0 / math.sqrt(s.nplc)
        status = STATUS_FRONT_TERMINALS
        if s.source_function == "VOLTage":
            status |= STATUS_VOLTAGE_SOURCE
        else:
            status |= STATUS_CURRENT_SOURCE
        if in_compliance:
            status |= STATUS_COMPLIANCE
        if s.remote_sense:
            status |= STATUS_REMOTE_SENSE
        measured_volts = volts + float(m.rng.normal(0.0, VOLTAGE_NOISE_V * averaging))
        if s.current_range_auto:
            s.current_range = range_for(amperes, CURRENT_RANGES) or CURRENT_RANGES[-1]
        sigma = math.hypot(CURRENT_NOISE_FLOOR_A, CURRENT_NOISE_PER_RANGE * s.current_range)
        measured_amperes = amperes + float(m.rng.normal(0.0, sigma * averaging))
        overflow = abs(measured_amperes) > s.current_range * OVER_RANGE
        current_value = NOT_MEASURED
        if "CURR" in s.functions:
            status |= STATUS_CURRENT_MEASURED
            current_value = measured_amperes
            if overflow:
                current_value = math.copysign(OVERFLOW, measured_amperes)
                status |= STATUS_OVERFLOW
        # Unmeasured, the voltage element is the programmed source value (source readback off).
        volts_value = s.voltage_level
        if "VOLT" in s.functions:
            status |= STATUS_VOLTAGE_MEASURED
            volts_value = measured_volts
        ohms = NOT_MEASURED
        if "RES" in s.functions:
            status |= STATUS_RESISTANCE_MEASURED
            if overflow:
                status |= STATUS_OVERFLOW
            elif measured_amperes != 0.0:
                ohms = measured_volts / measured_amperes
        return Reading(
            volts=volts_value,
            amperes=current_value,
            ohms=ohms,
            time_s=time.monotonic() - self._time_origin,
            status=status,
        )

    def reset(self) -> None:
        """*RST: output off, every setting to its default; the error queue is kept."""
        self.settings = Settings()
        self._last_reading = None
        self._apply_source()
        log.info("sourcemeter: reset")

    # ----- command tree ------------------------------------------------------------------------
    def _build_tree(self) -> CommandTree:
        t = CommandTree()
        # IEEE 488.2 common commands.
        t.add("*IDN", getter=lambda p: self._identity())
        t.add("*RST", setter=lambda p: self.reset(), set_arguments=(0, 0))
        t.add("*CLS", setter=lambda p: self.status.clear(), set_arguments=(0, 0))
        t.add(
            "*OPC", setter=self._set_operation_complete, getter=lambda p: "1", set_arguments=(0, 0)
        )
        t.add("*WAI", setter=lambda p: None, set_arguments=(0, 0))
        t.add("*ESR", getter=lambda p: str(self.status.read_event_status()))
        t.add("*ESE", setter=self._set_event_enable, getter=lambda p: str(self.status.event_enable))
        t.add(
            "*SRE",
            setter=self._set_request_enable,
            getter=lambda p: str(self.status.service_request_enable),
        )
        t.add("*STB", getter=lambda p: str(self.status.status_byte()))
        t.add("*TST", getter=lambda p: "0")

        # SENSe before SOURce: where optional roots overlap, SENSe is the default root.
        t.add(
            "[:SENSe]:FUNCtion:CONCurrent",
            setter=self._set_concurrent,
            getter=lambda p: format_bool(self.settings.concurrent),
        )
        t.add("[:SENSe]:FUNCtion:ON:ALL", setter=self._functions_all_on, set_arguments=(0, 0))
        t.add("[:SENSe]:FUNCtion:OFF:ALL", setter=self._functions_all_off, set_arguments=(0, 0))
        t.add(
            "[:SENSe]:FUNCtion:OFF",
            setter=self._functions_off,
            getter=self._functions_off_query,
            set_arguments=(1, 3),
        )
        t.add(
            "[:SENSe]:FUNCtion[:ON]",
            setter=self._functions_on,
            getter=self._functions_query,
            set_arguments=(1, 3),
        )
        t.add(
            "[:SENSe]:CURRent[:DC]:PROTection[:LEVel]",
            setter=self._set_compliance,
            getter=self._compliance_query,
            query_arguments=(0, 1),
        )
        t.add("[:SENSe]:CURRent[:DC]:PROTection:TRIPped", getter=self._tripped_query)
        t.add(
            "[:SENSe]:CURRent[:DC]:RANGe:AUTO",
            setter=self._set_current_range_auto,
            getter=lambda p: format_bool(self.settings.current_range_auto),
        )
        t.add(
            "[:SENSe]:CURRent[:DC]:RANGe[:UPPer]",
            setter=self._set_current_range,
            getter=self._current_range_query,
            query_arguments=(0, 1),
        )
        for quantity in ("CURRent[:DC]", "VOLTage[:DC]", "RESistance"):
            t.add(
                f"[:SENSe]:{quantity}:NPLCycles",
                setter=self._set_nplc,
                getter=self._nplc_query,
                query_arguments=(0, 1),
            )
        t.add(
            "[:SENSe]:VOLTage[:DC]:PROTection[:LEVel]",
            setter=self._set_voltage_compliance,
            getter=self._voltage_compliance_query,
            query_arguments=(0, 1),
        )
        t.add(
            "[:SENSe]:VOLTage[:DC]:RANGe:AUTO",
            setter=self._set_voltage_measure_range_auto,
            getter=lambda p: format_bool(self.settings.voltage_measure_range_auto),
        )
        t.add(
            "[:SENSe]:VOLTage[:DC]:RANGe[:UPPer]",
            setter=self._set_voltage_measure_range,
            getter=self._voltage_measure_range_query,
            query_arguments=(0, 1),
        )

        t.add(
            "[:SOURce]:FUNCtion[:MODE]",
            setter=self._set_source_function,
            getter=lambda p: _short(self.settings.source_function),
        )
        t.add(
            "[:SOURce]:VOLTage:MODE",
            setter=self._set_voltage_mode,
            getter=lambda p: _short(self.settings.voltage_mode),
        )
        t.add(
            "[:SOURce]:VOLTage:RANGe:AUTO",
            setter=self._set_voltage_range_auto,
            getter=lambda p: format_bool(self.settings.voltage_range_auto),
        )
        t.add(
            "[:SOURce]:VOLTage:RANGe",
            setter=self._set_voltage_range,
            getter=self._voltage_range_query,
            query_arguments=(0, 1),
        )
        t.add(
            "[:SOURce]:VOLTage[:LEVel][:IMMediate][:AMPLitude]",
            setter=self._set_voltage,
            getter=self._voltage_query,
            query_arguments=(0, 1),
        )
        t.add(
            "[:SOURce]:CURRent[:LEVel][:IMMediate][:AMPLitude]",
            setter=self._set_current,
            getter=self._current_query,
            query_arguments=(0, 1),
        )
        t.add(
            "[:SOURce]:CLEar:AUTO",
            setter=self._set_auto_output_off,
            getter=lambda p: format_bool(self.settings.auto_output_off),
        )
        t.add(
            "[:SOURce]:CLEar[:IMMediate]",
            setter=lambda p: self._set_output(False),
            set_arguments=(0, 0),
        )

        t.add(
            ":OUTPut[:STATe]",
            setter=lambda p: self._set_output(parse_bool(p[0])),
            getter=lambda p: format_bool(self.settings.output),
        )
        t.add(
            ":OUTPut:SMODe",
            setter=self._set_output_off_mode,
            getter=lambda p: _short(self.settings.output_off_mode),
        )

        t.add(
            ":FORMat:ELEMents[:SENSe]",
            setter=self._set_elements,
            getter=self._elements_query,
            set_arguments=(1, 5),
        )
        t.add(
            ":FORMat[:DATA]",
            setter=self._set_data_format,
            getter=lambda p: "ASC",
            set_arguments=(1, 2),
        )

        t.add(":READ", getter=lambda p: self._measure().format(self.settings.elements))
        t.add(":FETCh", getter=self._fetch)
        t.add(":INITiate[:IMMediate]", setter=lambda p: self._measure(), set_arguments=(0, 0))
        t.add(":MEASure", getter=lambda p: self._measure_function(None))
        t.add(":CONFigure", getter=self._functions_query)
        for function, pattern in (
            ("VOLT", "VOLTage[:DC]"),
            ("CURR", "CURRent[:DC]"),
            ("RES", "RESistance"),
        ):
            t.add(f":MEASure:{pattern}", getter=lambda p, f=function: self._measure_function(f))
            t.add(
                f":CONFigure:{pattern}",
                setter=lambda p, f=function: self._configure(f),
                set_arguments=(0, 0),
            )

        t.add(":SYSTem:ERRor[:NEXT]", getter=lambda p: format_error(*self.status.pop()))
        t.add(
            ":SYSTem:ERRor:ALL",
            getter=lambda p: ",".join(format_error(*e) for e in self.status.pop_all()),
        )
        t.add(":SYSTem:ERRor:COUNt", getter=lambda p: str(self.status.count))
        t.add(":SYSTem:CLEar", setter=lambda p: self.status.pop_all(), set_arguments=(0, 0))
        t.add(
            ":SYSTem:LFRequency",
            setter=self._set_line_frequency,
            getter=lambda p: f"{self.line_frequency:.0f}",
        )
        t.add(":SYSTem:TIME", getter=lambda p: format_number(self._elapsed()))
        t.add(":SYSTem:TIME:RESet", setter=self._reset_time, set_arguments=(0, 0))
        t.add(
            ":SYSTem:BEEPer:STATe",
            setter=self._set_beeper,
            getter=lambda p: format_bool(self.settings.beeper),
        )
        t.add(":SYSTem:BEEPer[:IMMediate]", setter=self._beep, set_arguments=(2, 2))
        t.add(
            ":SYSTem:RSENse",
            setter=self._set_remote_sense,
            getter=lambda p: format_bool(self.settings.remote_sense),
        )
        t.add(
            ":SYSTem:AZERo[:STATe]",
            setter=self._set_autozero,
            getter=lambda p: self.settings.autozero,
        )
        t.add(":SYSTem:PRESet", setter=lambda p: self.reset(), set_arguments=(0, 0))
        t.add(":SYSTem:VERSion", getter=lambda p: "1996.0")
        return t

    # ----- common commands ---------------------------------------------------------------------
    def _identity(self) -> str:
        return f"{MANUFACTURER},{MODEL},{self.serial_number},{FIRMWARE}"

    def _set_operation_complete(self, params: list[str]) -> None:
        self.status.event_status |= 1  # all commands so far are done: they run in order

    def _set_event_enable(self, params: list[str]) -> None:
        self.status.event_enable = int(parse_number(params[0], 0, 255))

    def _set_request_enable(self, params: list[str]) -> None:
        self.status.service_request_enable = int(parse_number(params[0], 0, 255))

    # ----- sense -------------------------------------------------------------------------------
    def _parse_functions(self, params: list[str]) -> list[str]:
        functions: list[str] = []
        for param in params:
            for item in split_outside_quotes(parse_string(param), ","):
                name = _FUNCTION_WORDS.get(item.strip().upper())
                if name is None:
                    raise ScpiError(-224, f"unknown sense function {item!r}")
                if name not in functions:
                    functions.append(name)
        return functions

    def _functions_on(self, params: list[str]) -> None:
        s = self.settings
        wanted = self._parse_functions(params)
        if not s.concurrent:
            if len(wanted) > 1:
                raise ScpiError(-221, "one function at a time with concurrent measurements off")
            s.functions = wanted
            return
        s.functions = [f for f in FUNCTIONS if f in s.functions or f in wanted]

    def _functions_off(self, params: list[str]) -> None:
        unwanted = self._parse_functions(params)
        self.settings.functions = [f for f in self.settings.functions if f not in unwanted]

    def _functions_all_on(self, params: list[str]) -> None:
        if not self.settings.concurrent:
            raise ScpiError(-221, "concurrent measurements are off")
        self.settings.functions = list(FUNCTIONS)

    def _functions_all_off(self, params: list[str]) -> None:
        self.settings.functions = []

    def _functions_query(self, params: list[str]) -> str:
        return ",".join(f'"{_FUNCTION_NAMES[f]}"' for f in self.settings.functions)

    def _functions_off_query(self, params: list[str]) -> str:
        off = [f for f in FUNCTIONS if f not in self.settings.functions]
        return ",".join(f'"{_FUNCTION_NAMES[f]}"' for f in off)

    def _set_concurrent(self, params: list[str]) -> None:
        s = self.settings
        s.concurrent = parse_bool(params[0])
        if not s.concurrent and len(s.functions) > 1:
            s.functions = s.functions[-1:]

    def _set_compliance(self, params: list[str]) -> None:
        low, high = COMPLIANCE_LIMITS
        self.settings.current_compliance = parse_number(params[0], low, high, 1.05e-4)
        self._apply_source()

    def _compliance_query(self, params: list[str]) -> str:
        low, high = COMPLIANCE_LIMITS
        return _limit_query(params, self.settings.current_compliance, low, high, 1.05e-4)

    def _tripped_query(self, params: list[str]) -> str:
        if not self.settings.output:
            return format_bool(False)
        with self._station.model() as m:
            return format_bool(m.terminal()[2])

    def _set_current_range(self, params: list[str]) -> None:
        s = self.settings
        s.current_range = _select_range(params[0], s.current_range, 1e-4, CURRENT_RANGES)
        s.current_range_auto = False

    def _current_range_query(self, params: list[str]) -> str:
        r = CURRENT_RANGES
        value = self.settings.current_range
        return _limit_query(
            params, value * OVER_RANGE, r[0] * OVER_RANGE, r[-1] * OVER_RANGE, 1e-4 * OVER_RANGE
        )

    def _set_current_range_auto(self, params: list[str]) -> None:
        self.settings.current_range_auto = parse_bool(params[0])

    def _set_nplc(self, params: list[str]) -> None:
        low, high = NPLC_LIMITS
        self.settings.nplc = parse_number(params[0], low, high, 1.0)

    def _nplc_query(self, params: list[str]) -> str:
        low, high = NPLC_LIMITS
        return _limit_query(params, self.settings.nplc, low, high, 1.0)

    def _set_voltage_compliance(self, params: list[str]) -> None:
        low, high = VOLTAGE_COMPLIANCE_LIMITS
        self.settings.voltage_compliance = parse_number(params[0], low, high, 21.0)

    def _voltage_compliance_query(self, params: list[str]) -> str:
        low, high = VOLTAGE_COMPLIANCE_LIMITS
        return _limit_query(params, self.settings.voltage_compliance, low, high, 21.0)

    def _set_voltage_measure_range(self, params: list[str]) -> None:
        s = self.settings
        s.voltage_measure_range = _select_range(
            params[0], s.voltage_measure_range, 20.0, VOLTAGE_RANGES
        )
        s.voltage_measure_range_auto = False

    def _voltage_measure_range_query(self, params: list[str]) -> str:
        r = VOLTAGE_RANGES
        value = self.settings.voltage_measure_range * OVER_RANGE
        return _limit_query(params, value, r[0] * OVER_RANGE, r[-1] * OVER_RANGE, 21.0)

    def _set_voltage_measure_range_auto(self, params: list[str]) -> None:
        self.settings.voltage_measure_range_auto = parse_bool(params[0])

    # ----- source ------------------------------------------------------------------------------
    def _set_source_function(self, params: list[str]) -> None:
        s = self.settings
        function = parse_choice(params[0], ("VOLTage", "CURRent"))
        if function != s.source_function and s.output:
            raise ScpiError(-221, "turn the output off before changing the source function")
        s.source_function = function

    def _set_voltage_mode(self, params: list[str]) -> None:
        mode = parse_choice(params[0], ("FIXed", "SWEep", "LIST"))
        if mode != "FIXed":
            raise ScpiError(-224, f"source mode {mode} is not simulated")
        self.settings.voltage_mode = mode

    def _set_voltage(self, params: list[str]) -> None:
        s = self.settings
        value = parse_number(params[0], -MAX_SOURCE_VOLTS, MAX_SOURCE_VOLTS, 0.0)
        if s.voltage_range_auto:
            s.voltage_range = range_for(value, VOLTAGE_RANGES) or VOLTAGE_RANGES[-1]
        elif abs(value) > s.voltage_range * OVER_RANGE * (1 + 1e-12):
            raise ScpiError(-222, f"{value:g} V outside the fixed {s.voltage_range:g} V range")
        s.voltage_level = value
        self._apply_source()

    def _voltage_query(self, params: list[str]) -> str:
        m = MAX_SOURCE_VOLTS
        return _limit_query(params, self.settings.voltage_level, -m, m, 0.0)

    def _set_voltage_range(self, params: list[str]) -> None:
        s = self.settings
        nominal = _select_range(params[0], s.voltage_range, 20.0, VOLTAGE_RANGES)
        if abs(s.voltage_level) > nominal * OVER_RANGE:
            raise ScpiError(-221, f"level {s.voltage_level:g} V exceeds the {nominal:g} V range")
        s.voltage_range = nominal
        s.voltage_range_auto = False

    def _voltage_range_query(self, params: list[str]) -> str:
        r = VOLTAGE_RANGES
        value = self.settings.voltage_range * OVER_RANGE
        return _limit_query(params, value, r[0] * OVER_RANGE, r[-1] * OVER_RANGE, 21.0)

    def _set_voltage_range_auto(self, params: list[str]) -> None:
        s = self.settings
        s.voltage_range_auto = parse_bool(params[0])
        if s.voltage_range_auto:
            s.voltage_range = range_for(s.voltage_level, VOLTAGE_RANGES) or VOLTAGE_RANGES[-1]

    def _set_current(self, params: list[str]) -> None:
        m = MAX_SOURCE_AMPERES
        self.settings.current_level = parse_number(params[0], -m, m, 0.0)

    def _current_query(self, params: list[str]) -> str:
        m = MAX_SOURCE_AMPERES
        return _limit_query(params, self.settings.current_level, -m, m, 0.0)

    def _set_auto_output_off(self, params: list[str]) -> None:
        self.settings.auto_output_off = parse_bool(params[0])

    def _set_output_off_mode(self, params: list[str]) -> None:
        choices = ("HIMPedance", "NORMal", "ZERO", "GUARd")
        self.settings.output_off_mode = parse_choice(params[0], choices)

    # ----- format, readings --------------------------------------------------------------------
    def _set_elements(self, params: list[str]) -> None:
        self.settings.elements = {parse_choice(p, ELEMENTS) for p in params}

    def _elements_query(self, params: list[str]) -> str:
        return ",".join(_short(e) for e in ELEMENTS if e in self.settings.elements)

    def _set_data_format(self, params: list[str]) -> None:
        kind = parse_choice(params[0], ("ASCii", "REAL", "SREal", "32"))
        if kind != "ASCii":
            raise ScpiError(-224, f"data format {kind} is not simulated")

    def _fetch(self, params: list[str]) -> str:
        if self._last_reading is None:
            raise ScpiError(-230, "no reading since the last reset")
        return self._last_reading.format(self.settings.elements)

    def _configure(self, function: str) -> None:
        """:CONF:<function>: that function alone, and the output switched per reading."""
        self.settings.functions = [function]
        self.settings.auto_output_off = True

    def _measure_function(self, function: str | None) -> str:
        if function is not None:
            self._configure(function)
        else:
            self.settings.auto_output_off = True
        return self._measure().format(self.settings.elements)

    # ----- system ------------------------------------------------------------------------------
    def _set_line_frequency(self, params: list[str]) -> None:
        value = parse_number(params[0], 0.0, 1000.0, 50.0)
        if value not in LINE_FREQUENCIES:
            raise ScpiError(-224, f"line frequency must be 50 or 60 Hz, not {value:g}")
        self.line_frequency = value

    def _elapsed(self) -> float:
        return time.monotonic() - self._time_origin

    def _reset_time(self, params: list[str]) -> None:
        self._time_origin = time.monotonic()

    def _set_beeper(self, params: list[str]) -> None:
        self.settings.beeper = parse_bool(params[0])

    def _beep(self, params: list[str]) -> None:
        parse_number(params[0], 65.0, 2e6)
        parse_number(params[1], 0.0, 7.9)
        if self.settings.beeper:
            log.info("sourcemeter: beep")

    def _set_remote_sense(self, params: list[str]) -> None:
        self.settings.remote_sense = parse_bool(params[0])

    def _set_autozero(self, params: list[str]) -> None:
        if params[0].upper() == "ONCE":
            return  # one zero now; the state is unchanged
        self.settings.autozero = "ON" if parse_bool(params[0]) else "OFF"


def _short(mnemonic: str) -> str:
    return "".join(c for c in mnemonic if c.isupper() or c.isdigit())


def _limit_query(
    params: list[str], value: float, minimum: float, maximum: float, default: float
) -> str:
    """A numeric setting's query: its value, or what MIN / MAX / DEF stand for."""
    if params:
        word = parse_choice(params[0], _LIMIT_WORDS)
        value = {"MINimum": minimum, "MAXimum": maximum, "DEFault": default}[word]
    return format_number(value)


def _select_range(text: str, present: float, default: float, ranges: tuple[float, ...]) -> float:
    """A <n>|UP|DOWN|MIN|MAX|DEF range parameter to the nominal range it selects."""
    word = text.upper()
    index = ranges.index(present)
    if word == "UP":
        return ranges[min(index + 1, len(ranges) - 1)]
    if word == "DOWN":
        return ranges[max(index - 1, 0)]
    top = ranges[-1] * OVER_RANGE
    value = parse_number(text, -top, top, default, minimum_value=ranges[0], maximum_value=top)
    nominal = range_for(value, ranges)
    assert nominal is not None  # parse_number bounded it by the top range
    return nominal


class SimulatedSourceMeter(ServedInstrument):
    """The simulated 2400 served on a raw TCP socket (VISA `TCPIP::host::port::SOCKET`)."""

    def __init__(
        self,
        station: SimStation,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        serial_number: str = DEFAULT_SERIAL,
    ) -> None:
        self._station = station
        self.instrument = Keithley2400Simulator(station, serial_number)
        super().__init__(
            TcpLineServer("sourcemeter", host, port, self.instrument.handle_line, MAX_LINE)
        )

    @property
    def errors_total(self) -> int:
        return self.instrument.errors_total

    @property
    def malformed_total(self) -> int:
        return self.instrument.malformed_total

    def inject_short(self, shorted: bool) -> None:
        """Fault injection: the tip touches the grid, so the source runs into compliance."""
        log.warning("sourcemeter: short circuit %s", "injected" if shorted else "removed")
        with self._station.model() as m:
            m.set_short_circuit(shorted)

    @property
    def endpoints(self) -> dict[str, str]:
        host, port = self.tcp_address()
        return {"visa": f"TCPIP::{host}::{port}::SOCKET"}
