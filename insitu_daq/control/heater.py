"""A heating holder's heater: ramp the chip to a temperature and see it settle; make it safe.

The holder model decides whether there is a heater (`heats`: a driver with the verbs of
`HeatingHolder`, control/instruments/); nothing here names a model. The steps in
control/steps/ reach the driver through `Station.holder_call`, the daemon and the guardian
through their own links.

Ramps, never steps. The controller ramps its own setpoint at the rate it is given (in station
seconds: a time-scaled simulated station ramps on its own clock), so a temperature is asked for
as "rate, then target", each checked against the station's limits (SafetyCheck.temperature)
before anything is written; switching the heater on starts its setpoint at the chip's present
temperature.

The safe state is **heater off**, not a ramp down to room temperature. Why:
- A MEMS membrane's thermal time constant is milliseconds: its makers quench chips from
  1000 C routinely, so power off is what the hardware is built to take (the bias is ramped
  because a step hurts the particle and the source-meter; switching a heater off steps
  nothing but the power).
- It is one command whose result can be read back (`HEAT?`), done in well under a second. A
  ramp to room temperature at the heating study's 0.1 C/s takes 80 minutes from 500 C: a
  guardian would hold the holder (and the station's lock) that long after a crash, and a
  daemon's stop, an abort and a failed run would wait for it.
- When things have gone wrong (the daemon died, a run failed, an operator aborted), the
  state wanted is "no power", at once; the specimen's history is in the run file either way.
A protocol that wants a gentle cool-down ends with its own `temperature` step down before
the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from insitu_daq.control.instruments.factory import holder_class, open_holder
from insitu_daq.control.retry import PERSIST_S, keep_trying
from insitu_daq.core.config import StationConfig

log = logging.getLogger(__name__)


def heats(driver_or_class: Any) -> bool:
    """Whether a holder driver (or its class) has a heater to make safe."""
    return callable(getattr(driver_or_class, "heater_off", None)) and callable(
        getattr(driver_or_class, "set_temperature", None)
    )


def model_heats(config: StationConfig) -> bool:
    """Whether the station's holder model has a heater (its driver class is imported)."""
    return heats(holder_class(config.holder.model))


def start_ramp(driver: Any, celsius: float, rate_c_per_s: float) -> None:
    """Heater on (its setpoint at the chip's temperature), the rate, then the target: the
    controller ramps the setpoint from where it is. The caller has checked both against the
    station's limits (SafetyCheck.temperature) just before."""
    if not driver.status().heater_on:
        driver.heater_on()
    driver.set_ramp_rate(rate_c_per_s)
    driver.set_temperature(celsius)


def heater_off(driver: Any) -> Any:
    """Switch the heater off and read it back; returns the status it found before (heater on
    or not, the chip's temperature). The driver's error when the controller still says on."""
    found = driver.status()
    driver.heater_off()
    if driver.heater_enabled():
        raise type(driver).ERRORS[0]("heater still on after HEAT OFF")
    if found.heater_on:
        log.warning(
            "heater off (it was on at %.1f C, setpoint %.1f C)",
            found.temperature_c,
            found.setpoint_c,
        )
    return found


def _make_safe_once(config: StationConfig) -> None:
    holder = open_holder(config.holder)
    with contextlib.closing(holder):
        identity = holder.identify()
        began = time.monotonic()
        found = heater_off(holder)
        log.warning(
            "heating holder %s at %s: heater OFF (it was %s, chip at %.1f C) in %.3f s",
            identity, config.holder.port, "on" if found.heater_on else "off",
            found.temperature_c, time.monotonic() - began,
        )  # fmt: skip


def make_holder_safe(config: StationConfig, persist_s: float = PERSIST_S) -> bool:
    """Connect to the station's heating holder (retrying with back-off), switch the heater
    off. True at once for a holder without a heater. Nobody else is left to do it when the
    guardian does, so it keeps trying every `retry.max_delay_s` for `persist_s`; False if the
    heater could not be confirmed off in that time."""
    cls = holder_class(config.holder.model)
    if not heats(cls):
        return True
    return keep_trying(
        lambda: _make_safe_once(config),
        f"heating holder {config.holder.port}",
        config.retry,
        (*cls.ERRORS, OSError),
        persist_s,
    )
