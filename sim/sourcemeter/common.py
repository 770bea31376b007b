"""What every simulated source-meter model shares: ranges, the measurement noise, the link to
the station model, the program-message entry point and the settings both dialects name alike.

A dialect (`keithley2400.py`, `keithley2450.py`) subclasses `SourceMeterSimulator` with its
command tree, its settings and how it formats a reading; the physics stays in the model:
whenever output, level or current limit change the simulator calls `m.set_source(...)`; a
reading takes `m.terminal()` and adds measurement noise from `m.rng`, both under the station
lock. The integration time (NPLC / line frequency per conversion) is spent in real wall time
with the instrument busy but the station lock free, since transport latency does not scale
with the station clock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from ..model import NanobatteryModel
from ..scpi import (
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
)
from ..station import SimStation

log = logging.getLogger(__name__)

DEFAULT_PORT = 5025
MAX_LINE = 4096  # bytes of one program message; longer ones are refused with -363
MANUFACTURER = "KEITHLEY INSTRUMENTS INC."

# Ranges (nominal); each range reaches OVER_RANGE times its nominal value. The 2400's and the
# 2450's voltage source and current measure ranges from 0.2 V and 1 uA up (the 2450 adds
# lower current ranges, not simulated).
VOLTAGE_RANGES = (0.2, 2.0, 20.0, 200.0)
CURRENT_RANGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
OVER_RANGE = 1.05
MAX_SOURCE_VOLTS = 210.0
MAX_SOURCE_AMPERES = 1.05
COMPLIANCE_LIMITS = (1e-9, 1.05)  # amperes: the current limit
DEFAULT_COMPLIANCE_A = 1.05e-4  # after *RST, on both models
NPLC_LIMITS = (0.01, 10.0)
LINE_FREQUENCIES = (50.0, 60.0)

# Special reading values.
OVERFLOW = 9.9e37
NOT_MEASURED = 9.91e37

# Measurement model. *Model choice*: noise of the order of the 2400's specified resolution on
# the low ranges, shrinking with the square root of the integration time.
CURRENT_NOISE_FLOOR_A = 1e-12
CURRENT_NOISE_PER_RANGE = 1e-6  # rms noise as a fraction of the present range
VOLTAGE_NOISE_V = 10e-6
READING_OVERHEAD_S = 0.0015  # A/D setup and formatting per reading, on top of integration

LIMIT_WORDS = ("MINimum", "MAXimum", "DEFault")


def range_for(value: float, ranges: tuple[float, ...]) -> float | None:
    """The smallest nominal range that holds |value| (with over-range), None if none does."""
    for nominal in ranges:
        if abs(value) <= nominal * OVER_RANGE * (1 + 1e-12):
            return nominal
    return None


def short(mnemonic: str) -> str:
    return "".join(c for c in mnemonic if c.isupper() or c.isdigit())


def limit_query(
    params: list[str], value: float, minimum: float, maximum: float, default: float
) -> str:
    """A numeric setting's query: its value, or what MIN / MAX / DEF stand for."""
    if params:
        word = parse_choice(params[0], LIMIT_WORDS)
        value = {"MINimum": minimum, "MAXimum": maximum, "DEFault": default}[word]
    return format_number(value)


def select_range(text: str, present: float, default: float, ranges: tuple[float, ...]) -> float:
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


@dataclass
class SourceSettings:
    """What *RST sets on both models for the voltage source and the current measurement."""

    source_function: str = "VOLTage"
    voltage_level: float = 0.0
    voltage_range: float = 20.0
    voltage_range_auto: bool = True
    current_level: float = 0.0
    current_compliance: float = DEFAULT_COMPLIANCE_A
    current_range: float = 1e-4
    current_range_auto: bool = True
    nplc: float = 1.0
    output: bool = False
    output_off_mode: str = "NORMal"


@dataclass(frozen=True)
class Sample:
    """One noisy measurement at the terminals, before a dialect formats it."""

    volts: float  # measured
    amperes: float  # measured (finite; see overflow)
    in_compliance: bool
    overflow: bool  # |amperes| beyond the present current range
    time_s: float  # the instrument's clock at the sample (the middle of the integration)


class SourceMeterSimulator:
    """The SourceMeter's state machine: one program message in, its reply line out."""

    MODEL: ClassVar[str]  # the *IDN? model field, e.g. "MODEL 2400"
    FIRMWARE: ClassVar[str]
    DEFAULT_SERIAL: ClassVar[str]
    DEVICE_ERRORS: ClassVar[dict[int, str]] = {}
    SETTINGS: ClassVar[type[SourceSettings]]  # the dialect's settings, as *RST leaves them

    def __init__(self, station: SimStation, serial_number: str | None = None) -> None:
        self._last_reading: Any = None  # the dialect's last reading (:FETCh? returns it)
        self._station = station
        self.serial_number = serial_number or self.DEFAULT_SERIAL
        self._lock = threading.Lock()  # one message at a time, as the instrument does
        self.settings = self._default_settings()
        self.line_frequency = 50.0  # a system setting: *RST keeps it
        self._time_origin = time.monotonic()
        self.status = StatusSystem(self.DEVICE_ERRORS)
        self._dispatcher = Dispatcher(self._build_tree(), self.status, name="sourcemeter")
        self.messages_total = 0
        self.garbage_total = 0  # lines refused before parsing: non-ASCII, control chars, overlong
        self.readings_total = 0
        self._apply_source()

    # ----- the dialect -------------------------------------------------------------------------
    def _default_settings(self) -> SourceSettings:
        return self.SETTINGS()

    def _build_tree(self) -> CommandTree:
        raise NotImplementedError

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

    def _integrate(self, conversions: int) -> Sample:
        """One sample taken in the middle of `conversions` integrations spent in wall time."""
        half = (conversions * self.settings.nplc / self.line_frequency + READING_OVERHEAD_S) / 2
        time.sleep(half)
        with self._station.model() as m:
            sample = self._sample(m)
        time.sleep(half)
        self.readings_total += 1
        return sample

    def _sample(self, m: NanobatteryModel) -> Sample:
        s = self.settings
        volts, amperes, in_compliance = m.terminal()
        averaging = 1.0 / math.sqrt(s.nplc)
        measured_volts = volts + float(m.rng.normal(0.0, VOLTAGE_NOISE_V * averaging))
        if s.current_range_auto:
            s.current_range = range_for(amperes, CURRENT_RANGES) or CURRENT_RANGES[-1]
        sigma = math.hypot(CURRENT_NOISE_FLOOR_A, CURRENT_NOISE_PER_RANGE * s.current_range)
        measured_amperes = amperes + float(m.rng.normal(0.0, sigma * averaging))
        overflow = abs(measured_amperes) > s.current_range * OVER_RANGE
        return Sample(measured_volts, measured_amperes, in_compliance, overflow, self._elapsed())

    def _tripped(self) -> bool:
        """Whether the source is limited by its current limit right now."""
        if not self.settings.output:
            return False
        with self._station.model() as m:
            return m.terminal()[2]

    def reset(self) -> None:
        """*RST: output off, every setting to its default; the error queue is kept."""
        self._last_reading = None
        self.settings = self._default_settings()
        self._apply_source()
        log.info("sourcemeter: reset")

    # ----- commands both dialects have ---------------------------------------------------------
    def _add_common_commands(self, t: CommandTree) -> None:
        """IEEE 488.2 common commands."""
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

    def _add_source_commands(self, t: CommandTree) -> None:
        """The voltage source's function, level and range."""
        t.add(
            "[:SOURce]:FUNCtion[:MODE]",
            setter=self._set_source_function,
            getter=lambda p: short(self.settings.source_function),
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

    def _add_current_measure_commands(self, t: CommandTree) -> None:
        """The current measurement's range and integration time."""
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
        t.add(
            "[:SENSe]:CURRent[:DC]:NPLCycles",
            setter=self._set_nplc,
            getter=self._nplc_query,
            query_arguments=(0, 1),
        )

    def _add_output_and_format_commands(self, t: CommandTree, off_mode_header: str) -> None:
        t.add(
            ":OUTPut[:STATe]",
            setter=lambda p: self._set_output(parse_bool(p[0])),
            getter=lambda p: format_bool(self.settings.output),
        )
        t.add(
            off_mode_header,
            setter=self._set_output_off_mode,
            getter=lambda p: short(self.settings.output_off_mode),
        )
        t.add(
            ":FORMat[:DATA]",
            setter=self._set_data_format,
            getter=lambda p: "ASC",
            set_arguments=(1, 2),
        )

    def _add_error_commands(self, t: CommandTree) -> None:
        t.add(":SYSTem:ERRor[:NEXT]", getter=lambda p: format_error(*self.status.pop()))
        t.add(":SYSTem:ERRor:COUNt", getter=lambda p: str(self.status.count))
        t.add(":SYSTem:CLEar", setter=lambda p: self.status.pop_all(), set_arguments=(0, 0))

    # ----- common commands ---------------------------------------------------------------------
    def _identity(self) -> str:
        return f"{MANUFACTURER},{self.MODEL},{self.serial_number},{self.FIRMWARE}"

    def _set_operation_complete(self, params: list[str]) -> None:
        self.status.event_status |= 1  # all commands so far are done: they run in order

    def _set_event_enable(self, params: list[str]) -> None:
        self.status.event_enable = int(parse_number(params[0], 0, 255))

    def _set_request_enable(self, params: list[str]) -> None:
        self.status.service_request_enable = int(parse_number(params[0], 0, 255))

    # ----- the current limit and measurement ---------------------------------------------------
    def _set_compliance(self, params: list[str]) -> None:
        low, high = COMPLIANCE_LIMITS
        self.settings.current_compliance = parse_number(params[0], low, high, DEFAULT_COMPLIANCE_A)
        self._apply_source()

    def _compliance_query(self, params: list[str]) -> str:
        low, high = COMPLIANCE_LIMITS
        value = self.settings.current_compliance
        return limit_query(params, value, low, high, DEFAULT_COMPLIANCE_A)

    def _tripped_query(self, params: list[str]) -> str:
        return format_bool(self._tripped())

    def _set_current_range(self, params: list[str]) -> None:
        s = self.settings
        s.current_range = select_range(params[0], s.current_range, 1e-4, CURRENT_RANGES)
        s.current_range_auto = False

    def _current_range_query(self, params: list[str]) -> str:
        r = CURRENT_RANGES
        value = self.settings.current_range
        return limit_query(
            params, value * OVER_RANGE, r[0] * OVER_RANGE, r[-1] * OVER_RANGE, 1e-4 * OVER_RANGE
        )

    def _set_current_range_auto(self, params: list[str]) -> None:
        self.settings.current_range_auto = parse_bool(params[0])

    def _set_nplc(self, params: list[str]) -> None:
        low, high = NPLC_LIMITS
        self.settings.nplc = parse_number(params[0], low, high, 1.0)

    def _nplc_query(self, params: list[str]) -> str:
        low, high = NPLC_LIMITS
        return limit_query(params, self.settings.nplc, low, high, 1.0)

    # ----- source ------------------------------------------------------------------------------
    def _set_source_function(self, params: list[str]) -> None:
        s = self.settings
        function = parse_choice(params[0], ("VOLTage", "CURRent"))
        if function != s.source_function and s.output:
            raise ScpiError(-221, "turn the output off before changing the source function")
        s.source_function = function

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
        return limit_query(params, self.settings.voltage_level, -m, m, 0.0)

    def _set_voltage_range(self, params: list[str]) -> None:
        s = self.settings
        nominal = select_range(params[0], s.voltage_range, 20.0, VOLTAGE_RANGES)
        if abs(s.voltage_level) > nominal * OVER_RANGE:
            raise ScpiError(-221, f"level {s.voltage_level:g} V exceeds the {nominal:g} V range")
        s.voltage_range = nominal
        s.voltage_range_auto = False

    def _voltage_range_query(self, params: list[str]) -> str:
        r = VOLTAGE_RANGES
        value = self.settings.voltage_range * OVER_RANGE
        return limit_query(params, value, r[0] * OVER_RANGE, r[-1] * OVER_RANGE, 21.0)

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
        return limit_query(params, self.settings.current_level, -m, m, 0.0)

    def _set_output_off_mode(self, params: list[str]) -> None:
        choices = ("HIMPedance", "NORMal", "ZERO", "GUARd")
        self.settings.output_off_mode = parse_choice(params[0], choices)

    # ----- format, system ----------------------------------------------------------------------
    def _set_data_format(self, params: list[str]) -> None:
        kind = parse_choice(params[0], ("ASCii", "REAL", "SREal", "32"))
        if kind != "ASCii":
            raise ScpiError(-224, f"data format {kind} is not simulated")

    def _set_line_frequency(self, params: list[str]) -> None:
        value = parse_number(params[0], 0.0, 1000.0, 50.0)
        if value not in LINE_FREQUENCIES:
            raise ScpiError(-224, f"line frequency must be 50 or 60 Hz, not {value:g}")
        self.line_frequency = value

    def _elapsed(self) -> float:
        return time.monotonic() - self._time_origin

    def _reset_time(self, params: list[str]) -> None:
        self._time_origin = time.monotonic()
