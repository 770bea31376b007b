"""An instrument's readings as run-file time series, and its loss noticed while nobody moves it.

The instrument's control says what it reports (`series`: series name -> the attributes of a
reading giving that series' columns; for a holder, its driver's SERIES), and this module turns
every reading the control takes into rows for them (checked against runfile/layout.py by the
daemon, which may import it: service/sinks.py `series_logs`): a thread reads it every `period_s`
when nothing else has, and the control hands over the readings its own moves take (an approach
polls the holder at 50 Hz), so the monitor never interleaves an exchange with them and a move is
recorded as finely as it is watched.

Each row is stamped on the open run's clock at the midpoint of the exchange, with its
half-width (kept in `time_errors` where the series' log has them, as the bias readings). Rows are
published only while a run is open (`run_clock()` is not None); between runs readings only keep the
watch.

An instrument that stops answering is retried by its link ([retry], an `instrument` event per
attempt); when the link gives up, `on_state(False, reason)` once; it is then probed once per
period, one quiet attempt each, and `on_state(True, message)` when it answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from insitu_daq.control.station import StationError
from insitu_daq.core.clock import RunClock
from insitu_daq.core.config import RetryConfig

log = logging.getLogger(__name__)

R = TypeVar("R")

# A lost instrument is probed with one attempt: its link's retries would report every one.
ONE_ATTEMPT = RetryConfig(attempts=1)


@dataclass(frozen=True)
class Stamped(Generic[R]):
    """A reading and the monotonic interval of the exchange that took it."""

    value: R
    began_ns: int
    ended_ns: int


def stamped(read: Callable[[], R]) -> Stamped[R]:
    began = time.monotonic_ns()
    value = read()
    return Stamped(value, began, time.monotonic_ns())


class Polled(Protocol):
    """What the monitor needs of an instrument's control (HolderControl is one)."""

    name: str
    series: Mapping[str, tuple[str, ...]]

    def add_observer(self, observer: Callable[[Stamped[Any]], None]) -> None: ...

    def poll(self, stop: threading.Event, retry: RetryConfig | None = None) -> bool: ...


class InstrumentMonitor:
    """Polls one instrument's control and publishes its readings as run-file series rows."""

    def __init__(
        self,
        control: Polled,
        period_s: float,
        run_clock: Callable[[], RunClock | None],
        publish: Callable[[str, list[tuple[Any, ...]]], None],
        on_state: Callable[[bool, str], None],
    ) -> None:
        """`run_clock()`: the open run's clock, None between runs; `publish(series, rows)`:
        rows (time, time half-width, *columns) on that clock (the run-file subscriber keeps
        the half-width where the series' log has `time_errors`: service/sinks.py);
        `on_state(answering, message)` when the instrument stops answering and when it answers
        again."""
        self._control = control
        self._period_s = period_s
        self._run_clock = run_clock
        self._publish = publish
        self._on_state = on_state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._answering = True
        self._last_read_ns = time.monotonic_ns()  # the control answered when it connected
        self.readings_total = 0
        self.polls_failed_total = 0
        control.add_observer(self._observe)

    @property
    def answering(self) -> bool:
        return self._answering

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"{self._control.name}-monitor", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling; idempotent, never raises. Waits at most `timeout_s` for an exchange in
        flight (the link's timeout); retries and probes end at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("%s monitor still in an exchange; left to end", self._control.name)

    # ----- the watch -----------------------------------------------------------------------------
    def _run(self) -> None:
        period_ns = int(self._period_s * 1e9)
        while not self._stop.is_set():
            # Due one period after the last reading, whoever took it.
            wait_ns = self._last_read_ns + period_ns - time.monotonic_ns()
            if wait_ns > 0:
                self._stop.wait(wait_ns * 1e-9)
                continue
            try:
                answered = self._control.poll(self._stop, None if self._answering else ONE_ATTEMPT)
            except StationError as exc:
                self.polls_failed_total += 1
                self._last_read_ns = time.monotonic_ns()  # next probe one period from now
                self._lost(str(exc))
                continue
            except Exception:  # the watch must go on: log, count, try again next period
                self.polls_failed_total += 1
                self._last_read_ns = time.monotonic_ns()
                log.exception("%s monitor poll", self._control.name)
                continue
            if not answered:  # someone else is talking to it (a move): they read it
                self._stop.wait(self._period_s)

    def _lost(self, reason: str) -> None:
        with self._state_lock:
            if not self._answering or self._stop.is_set():
                log.debug("%s still not answering: %s", self._control.name, reason)
                return
            self._answering = False
        log.warning("%s; probing it every %g s", reason, self._period_s)
        self._report(False, reason)

    def _observe(self, reading: Stamped[Any]) -> None:
        """A reading taken by anyone (in their thread): rows for the open run, the watch reset."""
        self._last_read_ns = reading.ended_ns
        self.readings_total += 1
        with self._state_lock:
            back, self._answering = not self._answering, True
        if back:
            self._report(True, f"{self._control.name} answering again")
        clock = self._run_clock()
        if clock is None:
            return
        half_ns = (reading.ended_ns - reading.began_ns) // 2
        when = clock.from_monotonic_ns(reading.began_ns + half_ns)
        half_width = half_ns * 1e-9 * clock.time_scale
        for record, attributes in self._control.series.items():
            values = tuple(getattr(reading.value, name) for name in attributes)
            self._publish(record, [(when, half_width, *values)])

    def _report(self, answering: bool, message: str) -> None:
        try:
            self._on_state(answering, message)
        except Exception:
            log.exception("%s monitor state callback", self._control.name)
