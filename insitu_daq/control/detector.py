"""Arming the detector for a recording: `[detector] control = "simplon"`.

A station whose detector is under control starts each recording's series itself, over the
detector's DECTRIS SIMPLON REST API (drivers/simplon.py), instead of listening to whatever it
streams. `arm()` brings the detector to `idle` if it is not (initialize from `na`/`error`, a
series left armed by an earlier daemon disarmed), switches its Stream V2 output on, sets the
series up from the station config (frame time 1 / `default_frame_rate_hz`, exposure
`count_time_s` or the frame time less the detector's readout time, up to `series_max_images`
images, `default_compression`, internal trigger "ints") and arms it: the sequence id it
returns is the `series_id` the stream will carry, which the ingest is told so that no other
series' frames are taken. `trigger()` starts the series; in "ints" mode the trigger request
lasts the whole series, so it runs in a thread of its own, and `trigger()` returns once the
detector says `acquire` (or the series is already over). `disarm()` ends the series.

Every failure is a `StationError` with one line naming what the detector refused or that it
did not answer, so the step fails and the runner makes the bias safe as for any failed step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from insitu_daq.control.station import StationError
from insitu_daq.core.config import DetectorConfig
from insitu_daq.drivers.simplon import SimplonDetector, SimplonError

log = logging.getLogger(__name__)

_STATE_POLL_S = 0.02
TRIGGER_MARGIN_S = 60.0  # beyond the longest series, before a trigger request is given up


@dataclass(frozen=True)
class Series:
    """What a detector was armed for."""

    series_id: int
    frame_time_s: float
    count_time_s: float
    nimages: int
    compression: str


class DetectorControl:
    """Configures, arms, triggers and disarms the station's detector (SIMPLON API)."""

    def __init__(
        self,
        config: DetectorConfig,
        detector: SimplonDetector | None = None,
        on_trigger_failed: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.detector = detector or SimplonDetector(config.api_url, config.api_timeout_s)
        self._on_trigger_failed = on_trigger_failed
        self.series: Series | None = None  # armed, until disarm()
        self._trigger_thread: threading.Thread | None = None
        # A trigger request that fails while trigger() waits fails the step; one that fails
        # later (the series running) is reported through on_trigger_failed; none once disarmed.
        self._lock = threading.Lock()
        self._trigger_error: str | None = None
        self._triggered = False

    def arm(self) -> Series:
        """Configure and arm a series; StationError with the detector's reason if refused."""
        config = self.config
        frame_time = 1.0 / config.default_frame_rate_hz
        try:
            state = self.detector.state()
            if state in ("na", "error"):
                self.detector.initialize()
            elif state in ("ready", "acquire"):  # left armed (an earlier daemon): end it
                self.detector.disarm()
            self.detector.enable_stream()
            count_time = config.count_time_s
            if count_time is None:
                count_time = frame_time - self.detector.readout_time()
            self.detector.configure(
                count_time=count_time,
                frame_time=frame_time,
                nimages=config.series_max_images,
                ntrigger=1,
                compression=config.default_compression,
                trigger_mode="ints",
            )
            series_id = self.detector.arm()
        except SimplonError as exc:
            raise StationError(f"arming the detector: {exc}") from None
        self.series = Series(
            series_id, frame_time, count_time, config.series_max_images, config.default_compression
        )
        return self.series

    def trigger(self) -> None:
        """Start the armed series; returns once the detector acquires (StationError if not)."""
        series = self.series
        if series is None:
            raise StationError("triggering the detector: it was not armed")
        with self._lock:
            self._trigger_error, self._triggered = None, False
        timeout = series.nimages * series.frame_time_s + TRIGGER_MARGIN_S
        thread = threading.Thread(
            target=self._trigger, args=(timeout,), name="detector-trigger", daemon=True
        )
        self._trigger_thread = thread
        thread.start()
        deadline = time.monotonic() + self.config.api_timeout_s
        while True:
            thread.join(_STATE_POLL_S)
            try:
                # not alive: the whole series is already over
                acquiring = not thread.is_alive() or self.detector.state() == "acquire"
            except SimplonError as exc:
                raise StationError(f"triggering the detector: {exc}") from None
            with self._lock:
                if self._trigger_error is not None:
                    raise StationError(f"triggering the detector: {self._trigger_error}")
                if acquiring:
                    self._triggered = True
                    return
            if time.monotonic() > deadline:
                raise StationError(
                    f"triggering the detector: not acquiring {self.config.api_timeout_s:g} s "
                    "after the trigger"
                )

    def disarm(self) -> Series | None:
        """End the armed series (the detector sends its `end`) and return it; None if none
        was armed. StationError if the detector refuses or does not answer."""
        series, self.series = self.series, None
        if series is None:
            return None
        with self._lock:
            self._triggered = False  # the trigger request ends now, whatever it answers
        try:
            self.detector.disarm()
        except SimplonError as exc:
            raise StationError(f"disarming the detector: {exc}") from None
        finally:
            thread = self._trigger_thread
            if thread is not None:
                thread.join(self.config.api_timeout_s)  # the trigger request returns now
                self._trigger_thread = None
        return series

    def _trigger(self, timeout_s: float) -> None:
        try:
            self.detector.trigger(timeout_s=timeout_s)
        except SimplonError as exc:
            with self._lock:
                self._trigger_error = str(exc)
                report = self._triggered
            if report:
                log.error("detector trigger: %s", exc)
                if self._on_trigger_failed is not None:
                    self._on_trigger_failed(str(exc))


def detector_control(
    config: DetectorConfig, on_trigger_failed: Callable[[str], None] | None = None
) -> DetectorControl | None:
    """The station's detector control, or None for a listen-only station (control "none")."""
    if config.control == "none":
        return None
    return DetectorControl(config, on_trigger_failed=on_trigger_failed)
