"""The VISA/SCPI transport every source-meter model shares: `ScpiSourceMeter`.

A model's driver subclasses it with its dialect: a `ScpiCommands` subclass holding every
command string it sends (and nowhere else), `configure_voltage_source`, `in_compliance` and
how to turn its `:READ?` reply into a `Reading`. What is here is what the SCPI standard and
IEEE 488.2 fix, so it holds for every model.

Resources: `TCPIP::host::5025::SOCKET` (the simulator, or an instrument's raw socket, or a
LAN-GPIB bridge offering one), `GPIB0::24::INSTR`, `ASRL/dev/ttyUSB0::INSTR` and so on; the
backend defaults to pyvisa-py (`@py`). Messages end in LF both ways.

Errors. A SCPI instrument answers nothing to a query it refuses and queues the error instead,
so a refused query shows up as a timeout: the driver then clears the interface, drains
`:SYST:ERR:NEXT?` and raises `SourceMeterError` carrying the instrument's errors. Settings
are checked the same way, with one `:SYST:ERR?` round trip after each batch of writes, so a
refused level (-222 "Data out of range") raises instead of passing silently. A timeout with an
empty error queue raises `SourceMeterTimeout`.

Time. `read()` stamps each reading with the midpoint of its query on `time.time_ns()` and the
half-width of the query as its uncertainty (DESIGN.md, "Time"); the duration comes from
the monotonic clock so a wall-clock step cannot produce a negative width.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from typing import ClassVar

import pyvisa
from pyvisa.errors import VisaIOError

from ..closing import ClosedOnExit
from . import Identity, Reading, SourceMeterError, SourceMeterTimeout

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "@py"
DEFAULT_TIMEOUT_S = 3.0
MAX_ERRORS_DRAINED = 32  # more than any model's queue (the 2400's holds 10): the loop ends
STALE_READ_TIMEOUT_MS = 50  # a late reply still in flight arrives within this on a LAN

# Reading values Keithley instruments send instead of a number.
_OVERFLOW = 9.9e37
_NOT_MEASURED = 9.91e37


class ScpiCommands:
    """The strings every model shares (IEEE 488.2 common commands and standard SCPI).

    A dialect subclasses this and adds (or overrides) the rest; the driver sends only these.
    """

    IDENTIFY = "*IDN?"
    RESET = "*RST"
    CLEAR_STATUS = "*CLS"
    NEXT_ERROR = ":SYST:ERR:NEXT?"
    DATA_FORMAT_ASCII = ":FORM:DATA ASC"
    VOLTAGE_LEVEL = ":SOUR:VOLT:LEV {volts:.6E}"
    VOLTAGE_LEVEL_QUERY = ":SOUR:VOLT:LEV?"
    OUTPUT_ON = ":OUTP ON"
    OUTPUT_OFF = ":OUTP OFF"
    OUTPUT_QUERY = ":OUTP?"
    READ = ":READ?"
    # Sent at every open and after a reset: the reply format `read()` parses. It changes
    # nothing at the terminals.
    READING_FORMAT: tuple[str, ...] = (DATA_FORMAT_ASCII,)


def reading_value(text: str) -> float:
    """One number of a reading: +/-inf for an overflow, NaN for "not measured"."""
    value = float(text)
    if abs(value) == _OVERFLOW:
        return math.copysign(math.inf, value)
    if value == _NOT_MEASURED:
        return math.nan
    return value


class ScpiSourceMeter(ClosedOnExit):
    """A SCPI source-meter used as a voltage source that measures current (a model's base)."""

    SCPI: ClassVar[type[ScpiCommands]] = ScpiCommands

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
            self._write_checked(*self.SCPI.READING_FORMAT)
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
                reply = self._resource.query(self.SCPI.NEXT_ERROR).strip()
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
        reply = self._query(self.SCPI.IDENTIFY)
        parts = [part.strip() for part in reply.split(",", 3)]
        if len(parts) != 4:
            raise SourceMeterError(f"unexpected *IDN? reply {reply!r}")
        return Identity(*parts)

    def reset(self) -> None:
        """*RST (output off, defaults) and *CLS (error queue and event registers emptied)."""
        with self._lock:
            self._write(self.SCPI.RESET)
            self._write(self.SCPI.CLEAR_STATUS)
            self._write_checked(*self.SCPI.READING_FORMAT)

    def errors(self) -> list[tuple[int, str]]:
        """Every error the instrument has queued, oldest first; the queue is left empty."""
        with self._lock:
            return self._drain_errors()

    # ----- source level and output -------------------------------------------------------------
    def set_voltage(self, volts: float) -> None:
        """Set the source level (takes effect at once when the output is on)."""
        self._write_checked(self.SCPI.VOLTAGE_LEVEL.format(volts=volts))

    def voltage_setpoint(self) -> float:
        return float(self._query(self.SCPI.VOLTAGE_LEVEL_QUERY))

    def output_on(self) -> None:
        self._write_checked(self.SCPI.OUTPUT_ON)

    def output_off(self) -> None:
        self._write_checked(self.SCPI.OUTPUT_OFF)

    def output_enabled(self) -> bool:
        return self._query(self.SCPI.OUTPUT_QUERY) == "1"

    # ----- measurement -------------------------------------------------------------------------
    def read(self) -> Reading:
        """Trigger one reading and return it, stamped with the query's midpoint."""
        with self._lock:
            wall_start = time.time_ns()
            began = time.monotonic_ns()
            reply = self._query_reading()
            duration = time.monotonic_ns() - began
        half = duration // 2
        return self._reading(reply, wall_start + half, half, began + half)

    def _query_reading(self) -> str:
        """The `:READ?` reply; a model says here how it refuses a reading with the output off."""
        return self._query(self.SCPI.READ)

    def _reading(self, reply: str, time_ns: int, half_width_ns: int, monotonic_ns: int) -> Reading:
        """The model's reply parsed, with the stamp of its query (OutputOffError, or
        SourceMeterError for a reply it cannot parse)."""
        raise NotImplementedError

    # ----- the dialect -------------------------------------------------------------------------
    def configure_voltage_source(
        self,
        compliance_amperes: float,
        voltage_range_volts: float | None = None,
        current_range_amperes: float | None = None,
        nplc: float = 1.0,
    ) -> None:
        raise NotImplementedError

    def compliance(self) -> float:
        raise NotImplementedError

    def in_compliance(self) -> bool:
        raise NotImplementedError
