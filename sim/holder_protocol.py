"""The holder controllers' line protocol, once for every holder model the simulator speaks.

drivers/HOLDER_PROTOCOL.md and drivers/HEATER_PROTOCOL.md share their framing: one ASCII
command line in, `OK [value]` or `ERR <code> <text>` out, a last-error register read (and
cleared) by `ERR?`, `*IDN?`, the bias routing (`ROUT`, `ROUT?`) and a one-line `STAT?`.
`HolderLineController` is that state machine; a holder model (sim/holder.py,
sim/heating_holder.py) subclasses it, declares its own command table (`commands`) and its
status line, and keeps its own state. `ServedHolder` serves a controller on TCP and a
pseudo-terminal through the line servers (sim/lineserver.py).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from enum import IntEnum
from typing import ClassVar, Generic, TypeVar

from .lineserver import PtyLineServer, ServedInstrument, TcpLineServer
from .model import BiasRouting, NanobatteryModel
from .station import SimStation

log = logging.getLogger(__name__)

DEFAULT_PORT = 5026  # the holder's port: a station has one holder
MAX_LINE = 128  # characters, terminator excluded

# Protocol names of the bias routings.
ROUTING_NAMES = {
    "SMU": BiasRouting.SOURCE_METER,
    "GND": BiasRouting.GROUND,
    "FLOAT": BiasRouting.FLOAT,
}


class LineError(IntEnum):
    """The error codes every holder controller shares; a model numbers its own from 200."""

    NONE = 0
    UNKNOWN_COMMAND = 100
    ARGUMENT_COUNT = 101
    BAD_ARGUMENT = 102
    OUT_OF_RANGE = 103
    LINE_TOO_LONG = 104
    NOT_ASCII = 105
    INTERNAL = 900


class CommandError(Exception):
    """A command the controller refuses; becomes `ERR <code> <text>`."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{int(code)} {text}")
        self.code = int(code)
        self.text = text


# An action takes the model (under the station lock) and the command's argument words.
Action = Callable[..., "str | None"]
NO_ERROR = (int(LineError.NONE), "no error")


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CommandError(LineError.BAD_ARGUMENT, f"not an integer: {text}") from None


def parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CommandError(LineError.BAD_ARGUMENT, f"not a number: {text}") from None
    if not math.isfinite(value):
        raise CommandError(LineError.BAD_ARGUMENT, f"not a finite number: {text}")
    return value


def flag(value: bool) -> str:
    return "1" if value else "0"


class HolderLineController:
    """A holder controller's line protocol: parsing, the command table, the error register.

    A model names itself (`NAME`, for the log), says who it is (`IDENTITY`), declares its
    own commands (`commands`: keyword -> (number of arguments, action(model, *args)), run
    under the station lock) and its status fields before `ERR=` (`status_fields`).
    """

    NAME: ClassVar[str]
    IDENTITY: ClassVar[str]

    def __init__(self, station: SimStation) -> None:
        self._station = station
        self._lock = threading.Lock()
        self._last_error: tuple[int, str] = NO_ERROR
        self.commands_total = 0
        self.errors_total = 0  # commands answered with ERR (garbage included)
        self._commands: dict[str, tuple[int, Action]] = {
            "*IDN?": (0, lambda m: self.IDENTITY),
            **self.commands(),
            "ROUT": (1, self._set_routing),
            "ROUT?": (0, self._routing),
            "ERR?": (0, self._error_query),
            "STAT?": (0, self._status),
        }

    # ----- what a model declares ---------------------------------------------------------------
    def commands(self) -> dict[str, tuple[int, Action]]:
        raise NotImplementedError

    def status_fields(self, m: NanobatteryModel) -> str:
        """The STAT? line before its `ERR=` field."""
        raise NotImplementedError

    def before_command(self, m: NanobatteryModel) -> None:
        """Catch up with the model before any command acts (a finished move, say)."""

    # ----- protocol ----------------------------------------------------------------------------
    def handle_line(self, raw: bytes, too_long: bool) -> bytes | None:
        """One request line in, one reply line out (None for a blank line)."""
        with self._lock:
            try:
                reply = self._execute(raw, too_long)
                if reply is None:
                    return None
            except CommandError as exc:
                reply = self._refuse(exc.code, exc.text, raw)
            except Exception:
                log.exception("%s: internal error on %r", self.NAME, raw[:80])
                reply = self._refuse(LineError.INTERNAL, "internal error", raw)
            return (reply + "\r\n").encode("ascii")

    def _execute(self, raw: bytes, too_long: bool) -> str | None:
        if too_long:
            raise CommandError(LineError.LINE_TOO_LONG, f"line longer than {MAX_LINE} characters")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise CommandError(LineError.NOT_ASCII, "non-ASCII bytes in command") from None
        if not text.isprintable():
            raise CommandError(LineError.NOT_ASCII, "control characters in command")
        words = text.split()
        if not words:
            return None
        self.commands_total += 1
        keyword, args = words[0].upper(), words[1:]
        entry = self._commands.get(keyword)
        if entry is None:
            raise CommandError(LineError.UNKNOWN_COMMAND, f"unknown command {words[0]}")
        arity, action = entry
        if len(args) != arity:
            raise CommandError(
                LineError.ARGUMENT_COUNT, f"{keyword} takes {arity} argument(s), got {len(args)}"
            )
        with self._station.model() as m:
            self.before_command(m)
            result = action(m, *args)
        return "OK" if result is None else f"OK {result}"

    def _refuse(self, code: int, text: str, raw: bytes) -> str:
        self.errors_total += 1
        self._last_error = (int(code), text)
        log.warning("%s: ERR %d %s (request %r)", self.NAME, code, text, raw[:80])
        return f"ERR {int(code)} {text}"

    # ----- the commands every holder has -------------------------------------------------------
    def _set_routing(self, m: NanobatteryModel, name: str) -> None:
        routing = ROUTING_NAMES.get(name.upper())
        if routing is None:
            raise CommandError(
                LineError.BAD_ARGUMENT, f"routing must be one of {', '.join(ROUTING_NAMES)}"
            )
        m.set_bias_routing(routing)

    def _routing(self, m: NanobatteryModel) -> str:
        return next(name for name, value in ROUTING_NAMES.items() if value == m.bias_routing)

    def _error_query(self, m: NanobatteryModel) -> str:
        code, text = self._last_error
        self._last_error = NO_ERROR
        return f"{code} {text}"

    def _status(self, m: NanobatteryModel) -> str:
        code, text = self._last_error
        return f"{self.status_fields(m)} ERR={code} {text}"


C = TypeVar("C", bound=HolderLineController)


class ServedHolder(ServedInstrument, Generic[C]):
    """A holder controller served on a pseudo-terminal (the controller's serial port) and on
    TCP (a serial-to-Ethernet adapter, `socket://host:port` for pySerial): both reach the same
    controller, as one controller has one state."""

    def __init__(
        self,
        station: SimStation,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        pty: bool = True,
    ) -> None:
        self.controller: C = self.make_controller(station)
        name, handle = self.controller.NAME.replace(" ", "-"), self.controller.handle_line
        super().__init__(
            TcpLineServer(name, host, port, handle, MAX_LINE),
            PtyLineServer(name, handle, MAX_LINE) if pty else None,
        )

    def make_controller(self, station: SimStation) -> C:
        raise NotImplementedError

    @property
    def errors_total(self) -> int:
        return self.controller.errors_total

    @property
    def replies_dropped_total(self) -> int:
        """Replies the pty could not deliver because its client stopped reading."""
        return self._pty.replies_dropped_total if self._pty is not None else 0

    @property
    def endpoints(self) -> dict[str, str]:
        host, port = self.tcp_address()
        endpoints = {"url": f"socket://{host}:{port}"}
        if self._pty is not None and self._pty.device:
            endpoints["serial"] = self._pty.device
        return endpoints
