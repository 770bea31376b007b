"""Simulated controller of an open-cell biasing holder (PicoFemto / ZepTools-like needle drive).

`HolderController` is the controller's state machine behind the ASCII line protocol of
drivers/HOLDER_PROTOCOL.md, on the framing, error register, routing and status line every
holder model shares (sim/holder_protocol.py); `SimulatedHolder` serves it on a pseudo-terminal
and on TCP like every holder model.

Motion runs in model time: a move command starts `m.move_tip_to` and replies at once; the
model moves the tip as the station clock runs, stops it at contact during an approach (the
controller senses contact on its bias line) and at the over-travel limit otherwise. The
controller learns how a move ended (done, stopped, contact, over-travel) the next time any
command reaches it, so it needs no polling thread of its own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import IntEnum

from .holder_protocol import (
    Action,
    CommandError,
    HolderLineController,
    LineError,
    ServedHolder,
    flag,
    parse_float,
    parse_int,
)
from .model import NanobatteryModel
from .station import SimStation

log = logging.getLogger(__name__)

COARSE_STEP_NM = 100.0  # nominal stick-slip step
COARSE_STEP_JITTER = 0.08  # relative spread of single steps (stick-slip is not exact)
COARSE_RATE_HZ = 20.0
MAX_STEPS = 10_000
FINE_RANGE_NM = 1000.0  # fine piezo extension limit, either way from its centre
FINE_SPEED_NM_S = 200.0
APPROACH_SPEED_NM_S = (1.0, 2000.0)
APPROACH_MAX_TRAVEL_NM = 20_000.0


class ErrorCode(IntEnum):
    """This model's own error codes (the shared ones: holder_protocol.LineError)."""

    BUSY = 200
    ALREADY_IN_CONTACT = 201
    OVERTRAVEL = 300
    NO_CONTACT = 301
    FINE_RANGE = 302


@dataclass(frozen=True)
class _Move:
    kind: str  # "coarse", "fine" or "approach"
    start_nm: float  # model tip position when the move began
    fine_start_nm: float  # fine piezo extension when the move began


class HolderController(HolderLineController):
    """The controller's state: fine piezo extension, the move in progress, the last error."""

    NAME = "holder"
    IDENTITY = "INSITU-SIM,OCH-1 open-cell biasing holder,SN0001,FW1.0"

    def __init__(self, station: SimStation) -> None:
        with station.model() as m:
            self._origin_nm = m.tip_position_nm  # POS? counts from where the tip was at power-on
        self._fine_nm = 0.0
        self._move: _Move | None = None
        self.faults_total = 0  # over-travel trips and approaches that found no contact
        super().__init__(station)

    def commands(self) -> dict[str, tuple[int, Action]]:
        return {
            "POS?": (0, self._position),
            "FINE?": (0, self._fine_extension_query),
            "STEP": (1, self._step),
            "FINE": (1, self._fine),
            "APPR": (2, self._approach),
            "STOP": (0, self._stop),
            "MOV?": (0, self._moving_query),
            "CONT?": (0, lambda m: flag(m.contact)),
        }

    def status_fields(self, m: NanobatteryModel) -> str:
        return (
            f"POS={self._axis(m):.1f} FINE={self._fine_extension(m):.1f} "
            f"MOV={self._moving_query(m)} CONT={flag(m.contact)} ROUT={self._routing(m)} "
            f"OVT={flag(m.overtravel)}"
        )

    def before_command(self, m: NanobatteryModel) -> None:
        self._settle(m)

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
    def _position(self, m: NanobatteryModel) -> str:
        return f"{self._axis(m):.1f}"

    def _fine_extension_query(self, m: NanobatteryModel) -> str:
        return f"{self._fine_extension(m):.1f}"

    def _step(self, m: NanobatteryModel, count_text: str) -> None:
        count = parse_int(count_text)
        if not 1 <= abs(count) <= MAX_STEPS:
            raise CommandError(LineError.OUT_OF_RANGE, f"step count must be 1..{MAX_STEPS}")
        self._require_idle(m, forward=count > 0)
        sizes = m.rng.normal(COARSE_STEP_NM, COARSE_STEP_NM * COARSE_STEP_JITTER, abs(count))
        distance = math.copysign(float(sizes.clip(min=0.0).sum()), count)
        duration_s = abs(count) / COARSE_RATE_HZ
        self._start(m, "coarse", distance, abs(distance) / duration_s)

    def _fine(self, m: NanobatteryModel, distance_text: str) -> None:
        distance = parse_float(distance_text)
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
        speed, travel = parse_float(speed_text), parse_float(travel_text)
        low, high = APPROACH_SPEED_NM_S
        if not low <= speed <= high:
            raise CommandError(LineError.OUT_OF_RANGE, f"speed must be {low:g}..{high:g} nm/s")
        if not 0.0 < travel <= APPROACH_MAX_TRAVEL_NM:
            raise CommandError(
                LineError.OUT_OF_RANGE, f"travel must be >0..{APPROACH_MAX_TRAVEL_NM:g} nm"
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
        return flag(self._move is not None or m.tip_moving)


class SimulatedHolder(ServedHolder[HolderController]):
    """The holder controller served on a pseudo-terminal and on TCP."""

    def make_controller(self, station: SimStation) -> HolderController:
        return HolderController(station)

    @property
    def faults_total(self) -> int:
        return self.controller.faults_total
