"""Driver for the open-cell biasing holder's piezo controller (drivers/HOLDER_PROTOCOL.md).

One method per controller command, over pySerial: `serial_for_url` takes a serial device
(`/dev/ttyUSB0`, `/dev/pts/3`) or any pySerial URL (`socket://host:port` for a
serial-to-Ethernet adapter). Moves only start a motion and return; `wait_until_idle()` waits
for it. An `ERR` reply raises `HolderError` with the controller's code; no reply within the
timeout raises `HolderTimeout`. The protocol strings live in `_Command` and nowhere else
(those every holder controller shares, and the verbs sending them, in `LineCommand` and
`LineController`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import serial

from .closing import ClosedOnExit

log = logging.getLogger(__name__)

BAUD_RATE = 115200
_EOL = b"\n"  # replies end in CR LF; the CR is stripped


class LineCommand:
    """The command strings every holder controller of this family shares (HOLDER_PROTOCOL.md,
    HEATER_PROTOCOL.md); each driver's `_Command` adds its own."""

    IDENTIFY = "*IDN?"
    SET_ROUTING = "ROUT {name}"
    ROUTING = "ROUT?"
    LAST_ERROR = "ERR?"
    STATUS = "STAT?"


class _Command(LineCommand):
    """The open-cell controller's command strings (HOLDER_PROTOCOL.md, command table)."""

    POSITION = "POS?"
    FINE_EXTENSION = "FINE?"
    COARSE_STEP = "STEP {count:d}"
    FINE_MOVE = "FINE {distance_nm:.3f}"
    APPROACH = "APPR {speed_nm_s:.3f} {max_travel_nm:.3f}"
    STOP = "STOP"
    MOVING = "MOV?"
    CONTACT = "CONT?"


# Driver routing names (those of the service and the model) <-> protocol names.
ROUTINGS = {"source_meter": "SMU", "ground": "GND", "float": "FLOAT"}
_ROUTING_FROM_PROTOCOL = {name: routing for routing, name in ROUTINGS.items()}

# Error codes of the controller that callers may want to tell apart.
ERR_BUSY = 200
ERR_ALREADY_IN_CONTACT = 201
ERR_OVERTRAVEL = 300
ERR_NO_CONTACT = 301
ERR_FINE_RANGE = 302


class HolderError(Exception):
    """The controller refused a command (`code` from its ERR reply) or answered nonsense."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message if code is None else f"holder error {code}: {message}")
        self.code = code
        self.text = message


# The name is the project contract (the service catches HolderTimeout), hence the noqa.
class HolderTimeout(HolderError, TimeoutError):  # noqa: N818
    """No complete reply from the controller within the timeout."""


@dataclass(frozen=True)
class HolderFault:
    """The controller's last error register: code and text (code 0 means none)."""

    code: int
    text: str


@dataclass(frozen=True)
class HolderStatus:
    position_nm: float  # axis position relative to the controller's power-on position
    fine_extension_nm: float  # fine piezo extension from its centre
    moving: bool
    contact: bool
    routing: str  # "source_meter", "ground" or "float"
    overtravel: bool  # forward moves are refused until the tip is retracted
    error: HolderFault | None  # last error not yet read with last_error(), if any


class LineController(ClosedOnExit):
    """A holder controller's serial line: one command line out, its one reply line back.

    The transport and the verbs every holder controller of this family shares
    (HOLDER_PROTOCOL.md, HEATER_PROTOCOL.md: the same framing, `OK`/`ERR <code> <text>`
    replies and errors, identity, bias routing, error register, a `STAT?` line).
    """

    ERRORS: ClassVar[tuple[type[Exception], ...]] = (HolderError,)

    @staticmethod
    def lost(exc: BaseException) -> bool:
        """A refusal (ERR reply, with a code) is an answer; silence or a dead line (no code)
        is worth a reconnect and a retry."""
        return isinstance(exc, HolderError) and exc.code is None

    def __init__(self, port_or_url: str, timeout: float = 2.0) -> None:
        self.port = port_or_url
        self.timeout = timeout
        self._serial = serial.serial_for_url(
            port_or_url, baudrate=BAUD_RATE, timeout=timeout, write_timeout=timeout
        )
        self._lock = threading.Lock()
        self._serial.reset_input_buffer()  # replies left over from an earlier client
        self._stale = False

    # ----- transport ---------------------------------------------------------------------------
    def _query(self, command: str) -> str:
        """Send one command line; return the text after `OK` or raise on `ERR` / silence."""
        with self._lock:
            if self._stale:  # a late reply to a timed-out command must not answer this one
                self._serial.reset_input_buffer()
                self._stale = False
            try:
                self._serial.write(command.encode("ascii") + b"\r\n")
                raw = self._serial.read_until(_EOL)
            except serial.SerialTimeoutException as exc:
                self._stale = True
                raise HolderTimeout(f"{command!r}: write timed out on {self.port}") from exc
            except serial.SerialException as exc:
                raise HolderError(f"{command!r}: {exc}") from exc
            if not raw.endswith(_EOL):
                self._stale = True
                raise HolderTimeout(f"{command!r}: no reply from {self.port} in {self.timeout} s")
        reply = raw.decode("ascii", errors="replace").strip()
        if reply == "OK" or reply.startswith("OK "):
            return reply[3:]
        if reply.startswith("ERR "):
            code_text, _, text = reply[4:].partition(" ")
            try:
                code = int(code_text)
            except ValueError:
                code = None
            raise HolderError(text or reply, code)
        raise HolderError(f"{command!r}: unexpected reply {reply!r}")

    def close(self) -> None:
        self._serial.close()

    # ----- the verbs every holder controller has -----------------------------------------------
    def identify(self) -> str:
        return self._query(LineCommand.IDENTIFY)

    def bias_routing(self) -> str:
        return _ROUTING_FROM_PROTOCOL[self._query(LineCommand.ROUTING)]

    def set_bias_routing(self, routing: str) -> None:
        """Connect the sample's bias line to 'source_meter', 'ground' or leave it 'float'ing."""
        name = ROUTINGS.get(routing)
        if name is None:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {routing!r}")
        self._query(LineCommand.SET_ROUTING.format(name=name))

    def last_error(self) -> HolderFault | None:
        """Read and clear the controller's last error; None when there was none."""
        code_text, _, text = self._query(LineCommand.LAST_ERROR).partition(" ")
        code = int(code_text)
        return HolderFault(code, text) if code else None

    def _status_fields(self) -> tuple[dict[str, str], HolderFault | None]:
        """One consistent snapshot (STAT?): its `KEY=value` fields, and the error register
        (the text after `ERR=`, which may hold spaces)."""
        fields_text, _, error_text = self._query(LineCommand.STATUS).partition(" ERR=")
        fields = dict(item.split("=", 1) for item in fields_text.split())
        code_text, _, text = error_text.partition(" ")
        code = int(code_text)
        fields["ROUT"] = _ROUTING_FROM_PROTOCOL[fields["ROUT"]]
        return fields, HolderFault(code, text) if code else None


class OpenCellHolder(LineController):
    """The holder's piezo needle controller on a serial line."""

    # What it reports for the run file: series name (a log in insitu_daq/runfile/layout.py) ->
    # the HolderStatus attributes giving that log's columns, in its order.
    SERIES: ClassVar[dict[str, tuple[str, ...]]] = {"holder_position": ("position_nm",)}

    # ----- queries -----------------------------------------------------------------------------
    def position_nm(self) -> float:
        return float(self._query(_Command.POSITION))

    def fine_extension_nm(self) -> float:
        return float(self._query(_Command.FINE_EXTENSION))

    def moving(self) -> bool:
        return self._query(_Command.MOVING) == "1"

    def in_contact(self) -> bool:
        return self._query(_Command.CONTACT) == "1"

    def status(self) -> HolderStatus:
        """Everything at once, from one consistent snapshot of the controller."""
        fields, error = self._status_fields()
        return HolderStatus(
            position_nm=float(fields["POS"]),
            fine_extension_nm=float(fields["FINE"]),
            moving=fields["MOV"] == "1",
            contact=fields["CONT"] == "1",
            routing=fields["ROUT"],
            overtravel=fields["OVT"] == "1",
            error=error,
        )

    # ----- motion ------------------------------------------------------------------------------
    def coarse_step(self, count: int) -> None:
        """Start `count` stick-slip steps (~100 nm each); positive is toward the sample."""
        self._query(_Command.COARSE_STEP.format(count=count))

    def move_fine(self, distance_nm: float) -> None:
        """Start a relative fine piezo move; positive is toward the sample."""
        self._query(_Command.FINE_MOVE.format(distance_nm=distance_nm))

    def approach(self, speed_nm_s: float, max_travel_nm: float) -> None:
        """Start moving forward; the controller stops at contact or after max_travel_nm."""
        self._query(_Command.APPROACH.format(speed_nm_s=speed_nm_s, max_travel_nm=max_travel_nm))

    def stop(self) -> None:
        self._query(_Command.STOP)

    def wait_until_idle(self, timeout: float = 60.0, poll_s: float = 0.02) -> HolderStatus:
        """Poll until the axis stops; the final status tells how the move ended."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if not status.moving:
                return status
            if time.monotonic() >= deadline:
                raise HolderTimeout(f"axis still moving after {timeout} s")
            time.sleep(poll_s)
