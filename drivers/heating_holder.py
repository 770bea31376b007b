"""Driver for a MEMS heating + biasing holder controller (drivers/HEATER_PROTOCOL.md).

One method per controller command, over pySerial (`serial_for_url`: a serial device or any
pySerial URL, `socket://host:port`), on the holder family's line transport
(`LineController`: an `ERR` reply raises `HolderError` with its code, silence
`HolderTimeout`; identity, routing, error register and status parsing come with it too).
The heater's protocol strings live in `_Command` and nowhere else.

It is a holder model (core/instrument_models.py `mems_heating`), not an instrument of its own:
the chip is the specimen carrier, the same holder carries the sample's electrical contacts, and
a heated biasing cell runs both in one protocol (bias through the source-meter, temperature
here). The daemon's holder link, monitor and station lock therefore serve it unchanged; its
SERIES names the temperature and the heater's power, so the holder monitor records them.
A MEMS chip has no positioner: the sample lies on the chip's electrodes, so the status reports
contact and no motion (an `approach` step finds contact at once) and the positioner verbs are
refused without a word to the controller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .holder import HolderError, HolderFault, LineCommand, LineController

ERR_OUT_OF_RANGE = 103
ERR_HEATER_OFF = 210
ERR_NO_POSITIONER = 400  # the driver's own: refused here, never sent


class _Command(LineCommand):
    """The heater's command strings (HEATER_PROTOCOL.md, command table); the holder family's
    shared ones (identity, routing, error register, status) come with `LineCommand`."""

    SET_TEMPERATURE = "TEMP {celsius:.3f}"
    TEMPERATURE = "TEMP?"
    SETPOINT = "SETP?"
    SET_RAMP_RATE = "RATE {c_per_s:.6g}"
    RAMP_RATE = "RATE?"
    POWER = "POW?"
    RESISTANCE = "RES?"
    HEATER = "HEAT {state}"
    HEATER_ENABLED = "HEAT?"
    HOLD = "HOLD"


@dataclass(frozen=True)
class HeatingHolderStatus:
    """One consistent snapshot of the controller (STAT?).

    The positioner fields of an open-cell holder's status are here too, fixed (no motion, the
    sample always on its contacts), so the holder link's moves and monitor read it alike.
    """

    temperature_c: float  # the chip's temperature
    setpoint_c: float  # the controller's setpoint, ramping toward target_c
    target_c: float
    ramp_rate_c_per_s: float
    power_w: float
    resistance_ohm: float
    heater_on: bool
    ramping: bool  # the setpoint is still moving toward the target
    routing: str  # "source_meter", "ground" or "float"
    error: HolderFault | None
    position_nm: float = 0.0
    fine_extension_nm: float = 0.0
    moving: bool = False
    contact: bool = True
    overtravel: bool = False


class MemsHeatingHolder(LineController):
    """The heating holder's controller on a serial line."""

    # Series name (a log in insitu_daq/runfile/layout.py) -> the status attributes giving its
    # columns, in the log's order: the holder monitor records them (control/instruments/).
    SERIES: ClassVar[dict[str, tuple[str, ...]]] = {
        "holder_temperature": ("temperature_c", "setpoint_c"),
        "holder_heater": ("power_w", "resistance_ohm"),
    }

    # ----- queries -----------------------------------------------------------------------------
    def temperature_c(self) -> float:
        return float(self._query(_Command.TEMPERATURE))

    def setpoint_c(self) -> float:
        return float(self._query(_Command.SETPOINT))

    def ramp_rate_c_per_s(self) -> float:
        return float(self._query(_Command.RAMP_RATE))

    def power_w(self) -> float:
        return float(self._query(_Command.POWER))

    def resistance_ohm(self) -> float:
        return float(self._query(_Command.RESISTANCE))

    def heater_enabled(self) -> bool:
        return self._query(_Command.HEATER_ENABLED) == "1"

    def status(self) -> HeatingHolderStatus:
        """Everything at once, from one consistent snapshot of the controller."""
        fields, error = self._status_fields()
        return HeatingHolderStatus(
            temperature_c=float(fields["TEMP"]),
            setpoint_c=float(fields["SETP"]),
            target_c=float(fields["TARG"]),
            ramp_rate_c_per_s=float(fields["RATE"]),
            power_w=float(fields["POW"]),
            resistance_ohm=float(fields["RES"]),
            heater_on=fields["HEAT"] == "1",
            ramping=fields["RAMP"] == "1",
            routing=fields["ROUT"],
            error=error,
        )

    # ----- heating -----------------------------------------------------------------------------
    def heater_on(self) -> None:
        """Switch the heater on; its setpoint starts at the chip's present temperature."""
        self._query(_Command.HEATER.format(state="ON"))

    def heater_off(self) -> None:
        """Switch the heater off: no power, the chip cools to room temperature in milliseconds."""
        self._query(_Command.HEATER.format(state="OFF"))

    def set_ramp_rate(self, c_per_s: float) -> None:
        """The rate (C per second) at which the controller ramps its setpoint."""
        self._query(_Command.SET_RAMP_RATE.format(c_per_s=c_per_s))

    def set_temperature(self, celsius: float) -> None:
        """Ramp the setpoint to `celsius` at the ramp rate (the heater must be on: ERR 210)."""
        self._query(_Command.SET_TEMPERATURE.format(celsius=celsius))

    def hold(self) -> None:
        """Stop the setpoint's ramp where it is now."""
        self._query(_Command.HOLD)

    # ----- the holder verbs a MEMS chip has not ------------------------------------------------
    def stop(self) -> None:
        """What a holder's `stop` means here: nothing moves but the setpoint; hold it."""
        self.hold()

    def approach(self, speed_nm_s: float, max_travel_nm: float) -> None:
        raise HolderError("a MEMS chip has no positioner: no approach", ERR_NO_POSITIONER)

    def move_fine(self, distance_nm: float) -> None:
        raise HolderError("a MEMS chip has no positioner: no fine move", ERR_NO_POSITIONER)

    def coarse_step(self, count: int) -> None:
        raise HolderError("a MEMS chip has no positioner: no coarse step", ERR_NO_POSITIONER)
