"""The Station the protocol runner drives (control/station.py), over the daemon's parts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from insitu_daq.control.conditions import LiveUpdate

T = TypeVar("T")

if TYPE_CHECKING:  # the daemon builds its station: only its type is needed here
    from insitu_daq.service.daemon import Daemon


class DaemonStation:
    """The Station the protocol runner drives, over the daemon's controllers."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.clock = daemon.clock

    def approach(self, speed_nm_s: float, max_travel_nm: float, stop: threading.Event) -> float:
        return self._daemon.holder.approach(speed_nm_s, max_travel_nm, stop)

    def retract(self, distance_nm: float, speed_nm_s: float, stop: threading.Event) -> None:
        self._daemon.holder.retract(distance_nm, speed_nm_s, stop)

    def holder_call(self, action: Callable[[Any], T], stop: threading.Event) -> T:
        return self._daemon.holder.call(action, stop)

    def check_bias(self, volts: float, rate_volts_per_s: float | None) -> None:
        self._daemon.bias.check(volts, rate_volts_per_s)

    def ramp_bias(
        self, volts: float, rate_volts_per_s: float | None, stop: threading.Event
    ) -> None:
        self._daemon.bias.ramp_to(volts, rate_volts_per_s, stop)

    def bias_setpoint(self) -> float:
        return self._daemon.bias.state.setpoint

    def make_safe(self) -> None:
        self._daemon.bias.make_safe()

    def start_recording(self) -> None:
        self._daemon.ingest.start_recording()

    def stop_recording(self) -> None:
        self._daemon.ingest.stop_recording()

    def set_microscope(
        self,
        mode: str | None = None,
        beam: bool | None = None,
        dose_rate_e_per_a2_s: float | None = None,
        pixel_size_nm: float | None = None,
    ) -> None:
        # What frames show changes (the beam too: its dose rate at the specimen, service/dose.py):
        # frames from here on wait until the new state is announced.
        imaging = self._daemon.imaging
        started = imaging.begin_switch()
        try:
            self._daemon.microscope.apply(mode, beam, dose_rate_e_per_a2_s, pixel_size_nm)
        finally:
            ended = imaging.now()
            if started is not None and ended is not None:
                self._daemon.imaging_switched(started, ended)

    def live_updates(self, names: frozenset[str], after: int) -> tuple[int, list[LiveUpdate]]:
        return self._daemon.live_values.updates(names, after)

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._daemon.event(kind, message, data)
