"""The daemon's side of the holder and the microscope: driver calls with retries and stop events.

Drivers say what the instrument's manual says; this module decides what a protocol step means
in terms of them (an approach is "start, wait while watching the stop event, check contact")
and how to survive an instrument that stops answering (retry with back-off and reconnect,
then fail the step with StationError so the runner makes the bias safe).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .config import HolderConfig, MicroscopeConfig, RetryConfig
from .drivers.holder import HolderError, HolderStatus, OpenCellHolder
from .drivers.microscope import MicroscopeError, RemoteMicroscope
from .retry import call_with_retries
from .station import StationError, Stopped

log = logging.getLogger(__name__)

COARSE_STEP_NM = 100.0  # nominal stick-slip step (HOLDER_PROTOCOL.md)
POLL_S = 0.02


class HolderControl:
    """Approach and retract with the open-cell holder; one caller at a time."""

    def __init__(
        self,
        config: HolderConfig,
        retry: RetryConfig,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._retry = retry
        self._on_retry = on_retry
        self._driver: OpenCellHolder | None = None
        self._lock = threading.RLock()

    def connect(self) -> str:
        """Open the line and identify the controller; returns its identity."""
        with self._lock:
            self._reconnect()
            return self._call(lambda d: d.identify())

    def _reconnect(self) -> None:
        if self._driver is not None:
            try:
                self._driver.close()
            except Exception:  # a dead line may fail to close; the new one matters
                log.debug("closing the holder line failed", exc_info=True)
        self._driver = OpenCellHolder(self._config.port, timeout=self._config.timeout_s)

    def _call(self, action: Callable[[OpenCellHolder], Any], stop: threading.Event | None = None):
        def attempt() -> Any:
            if self._driver is None:
                self._reconnect()
            assert self._driver is not None
            try:
                return action(self._driver)
            except HolderError as exc:
                # A refusal (ERR reply, with a code) is an answer; silence or a dead line
                # (no code) is worth a reconnect and a retry.
                if exc.code is None:
                    raise _LineLostError(str(exc)) from exc
                raise

        def report(n: int, exc: BaseException) -> None:
            if self._on_retry is not None:
                self._on_retry(f"holder: attempt {n} failed: {exc}")

        try:
            return call_with_retries(
                attempt, self._retry, (_LineLostError, OSError), self._reconnect, report, stop
            )
        except (_LineLostError, OSError) as exc:
            raise StationError(f"holder not answering: {exc}") from exc
        except HolderError as exc:
            raise StationError(f"holder: {exc}") from exc

    def status(self) -> HolderStatus:
        with self._lock:
            return self._call(lambda d: d.status())

    def set_bias_routing(self, routing: str) -> None:
        with self._lock:
            self._call(lambda d: d.set_bias_routing(routing))

    def approach(self, speed_nm_s: float, max_travel_nm: float, stop: threading.Event) -> float:
        """Approach until contact; returns the travel in nm. Stopped / StationError."""
        with self._lock:
            start = self._call(lambda d: d.status())
            if start.contact:
                return 0.0
            self._call(lambda d: d.approach(speed_nm_s, max_travel_nm))
            end = self._wait_idle(stop)
            travel = end.position_nm - start.position_nm
            if not end.contact:
                raise StationError(
                    f"no contact after {travel:.0f} nm of approach (max {max_travel_nm:.0f} nm)"
                )
            return travel

    def retract(self, distance_nm: float, speed_nm_s: float, stop: threading.Event) -> None:
        """Back off: the fine piezo first (smooth, leaves contact gently), then coarse steps."""
        del speed_nm_s  # the controller's coarse and fine drives run at fixed speeds
        with self._lock:
            status = self._call(lambda d: d.status())
            fine_back = min(distance_nm, max(0.0, status.fine_extension_nm + 1000.0))
            if fine_back > 0:
                self._call(lambda d: d.move_fine(-fine_back))
                self._wait_idle(stop)
            steps = round((distance_nm - fine_back) / COARSE_STEP_NM)
            if steps > 0:
                self._call(lambda d: d.coarse_step(-steps))
                self._wait_idle(stop)

    def _wait_idle(self, stop: threading.Event) -> HolderStatus:
        while True:
            status = self._call(lambda d: d.status())
            if not status.moving:
                return status
            if stop.wait(POLL_S):
                self._call(lambda d: d.stop())
                raise Stopped("holder move interrupted")

    def halt(self) -> None:
        """Stop any motion; never raises (used when making the station safe)."""
        try:
            with self._lock:
                if self._driver is not None:
                    self._driver.stop()
        except Exception:
            log.exception("holder: stop failed")

    def close(self) -> None:
        with self._lock:
            if self._driver is not None:
                self._driver.close()
                self._driver = None


class _LineLostError(Exception):
    """The holder did not answer (timeout or a dead line): worth a reconnect and a retry."""


class MicroscopeControl:
    """Beam, imaging mode, pixel size and dose rate through the microscope interface."""

    def __init__(
        self,
        config: MicroscopeConfig,
        retry: RetryConfig,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._retry = retry
        self._on_retry = on_retry
        self._driver: RemoteMicroscope | None = None
        self._lock = threading.RLock()

    def _reconnect(self) -> None:
        if self._driver is not None:
            self._driver.close()
        self._driver = RemoteMicroscope(
            self._config.host, self._config.port, timeout=self._config.timeout_s
        )

    def _call(self, action: Callable[[RemoteMicroscope], Any]) -> Any:
        def attempt() -> Any:
            if self._driver is None:
                self._reconnect()
            assert self._driver is not None
            return action(self._driver)

        def report(n: int, exc: BaseException) -> None:
            if self._on_retry is not None:
                self._on_retry(f"microscope: attempt {n} failed: {exc}")

        with self._lock:
            try:
                return call_with_retries(
                    attempt, self._retry, (MicroscopeError, OSError), self._reconnect, report
                )
            except (MicroscopeError, OSError) as exc:
                raise StationError(f"microscope: {exc}") from exc

    def connect(self) -> str:
        return self._call(lambda d: d.identify())

    def state(self) -> Any:
        return self._call(lambda d: d.state())

    def apply(
        self,
        mode: str | None = None,
        beam: bool | None = None,
        dose_rate_e_per_a2_s: float | None = None,
        pixel_size_nm: float | None = None,
    ) -> None:
        if mode is not None:
            self._call(lambda d: d.set_mode(mode))
        if pixel_size_nm is not None:
            self._call(lambda d: d.set_pixel_size(pixel_size_nm))
        if dose_rate_e_per_a2_s is not None:
            self._call(lambda d: d.set_dose_rate(dose_rate_e_per_a2_s))
        if beam is True:
            self._call(lambda d: d.unblank_beam())
        elif beam is False:
            self._call(lambda d: d.blank_beam())

    def close(self) -> None:
        with self._lock:
            if self._driver is not None:
                self._driver.close()
                self._driver = None
