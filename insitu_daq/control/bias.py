"""Bias control: the one part of the daemon that must never leave the bias on.

Shape. One I/O thread owns the source-meter (the driver is not thread-safe). Callers never
touch the instrument: they set a *goal* (a level, a rate, output on or off) and wait for the
thread to reach it. Each loop of the thread takes at most one step toward the goal, then one
reading when the sampling grid says so, so readings go on during ramps and the log shows them.
Because the goal is state, not a queue of commands, making the source safe is one assignment
that overrides whatever was going on (a ramp, a hold, a reconnect), and the intent survives an
unreachable instrument: whenever the thread gets the instrument back it pursues the goal from
the level the instrument actually reports.

A second thread delivers samples, events and the trip/lost callbacks, so a slow consumer never
delays a reading, and a callback that calls back in (the runner pausing or aborting, which makes
the bias safe) cannot deadlock the I/O thread.

Rules kept by the I/O thread:
- every level change is at most `limits.ramp_step_volts`, and follows the previous change (or
  the start of the ramp) by at least step / rate run-clock seconds, so the ramp is never faster
  than asked; when the I/O cannot keep up it runs slower; each write with the output on is
  checked against the limits first (limits.SafetyCheck.step, the station's one rule set);
- the output goes on only at 0 V, after the compliance is configured (at every connect);
- a reading in compliance ramps to 0 V at the maximum rate and switches the output off;
- an output found on that should be off is ramped down; an output found off that should be on
  is never switched back on by itself.

Outcomes for a waiting `ramp_to`: it returns once the level is reached. It raises `Stopped` when
its `stop` event is set (the level holds where it is), when `make_safe`/`output_off`/another
ramp supersedes it, and on a compliance trip (after `on_trip` has been called, so the runner is
already paused when it sees Stopped). It raises `StationError` when the instrument is lost for
good (after `on_lost`) or its output went off by itself.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyvisa.errors import Error as VisaError

from insitu_daq.control import staircase
from insitu_daq.control.instruments import SourceMeter
from insitu_daq.control.instruments.factory import open_source_meter
from insitu_daq.control.limits import LimitError, SafetyCheck
from insitu_daq.control.retry import backoff_delays, call_with_retries
from insitu_daq.control.station import StationError, Stopped
from insitu_daq.core.clock import RunClock
from insitu_daq.core.config import StationConfig
from insitu_daq.core.records import BIAS_SAMPLE_DTYPE, STATUS_LEVEL_CHANGE, Event, EventKind
from insitu_daq.drivers.sourcemeter import Identity, OutputOffError, Reading, SourceMeterError

log = logging.getLogger(__name__)

# What a driver call raises when the instrument or the link fails. ValueError: a garbled reply
# (a reply meant for another query) means a desynchronised link, which a reconnect fixes.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    SourceMeterError,
    VisaError,
    OSError,
    ValueError,
)
DELIVER_EVERY_S = 0.05  # samples reach on_samples within this (plus a reading)
WAIT_POLL_S = 0.02  # how often a waiting caller looks at its stop event
IDLE_WAKE_S = 0.05  # the I/O thread never sleeps longer (a slow sampling rate still delivers)
NOT_MEASURED = math.nan  # current of a sample taken with the output off


@dataclass(frozen=True)
class BiasState:
    """A snapshot of the controller for status, metrics and tests."""

    setpoint: float  # the level the source is programmed to now (V)
    target: float  # the level it is heading for (V)
    output_on: bool
    voltage: float  # last reading (V); 0 with the output off
    current: float  # last reading (A); NaN with the output off
    status: int  # last reading's status word; 0 with the output off
    tripped: bool  # a compliance trip since the last ramp_to
    connected: bool
    lost: bool  # retries exhausted; the output is made safe once the instrument answers
    samples_total: int
    trips_total: int
    reconnects_total: int


class _Request:
    """One caller's wait for a goal: finished once, with an error or without."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.error: BaseException | None = None
        self.done = threading.Event()

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@dataclass(frozen=True)
class _Goal:
    """Where the source should be. None means "as it is now" (a hold after a stop)."""

    level: float | None
    rate: float  # V per run-clock second
    output_on: bool | None
    request: _Request
    started: float  # monotonic s: the ramp's first step comes one interval after this


def _is_safe_goal(goal: _Goal) -> bool:
    return goal.level == 0.0 and goal.output_on is False


@dataclass
class _Outage:
    """An instrument that stopped answering, from the first failure until it answers again."""

    gap_start: float  # run-clock time of the last good sample
    reason: str
    delays: Iterator[float]
    next_try: float  # monotonic s
    attempts: int = 1  # the failed call was the first attempt
    gave_up: bool = False


class BiasController:
    """Safe voltage-source control and continuous V/I sampling on a source-meter."""

    def __init__(
        self,
        config: StationConfig,
        clock: RunClock,
        on_samples: Callable[[np.ndarray], None],
        on_event: Callable[[Event], None],
        on_trip: Callable[[str], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
        driver_factory: Callable[[], SourceMeter] | None = None,
    ) -> None:
        self._config = config
        self._limits = config.limits
        self._check = SafetyCheck(config.limits)
        self._clock = clock
        self._on_samples = on_samples
        self._on_event = on_event
        self._on_trip = on_trip
        self._on_lost = on_lost
        self._driver_factory = driver_factory or (lambda: open_source_meter(config.source_meter))
        self._period_s = 1.0 / config.sampling.bias_rate_hz

        self._lock = threading.Lock()  # goal, outage flags and the state snapshot fields
        self._stop_lock = threading.Lock()  # one stop() at a time
        self._wake = threading.Event()  # a new goal or shutdown: the I/O thread looks at once
        self._shutdown = False
        self._shutdown_deadline = 0.0  # monotonic s: give up making it safe after this
        self._stopped = False
        self._io_thread: threading.Thread | None = None
        self._deliveries: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._delivery_thread: threading.Thread | None = None

        # Owned by the I/O thread (and by start() before the thread exists).
        self._driver: SourceMeter | None = None
        self._outage: _Outage | None = None
        self._announce_back_when_safe: _Outage | None = None
        self._last_change = 0.0  # monotonic s of the last level change
        self._next_reading = 0.0  # monotonic s
        self._pending: list[tuple[float, float, float, float, float, int]] = []
        self._pending_since = 0.0
        self._last_sample_time = 0.0  # run clock

        # Read by other threads through `state` (under _lock).
        self._identity: Identity | None = None
        self._goal = _Goal(0.0, self._limits.max_ramp_rate_volts_per_s, False, _Request("off"), 0)
        self._goal.request.finish()
        self._level = 0.0
        self._output_on = False
        self._voltage = 0.0
        self._current = NOT_MEASURED
        self._status = 0
        self._tripped = False
        self._lost = False
        self._samples_total = 0
        self._trips_total = 0
        self._reconnects_total = 0

    # ----- public API --------------------------------------------------------------------------
    @property
    def identity(self) -> Identity | None:
        """The instrument's *IDN? (model, serial...) for the run file; None before start()."""
        return self._identity

    @property
    def state(self) -> BiasState:
        with self._lock:
            return BiasState(
                setpoint=self._level,
                target=self._goal.level if self._goal.level is not None else self._level,
                output_on=self._output_on,
                voltage=self._voltage,
                current=self._current,
                status=self._status,
                tripped=self._tripped,
                connected=self._driver is not None,
                lost=self._lost,
                samples_total=self._samples_total,
                trips_total=self._trips_total,
                reconnects_total=self._reconnects_total,
            )

    def start(self) -> None:
        """Connect, configure (compliance first), output off, start sampling.

        An output left on by an earlier session is ramped down before start() returns.
        Raises StationError if the instrument cannot be reached or made safe.
        """
        if self._io_thread is not None:
            raise StationError("bias controller already started")
        try:
            call_with_retries(self._connect, self._config.retry, DRIVER_ERRORS)
        except DRIVER_ERRORS as exc:
            raise StationError(f"source-meter {self._config.source_meter.resource}: {exc}") from exc
        self._delivery_thread = threading.Thread(
            target=self._deliver_loop, name="bias-delivery", daemon=True
        )
        self._delivery_thread.start()
        request = self._set_goal(0.0, None, output_on=False, what="start: output off")
        self._io_thread = threading.Thread(target=self._io_loop, name="bias-io", daemon=True)
        self._io_thread.start()
        if not self._wait_for(request, self._safe_timeout_s()):
            self.stop()
            raise StationError("source-meter could not be switched off at start")
        identity = self._identity
        assert identity is not None
        self._event(EventKind.BIAS, f"source-meter {identity.model} #{identity.serial} ready")

    def check(self, volts: float, rate_volts_per_s: float | None = None) -> None:
        """Raise LimitError naming the limit a ramp to `volts` at that rate would break."""
        self._check.bias(volts, rate_volts_per_s)

    def ramp_to(
        self,
        volts: float,
        rate_volts_per_s: float | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """Ramp to `volts` (switching the output on at 0 V first); returns once there.

        Limits are checked before anything else (LimitError). Stopped / StationError: see the
        module docstring.
        """
        rate = self._check.bias(volts, rate_volts_per_s)
        self._require_running()
        with self._lock:
            if self._lost:
                raise StationError("source-meter unreachable: no ramp until it answers")
            self._tripped = False  # ramping again is the operator's acknowledgement
        self._event(EventKind.BIAS, f"ramp to {volts:g} V at {rate:g} V/s")  # before its steps
        request = self._set_goal(volts, rate, output_on=True, what=f"ramp to {volts:g} V")
        self._wait(request, stop)

    def output_off(self) -> None:
        """Ramp to 0 V at the maximum rate (if not there) and switch the output off."""
        self._require_running()
        request = self._set_goal(0.0, None, output_on=False, what="output off")
        self._wait(request, None)

    def make_safe(self) -> None:
        """0 V at the maximum rate, output off. Any thread, any time, idempotent; never raises.

        If the instrument is unreachable the intent is kept: the I/O thread makes it safe as
        soon as it answers again.
        """
        try:
            with self._lock:
                pending = self._goal
            if _is_safe_goal(pending) and not pending.request.done.is_set():
                # Already on its way to safe (e.g. the runner's make_safe during an abort):
                # wait for that one; superseding it would report a failure that is not one.
                request = pending.request
            else:
                request = self._set_goal(0.0, None, output_on=False, what="make safe")
            io_thread = self._io_thread
            if io_thread is None or not io_thread.is_alive():
                self._make_safe_without_thread()
                return
            if threading.current_thread() is io_thread:
                return  # the loop pursues the goal as soon as this returns
            if not self._wait_for(request, self._safe_timeout_s()):
                log.critical("bias: NOT confirmed safe (instrument unreachable); will retry")
        except BaseException:  # the last line of defence must not throw at its caller
            log.exception("bias: make_safe failed")

    def stop(self) -> None:
        """make_safe, then stop the threads and close the instrument. Idempotent, any thread."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            self.make_safe()
            with self._lock:
                self._shutdown = True
                # The I/O thread keeps pursuing a safe output until this, even when stopping.
                self._shutdown_deadline = time.monotonic() + self._safe_timeout_s()
            self._wake.set()
            _join(self._io_thread)  # it delivers its last samples and closes the instrument
            self._close_driver()  # in case the I/O thread never ran
            self._deliveries.put(None)  # after everything the I/O thread queued
            _join(self._delivery_thread)
            if self._output_on:
                log.critical("bias: stopped with the output possibly ON at %.4g V", self._level)

    # ----- callers' side -----------------------------------------------------------------------
    def _require_running(self) -> None:
        if self._io_thread is None or self._shutdown:
            raise StationError("bias controller is not running")

    def _set_goal(
        self, level: float | None, rate: float | None, output_on: bool | None, what: str
    ) -> _Request:
        """Replace the goal; a caller waiting for the old one gets Stopped."""
        request = _Request(what)
        with self._lock:
            old = self._goal.request
            self._goal = _Goal(
                level,
                rate or self._limits.max_ramp_rate_volts_per_s,
                output_on,
                request,
                time.monotonic(),
            )
        old.finish(Stopped(f"{old.what}: superseded by {what}"))
        self._wake.set()
        return request

    def _wait(self, request: _Request, stop: threading.Event | None) -> None:
        while not request.done.wait(WAIT_POLL_S):
            if stop is not None and stop.is_set():
                with self._lock:
                    if self._goal.request is request:  # still ours: hold where we are
                        hold = _Request("hold")
                        hold.finish()
                        self._goal = _Goal(None, self._goal.rate, None, hold, time.monotonic())
                        request.finish(Stopped(f"{request.what}: stopped at {self._level:g} V"))
        if request.error is not None:
            raise request.error

    def _wait_for(self, request: _Request, timeout_s: float) -> bool:
        """Wait for a safe-making request; False if it did not happen (lost, timeout)."""
        deadline = time.monotonic() + timeout_s
        while not request.done.wait(WAIT_POLL_S):
            if self._lost or time.monotonic() > deadline:
                return False
        return request.error is None

    def _safe_timeout_s(self) -> float:
        """Generous bound for a ramp to 0 at the max rate, retries included."""
        limits = self._limits
        steps = abs(self._level) / limits.ramp_step_volts + 2
        ramp = self._clock.wall_seconds(abs(self._level) / limits.max_ramp_rate_volts_per_s)
        retry = self._config.retry
        retries = retry.attempts * (retry.max_delay_s + self._config.source_meter.timeout_s)
        return 2 * ramp + steps * 0.02 + retries + 5.0

    def _make_safe_without_thread(self) -> None:
        """No I/O thread (never started, or killed by a bug): ramp down on the driver here."""
        driver = self._driver
        if driver is None:
            return
        try:
            if driver.output_enabled():
                wall_rate = self._limits.max_ramp_rate_volts_per_s / self._clock.wall_seconds(1)
                start = driver.voltage_setpoint()
                step = self._limits.ramp_step_volts
                staircase.ramp(driver.set_voltage, start, 0.0, step, wall_rate, check=self._check)
                driver.output_off()
            driver.set_voltage(0.0)
            with self._lock:
                self._level, self._output_on = 0.0, False
        except DRIVER_ERRORS:
            log.critical("bias: could not make the source-meter safe", exc_info=True)

    # ----- the I/O thread ----------------------------------------------------------------------
    def _io_loop(self) -> None:
        self._next_reading = time.monotonic()
        while True:
            self._wake.clear()
            with self._lock:
                safe = not self._output_on and _is_safe_goal(self._goal)
                if self._shutdown and (safe or time.monotonic() > self._shutdown_deadline):
                    break
            try:
                wake_at = self._try_reconnect() if self._driver is None else self._work()
            except LimitError:  # a ValueError, but no link fault: the refused level was not sent
                log.exception("bias: level write refused by the limits")
                wake_at = time.monotonic() + IDLE_WAKE_S
            except DRIVER_ERRORS as exc:
                self._instrument_failed(exc)
                wake_at = time.monotonic()
            except Exception:  # a bug here must not end bias control
                log.exception("bias: I/O loop error")
                wake_at = time.monotonic() + IDLE_WAKE_S
            self._flush_samples(force=False)
            delay = min(wake_at, time.monotonic() + IDLE_WAKE_S) - time.monotonic()
            if delay > 0:
                self._wake.wait(delay)
        self._flush_samples(force=True)
        self._close_driver()

    def _work(self) -> float:
        """At most one step toward the goal and one reading; returns when to come back."""
        next_step = self._pursue_goal()
        now = time.monotonic()
        if now >= self._next_reading:
            self._take_sample()
            # On the grid; after a stall, the next reading waits one period, not zero.
            self._next_reading = max(self._next_reading + self._period_s, now)
        return min(next_step, self._next_reading)

    def _pursue_goal(self) -> float:
        """Do the next thing toward the goal if it is due; returns when the next one is."""
        driver = self._driver
        assert driver is not None
        with self._lock:
            goal = self._goal
        level = self._level if goal.level is None else goal.level
        output_on = self._output_on if goal.output_on is None else goal.output_on
        now = time.monotonic()

        if output_on and not self._output_on:
            if self._level != 0.0:
                self._set_level(0.0, now)  # output off: the terminals do not see it
            began = time.monotonic_ns()
            driver.output_on()
            self._set_output(True, began)
            self._last_change = now
            self._event(EventKind.BIAS, "output on at 0 V")
            return now
        if self._output_on and self._level != level:
            to = staircase.next_level(self._level, level, self._limits.ramp_step_volts)
            interval = self._clock.wall_seconds(
                staircase.step_interval_s(to - self._level, goal.rate)
            )
            due = max(self._last_change, goal.started) + interval
            if now < due:
                return due
            self._set_level(to, now)
            return now
        if not output_on and self._output_on:  # here the level is 0
            began = time.monotonic_ns()
            driver.output_off()
            self._set_output(False, began)
            self._event(EventKind.BIAS, "output off")
            return now
        if not self._output_on and self._level != 0.0:
            self._set_level(0.0, now)  # a level kept while off would be the next output-on's
            return now
        if not goal.request.done.is_set():
            goal.request.finish()
            self._event(EventKind.BIAS, f"reached {self._level:g} V ({goal.request.what})")
        if self._announce_back_when_safe is not None and not self._output_on:
            outage, self._announce_back_when_safe = self._announce_back_when_safe, None
            with self._lock:
                self._lost = False
            self._announce_back(outage, "output made safe first")
        return now + IDLE_WAKE_S

    def _set_level(self, volts: float, now: float) -> None:
        assert self._driver is not None
        if self._output_on:  # the terminals see this write: one step within the limits
            self._check.step(self._level, volts)
        began = time.monotonic_ns()
        self._driver.set_voltage(volts)
        ended = time.monotonic_ns()
        with self._lock:
            self._level = volts
        if self._output_on:
            self._record_level_change(began, ended, volts)
        # From when the level is surely set: a slow write delays the next step, never hurries it.
        self._last_change = max(now, time.monotonic())

    def _set_output(self, on: bool, began_ns: int | None = None) -> None:
        """The output was switched (by a write that began at `began_ns`)."""
        with self._lock:
            self._output_on = on
        if began_ns is not None:
            self._record_level_change(began_ns, time.monotonic_ns(), self._level if on else 0.0)

    def _record_level_change(self, began_ns: int, ended_ns: int, terminal_volts: float) -> None:
        """Log a change of the commanded terminal level, stamped by the write that made it."""
        half_ns = (ended_ns - began_ns) // 2
        nan = math.nan
        self._queue_row(
            began_ns + half_ns, half_ns, nan, terminal_volts, nan, int(STATUS_LEVEL_CHANGE)
        )

    def _take_sample(self) -> None:
        """One reading into the log; with the output off, an output query keeps the heartbeat."""
        driver = self._driver
        assert driver is not None
        if self._output_on:
            try:
                reading = driver.read()
            except OutputOffError as exc:
                self._output_went_off(f"reading refused: {exc}")
                return
            self._record(
                reading.monotonic_ns, reading.half_width_ns, reading.voltage, reading.current,
                reading.status,
            )  # fmt: skip
            if reading.in_compliance and not self._tripped:
                self._trip(reading)
            return
        began = time.monotonic_ns()
        on = driver.output_enabled()
        half_ns = (time.monotonic_ns() - began) // 2
        self._record(began + half_ns, half_ns, 0.0, NOT_MEASURED, 0)
        if on:  # switched on behind our back (front panel): the goal pursuit ramps it down
            level = driver.voltage_setpoint()
            with self._lock:
                self._level, self._output_on = level, True
            # When it went on is unknown; the log says when we found out.
            self._record_level_change(began, time.monotonic_ns(), level)
            self._event(EventKind.ERROR, f"source-meter output found ON at {level:g} V")

    def _record(
        self, monotonic_ns: int, half_ns: int, volts: float, amperes: float, status: int
    ) -> None:
        self._last_sample_time = self._queue_row(
            monotonic_ns, half_ns, volts, self._level, amperes, status
        )
        with self._lock:
            self._voltage, self._current, self._status = volts, amperes, status
            self._samples_total += 1

    def _queue_row(
        self,
        monotonic_ns: int,
        half_ns: int,
        volts: float,
        setpoint: float,
        amperes: float,
        status: int,
    ) -> float:
        """One BIAS_SAMPLE_DTYPE row, stamped on the run clock, for the next delivery."""
        when = self._clock.from_monotonic_ns(monotonic_ns)
        error = half_ns * 1e-9 * self._clock.time_scale
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append((when, error, volts, setpoint, amperes, status))
        return when

    def _flush_samples(self, force: bool) -> None:
        if self._pending and (force or time.monotonic() - self._pending_since >= DELIVER_EVERY_S):
            batch = np.array(self._pending, dtype=BIAS_SAMPLE_DTYPE)
            self._pending = []
            self._deliver(lambda: self._on_samples(batch))

    # ----- trips and failures (I/O thread) -----------------------------------------------------
    def _trip(self, reading: Reading) -> None:
        reason = (
            f"compliance trip: {reading.current:.3g} A at {reading.voltage:.4g} V"
            f" (setpoint {self._level:g} V, limit {self._limits.compliance_amperes:.3g} A)"
        )
        with self._lock:
            self._tripped = True
            self._trips_total += 1
        # The safe goal first: the next loop steps down whatever the callbacks do.
        old = self._replace_goal_quietly(0.0, output_on=False, what="compliance trip")
        data = {
            "voltage": reading.voltage,
            "current": reading.current,
            "status": reading.status,
            "setpoint": self._level,
            "time": self._last_sample_time,
        }
        self._event(EventKind.TRIP, reason, data, level=logging.ERROR)
        self._notify(self._on_trip, reason, old, Stopped(reason))

    def _output_went_off(self, why: str) -> None:
        """The output is off but should be on: never switch it back on by ourselves."""
        assert self._driver is not None
        began = time.monotonic_ns()
        on = self._driver.output_enabled()
        level = self._driver.voltage_setpoint()
        with self._lock:
            self._output_on, self._level = on, level
        self._record_level_change(began, time.monotonic_ns(), level if on else 0.0)
        reason = f"source-meter output went off by itself ({why})"
        old = self._replace_goal_quietly(0.0, output_on=False, what="output lost")
        self._event(EventKind.INSTRUMENT, reason, level=logging.ERROR)
        self._notify(self._on_lost, reason, old, StationError(reason))

    def _replace_goal_quietly(self, level: float, output_on: bool, what: str) -> _Request:
        """Set a goal without finishing the old request (it is finished after a callback)."""
        with self._lock:
            old = self._goal.request
            request = _Request(what)
            rate = self._limits.max_ramp_rate_volts_per_s
            self._goal = _Goal(level, rate, output_on, request, time.monotonic())
        return old

    def _notify(
        self,
        callback: Callable[[str], None] | None,
        reason: str,
        old: _Request,
        error: BaseException,
    ) -> None:
        """Call back, then fail the waiting ramp, so its caller sees the runner's new state."""

        def deliver() -> None:
            try:
                if callback is not None:
                    callback(reason)
            finally:
                old.finish(error)

        self._deliver(deliver)

    def _instrument_failed(self, exc: BaseException) -> None:
        self._close_driver()
        if self._outage is not None:
            return  # a reconnect that failed again: _try_reconnect counts it
        retry = self._config.retry
        delays = backoff_delays(retry)
        delay = next(delays, None)
        reason = f"{type(exc).__name__}: {exc}"
        self._outage = _Outage(self._last_sample_time, reason, delays, time.monotonic())
        self._event(
            EventKind.INSTRUMENT,
            f"source-meter lost ({reason}); retrying up to {retry.attempts - 1} times",
            {"gap_start": self._last_sample_time},
            level=logging.ERROR,
        )
        if delay is None:
            self._give_up(self._outage)
        else:
            self._outage.next_try += delay

    def _try_reconnect(self) -> float:
        outage = self._outage
        assert outage is not None
        now = time.monotonic()
        if now < outage.next_try:
            return outage.next_try
        try:
            self._connect()
        except DRIVER_ERRORS as exc:
            self._close_driver()
            outage.attempts += 1
            delay = None if outage.gave_up else next(outage.delays, None)
            if delay is None:
                if not outage.gave_up:
                    self._give_up(outage)
                delay = self._config.retry.max_delay_s
                log.debug("bias: source-meter still unreachable: %s", exc)
            else:
                self._event(
                    EventKind.INSTRUMENT,
                    f"source-meter retry {outage.attempts - 1} of"
                    f" {self._config.retry.attempts - 1} failed ({exc}); next in {delay:g} s",
                    level=logging.WARNING,
                )
            outage.next_try = time.monotonic() + delay
            return outage.next_try
        self._outage = None
        with self._lock:
            self._reconnects_total += 1
            goal = self._goal
        if outage.gave_up:
            self._announce_back_when_safe = outage  # the goal is safe: announce once there
        elif goal.output_on and not self._output_on:
            self._announce_back(outage, "but its output is off")
            self._output_went_off("found off after reconnecting")
        else:
            self._announce_back(outage, "resuming")
        return time.monotonic()

    def _give_up(self, outage: _Outage) -> None:
        outage.gave_up = True
        with self._lock:
            self._lost = True
        reason = (
            f"source-meter unreachable after {self._config.retry.attempts} attempts"
            f" ({outage.reason}); will make it safe when it answers"
        )
        old = self._replace_goal_quietly(0.0, output_on=False, what="instrument lost")
        self._event(EventKind.INSTRUMENT, reason, level=logging.CRITICAL)
        self._notify(self._on_lost, reason, old, StationError(reason))

    def _announce_back(self, outage: _Outage, how: str) -> None:
        gap_end = self._clock.now()
        self._event(
            EventKind.INSTRUMENT,
            f"source-meter back ({how}) after {outage.attempts} failed attempts",
            {"setpoint": self._level, "output_on": self._output_on},
        )
        self._event(
            EventKind.INSTRUMENT,
            f"bias log gap: no readings from {outage.gap_start:.3f} s to {gap_end:.3f} s",
            {"gap_start": outage.gap_start, "gap_end": gap_end},
        )

    # ----- connection --------------------------------------------------------------------------
    def _connect(self) -> None:
        """A fresh driver: identify, compliance and measurement set up, present state read."""
        self._close_driver()
        driver = self._driver_factory()
        try:
            identity = driver.identify()
            # Compliance is in the same checked batch as the source setup, before any output-on;
            # re-sent on every connect since a power-cycled 2400 is back at 105 uA.
            driver.configure_voltage_source(
                compliance_amperes=self._limits.compliance_amperes,
                nplc=self._config.source_meter.nplc,
            )
            began = time.monotonic_ns()
            on = driver.output_enabled()
            level = driver.voltage_setpoint()
        except BaseException:
            _close_quietly(driver)
            raise
        self._driver = driver
        with self._lock:
            self._identity = identity
            self._output_on, self._level = on, level
        # The terminal level as found: the origin of the commanded-level log.
        self._record_level_change(began, time.monotonic_ns(), level if on else 0.0)
        if on:
            log.warning("bias: source-meter output is on at %g V", level)

    def _close_driver(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            _close_quietly(driver)

    # ----- records -----------------------------------------------------------------------------
    def _event(
        self,
        kind: str,
        message: str,
        data: dict[str, Any] | None = None,
        level: int = logging.INFO,
    ) -> None:
        log.log(level, "bias: %s", message)
        event = Event(self._clock.now(), kind, message, data)
        self._deliver(lambda: self._on_event(event))

    def _deliver(self, call: Callable[[], None]) -> None:
        self._deliveries.put(call)

    def _deliver_loop(self) -> None:
        while True:
            call = self._deliveries.get()
            if call is None:
                return
            try:
                call()
            except Exception:  # a consumer's bug must not stop the next delivery
                log.exception("bias: delivery failed")


def _join(thread: threading.Thread | None) -> None:
    """Join a thread unless it is the caller (a callback may call stop())."""
    if thread is None or thread is threading.current_thread():
        return
    thread.join(timeout=10.0)
    if thread.is_alive():
        log.error("bias: thread %s did not stop", thread.name)


def _close_quietly(driver: SourceMeter) -> None:
    try:
        driver.close()
    except Exception:  # a dead link may fail to close; nothing is left to do with it
        log.debug("bias: closing the source-meter failed", exc_info=True)
