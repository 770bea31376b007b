"""The daemon's side of the holder and the microscope: driver calls with retries and stop events.

Drivers say what the instrument's manual says; this module decides what a protocol step means
in terms of them (an approach is "start, wait while watching the stop event, check contact")
and how to survive an instrument that stops answering (retry with back-off and reconnect,
then fail the step with StationError so the runner makes the bias safe).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from insitu_daq.control.instruments import Holder, Link, Microscope
from insitu_daq.control.instruments.factory import (
    holder_class,
    microscope_class,
    open_holder,
    open_microscope,
)
from insitu_daq.control.instruments.monitor import Stamped, stamped
from insitu_daq.control.retry import call_with_retries
from insitu_daq.control.station import StationError, Stopped
from insitu_daq.core.config import HolderConfig, MicroscopeConfig, RetryConfig
from insitu_daq.drivers.holder import HolderStatus

log = logging.getLogger(__name__)

COARSE_STEP_NM = 100.0  # nominal stick-slip step (HOLDER_PROTOCOL.md)
POLL_S = 0.02


D = TypeVar("D", bound=Link)
T = TypeVar("T")


class _LinkLostError(Exception):
    """The instrument did not answer (timeout, dead line): worth a reconnect and a retry."""


class RetryingLink(Generic[D]):
    """One instrument's driver, opened on first use, reopened and retried when the link fails.

    The driver class says which of its errors are a transport failure (`lost(exc)`: retried
    after a reconnect, with back-off) and which an instrument's refusal (an answer: not
    retried). Either ends as StationError; a link given up on is closed, so the next call
    starts on a fresh one.
    """

    def __init__(
        self,
        name: str,
        driver_class: type[D],
        open_driver: Callable[[], D],
        retry: RetryConfig,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self._open_driver = open_driver
        self._errors = driver_class.ERRORS
        self._lost = driver_class.lost
        self._retry = retry
        self._on_retry = on_retry
        self._driver: D | None = None
        self.lock = threading.RLock()  # one caller at a time: drivers are not thread-safe

    def reconnect(self) -> None:
        with self.lock:
            self.close()
            self._driver = self._open_driver()

    def call(
        self,
        action: Callable[[D], T],
        stop: threading.Event | None = None,
        retry: RetryConfig | None = None,
    ) -> T:
        """`action(driver)`, with the link's retries (or `retry`'s: a monitor probing a lost
        instrument tries once, quietly)."""

        def attempt() -> T:
            if self._driver is None:
                self._driver = self._open_driver()
            try:
                return action(self._driver)
            except Exception as exc:
                if self._lost(exc):
                    raise _LinkLostError(str(exc)) from exc
                raise

        def report(n: int, exc: BaseException) -> None:
            if self._on_retry is not None:
                self._on_retry(f"{self.name}: attempt {n} failed: {exc}")

        with self.lock:
            try:
                return call_with_retries(
                    attempt,
                    retry or self._retry,
                    (_LinkLostError, OSError),
                    self.reconnect,
                    report,
                    stop,
                )
            except (_LinkLostError, OSError) as exc:
                self.close()
                raise StationError(f"{self.name} not answering: {exc}") from exc
            except self._errors as exc:
                raise StationError(f"{self.name}: {exc}") from exc

    @property
    def connected(self) -> bool:
        return self._driver is not None

    def close(self) -> None:
        with self.lock:
            driver, self._driver = self._driver, None
            if driver is not None:
                try:
                    driver.close()
                except Exception:  # a dead line may fail to close; the next one matters
                    log.debug("closing the %s link failed", self.name, exc_info=True)


class HolderControl:
    """Approach and retract with the holder; one caller at a time.

    Every status it reads (a move's polls, the monitor's) is stamped with the exchange's
    monotonic interval and given to the observers (`add_observer`: the holder monitor).
    """

    name = "holder"

    def __init__(
        self,
        config: HolderConfig,
        retry: RetryConfig,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        driver_class = holder_class(config.model)
        self.series: Mapping[str, tuple[str, ...]] = driver_class.SERIES
        self._link: RetryingLink[Holder] = RetryingLink(
            "holder", driver_class, lambda: open_holder(config), retry, on_retry
        )
        self._call = self._link.call
        self._lock = self._link.lock
        self._observers: list[Callable[[Stamped[HolderStatus]], None]] = []

    def add_observer(self, observer: Callable[[Stamped[HolderStatus]], None]) -> None:
        """`observer(stamped_status)` after each status read (in the reading thread)."""
        self._observers.append(observer)

    def _status(
        self, stop: threading.Event | None = None, retry: RetryConfig | None = None
    ) -> HolderStatus:
        reading = self._call(lambda d: stamped(d.status), stop, retry)
        for observer in self._observers:
            try:
                observer(reading)
            except Exception:  # a reading not recorded must not fail a move
                log.exception("holder status observer")
        return reading.value

    def poll(self, stop: threading.Event, retry: RetryConfig | None = None) -> bool:
        """Read the status once if nobody else is talking to the holder (False, nothing read,
        if someone is: a move polls it itself). StationError as any call."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._status(stop, retry)
            return True
        finally:
            self._lock.release()

    def connect(self) -> str:
        """Open the line and identify the controller; returns its identity."""
        self._link.reconnect()
        return self._call(lambda d: d.identify())

    def status(self) -> HolderStatus:
        with self._lock:
            return self._status()

    def set_bias_routing(self, routing: str) -> None:
        with self._lock:
            self._call(lambda d: d.set_bias_routing(routing))

    def call(self, action: Callable[[Holder], T], stop: threading.Event | None = None) -> T:
        """`action(driver)` through the retrying link, one caller at a time: the verbs a holder
        type has beyond the ones above (a heating holder's temperature), for its step kinds."""
        with self._lock:
            return self._call(action, stop)

    def approach(self, speed_nm_s: float, max_travel_nm: float, stop: threading.Event) -> float:
        """Approach until contact; returns the travel in nm. Stopped / StationError."""
        with self._lock:
            start = self._status()
            if start.contact:
                return 0.0
            self._call(lambda d: d.approach(speed_nm_s, max_travel_nm))
            try:
                end = self._wait_idle(stop)
            except Stopped:
                # Say how far it got, so a resumed approach drives only the travel left.
                now = self._status()
                moved = now.position_nm - start.position_nm
                raise Stopped("approach interrupted", moved_nm=moved) from None
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
            status = self._status()
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
            status = self._status()
            if not status.moving:
                return status
            if stop.wait(POLL_S):
                self._call(lambda d: d.stop())
                raise Stopped("holder move interrupted")

    def halt(self) -> None:
        """Stop any motion; never raises (used when making the station safe)."""
        try:
            if self._link.connected:  # a holder given up on is not asked again here
                self._call(lambda d: d.stop())
        except Exception:
            log.exception("holder: stop failed")

    def close(self) -> None:
        self._link.close()


class MicroscopeControl:
    """Beam, imaging mode, pixel size and dose rate through the microscope interface."""

    def __init__(
        self,
        config: MicroscopeConfig,
        retry: RetryConfig,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._link: RetryingLink[Microscope] = RetryingLink(
            "microscope",
            microscope_class(config.model),
            lambda: open_microscope(config),
            retry,
            on_retry,
        )
        self._call = self._link.call

    def connect(self) -> str:
        return self._call(lambda d: d.identify())

    def state(self) -> Any:
        return self._call(lambda d: d.state())

    def illumination(self) -> Any:
        """Beam current at the specimen and illuminated area (drivers/microscope.py)."""
        return self._call(lambda d: d.illumination())

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
        self._link.close()
