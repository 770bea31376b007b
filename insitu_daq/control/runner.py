"""The protocol runner: executes a Protocol's steps against a Station, one worker thread per run.

What to do lives in the protocol (insitu_daq/control/protocol.py); doing it lives here, and
the runner touches the instruments only through the `Station` verbs
(insitu_daq/control/station.py), so the same runner drives the daemon's real controllers and
the tests' in-memory double. Each step kind's executor lives with its model in
insitu_daq/control/steps/ and is looked up in the registry; it acts through the runner's verbs
(`_StepVerbs`: checkpoint, move, ramp_bias, timed, ...), which keep pause, resume and abort
here, in one place.

Control, callable from any thread at any time:
- `pause(reason)`: the `stop` event of the verb in progress is set, so a move returns with
  `Stopped`; the step's clock freezes (a hold's remaining time stops counting). On `resume()` an
  interrupted bias ramp is re-issued, an approach is re-issued with the remaining travel, and a
  hold continues where it stopped. If the bias is no longer at the last bias step's setpoint
  when the run resumes (the daemon made it safe after a compliance trip, then paused us), the
  runner first ramps back to that setpoint, and only then lets the step's clock run again.
- `abort(reason)`: the verb in progress is stopped, then the bias is made safe FIRST, then
  recording stops, then the state is `aborted`.
- `fail(reason)`: the same, for a failure outside the protocol that makes going on pointless
  (the run file stopped taking writes): the state is `failed`, with `reason`.
Any exception in a step makes the bias safe, records an `error` event, and the run `failed`.
Whatever the outcome (finished, aborted, failed) the run ends with `station.make_safe()` (it is
idempotent) and, if recording is still on, `station.stop_recording()` - in that order, so the
ramp-down is in the run file.

A hold or wait with `interleave` switches the microscope into the burst mode and back on the
step's clock (`_Bursts`), through `station.set_microscope` like a microscope step, and records
each switch as a `microscope` event (as every microscope setting the runner makes): a pause
freezes the schedule with the step's clock, the step ends in the mode it started in, and an
abort leaves the microscope as it is (only the bias matters then).

Durations (hold, wait, elapsed times) are run-clock seconds (`station.clock.now()`), so a
time-scaled simulated station runs a 120 s hold in 120 / time_scale wall seconds.

A verb that returns normally has done its job (ramp_bias is at the level, approach is in
contact); one interrupted by its `stop` event raises `Stopped`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, TypeVar

from insitu_daq.control.conditions import ConditionTracker, Until
from insitu_daq.control.limits import LimitError
from insitu_daq.control.protocol import Interleave, Protocol, ProtocolError, Step
from insitu_daq.control.station import FROM_NOW, Station, StationError, Stopped
from insitu_daq.control.steps import STEPS, StepRefused
from insitu_daq.core.records import Event, EventKind

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often a conditional hold asks the station for live values (wall seconds).
CONDITION_POLL_S = 0.1
# A live value older than this (event time, against the newest update) no longer counts for a
# condition: a stalled analysis must not keep `... and rock_salt_fraction > 0.5` true.
LIVE_MAX_AGE_S = 5.0
# How long a verb's Stopped may precede the pause or abort that explains it (wall seconds).
STOPPED_GRACE_S = 1.0
# The bias is "at the setpoint" within this (V); further off after a pause means re-ramp.
SETPOINT_TOLERANCE_V = 1e-6


class RunState(str, Enum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTING = "aborting"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


ACTIVE_STATES = (RunState.RUNNING, RunState.PAUSED, RunState.ABORTING)


class RunnerBusy(RuntimeError):  # noqa: N818 - reads as the condition it reports
    """A protocol is already running."""


class _Aborted(Exception):  # noqa: N818 - control flow inside the worker
    pass


@dataclass(frozen=True)
class Progress:
    """A snapshot of the run for status displays. Times in run-clock seconds."""

    state: RunState
    protocol: str | None = None
    step_index: int | None = None  # 0-based; see step_number
    step_count: int = 0
    step_kind: str | None = None
    step_description: str | None = None
    step_elapsed_s: float = 0.0  # time the step has run, pauses excluded
    run_elapsed_s: float = 0.0  # since the run started, pauses included
    hold_remaining_s: float | None = None  # hold and wait steps only
    reason: str | None = None  # why paused, aborted or failed

    @property
    def step_number(self) -> int | None:
        """1-based, as operators count and as protocol errors and events name steps."""
        return None if self.step_index is None else self.step_index + 1

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["step_number"] = self.step_number
        return data


def _by(operator: str | None, data: dict[str, Any]) -> dict[str, Any]:
    """An event's data with who asked for it, when someone did."""
    return data if operator is None else {**data, "operator": operator}


def _by_whom(operator: str | None) -> str:
    """ " by alice" for an event's message: the run file's event log keeps only kind and
    message, and who paused or aborted a run belongs in it."""
    return "" if operator is None else f" by {operator}"


@dataclass(frozen=True)
class _BiasTarget:
    volts: float
    rate_volts_per_s: float | None


@dataclass
class _Imaging:
    """What this run's microscope steps have set: the mode, and the dose rate of each mode."""

    mode: str | None = None
    dose_rates: dict[str, float] = field(default_factory=dict)

    def apply(self, mode: str | None, dose_rate_e_per_a2_s: float | None) -> None:
        if mode is not None:
            self.mode = mode
        if dose_rate_e_per_a2_s is not None and self.mode is not None:
            self.dose_rates[self.mode] = dose_rate_e_per_a2_s


class ProtocolRunner:
    """Runs one protocol at a time against `station`.

    `on_event`, if given, is told of every event the runner records (after it went to
    `station.event`, which is the record: do not record it again), e.g. to refresh a status
    display at once. `on_done(state)` of `start` is called last, from the worker thread.
    """

    def __init__(self, station: Station, on_event: Callable[[Event], None] | None = None) -> None:
        self.station = station
        self._on_event = on_event
        self._cond = threading.Condition()
        self._state = RunState.IDLE
        self._reason: str | None = None
        self._abort_state = RunState.ABORTED  # what an abort ends in: aborted, or failed (fail)
        self._protocol: Protocol | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Pause accounting: the step's clock is `_step_active_s` plus the running segment.
        self._pauses = 0  # pause() calls so far; the worker compares it with `_pauses_seen`
        self._pauses_seen = 0
        self._step_index: int | None = None
        self._step_active_s = 0.0
        self._segment_start: float | None = None
        self._timed_duration_s: float | None = None
        self._run_start = 0.0
        self._run_end: float | None = None
        # Worker-only state.
        self._bias_target: _BiasTarget | None = None
        self._in_bias_step = False
        self._recording = False
        self._imaging = _Imaging()
        self.event_errors_total = 0  # on_event listener failures (logged, never stop a run)
        self._verbs = _StepVerbs(self)  # what the steps' executors may do

    # ----- control ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        with self._cond:
            return self._state in ACTIVE_STATES

    def start(self, protocol: Protocol, on_done: Callable[[str], None] | None = None) -> None:
        """Check the protocol against the station, then run it in a worker thread.

        Raises RunnerBusy if a run is active, LimitError if a bias step breaks the station's
        limits (before any instrument is touched: only `check_bias` has been called).
        """
        with self._cond:
            if self._state in ACTIVE_STATES:
                raise RunnerBusy(f"protocol {self._protocol_name()} is {self._state.value}")
            self._preflight(protocol)
            self._protocol = protocol
            self._state = RunState.RUNNING
            self._reason = None
            self._abort_state = RunState.ABORTED
            self._stop = threading.Event()
            self._pauses = self._pauses_seen = 0
            self._step_index = None
            self._step_active_s = 0.0
            self._segment_start = None
            self._timed_duration_s = None
            self._run_start = self.station.clock.now()
            self._run_end = None
            self._bias_target = None
            self._in_bias_step = False
            self._recording = False
            self._imaging = _Imaging()
            self._thread = threading.Thread(
                target=self._run, args=(protocol, on_done), name="protocol-runner", daemon=True
            )
            self._thread.start()

    def _preflight(self, protocol: Protocol) -> None:
        """Each step's check against the station (its limits, what it offers), before any
        instrument is touched; the error names the step."""
        for number, step in enumerate(protocol.steps, 1):
            where = f"step {number} ({step.kind})"
            try:
                STEPS[step.kind].preflight(step, self.station)
            except LimitError as exc:
                raise LimitError(f"{where}: {exc}", exc.field) from None
            except StepRefused as exc:
                raise ProtocolError(
                    f"{where}: {exc.field}: {exc}", number, step.kind, exc.field
                ) from None

    def pause(self, reason: str = "paused", operator: str | None = None) -> bool:
        """Pause the run (from any thread); False if nothing is running. `operator`: who
        asked, recorded in the event."""
        with self._cond:
            if self._state is not RunState.RUNNING:
                return False
            self._freeze_step_clock()
            self._state = RunState.PAUSED
            self._reason = reason
            self._pauses += 1
            self._stop.set()
            self._cond.notify_all()
        self._emit_quietly(
            EventKind.STATE,
            f"paused{_by_whom(operator)}: {reason}",
            _by(operator, {"state": "paused", "reason": reason}),
        )
        return True

    def resume(self, operator: str | None = None) -> bool:
        """Resume a paused run; False if it is not paused."""
        with self._cond:
            if self._state is not RunState.PAUSED:
                return False
            self._state = RunState.RUNNING
            self._reason = None
            self._stop = threading.Event()  # the old one stays set for the interrupted verb
            self._cond.notify_all()
        self._emit_quietly(
            EventKind.STATE, f"resumed{_by_whom(operator)}", _by(operator, {"state": "running"})
        )
        return True

    def abort(self, reason: str = "aborted", operator: str | None = None) -> bool:
        """Abort the run (from any thread); returns at once, `wait()` for the end."""
        return self._abort(reason, RunState.ABORTED, operator)

    def fail(self, reason: str) -> bool:
        """Abort the run because something outside it failed (from any thread): as `abort`,
        but the run ends `failed` with `reason`. False if nothing is running or it is
        already aborting (the first reason stands)."""
        return self._abort(reason, RunState.FAILED)

    def _abort(self, reason: str, final: RunState, operator: str | None = None) -> bool:
        with self._cond:
            if self._state not in (RunState.RUNNING, RunState.PAUSED):
                return False
            self._freeze_step_clock()
            self._state = RunState.ABORTING
            self._abort_state = final
            self._reason = reason
            self._stop.set()
            self._cond.notify_all()
        self._emit_quietly(
            EventKind.STATE,
            f"aborting{_by_whom(operator)}: {reason}",
            _by(operator, {"state": "aborting", "reason": reason, "ends": final.value}),
        )
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; True if it has (or none was started)."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def progress(self) -> Progress:
        with self._cond:
            protocol, index = self._protocol, self._step_index
            now = self.station.clock.now()
            step = protocol.steps[index] if protocol is not None and index is not None else None
            step_elapsed = self._step_elapsed(now) if step is not None else 0.0
            remaining = None
            if step is not None and self._timed_duration_s is not None:
                remaining = max(0.0, self._timed_duration_s - step_elapsed)
            end = self._run_end if self._run_end is not None else now
            return Progress(
                state=self._state,
                protocol=protocol.name if protocol is not None else None,
                step_index=index,
                step_count=len(protocol.steps) if protocol is not None else 0,
                step_kind=step.kind if step is not None else None,
                step_description=step.describe() if step is not None else None,
                step_elapsed_s=step_elapsed,
                run_elapsed_s=end - self._run_start if protocol is not None else 0.0,
                hold_remaining_s=remaining,
                reason=self._reason,
            )

    def _step_time(self) -> float:
        """The step's clock now (pauses excluded)."""
        with self._cond:
            return self._step_elapsed(self.station.clock.now())

    # ----- step clock (callers hold self._cond) ------------------------------------------------
    def _step_elapsed(self, now: float) -> float:
        running = now - self._segment_start if self._segment_start is not None else 0.0
        return self._step_active_s + running

    def _freeze_step_clock(self) -> None:
        if self._segment_start is not None:
            self._step_active_s += self.station.clock.now() - self._segment_start
            self._segment_start = None

    def _protocol_name(self) -> str:
        return self._protocol.name if self._protocol is not None else "?"

    # ----- the worker --------------------------------------------------------------------------
    def _run(self, protocol: Protocol, on_done: Callable[[str], None] | None) -> None:
        final = RunState.FAILED
        safe = False
        count = len(protocol.steps)
        try:
            self._emit(
                EventKind.STATE,
                f"protocol {protocol.name} started ({count} steps)",
                {"state": "running", "protocol": protocol.name, "steps": count},
            )
            for index, step in enumerate(protocol.steps):
                self._run_step(index, count, step)
            final = RunState.FINISHED
        except _Aborted:
            with self._cond:
                final = self._abort_state
        except Exception as exc:
            self._make_safe()  # before anything else, even the record of the error
            safe = True
            log.exception("protocol %s failed", protocol.name)
            with self._cond:
                aborting = self._state is RunState.ABORTING
                abort_state = self._abort_state
                index = self._step_index
            where = (
                f"step {index + 1} ({protocol.steps[index].kind}): " if index is not None else ""
            )
            self._emit_quietly(
                EventKind.ERROR,
                f"{where}{type(exc).__name__}: {exc}",
                {"step": None if index is None else index + 1, "error": type(exc).__name__},
            )
            final = abort_state if aborting else RunState.FAILED
            if not aborting:
                with self._cond:
                    self._reason = f"{where}{exc}"
        finally:
            self._finish(protocol, final, safe, on_done)

    def _finish(
        self,
        protocol: Protocol,
        final: RunState,
        safe: bool,
        on_done: Callable[[str], None] | None,
    ) -> None:
        with self._cond:
            if final is RunState.FINISHED and self._state is RunState.ABORTING:
                final = self._abort_state  # aborted after the last step: still an abort
            self._freeze_step_clock()
        if not safe:
            self._make_safe()
        if self._recording:
            try:
                self.station.stop_recording()
            except Exception:
                log.exception("stop_recording at the end of protocol %s", protocol.name)
            self._recording = False
        with self._cond:
            reason = self._reason
            self._run_end = self.station.clock.now()
        suffix = f": {reason}" if reason and final is not RunState.FINISHED else ""
        self._emit_quietly(
            EventKind.STATE,
            f"protocol {protocol.name} {final.value}{suffix}",
            {"state": final.value, "protocol": protocol.name},
        )
        if on_done is not None:
            try:
                on_done(final.value)
            except Exception:
                log.exception("on_done callback")
        # Last: only now is the runner free for the next protocol.
        with self._cond:
            self._state = final
            self._cond.notify_all()

    def _make_safe(self) -> None:
        try:
            self.station.make_safe()
        except Exception:  # make_safe never raises by contract; log it if it does
            log.exception("make_safe raised")

    def _run_step(self, index: int, count: int, step: Step) -> None:
        with self._cond:
            self._step_index = index
            self._step_active_s = 0.0
            self._segment_start = None
            self._timed_duration_s = step.duration_s if STEPS[step.kind].timed else None
        number = index + 1
        self._emit(
            EventKind.STEP,
            f"step {number}/{count} {step.kind}: {step.describe()}",
            {"step": number, "kind": step.kind, "phase": "start", "settings": step.settings()},
        )
        result = self._execute(step)
        with self._cond:
            elapsed = self._step_elapsed(self.station.clock.now())
        detail = result.pop("summary", "")
        self._emit(
            EventKind.STEP,
            f"step {number}/{count} {step.kind} done{': ' + detail if detail else ''}",
            {"step": number, "kind": step.kind, "phase": "end", "elapsed_s": elapsed, **result},
        )

    def _execute(self, step: Step) -> dict[str, Any]:
        return STEPS[step.kind].execute(self._verbs, step)

    # ----- interruptible execution ---------------------------------------------------------
    def _checkpoint(self) -> threading.Event:
        """Wait out a pause, raise _Aborted on abort, restore the bias after a pause.

        Returns the stop event for the next station call; from here the step's clock runs.
        """
        while True:
            with self._cond:
                while self._state is RunState.PAUSED:
                    self._cond.wait()
                if self._state is RunState.ABORTING:
                    raise _Aborted
                stop = self._stop
                was_paused = self._pauses != self._pauses_seen
                self._pauses_seen = self._pauses
            if was_paused and not self._restore_bias(stop):
                continue  # paused (or aborted) again while re-ramping
            with self._cond:
                if stop.is_set():
                    continue
                if self._segment_start is None:
                    self._segment_start = self.station.clock.now()
            return stop

    def _restore_bias(self, stop: threading.Event) -> bool:
        """After a pause: ramp back to the last bias step's setpoint if the bias left it."""
        target = self._bias_target
        if target is None or self._in_bias_step:
            return True
        setpoint = self.station.bias_setpoint()
        if abs(setpoint - target.volts) <= SETPOINT_TOLERANCE_V:
            return True
        self._emit(
            EventKind.STATE,
            f"re-ramping bias from {setpoint:+.3f} V to {target.volts:+.3f} V after the pause",
            {"from_volts": setpoint, "to_volts": target.volts},
        )
        try:
            self.station.ramp_bias(target.volts, target.rate_volts_per_s, stop)
        except Stopped as exc:
            self._check_stopped(exc, stop)
            return False
        return True

    def _ramp_bias(self, volts: float, rate_volts_per_s: float | None) -> None:
        # The new setpoint from now on; an interrupted ramp is simply re-issued.
        self._bias_target = _BiasTarget(volts, rate_volts_per_s)
        self._in_bias_step = True
        try:
            self._move(lambda stop: self.station.ramp_bias(volts, rate_volts_per_s, stop))
        finally:
            self._in_bias_step = False

    def _set_recording(self, on: bool) -> None:
        if on:
            self.station.start_recording()
        else:
            self.station.stop_recording()
        self._recording = on

    def _move(self, verb: Callable[[threading.Event], T]) -> T:
        """Call a verb that moves something; after a pause call it again, after abort stop."""
        while True:
            stop = self._checkpoint()
            try:
                return verb(stop)
            except Stopped as exc:
                self._check_stopped(exc, stop)

    @staticmethod
    def _check_stopped(exc: Stopped, stop: threading.Event) -> None:
        # The pause that explains a Stopped may arrive just after it (the daemon's trip
        # handler stops the ramp, then pauses us); a Stopped nobody asked for is an error,
        # else the runner would re-issue the verb forever.
        if not stop.wait(STOPPED_GRACE_S):
            raise StationError(f"{exc} without a pause or abort") from exc

    def _timed(
        self, duration_s: float, condition: Until | None, interleave: Interleave | None
    ) -> dict[str, Any]:
        """Hold or wait `duration_s` of step time (frozen while paused), or until `condition`
        has held for its persistence (every live update taken in turn, by event time).

        With `interleave`, the microscope is switched into its mode and back on the step's
        clock; the step ends in the mode it started in (an abort leaves it as it is).
        """
        clock = self.station.clock
        bursts = _Bursts(self, interleave) if interleave is not None else None
        tracker = None if condition is None else ConditionTracker(condition, LIVE_MAX_AGE_S)
        cursor = FROM_NOW  # updates measured from this step on
        while True:
            stop = self._checkpoint()
            if tracker is not None:  # what held before a pause does not count after it
                tracker.reset()
            while not stop.is_set():
                with self._cond:
                    elapsed = self._step_elapsed(clock.now())
                if elapsed >= duration_s:
                    if bursts is not None:
                        bursts.end(elapsed)
                    if condition is None:
                        return {}
                    return {
                        "ended_by": "timeout",
                        "summary": f"{condition} not met within {duration_s:g} s",
                    }
                timeout = clock.wall_seconds(duration_s - elapsed)
                if condition is not None and tracker is not None:
                    cursor, met = self._condition_met(tracker, cursor)
                    if met:
                        if bursts is not None:
                            bursts.end(elapsed)
                        return {
                            "ended_by": "condition",
                            "values": tracker.values(),
                            "summary": f"{condition} met after {elapsed:.1f} s",
                        }
                    timeout = min(timeout, CONDITION_POLL_S)
                if bursts is not None:
                    next_switch = bursts.follow(elapsed)
                    now = self._step_time()  # a switch takes time: wait from after it
                    until = min(next_switch, duration_s)
                    timeout = min(timeout, clock.wall_seconds(max(0.0, until - now)))
                stop.wait(timeout)

    def _set_microscope(
        self,
        cause: str,
        mode: str | None = None,
        beam: bool | None = None,
        dose_rate_e_per_a2_s: float | None = None,
        pixel_size_nm: float | None = None,
        **details: Any,
    ) -> None:
        """Set the microscope through the station, then record it as a `microscope` event.

        Every mode change the runner makes goes through here (microscope steps and interleave
        bursts alike), so the run file and the analysis see each one at its run-clock time.
        """
        self.station.set_microscope(
            mode=mode,
            beam=beam,
            dose_rate_e_per_a2_s=dose_rate_e_per_a2_s,
            pixel_size_nm=pixel_size_nm,
        )
        previous = self._imaging.mode
        self._imaging.apply(mode, dose_rate_e_per_a2_s)
        settings = {
            "mode": mode,
            "beam": beam,
            "dose_rate_e_per_a2_s": dose_rate_e_per_a2_s,
            "pixel_size_nm": pixel_size_nm,
        }
        settings = {key: value for key, value in settings.items() if value is not None}
        parts = []
        if mode is not None:
            change = mode if previous in (None, mode) else f"{previous} -> {mode}"
            parts.append(f"mode {change}")
        if beam is not None:
            parts.append("beam on" if beam else "beam off")
        if dose_rate_e_per_a2_s is not None:
            parts.append(f"dose rate {dose_rate_e_per_a2_s:g} e/A^2/s")
        if pixel_size_nm is not None:
            parts.append(f"pixel size {pixel_size_nm:g} nm")
        with self._cond:
            index = self._step_index
        self._emit(
            EventKind.MICROSCOPE,
            f"microscope: {', '.join(parts)} ({cause})",
            {
                **settings,
                "previous_mode": previous,
                "cause": cause,
                "step": None if index is None else index + 1,
                **details,
            },
        )

    def _condition_met(self, tracker: ConditionTracker, cursor: int) -> tuple[int, bool]:
        """Feed the tracker every live update since `cursor`; the new cursor, and whether the
        condition has held for its persistence."""
        try:
            cursor, updates = self.station.live_updates(tracker.until.quantities, cursor)
        except Exception:
            log.exception("live_updates")
            return cursor, False
        return cursor, any([tracker.update(update) for update in updates])

    # ----- events ----------------------------------------------------------------------------
    def _emit(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Record an event through the station (errors propagate: a run must not go unrecorded)."""
        self.station.event(kind, message, data)
        if self._on_event is not None:
            try:
                self._on_event(Event(self.station.clock.now(), kind, message, data))
            except Exception:
                self.event_errors_total += 1
                log.exception("on_event listener")

    def _emit_quietly(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Record an event where failing to record must not stop what we are doing."""
        try:
            self._emit(kind, message, data)
        except Exception:
            self.event_errors_total += 1
            log.exception("recording event %r", message)


class _Bursts:
    """Drives one hold's (or wait's) interleave on the step's clock (pauses excluded).

    Bursts start on the grid k * every_s (k >= 1), or as soon after as the runner gets to it,
    and last dwell_s from the moment the microscope has switched (a slow remote call must not
    eat the burst). A burst that would start while the previous one still runs (it started
    very late) is left out. After a pause the schedule continues where the clock stopped: a
    burst a pause interrupted goes on for its remaining dwell.
    """

    def __init__(self, runner: ProtocolRunner, interleave: Interleave) -> None:
        imaging = runner._imaging
        if imaging.mode is None:  # the protocol's validation refuses this; a guard only
            raise StationError("interleave: no imaging mode set to return to")
        self._runner = runner
        self._interleave = interleave
        self._home_mode = imaging.mode
        self._home_dose = imaging.dose_rates.get(imaging.mode)
        self._burst_dose = interleave.dose_rate_e_per_a2_s or imaging.dose_rates.get(
            interleave.mode
        )
        self._in_burst = False
        self._burst_end_s = 0.0
        self._next_start_s = interleave.every_s

    def follow(self, elapsed_s: float) -> float:
        """Switch if the schedule says so at step time `elapsed_s`; returns the next switch's
        step time."""
        every = self._interleave.every_s
        if not self._in_burst and elapsed_s >= self._next_start_s:
            switched_at = self._switch(True, elapsed_s)
            self._burst_end_s = switched_at + self._interleave.dwell_s
            self._next_start_s = (math.floor(self._burst_end_s / every) + 1) * every
        elif self._in_burst and elapsed_s >= self._burst_end_s:
            self._switch(False, elapsed_s)
        return self._burst_end_s if self._in_burst else self._next_start_s

    def end(self, elapsed_s: float) -> None:
        """The step is over: back to the mode it started in, if a burst is running."""
        if self._in_burst:
            self._switch(False, elapsed_s)

    def _switch(self, into_burst: bool, elapsed_s: float) -> float:
        """Set the microscope; returns the step time once it is set."""
        interleave = self._interleave
        if into_burst:
            mode, dose = interleave.mode, self._burst_dose
        else:
            mode, dose = self._home_mode, self._home_dose
        self._runner._set_microscope(
            "interleave",
            mode=mode,
            dose_rate_e_per_a2_s=dose,
            burst="start" if into_burst else "end",
            step_elapsed_s=elapsed_s,
        )
        self._in_burst = into_burst
        return self._runner._step_time()


class _StepVerbs:
    """The runner's verbs as a step's executor sees them (steps.StepContext), on the worker
    thread only: the executors in control/steps/ never reach into the runner's state."""

    def __init__(self, runner: ProtocolRunner) -> None:
        self._runner = runner
        self.station: Station = runner.station

    def checkpoint(self) -> threading.Event:
        return self._runner._checkpoint()

    def check_stopped(self, exc: Stopped, stop: threading.Event) -> None:
        self._runner._check_stopped(exc, stop)

    def move(self, verb: Callable[[threading.Event], T]) -> T:
        return self._runner._move(verb)

    def ramp_bias(self, volts: float, rate_volts_per_s: float | None) -> None:
        self._runner._ramp_bias(volts, rate_volts_per_s)

    def timed(
        self, duration_s: float, condition: Until | None, interleave: Interleave | None
    ) -> dict[str, Any]:
        return self._runner._timed(duration_s, condition, interleave)

    def step_time(self) -> float:
        return self._runner._step_time()

    def set_recording(self, on: bool) -> None:
        self._runner._set_recording(on)

    def set_microscope(self, cause: str, **settings: Any) -> None:
        self._runner._set_microscope(cause, **settings)

    def emit(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._runner._emit(kind, message, data)
