"""Simulated controller of an open-cell biasing holder (PicoFemto / ZepTools-like needle drive).

`HolderController` is the controller's state machine behind the ASCII line protocol of
drivers/HOLDER_PROTOCOL.md; `SimulatedHolder` serves it on a pseudo-terminal (the
controller's serial port) and on TCP (a serial-to-Ethernet adapter, `socket://host:port` for
pySerial). Both transports talk to the same controller, as one controller has one state.

Motion runs in model time: a move command starts `m.move_tip_to` and replies at once; the
model moves the tip as the station clock runs, stops it at contact during an approach (the
controller senses contact on its bias line) and at the over-travel limit otherwise. The
controller learns how a move ended (done, stopped, contact, over-travel) the next time any
command reaches it, so it needs no polling thread of its own.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from enum import IntEnum

from .lineserver import PtyLineServer, ServedInstrument, TcpLineServer
from .model import BiasRouting, NanobatteryModel
from .station import SimStation

log = logging.getLogger(__name__)

DEFAULT_PORT = 5026
MAX_LINE = 128  # characters, terminator excluded
IDENTITY = "INSITU-SIM,OCH-1 open-cell biasing holder,SN0001,FW1.0"

COARSE_STEP_NM = 100.0  # nominal stick-slip step
COARSE_STEP_JITTER = 0.08  # relative spread of single steps (stick-slip is not exact)
COARSE_RATE_HZ = 20.0
MAX_STEPS = 10_000
FINE_RANGE_NM = 1000.0  # fine piezo extension limit, either way from its centre
FINE_SPEED_NM_S = 200.0
APPROACH_SPEED_NM_S = (1.0, 2000.0)
APPROACH_MAX_TRAVEL_NM = 20_000.0

# Protocol names of the bias routings.
ROUTING_NAMES = {
    "SMU": BiasRouting.SOURCE_METER,
    "GND": BiasRouting.GROUND,
    "FLOAT": BiasRouting.FLOAT,
}


class ErrorCode(IntEnum):
    NONE = 0
    UNKNOWN_COMMAND = 100
    ARGUMENT_COUNT = 101
    BAD_ARGUMENT = 102
    OUT_OF_RANGE = 103
    LINE_TOO_LONG = 104
    NOT_ASCII = 105
    BUSY = 200
    ALREADY_IN_CONTACT = 201
    OVERTRAVEL = 300
    NO_CONTACT = 301
    FINE_RANGE = 302
    INTERNAL = 900


class CommandError(Exception):
    """A command the controller refuses; becomes `ERR <code> <text>`."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(f"{int(code)} {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True)
class _Move:
    kind: str  # "coarse", "fine" or "approach"
    start_nm: float  # model tip position when the move began
    fine_start_nm: float  # fine piezo extension when the move began


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CommandError(ErrorCode.BAD_ARGUMENT, f"not an integer: {text}") from None


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CommandError(ErrorCode.BAD_ARGUMENT, f"not a number: {text}") from None
    if not math.isfinite(value):
        raise CommandError(ErrorCode.BAD_ARGUMENT, f"not a finite number: {text}")
    return value


def _flag(value: bool) -> str:
    return "1" if value else "0"


class HolderController:
    """The controller's state: fine piezo extension, the move in progress, the last error."""

    def __init__(self, station: SimStation) -> None:
        self._station = station
        self._lock = threading.Lock()
        with station.model() as m:
            self._origin_nm = m.tip_position_nm  # POS? counts from where the tip was at power-on
        self._fine_nm = 0.0
        self._move: _Move | None = None
        self._last_error: tuple[int, str] = (int(ErrorCode.NONE), "no error")
        self.commands_total = 0
        self.errors_total = 0  # commands answered with ERR (garbage included)
        self.faults_total = 0  # over-travel trips and approaches that found no contact
        # keyword -> (number of arguments, action); actions run under the station lock.
        self._commands = {
            "*IDN?": (0, self._identify),
            "POS?": (0, self._position),
            "FINE?": (0, self._fine_extension_query),
            "STEP": (1, self._step),
            "FINE": (1, self._fine),
            "APPR": (2, self._approach),
            "STOP": (0, self._stop),
            "MOV?": (0, self._moving_query),
            "CONT?": (0, self._contact_query),
            "ROUT": (1, self._set_routing),
            "ROUT?": (0, self._routing_query),
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
                log.exception("holder: internal error on %r", raw[:80])
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
            self._settle(m)
            result = action(m, *args)
        return "OK" if result is None else f"OK {result}"

    def _refuse(self, code: ErrorCode, text: str, raw: bytes) -> str:
        self.errors_total += 1
        self._last_error = (int(code), text)
        log.warning("holder: ERR %d %s (request %r)", code, text, raw[:80])
        return f"ERR {int(code)} {text}"

    def _fault(self, code: ErrorCode, text: str) -> None:
        """An error that arose during a move: kept for ERR? / STAT?, not a reply."""
        self.faults_total += 1
        self._last_error = (int(code), text)
        log.warning("holder: fault %d %s", code, text)

    # ----- motion bookkeeping ------------------------------------------------------------------
    def _settle(self, m: NanobatteryModel) -> None:
        """Close the books on a move the model has finished since the last command."""
        if self._move is not None and not m.tip_moving:
            self._finish(m, stopped=False)

    def _finish(self, m: NanobatteryModel, stopped: bool) -> None:
        move = self._move
        assert move is not None
        self._fine_nm = self._fine_extension(m)
        self._move = None
        if m.overtravel:
            self._fault(
                ErrorCode.OVERTRAVEL,
                f"over-travel: forward motion stopped at {self._axis(m):.1f} nm, retract first",
            )
        elif move.kind == "approach" and not stopped and not m.contact:
            self._fault(ErrorCode.NO_CONTACT, "approach reached its maximum travel, no contact")

    def _fine_extension(self, m: NanobatteryModel) -> float:
        move = self._move
        if move is None or move.kind != "fine":
            return self._fine_nm
        return move.fine_start_nm + (m.tip_position_nm - move.start_nm)

    def _axis(self, m: NanobatteryModel) -> float:
        return m.tip_position_nm - self._origin_nm

    def _require_idle(self, m: NanobatteryModel, forward: bool) -> None:
        """Refuse a new move while one runs, and any forward move after an over-travel trip."""
        if self._move is not None or m.tip_moving:
            raise CommandError(ErrorCode.BUSY, "axis is moving; STOP or wait for it")
        if forward and m.overtravel:
            raise CommandError(ErrorCode.OVERTRAVEL, "over-travel: retract before moving forward")

    def _start(
        self,
        m: NanobatteryModel,
        kind: str,
        distance_nm: float,
        speed_nm_s: float,
        stop_at_contact: bool = False,
    ) -> None:
        self._move = _Move(kind, m.tip_position_nm, self._fine_nm)
        m.move_tip_to(m.tip_position_nm + distance_nm, speed_nm_s, stop_at_contact)

    # ----- commands ----------------------------------------------------------------------------
    def _identify(self, m: NanobatteryModel) -> str:
        return IDENTITY

    def _position(self, m: NanobatteryModel) -> str:
        return f"{self._axis(m):.1f}"

    def _fine_extension_query(self, m: NanobatteryModel) -> str:
        return f"{self._fine_extension(m):.1f}"

    def _step(self, m: NanobatteryModel, count_text: str) -> None:
        count = _parse_int(count_text)
        if not 1 <= abs(count) <= MAX_STEPS:
            raise CommandError(ErrorCode.OUT_OF_RANGE, f"step count must be 1..{MAX_STEPS}")
        self._require_idle(m, forward=count > 0)
        sizes = m.rng.normal(COARSE_STEP_NM, COARSE_STEP_NM * COARSE_STEP_JITTER, abs(count))
        distance = math.copysign(float(sizes.clip(min=0.0).sum()), count)
        duration_s = abs(count) / COARSE_RATE_HZ
        self._start(m, "coarse", distance, abs(distance) / duration_s)

    def _fine(self, m: NanobatteryModel, distance_text: str) -> None:
        distance = _parse_float(distance_text)
        self._require_idle(m, forward=distance > 0)
        target = self._fine_nm + distance
        if abs(target) > FINE_RANGE_NM:
            raise CommandError(
                ErrorCode.FINE_RANGE,
                f"fine piezo range +/-{FINE_RANGE_NM:g} nm exceeded "
                f"(extension {self._fine_nm:.1f} nm)",
            )
        if distance != 0.0:
            self._start(m, "fine", distance, FINE_SPEED_NM_S)

    def _approach(self, m: NanobatteryModel, speed_text: str, travel_text: str) -> None:
        speed, travel = _parse_float(speed_text), _parse_float(travel_text)
        low, high = APPROACH_SPEED_NM_S
        if not low <= speed <= high:
            raise CommandError(ErrorCode.OUT_OF_RANGE, f"speed must be {low:g}..{high:g} nm/s")
        if not 0.0 < travel <= APPROACH_MAX_TRAVEL_NM:
            raise CommandError(
                ErrorCode.OUT_OF_RANGE, f"travel must be >0..{APPROACH_MAX_TRAVEL_NM:g} nm"
            )
        self._require_idle(m, forward=True)
        if m.contact:
            raise CommandError(ErrorCode.ALREADY_IN_CONTACT, "already in contact")
        self._start(m, "approach", travel, speed, stop_at_contact=True)

    def _stop(self, m: NanobatteryModel) -> None:
        m.stop_tip()
        if self._move is not None:
            self._finish(m, stopped=True)

    def _moving_query(self, m: NanobatteryModel) -> str:
        return _flag(self._move is not None or m.tip_moving)

    def _contact_query(self, m: NanobatteryModel) -> str:
        return _flag(m.contact)

    def _set_routing(self, m: NanobatteryModel, name: str) -> None:
        routing = ROUTING_NAMES.get(name.upper())
        if routing is None:
            raise CommandError(
                ErrorCode.BAD_ARGUMENT, f"routing must be one of {', '.join(ROUTING_NAMES)}"
            )
        m.set_bias_routing(routing)

    def _routing_query(self, m: NanobatteryModel) -> str:
        return next(name for name, value in ROUTING_NAMES.items() if value == m.bias_routing)

    def _error_query(self, m: NanobatteryModel) -> str:
        code, text = self._last_error
        self._last_error = (int(ErrorCode.NONE), "no error")
        return f"{code} {text}"

    def _status(self, m: NanobatteryModel) -> str:
        code, text = self._last_error
        return (
            f"POS={self._axis(m):.1f} FINE={self._fine_extension(m):.1f} "
            f"MOV={self._moving_query(m)} CONT={_flag(m.contact)} ROUT={self._routing_query(m)} "
            f"OVT={_flag(m.overtravel)} ERR={code} {text}"
        )


class SimulatedHolder(ServedInstrument):
    """The holder controller served on a pseudo-terminal and on TCP."""

    def __init__(
        self,
        station: SimStation,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        pty: bool = True,
    ) -> None:
        self.controller = HolderController(station)
        super().__init__(
            TcpLineServer("holder", host, port, self.controller.handle_line, MAX_LINE),
            PtyLineServer("holder", self.controller.handle_line, MAX_LINE) if pty else None,
        )

    @property
    def errors_total(self) -> int:
        return self.controller.errors_total

    @property
    def faults_total(self) -> int:
        return self.controller.faults_total

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
