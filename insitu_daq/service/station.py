"""The Station the protocol runner drives (control/station.py), over the daemon's parts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from insitu_daq.control.conditions import LiveUpdate
from insitu_daq.core.records import EventKind

T = TypeVar("T")
log = logging.getLogger(__name__)

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

    def check_temperature(self, celsius: float, rate_c_per_s: float | None) -> float:
        return self._daemon.check_temperature(celsius, rate_c_per_s)

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
        self._daemon.make_heater_safe()  # after the bias: never raises either

    def start_recording(self) -> None:
        detector = self._daemon.detector
        if detector is None:  # listen-only: record what the detector streams
            self._daemon.ingest.start_recording()
            return
        # Armed first, so the ingest knows the one series it may take before it can come.
        series = detector.arm()
        try:
            self._daemon.ingest.start_recording(series_id=series.series_id)
            detector.trigger()
        except BaseException:
            # Not recording after all (the step fails with the reason raised): undo both.
            for undo in (self._daemon.ingest.stop_recording, detector.disarm):
                try:
                    undo()
                except Exception:
                    log.exception("undoing a failed start of recording")
            raise
        self._daemon.event(
            EventKind.DETECTOR,
            f"detector armed and triggered: series {series.series_id}, "
            f"{1 / series.frame_time_s:g} frames/s, count time {series.count_time_s:g} s",
            {"series_id": series.series_id, "frame_time_s": series.frame_time_s,
             "count_time_s": series.count_time_s, "nimages": series.nimages},
        )  # fmt: skip

    def stop_recording(self) -> None:
        self._daemon.ingest.stop_recording()
        detector = self._daemon.detector
        series = None if detector is None else detector.disarm()
        if series is not None:
            self._daemon.event(
                EventKind.DETECTOR, f"detector disarmed: series {series.series_id}",
                {"series_id": series.series_id},
            )  # fmt: skip

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
