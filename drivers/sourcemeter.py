"""Driver for a Keithley 2400-class SourceMeter over PyVISA (voltage source, current measure).

One method per verb of the instrument, thin on purpose: the daemon owns the safety logic
(limits, ramp rates, when to switch off); this class only says what the manual says. The
SCPI strings live in `_Scpi` and nowhere else.

Resources: `TCPIP::host::5025::SOCKET` (the simulator, or a 2400 behind a LAN-GPIB bridge
offering a raw socket), `GPIB0::24::INSTR`, `ASRL/dev/ttyUSB0::INSTR` and so on; the
backend defaults to pyvisa-py (`@py`). Messages end in LF both ways (the 2400's GPIB and
TCP setting; set the 2400's RS-232 terminator to LF too).

Errors. The 2400 answers nothing to a query it refuses and queues the error instead, so a
refused query shows up as a timeout: the driver then clears the interface, drains
`:SYST:ERR?` and raises `SourceMeterError` carrying the instrument's errors (for example
+803 "Not permitted with OUTPUT off" for `read()` with the output off, raised as its subclass
`OutputOffError`). Settings are
checked the same way, with one `:SYST:ERR?` round trip after each write, so a refused level
(-222 "Data out of range") raises instead of passing silently. A timeout with an empty error
queue raises `SourceMeterTimeout`.

Time. `read()` stamps each reading with the midpoint of its query on `time.time_ns()` and the
half-width of the query as its uncertainty (DESIGN.md, "Time"); the duration comes from the
monotonic clock so a wall-clock step cannot produce a negative width.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyvisa
from pyvisa.errors import VisaIOError

from .closing import ClosedOnExit

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "@py"
DEFAULT_TIMEOUT_S = 3.0
MAX_ERRORS_DRAINED = 32  # more than the 2400's queue of 10: the loop always ends
STALE_READ_TIMEOUT_MS = 50  # a late reply still in flight arrives within this on a LAN

# A reading's raw status word stays below this: bit 31 is the bias log's level-change marker.
STATUS_WORD_LIMIT = 1 << 31

# Status word bits of a reading (2400 manual, FORMat:ELEMents STATus).
STATUS_OVERFLOW = 1 << 0
STATUS_COMPLIANCE = 1 << 3
STATUS_RANGE_COMPLIANCE = 1 << 16

# Reading values the 2400 sends instead of a number.
_OVERFLOW = 9.9e37
_NOT_MEASURED = 9.91e37

# Error numbers callers may want to tell apart.
ERROR_DATA_OUT_OF_RANGE = -222
ERROR_OUTPUT_OFF = 803


class _Scpi:
    """The 2400's command strings (manual section 18), in the short form."""

    IDENTIFY = "*IDN?"
    RESET = "*RST"
    CLEAR_STATUS = "*CLS"
    NEXT_ERROR = ":SYST:ERR:NEXT?"
    DATA_FORMAT_ASCII = ":FORM:DATA ASC"
    ELEMENTS = ":FORM:ELEM VOLT,CURR,TIME,STAT"
    SOURCE_VOLTAGE = ":SOUR:FUNC VOLT"
    FIXED_MODE = ":SOUR:VOLT:MODE FIX"
    NO_AUTO_OUTPUT_OFF = ":SOUR:CLE:AUTO OFF"  # the output stays on between readings
    VOLTAGE_RANGE = ":SOUR:VOLT:RANG {volts:.6E}"
    VOLTAGE_RANGE_AUTO = ":SOUR:VOLT:RANG:AUTO ON"
    VOLTAGE_LEVEL = ":SOUR:VOLT:LEV {volts:.6E}"
    VOLTAGE_LEVEL_QUERY = ":SOUR:VOLT:LEV?"
    CONCURRENT = ":SENS:FUNC:CONC ON"
    MEASURE_VOLTAGE_AND_CURRENT = ':SENS:FUNC "VOLT","CURR"'
    COMPLIANCE = ":SENS:CURR:PROT {amperes:.6E}"
    COMPLIANCE_QUERY = ":SENS:CURR:PROT?"
    CURRENT_RANGE = ":SENS:CURR:RANG {amperes:.6E}"
    CURRENT_RANGE_AUTO = ":SENS:CURR:RANG:AUTO ON"
    NPLC = ":SENS:CURR:NPLC {nplc:.6E}"
    OUTPUT_ON = ":OUTP ON"
    OUTPUT_OFF = ":OUTP OFF"
    OUTPUT_QUERY = ":OUTP?"
    READ = ":READ?"
    TRIPPED = ":SENS:CURR:PROT:TRIP?"


# The elements `_Scpi.ELEMENTS` asks for, in the order the 2400 sends them.
_READING_ELEMENTS = ("volts", "amperes", "time_s", "status")


class SourceMeterError(Exception):
    """The instrument refused something (its queued errors attached) or could not be reached."""

    def __init__(self, message: str, errors: list[tuple[int, str]] | None = None) -> None:
        self.errors = errors or []
        detail = "; ".join(f"{code} {text}" for code, text in self.errors)
        super().__init__(f"{message}: {detail}" if detail else message)

    @property
    def codes(self) -> list[int]:
        return [code for code, _ in self.errors]


# Named like the holder driver's HolderTimeout: the service catches it by this name.
class SourceMeterTimeout(SourceMeterError, TimeoutError):  # noqa: N818
    """No reply within the timeout and nothing in the error queue to explain it."""


class OutputOffError(SourceMeterError):
    """A reading was asked for with the output off (switched off behind the caller's back)."""


@dataclass(frozen=True)
class Identity:
    """The four *IDN? fields as the instrument words them (model: "MODEL 2400")."""

    manufacturer: str
    model: str
    serial: str
    firmware: str


@dataclass(frozen=True)
class Reading:
    """One reading, model-neutral: the driver tells what its status word means.

    `current` is +/-inf on overflow (beyond the fixed range). `status` is the model's raw
    status word, kept within bits 0-30: the bias log marks its level-change rows with bit 31
    (core/records.py STATUS_LEVEL_CHANGE).
    """

    voltage: float  # volts at the terminals (measured)
    current: float  # amperes
    status: int  # the model's status word (its manual's meaning)
    instrument_time_s: float  # the instrument's own timestamp (since power-on or a reset)
    time_ns: int  # host wall time of the query's midpoint
    half_width_ns: int  # half the query's duration: the uncertainty of time_ns
    monotonic_ns: int = 0  # the same midpoint on time.monotonic_ns(), for run clocks
    in_compliance: bool = False  # the source was limited by the current compliance
    overflow: bool = False  # the current was beyond the measure range

    def __post_init__(self) -> None:
        if not 0 <= self.status < STATUS_WORD_LIMIT:
            raise ValueError(f"status word {self.status:#x} outside bits 0-30")


def _value(text: str) -> float:
    value = float(text)
    if abs(value) == _OVERFLOW:
        return math.copysign(math.inf, value)
    if value == _NOT_MEASURED:
        return math.nan
    return value


class Keithley2400(ClosedOnExit):
    """A Keithley 2400 SourceMeter used as a voltage source that measures current."""

    def __init__(
        self,
        resource_name: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backend: str = DEFAULT_BACKEND,
        resource_manager: pyvisa.ResourceManager | None = None,
    ) -> None:
        self.resource_name = resource_name
        self._own_manager = resource_manager is None
        self._manager = resource_manager or pyvisa.ResourceManager(backend)
        try:
            self._resource = self._manager.open_resource(
                resource_name,
                read_termination="\n",
                write_termination="\n",
                timeout=int(timeout_s * 1000),
            )
        except (VisaIOError, OSError, ValueError) as exc:
            if self._own_manager:
                self._manager.close()
            raise SourceMeterError(f"cannot open {resource_name}: {exc}") from exc
        self._lock = threading.RLock()  # one transaction at a time; errors() nests in others
        if isinstance(self._resource, pyvisa.resources.TCPIPSocket):
            self._send_without_delay()
        try:
            # Errors left by an earlier session would be blamed on our first setting.
            self._drain_errors()
            # Only the data format: it changes nothing at the terminals, and read() parses it.
            self._write_checked(_Scpi.DATA_FORMAT_ASCII, _Scpi.ELEMENTS)
        except BaseException:
            self.close()
            raise

    # ----- transport ---------------------------------------------------------------------------
    def _send_without_delay(self) -> None:
        """TCP_NODELAY on a raw socket, as NI-VISA sets it by default.

        Every setting is a write followed by a `:SYST:ERR?` write; with Nagle's algorithm the
        second waits for the ACK of the first, which the instrument delays (~40 ms) because it
        has nothing to send back. pyvisa-py 0.8 does not accept VI_ATTR_TCPIP_NODELAY for
        SOCKET resources, so its socket is set directly when the attribute is refused.
        """
        try:
            self._resource.set_visa_attribute(
                pyvisa.constants.ResourceAttribute.tcpip_nodelay, pyvisa.constants.VI_TRUE
            )
            return
        except Exception:  # backends refuse it with their own types (pyvisa-py: UnknownAttribute)
            pass
        sessions = getattr(self._resource.visalib, "sessions", {})
        sock = getattr(sessions.get(self._resource.session), "interface", None)
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            log.warning("sourcemeter: cannot set TCP_NODELAY; settings may take ~40 ms each")

    def _write(self, command: str) -> None:
        with self._lock:
            try:
                self._resource.write(command)
            except VisaIOError as exc:
                raise SourceMeterError(f"{command!r}: {exc}") from exc

    def _query(self, command: str) -> str:
        """One query; a silent instrument means a refused query: report its errors."""
        with self._lock:
            try:
                return self._resource.query(command).strip()
            except VisaIOError as exc:
                if exc.error_code != pyvisa.constants.StatusCode.error_timeout:
                    raise SourceMeterError(f"{command!r}: {exc}") from exc
            # A late reply to the timed-out query must not answer the next one.
            self._clear()
            errors = self._drain_errors()
            if errors:
                raise SourceMeterError(f"{command!r} refused", errors)
            raise SourceMeterTimeout(f"{command!r}: no reply from {self.resource_name}")

    def _clear(self) -> None:
        try:
            if isinstance(self._resource, pyvisa.resources.TCPIPSocket):
                self._drop_stale_input()
            else:
                self._resource.clear()
        except VisaIOError as exc:
            log.warning("sourcemeter: device clear failed: %s", exc)

    def _drop_stale_input(self) -> None:
        """Device clear of a raw socket: read and drop what is pending, with bounded reads.

        pyvisa-py's clear() on a socket loops for ever once the peer has closed it (recv
        returns nothing, select keeps reporting it readable), which would hang the caller on
        exactly the lost connection the clear is meant to recover from.
        """
        timeout = self._resource.timeout
        self._resource.timeout = STALE_READ_TIMEOUT_MS
        try:
            for _ in range(MAX_ERRORS_DRAINED):
                try:
                    self._resource.read_raw()
                except VisaIOError:
                    return  # nothing more within the timeout (or the peer is gone)
        finally:
            self._resource.timeout = timeout

    def _write_checked(self, *commands: str) -> None:
        """Send settings, then raise if the instrument queued any error for them."""
        with self._lock:
            for command in commands:
                self._write(command)
            errors = self.errors()
            if errors:
                raise SourceMeterError(f"{' ; '.join(commands)!r} refused", errors)

    def _drain_errors(self) -> list[tuple[int, str]]:
        """The error queue, emptied; a timeout here is reported as such, not retried."""
        errors: list[tuple[int, str]] = []
        for _ in range(MAX_ERRORS_DRAINED):
            try:
                reply = self._resource.query(_Scpi.NEXT_ERROR).strip()
            except VisaIOError as exc:
                raise SourceMeterTimeout(f"error queue unreadable: {exc}", errors) from exc
            code_text, _, message = reply.partition(",")
            try:
                code = int(code_text)
            except ValueError:
                raise SourceMeterError(f"unexpected :SYST:ERR? reply {reply!r}") from None
            if code == 0:
                break
            errors.append((code, message.strip().strip('"')))
        for code, message in errors:
            log.warning("sourcemeter: instrument error %d %s", code, message)
        return errors

    def close(self) -> None:
        with self._lock:
            self._resource.close()
            if self._own_manager:
                self._manager.close()

    # ----- identity and status -----------------------------------------------------------------
    def identify(self) -> Identity:
        reply = self._query(_Scpi.IDENTIFY)
        parts = [part.strip() for part in reply.split(",", 3)]
        if len(parts) != 4:
            raise SourceMeterError(f"unexpected *IDN? reply {reply!r}")
        return Identity(*parts)

    def reset(self) -> None:
        """*RST (output off, defaults) and *CLS (error queue and event registers emptied)."""
        with self._lock:
            self._write(_Scpi.RESET)
            self._write(_Scpi.CLEAR_STATUS)
            self._write_checked(_Scpi.DATA_FORMAT_ASCII, _Scpi.ELEMENTS)

    def errors(self) -> list[tuple[int, str]]:
        """Every error the instrument has queued, oldest first; the queue is left empty."""
        with self._lock:
            return self._drain_errors()

    # ----- configuration -----------------------------------------------------------------------
    def configure_voltage_source(
        self,
        compliance_amperes: float,
        voltage_range_volts: float | None = None,
        current_range_amperes: float | None = None,
        nplc: float = 1.0,
    ) -> None:
        """Source voltage (fixed level), measure voltage and current, with a current limit.

        Ranges of None mean auto range. A fixed current range below the compliance caps the
        measurable current at that range: larger currents read as overflow (inf).
        """
        commands = [
            _Scpi.SOURCE_VOLTAGE,
            _Scpi.FIXED_MODE,
            _Scpi.NO_AUTO_OUTPUT_OFF,
            _Scpi.VOLTAGE_RANGE_AUTO
            if voltage_range_volts is None
            else _Scpi.VOLTAGE_RANGE.format(volts=voltage_range_volts),
            _Scpi.CONCURRENT,
            _Scpi.MEASURE_VOLTAGE_AND_CURRENT,
            _Scpi.COMPLIANCE.format(amperes=compliance_amperes),
            _Scpi.CURRENT_RANGE_AUTO
            if current_range_amperes is None
            else _Scpi.CURRENT_RANGE.format(amperes=current_range_amperes),
            _Scpi.NPLC.format(nplc=nplc),
            _Scpi.DATA_FORMAT_ASCII,
            _Scpi.ELEMENTS,
        ]
        self._write_checked(*commands)

    def set_voltage(self, volts: float) -> None:
        """Set the source level (takes effect at once when the output is on)."""
        self._write_checked(_Scpi.VOLTAGE_LEVEL.format(volts=volts))

    def voltage_setpoint(self) -> float:
        return float(self._query(_Scpi.VOLTAGE_LEVEL_QUERY))

    def compliance(self) -> float:
        return float(self._query(_Scpi.COMPLIANCE_QUERY))

    def ramp_to(
        self,
        target_volts: float,
        rate_volts_per_s: float,
        step_volts: float = 0.05,
        on_step: Callable[[float], None] | None = None,
        stop: threading.Event | None = None,
    ) -> bool:
        """Step the level from its present setpoint to `target_volts` at the given mean rate.

        Steps are equal and no larger than `step_volts`; step i is set at i * step / rate
        seconds after the start, so the level never runs ahead of the rate. `on_step(level)`
        is called after each step. Returns True when the target is reached, False when
        `stop` was set (the level stays where the last step left it).
        """
        if rate_volts_per_s <= 0 or step_volts <= 0:
            raise ValueError("rate and step must be positive")
        start = self.voltage_setpoint()
        span = target_volts - start
        steps = max(1, math.ceil(abs(span) / step_volts - 1e-9))
        interval_s = abs(span) / steps / rate_volts_per_s
        began = time.monotonic()
        for i in range(1, steps + 1):
            delay = began + i * interval_s - time.monotonic()
            if stop is not None:
                if stop.wait(max(0.0, delay)):
                    log.info("sourcemeter: ramp stopped at step %d of %d", i - 1, steps)
                    return False
            elif delay > 0:
                time.sleep(delay)
            level = target_volts if i == steps else start + span * i / steps
            self.set_voltage(level)
            if on_step is not None:
                on_step(level)
        return True

    # ----- output ------------------------------------------------------------------------------
    def output_on(self) -> None:
        self._write_checked(_Scpi.OUTPUT_ON)

    def output_off(self) -> None:
        self._write_checked(_Scpi.OUTPUT_OFF)

    def output_enabled(self) -> bool:
        return self._query(_Scpi.OUTPUT_QUERY) == "1"

    # ----- measurement -------------------------------------------------------------------------
    def read(self) -> Reading:
        """Trigger one reading and return it, stamped with the query's midpoint."""
        with self._lock:
            wall_start = time.time_ns()
            began = time.monotonic_ns()
            try:
                reply = self._query(_Scpi.READ)
            except SourceMeterError as exc:
                if ERROR_OUTPUT_OFF in exc.codes:  # the 2400 refuses a reading with it off
                    raise OutputOffError(f"{_Scpi.READ!r} refused", exc.errors) from exc
                raise
            duration = time.monotonic_ns() - began
        fields = reply.split(",")
        if len(fields) != len(_READING_ELEMENTS):
            raise SourceMeterError(f"unexpected :READ? reply {reply!r}")
        try:
            values = dict(zip(_READING_ELEMENTS, (_value(f) for f in fields), strict=True))
        except ValueError:
            raise SourceMeterError(f"unexpected :READ? reply {reply!r}") from None
        status = int(values["status"])
        return Reading(
            voltage=values["volts"],
            current=values["amperes"],
            status=status,
            instrument_time_s=values["time_s"],
            time_ns=wall_start + duration // 2,
            half_width_ns=duration // 2,
            monotonic_ns=began + duration // 2,
            in_compliance=bool(status & STATUS_COMPLIANCE),
            overflow=bool(status & STATUS_OVERFLOW),
        )

    def in_compliance(self) -> bool:
        """Whether the source is limited by the current compliance right now (trip query)."""
        return self._query(_Scpi.TRIPPED) == "1"
