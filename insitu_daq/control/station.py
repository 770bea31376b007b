"""What a protocol can ask of the station: the verbs the ProtocolRunner calls.

The runner (insitu_daq/control/runner.py) only knows this interface; the daemon
(insitu_daq/service/daemon.py) implements it over the real controllers (bias, holder, microscope,
recorder). Every verb that
moves something takes a `stop` event: when it is set the verb returns (or raises `Stopped`)
promptly, leaving the instrument in a safe, known state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from insitu_daq.control.conditions import LiveUpdate
from insitu_daq.core.clock import RunClock

T = TypeVar("T")

FROM_NOW = -1  # live_updates(..., FROM_NOW): no updates, only the cursor to start from


class Stopped(Exception):  # noqa: N818 - a control-flow signal, not an error
    """A verb returned early because its `stop` event was set (pause or abort).

    A tip move says how far it got (`moved_nm`) when it knows, so the runner can re-issue an
    approach with only the remaining travel after a pause.
    """

    def __init__(self, message: str = "stopped", *, moved_nm: float | None = None) -> None:
        super().__init__(message)
        self.moved_nm = moved_nm


class StationError(RuntimeError):
    """An instrument failed in a way the verb could not recover from (after retries)."""


class Station(Protocol):
    clock: RunClock

    # ----- holder ----------------------------------------------------------------------------
    def approach(self, speed_nm_s: float, max_travel_nm: float, stop: threading.Event) -> float:
        """Drive the tip toward the particle until contact; returns the travel in nm.

        Raises StationError when max_travel_nm is used up without contact.
        """
        ...

    def retract(self, distance_nm: float, speed_nm_s: float, stop: threading.Event) -> None: ...

    def holder_call(self, action: Callable[[Any], T], stop: threading.Event) -> T:
        """`action(driver)` on the configured holder's driver, through its retrying link (one
        caller at a time; StationError once the retries are spent): how a step kind reaches a
        holder type's own verbs (a heating holder's temperature) with no verb here for each."""
        ...

    def check_temperature(self, celsius: float, rate_c_per_s: float | None) -> float:
        """The rate a heating holder's ramp to `celsius` goes at (None: the station's maximum);
        LimitError beyond the station's limits, StepRefused (control/steps/) if its holder has
        no heater. Called before every setpoint written (control/steps/temperature.py)."""
        ...

    # ----- bias ------------------------------------------------------------------------------
    def check_bias(self, volts: float, rate_volts_per_s: float | None) -> None:
        """Raise LimitError (control.limits) if a ramp to `volts` at that rate breaks a limit."""
        ...

    def ramp_bias(
        self, volts: float, rate_volts_per_s: float | None, stop: threading.Event
    ) -> None:
        """Compliance set, output on, ramp (never step) to `volts`; returns once there.

        rate None means the configured maximum ramp rate. Checks limits first (LimitError).
        """
        ...

    def bias_setpoint(self) -> float:
        """The level the source is at (or ramping toward) now, in V."""
        ...

    def make_safe(self) -> None:
        """Ramp the bias to 0 V at the maximum rate and turn the output off. Never raises."""
        ...

    # ----- detector / run file ---------------------------------------------------------------
    def start_recording(self) -> None: ...

    def stop_recording(self) -> None: ...

    # ----- microscope ------------------------------------------------------------------------
    def set_microscope(
        self,
        mode: str | None = None,
        beam: bool | None = None,
        dose_rate_e_per_a2_s: float | None = None,
        pixel_size_nm: float | None = None,
    ) -> None: ...

    # ----- live values -----------------------------------------------------------------------
    def live_updates(self, names: frozenset[str], after: int) -> tuple[int, list[LiveUpdate]]:
        """The live values (insitu_daq.control.conditions.live_quantities()) measured since cursor
        `after` (FROM_NOW: none, only the cursor), each update stamped with its event time, in
        the order they came; and the cursor to ask from next. A value not measurable is None.
        A `hold ... until` condition takes every update in turn (condition.ConditionTracker)."""
        ...

    # ----- records ---------------------------------------------------------------------------
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Record an event on the run clock (run file, event stream, log)."""
        ...
