"""Simulated controller of a MEMS heating + biasing holder (Protochips Fusion class).

`HeatingHolderController` is the controller's state machine behind the ASCII line protocol of
drivers/HEATER_PROTOCOL.md; `SimulatedHeatingHolder` serves it on a pseudo-terminal and on TCP
(`socket://host:port`), like the open-cell holder (sim/holder.py), through the same line
servers (sim/lineserver.py). The physics is the station's `HeatingChip` (sim/heating.py), on
the station's model clock, so ramp rates are in model seconds (time-scaled like everything).

The chip's electrical contacts carry the bias: `ROUT` routes them to the source-meter, to
ground or leaves them floating, through the shared nanobattery model, as the open-cell holder
routes its needle (a heated biasing cell: heating and bias in one protocol).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from enum import IntEnum

from .heating import HeatingChip
from .holder import ROUTING_NAMES
from .lineserver import PtyLineServer, ServedInstrument, TcpLineServer
from .model import NanobatteryModel
from .station import SimStation

log = logging.getLogger(__name__)

DEFAULT_PORT = 5026  # the holder's port: a station has one holder
MAX_LINE = 128
IDENTITY = "INSITU-SIM,MHC-1 MEMS heating biasing holder,SN0001,FW1.0"
RAMP_RATE_C_PER_S = (0.001, 1000.0)  # what the controller accepts


class ErrorCode(IntEnum):
    NONE = 0
    UNKNOWN_COMMAND = 100
    ARGUMENT_COUNT = 101
    BAD_ARGUMENT = 102
    OUT_OF_RANGE = 103
    LINE_TOO_LONG = 104
    NOT_ASCII = 105
    HEATER_OFF = 210
    INTERNAL = 900


class CommandError(Exception):
    """A command the controller refuses; becomes `ERR <code> <text>`."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(f"{int(code)} {text}")
        self.code = code
        self.text = text


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CommandError(ErrorCode.BAD_ARGUMENT, f"not a number: {text}") from None
    if not math.isfinite(value):
        raise CommandError(ErrorCode.BAD_ARGUMENT, f"not a finite number: {text}")
    return value


_Action = Callable[..., "str | None"]


def _flag(value: bool) -> str:
    return "1" if value else "0"


class HeatingHolderController:
    """The controller's state: the chip (the station's), the routing, the last error."""

    def __init__(self, station: SimStation) -> None:
        self._station = station
        self._lock = threading.Lock()
        self._last_error: tuple[int, str] = (int(ErrorCode.NONE), "no error")
        self.commands_total = 0
        self.errors_total = 0
        # keyword -> (number of arguments, action(model, chip, *args)); under the station lock.
        self._commands: dict[str, tuple[int, _Action]] = {
            "*IDN?": (0, lambda m, c: IDENTITY),
            "TEMP": (1, self._set_temperature),
            "TEMP?": (0, lambda m, c: f"{c.temperature_c:.2f}"),
            "SETP?": (0, lambda m, c: f"{c.setpoint_c:.2f}"),
            "TARG?": (0, lambda m, c: f"{c.target_c:.2f}"),
            "RATE": (1, self._set_rate),
            "RATE?": (0, lambda m, c: f"{c.ramp_rate_c_per_s:g}"),
            "POW?": (0, lambda m, c: f"{c.power_w():.6f}"),
            "RES?": (0, lambda m, c: f"{c.resistance_ohm():.3f}"),
            "HEAT": (1, self._heat),
            "HEAT?": (0, lambda m, c: _flag(c.heater_on)),
            "HOLD": (0, lambda m, c: c.hold()),
            "ROUT": (1, self._set_routing),
            "ROUT?": (0, lambda m, c: self._routing(m)),
            "ERR?": (0, self._error_query),
            "STAT?": (0, self._status),
        }

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
                log.exception("heating holder: internal error on %r", raw[:80])
                reply = self._refuse(ErrorCode.INTERNAL, "internal error", raw)
            return (reply + "\r\n").encode("ascii")

    def _execute(self, raw: bytes, too_long: bool) -> str | None:
        if too_long:
            raise CommandError(ErrorCode.LINE_TOO_LONG, f"line longer than {MAX_LINE} characters")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise CommandError(ErrorCode.NOT_ASCII, "non-ASCII bytes in command") from None
        if not text.isprintable():
            raise CommandError(ErrorCode.NOT_ASCII, "control characters in command")
        words = text.split()
        if not words:
            return None
        self.commands_total += 1
        keyword, args = words[0].upper(), words[1:]
        entry = self._commands.get(keyword)
        if entry is None:
            raise CommandError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {words[0]}")
        arity, action = entry
        if len(args) != arity:
            raise CommandError(
                ErrorCode.ARGUMENT_COUNT, f"{keyword} takes {arity} argument(s), got {len(args)}"
            )
        with self._station.model() as m:
            result = action(m, self._station.chip, *args)
        return "OK" if result is None else f"OK {result}"

    def _refuse(self, code: ErrorCode, text: str, raw: bytes) -> str:
        self.errors_total += 1
        self._last_error = (int(code), text)
        log.warning("heating holder: ERR %d %s (request %r)", code, text, raw[:80])
        return f"ERR {int(code)} {text}"

    # ----- commands ----------------------------------------------------------------------------
    def _set_temperature(self, m: NanobatteryModel, chip: HeatingChip, text: str) -> None:
        celsius = _parse_float(text)
        room, limit = chip.params.room_temperature_c, chip.params.max_temperature_c
        if celsius > limit:
            raise CommandError(ErrorCode.OUT_OF_RANGE, f"temperature beyond the chip's {limit:g} C")
        if celsius < room:
            raise CommandError(
                ErrorCode.OUT_OF_RANGE, f"below room temperature ({room:g} C): a heater cannot cool"
            )
        if not chip.heater_on:
            raise CommandError(ErrorCode.HEATER_OFF, "heater is off: HEAT ON first")
        chip.set_target(celsius)

    def _set_rate(self, m: NanobatteryModel, chip: HeatingChip, text: str) -> None:
        rate = _parse_float(text)
        low, high = RAMP_RATE_C_PER_S
        if not low <= rate <= high:
            raise CommandError(ErrorCode.OUT_OF_RANGE, f"ramp rate must be {low:g}..{high:g} C/s")
        chip.set_ramp_rate(rate)

    def _heat(self, m: NanobatteryModel, chip: HeatingChip, text: str) -> None:
        word = text.upper()
        if word not in ("ON", "OFF"):
            raise CommandError(ErrorCode.BAD_ARGUMENT, "HEAT takes ON or OFF")
        chip.switch_heater(word == "ON")

    def _set_routing(self, m: NanobatteryModel, chip: HeatingChip, name: str) -> None:
        routing = ROUTING_NAMES.get(name.upper())
        if routing is None:
            raise CommandError(
                ErrorCode.BAD_ARGUMENT, f"routing must be one of {', '.join(ROUTING_NAMES)}"
            )
        m.set_bias_routing(routing)

    @staticmethod
    def _routing(m: NanobatteryModel) -> str:
        return next(name for name, value in ROUTING_NAMES.items() if value == m.bias_routing)

    def _error_query(self, m: NanobatteryModel, chip: HeatingChip) -> str:
        code, text = self._last_error
        self._last_error = (int(ErrorCode.NONE), "no error")
        return f"{code} {text}"

    def _status(self, m: NanobatteryModel, chip: HeatingChip) -> str:
        code, text = self._last_error
        return (
            f"TEMP={chip.temperature_c:.2f} SETP={chip.setpoint_c:.2f} TARG={chip.target_c:.2f} "
            f"RATE={chip.ramp_rate_c_per_s:g} POW={chip.power_w():.6f} "
            f"RES={chip.resistance_ohm():.3f} HEAT={_flag(chip.heater_on)} "
            f"RAMP={_flag(chip.ramping)} ROUT={self._routing(m)} ERR={code} {text}"
        )


class SimulatedHeatingHolder(ServedInstrument):
    """The heating holder controller served on a pseudo-terminal and on TCP."""

    def __init__(
        self,
        station: SimStation,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        pty: bool = True,
    ) -> None:
        self.controller = HeatingHolderController(station)
        super().__init__(
            TcpLineServer("heating-holder", host, port, self.controller.handle_line, MAX_LINE),
            PtyLineServer("heating-holder", self.controller.handle_line, MAX_LINE) if pty else None,
        )

    @property
    def errors_total(self) -> int:
        return self.controller.errors_total

    @property
    def endpoints(self) -> dict[str, str]:
        host, port = self.tcp_address()
        endpoints = {"url": f"socket://{host}:{port}"}
        if self._pty is not None and self._pty.device:
            endpoints["serial"] = self._pty.device
        return endpoints
