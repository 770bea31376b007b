"""Simulated controller of a MEMS heating + biasing holder (Protochips Fusion class).

`HeatingHolderController` is the controller's state machine behind the ASCII line protocol of
drivers/HEATER_PROTOCOL.md; it shares the framing, error register, routing and status line
with the open-cell holder (sim/holder_protocol.py) and declares only the heater's commands.
`SimulatedHeatingHolder` serves it on a pseudo-terminal and on TCP (`socket://host:port`). The
physics is the station's `HeatingChip` (sim/heating.py), on the station's model clock, so ramp
rates are in model seconds (time-scaled like everything).

The chip's electrical contacts carry the bias: `ROUT` routes them to the source-meter, to
ground or leaves them floating, through the shared nanobattery model, as the open-cell holder
routes its needle (a heated biasing cell: heating and bias in one protocol).
"""

from __future__ import annotations

from enum import IntEnum

from .heating import HeatingChip
from .holder_protocol import (
    Action,
    CommandError,
    HolderLineController,
    LineError,
    ServedHolder,
    flag,
    parse_float,
)
from .model import NanobatteryModel
from .station import SimStation

RAMP_RATE_C_PER_S = (0.001, 1000.0)  # what the controller accepts


class ErrorCode(IntEnum):
    """This model's own error codes (the shared ones: holder_protocol.LineError)."""

    HEATER_OFF = 210


class HeatingHolderController(HolderLineController):
    """The controller's state: the chip (the station's), the routing, the last error."""

    NAME = "heating holder"
    IDENTITY = "INSITU-SIM,MHC-1 MEMS heating biasing holder,SN0001,FW1.0"

    @property
    def _chip(self) -> HeatingChip:
        return self._station.chip  # read and driven under the station lock, like the model

    def commands(self) -> dict[str, tuple[int, Action]]:
        return {
            "TEMP": (1, self._set_temperature),
            "TEMP?": (0, lambda m: f"{self._chip.temperature_c:.2f}"),
            "SETP?": (0, lambda m: f"{self._chip.setpoint_c:.2f}"),
            "TARG?": (0, lambda m: f"{self._chip.target_c:.2f}"),
            "RATE": (1, self._set_rate),
            "RATE?": (0, lambda m: f"{self._chip.ramp_rate_c_per_s:g}"),
            "POW?": (0, lambda m: f"{self._chip.power_w():.6f}"),
            "RES?": (0, lambda m: f"{self._chip.resistance_ohm():.3f}"),
            "HEAT": (1, self._heat),
            "HEAT?": (0, lambda m: flag(self._chip.heater_on)),
            "HOLD": (0, lambda m: self._chip.hold()),
        }

    def status_fields(self, m: NanobatteryModel) -> str:
        chip = self._chip
        return (
            f"TEMP={chip.temperature_c:.2f} SETP={chip.setpoint_c:.2f} TARG={chip.target_c:.2f} "
            f"RATE={chip.ramp_rate_c_per_s:g} POW={chip.power_w():.6f} "
            f"RES={chip.resistance_ohm():.3f} HEAT={flag(chip.heater_on)} "
            f"RAMP={flag(chip.ramping)} ROUT={self._routing(m)}"
        )

    # ----- commands ----------------------------------------------------------------------------
    def _set_temperature(self, m: NanobatteryModel, text: str) -> None:
        celsius, chip = parse_float(text), self._chip
        room, limit = chip.params.room_temperature_c, chip.params.max_temperature_c
        if celsius > limit:
            raise CommandError(LineError.OUT_OF_RANGE, f"temperature beyond the chip's {limit:g} C")
        if celsius < room:
            raise CommandError(
                LineError.OUT_OF_RANGE, f"below room temperature ({room:g} C): a heater cannot cool"
            )
        if not chip.heater_on:
            raise CommandError(ErrorCode.HEATER_OFF, "heater is off: HEAT ON first")
        chip.set_target(celsius)

    def _set_rate(self, m: NanobatteryModel, text: str) -> None:
        rate = parse_float(text)
        low, high = RAMP_RATE_C_PER_S
        if not low <= rate <= high:
            raise CommandError(LineError.OUT_OF_RANGE, f"ramp rate must be {low:g}..{high:g} C/s")
        self._chip.set_ramp_rate(rate)

    def _heat(self, m: NanobatteryModel, text: str) -> None:
        word = text.upper()
        if word not in ("ON", "OFF"):
            raise CommandError(LineError.BAD_ARGUMENT, "HEAT takes ON or OFF")
        self._chip.switch_heater(word == "ON")


class SimulatedHeatingHolder(ServedHolder[HeatingHolderController]):
    """The heating holder controller served on a pseudo-terminal and on TCP."""

    def make_controller(self, station: SimStation) -> HeatingHolderController:
        return HeatingHolderController(station)
