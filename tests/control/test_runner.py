"""The protocol runner's logic: call order, pause/resume, trip recovery, abort, failure, safety.

The runner only talks to the `Station` interface, and its logic is independent of transports,
so these tests drive it against `RecordingStation`, a small in-memory test double that records
every call. The real station (the daemon's controllers over the simulated instruments' real
sockets) is covered by the daemon's end-to-end tests. The double's clock is a real RunClock
with a large time_scale, so a 120 s hold takes 0.12 s of wall time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from insitu_daq.control import runner as runner_module
from insitu_daq.control.conditions import LiveUpdate
from insitu_daq.control.limits import LimitError
from insitu_daq.control.protocol import (
    Acquire,
    Approach,
    Bias,
    Hold,
    Mark,
    Microscope,
    Protocol,
    Wait,
)
from insitu_daq.control.runner import ProtocolRunner, RunnerBusy, RunState
from insitu_daq.control.station import FROM_NOW, StationError, Stopped
from insitu_daq.core.clock import RunClock
from insitu_daq.core.records import Event, EventKind

PROTOCOLS = Path(__file__).resolve().parents[2] / "deploy" / "protocols"
TIME_SCALE = 1000.0
HARDWARE = (
    "approach",
    "retract",
    "ramp_bias",
    "make_safe",
    "start_recording",
    "stop_recording",
    "set_microscope",
)


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Any, ...]
    time: float  # run clock


@dataclass
class RecordingStation:
    """In-memory Station: records calls and events in one ordered log.

    Moves take their run-clock duration (distance / speed, |dV| / rate) unless stopped. A verb
    named in `gates` waits until its gate is set (or its stop event is, then raises Stopped),
    so a test can pause or trip deterministically in the middle of it.
    """

    time_scale: float = TIME_SCALE
    max_bias_volts: float = 5.0
    max_rate_volts_per_s: float = 1.0
    gap_nm: float = 3000.0
    stopped_after_nm: float = 1200.0  # what a stopped approach reports as moved
    clock: RunClock = field(init=False)
    log: list[Call] = field(default_factory=list)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    entered: dict[str, threading.Event] = field(default_factory=dict)
    failures: dict[str, Exception] = field(default_factory=dict)
    live: dict[str, float | None] = field(default_factory=dict)
    setpoint: float = 0.0
    output_on: bool = False
    recording: bool = False

    def __post_init__(self) -> None:
        self.clock = RunClock(self.time_scale)
        self._lock = threading.Lock()

    # ----- bookkeeping ---------------------------------------------------------------------
    def _record(self, name: str, *args: Any) -> None:
        with self._lock:
            self.log.append(Call(name, args, self.clock.now()))
        failure = self.failures.get(name)
        if failure is not None:
            raise failure

    def _entered(self, name: str) -> threading.Event:
        with self._lock:
            return self.entered.setdefault(name, threading.Event())

    def _travel(
        self, name: str, run_seconds: float, stop: threading.Event, moved_nm: float | None = None
    ) -> None:
        self._entered(name).set()
        gate = self.gates.get(name)
        if gate is not None:
            while not gate.is_set():
                if stop.wait(0.002):
                    raise Stopped(f"{name} stopped", moved_nm=moved_nm)
        elif stop.wait(self.clock.wall_seconds(run_seconds)):
            raise Stopped(f"{name} stopped", moved_nm=moved_nm)

    def calls(self, *names: str) -> list[Call]:
        with self._lock:
            return [c for c in self.log if not names or c.name in names]

    def hardware(self) -> list[str]:
        return [c.name for c in self.calls(*HARDWARE)]

    def events(self, kind: str | None = None) -> list[Call]:
        return [c for c in self.calls("event") if kind is None or c.args[0] == kind]

    def step_event(self, kind: str, phase: str) -> Call:
        (call,) = [
            c
            for c in self.events(EventKind.STEP)
            if c.args[2]["kind"] == kind and c.args[2]["phase"] == phase
        ]
        return call

    # ----- the Station verbs -----------------------------------------------------------------
    def approach(self, speed_nm_s: float, max_travel_nm: float, stop: threading.Event) -> float:
        self._record("approach", speed_nm_s, max_travel_nm)
        self._travel("approach", self.gap_nm / speed_nm_s, stop, self.stopped_after_nm)
        return min(self.gap_nm, max_travel_nm)

    def retract(self, distance_nm: float, speed_nm_s: float, stop: threading.Event) -> None:
        self._record("retract", distance_nm, speed_nm_s)
        self._travel("retract", distance_nm / speed_nm_s, stop)

    def check_bias(self, volts: float, rate_volts_per_s: float | None) -> None:
        self._record("check_bias", volts, rate_volts_per_s)
        if abs(volts) > self.max_bias_volts:
            raise LimitError(f"{volts:+g} V beyond the maximum of {self.max_bias_volts:g} V")
        if rate_volts_per_s is not None and rate_volts_per_s > self.max_rate_volts_per_s:
            raise LimitError(f"{rate_volts_per_s:g} V/s beyond the maximum ramp rate")

    def ramp_bias(
        self, volts: float, rate_volts_per_s: float | None, stop: threading.Event
    ) -> None:
        self._record("ramp_bias", volts, rate_volts_per_s)
        rate = rate_volts_per_s or self.max_rate_volts_per_s
        self.output_on = True
        self._travel("ramp_bias", abs(volts - self.setpoint) / rate, stop)
        self.setpoint = volts

    def bias_setpoint(self) -> float:
        return self.setpoint

    def make_safe(self) -> None:
        self._record("make_safe")
        self.setpoint = 0.0
        self.output_on = False

    def start_recording(self) -> None:
        self._record("start_recording")
        self.recording = True

    def stop_recording(self) -> None:
        self._record("stop_recording")
        self.recording = False

    def set_microscope(
        self,
        mode: str | None = None,
        beam: bool | None = None,
        dose_rate_e_per_a2_s: float | None = None,
        pixel_size_nm: float | None = None,
    ) -> None:
        self._record("set_microscope", mode, beam, dose_rate_e_per_a2_s, pixel_size_nm)

    def live_value(self, name: str) -> float | None:
        return self.live.get(name)

    def live_updates(self, names: frozenset[str], after: int) -> tuple[int, list[LiveUpdate]]:
        """One update per call with the values now, stamped now (the fake's event time)."""
        if after == FROM_NOW:
            return 0, []
        return after + 1, [LiveUpdate(self.clock.now(), {n: self.live_value(n) for n in names})]

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._record("event", kind, message, data)


@pytest.fixture
def station() -> RecordingStation:
    return RecordingStation()


@pytest.fixture
def make_runner(station: RecordingStation) -> Iterator[Callable[..., ProtocolRunner]]:
    """Runners that are always aborted and joined at the end of the test (no stray threads)."""
    runners: list[ProtocolRunner] = []

    def make(**kwargs: Any) -> ProtocolRunner:
        runner = ProtocolRunner(station, **kwargs)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.abort("test teardown")
        for gate in station.gates.values():
            gate.set()
        assert runner.wait(5.0)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


def biased_hold(hold_s: float = 600.0) -> Protocol:
    return Protocol(
        name="biased_hold",
        steps=[
            Acquire(action="start"),
            Bias(volts=4.3, rate_volts_per_s=0.5),
            Hold(duration_s=hold_s),
            Bias(volts=0.0, rate_volts_per_s=0.5),
            Acquire(action="stop"),
        ],
    )


def in_hold(runner: ProtocolRunner, after_s: float = 0.0) -> Callable[[], bool]:
    def check() -> bool:
        progress = runner.progress
        return progress.step_kind == "hold" and progress.step_elapsed_s > after_s

    return check


# ----- the reference protocol ------------------------------------------------------------------
def test_reference_protocol_calls_the_station_in_order(station: RecordingStation) -> None:
    protocol = Protocol.load(PROTOCOLS / "lno_4v3.yaml")
    heard: list[Event] = []
    done: list[str] = []
    runner = ProtocolRunner(station, on_event=heard.append)
    runner.start(protocol, on_done=done.append)
    assert runner.wait(10.0)

    assert runner.progress.state is RunState.FINISHED and done == ["finished"]
    # the limits are checked for every bias step before anything else
    assert [c.name for c in station.log[:2]] == ["check_bias", "check_bias"]
    assert [c.args for c in station.calls("check_bias")] == [(4.3, 0.5), (0.0, 0.5)]
    hardware = station.hardware()
    start, stop = hardware.index("start_recording"), hardware.index("stop_recording")
    assert hardware[: start + 1] == [
        "set_microscope",  # lm, beam on
        "approach",
        "set_microscope",  # the LM reference's dose rate
        "start_recording",
    ]
    # while recording: HRTEM, the ramps, and the LM bursts of the hold and the end
    recording = hardware[start + 1 : stop]
    assert [name for name in recording if name != "set_microscope"] == ["ramp_bias", "ramp_bias"]
    bursts = [c for c in station.events(EventKind.MICROSCOPE) if c.args[2]["cause"] == "interleave"]
    assert recording.count("set_microscope") == 1 + len(bursts)
    # At most the 29 + 1 bursts of the protocol, in and out; at this time scale (1 ms of wall
    # time per run second) a burst that started very late can leave the next one out.
    assert 2 * 3 <= len(bursts) <= 2 * (29 + 1)
    assert [c.args[2]["mode"] for c in bursts] == ["lm", "hrtem"] * (len(bursts) // 2)
    assert hardware[stop:] == [
        "stop_recording",
        "set_microscope",  # beam off
        "retract",
        "make_safe",  # the end of every protocol
    ]
    ramps = station.calls("ramp_bias")
    assert [c.args for c in ramps] == [(4.3, 0.5), (0.0, 0.5)]
    # every step starts and finishes, in order, and the marks are where the protocol puts them
    steps = [(c.args[2]["step"], c.args[2]["phase"]) for c in station.events(EventKind.STEP)]
    count = len(protocol.steps)
    assert steps == [(n, phase) for n in range(1, count + 1) for phase in ("start", "end")]
    marks = [c.args[1] for c in station.events(EventKind.MARK)]
    assert marks == [s.text for s in protocol.steps if s.kind == "mark"]
    # the hold lasts 120 s of run clock, between the ramp up and the ramp down
    start, end = station.step_event("hold", "start"), station.step_event("hold", "end")
    assert ramps[0].time < start.time and end.time < ramps[1].time
    assert end.time - start.time >= 120.0
    assert end.args[2]["elapsed_s"] == pytest.approx(120.0, abs=5.0)
    # on_event hears what went to the station, in the same order
    assert [(e.kind, e.message) for e in heard] == [c.args[:2] for c in station.events()]


def test_progress_describes_the_running_step(
    station: RecordingStation, make_runner: Callable[..., ProtocolRunner]
) -> None:
    runner = make_runner()
    runner.start(biased_hold())
    wait_for(in_hold(runner, after_s=10.0))
    progress = runner.progress
    assert progress.state is RunState.RUNNING and progress.active
    assert (progress.step_number, progress.step_count, progress.step_kind) == (3, 5, "hold")
    assert progress.step_description == "hold 600 s"
    assert progress.hold_remaining_s is not None
    assert progress.hold_remaining_s == pytest.approx(600.0 - progress.step_elapsed_s, abs=20.0)
    assert progress.run_elapsed_s >= progress.step_elapsed_s
    assert progress.step_index == 2
    assert progress.to_dict()["state"] == "running"
    assert progress.to_dict()["step_number"] == 3
    with pytest.raises(RunnerBusy):
        runner.start(biased_hold())


# ----- pause and resume ------------------------------------------------------------------------
def test_pause_resume_and_abort_record_who_asked(
    station: RecordingStation, make_runner: Callable[..., ProtocolRunner]
) -> None:
    runner = make_runner()
    runner.start(biased_hold(600.0))
    wait_for(in_hold(runner, after_s=1.0))
    assert runner.pause("refocus", operator="alice")
    assert runner.resume(operator="bob")
    assert runner.abort("drifted", operator="alice")
    assert runner.wait(5.0)
    states = [c.args[2] for c in station.events(EventKind.STATE)]
    asked = [(d["state"], d.get("operator")) for d in states if d.get("operator")]
    assert asked == [("paused", "alice"), ("running", "bob"), ("aborting", "alice")]
    messages = [c.args[1] for c in station.events(EventKind.STATE)]
    assert "paused by alice: refocus" in messages and "resumed by bob" in messages
    assert "aborting by alice: drifted" in messages


def test_pause_freezes_the_hold_timer_and_resume_continues(
    station: RecordingStation, make_runner: Callable[..., ProtocolRunner]
) -> None:
    runner = make_runner()
    runner.start(biased_hold(600.0))
    wait_for(in_hold(runner, after_s=50.0))
    assert runner.pause("operator looks closer")
    frozen = runner.progress
    assert frozen.state is RunState.PAUSED and frozen.reason == "operator looks closer"
    time.sleep(0.2)  # 200 s of run clock pass while paused
    assert runner.progress.step_elapsed_s == frozen.step_elapsed_s
    assert runner.progress.hold_remaining_s == frozen.hold_remaining_s
    assert runner.resume()
    assert runner.wait(5.0)

    assert runner.progress.state is RunState.FINISHED
    start, end = station.step_event("hold", "start"), station.step_event("hold", "end")
    # the hold ran its 600 s, and the pause came on top of them
    assert end.args[2]["elapsed_s"] == pytest.approx(600.0, abs=20.0)
    assert end.time - start.time >= 600.0 + 200.0
    # a plain pause does not touch the bias: still one ramp up, one down
    assert [c.args[0] for c in station.calls("ramp_bias")] == [4.3, 0.0]
    states = [c.args[2]["state"] for c in station.events(EventKind.STATE)]
    assert states == ["running", "paused", "running", "finished"]


def test_compliance_trip_pause_reramps_to_the_setpoint_before_the_hold_continues(
    station: RecordingStation, make_runner: Callable[..., ProtocolRunner]
) -> None:
    runner = make_runner()
    runner.start(biased_hold(600.0))
    wait_for(in_hold(runner, after_s=50.0))
    # What the daemon does on a trip: the bias controller makes the bias safe, then pauses.
    station.make_safe()
    runner.pause("compliance trip")
    held_before = runner.progress.step_elapsed_s
    # Hold the re-ramp in progress to see that the hold clock waits for it.
    station.gates["ramp_bias"] = gate = threading.Event()
    station.entered["ramp_bias"].clear()
    runner.resume()
    assert station.entered["ramp_bias"].wait(5.0)
    time.sleep(0.05)  # 50 s of run clock while re-ramping
    assert runner.progress.state is RunState.RUNNING
    assert runner.progress.step_elapsed_s == held_before
    gate.set()
    assert runner.wait(5.0)

    assert runner.progress.state is RunState.FINISHED
    trip = station.calls("make_safe")[0]
    reramp = station.calls("ramp_bias")[1]
    hold_end = station.step_event("hold", "end")
    assert reramp.args == (4.3, 0.5)
    assert trip.time < reramp.time < hold_end.time
    assert hold_end.args[2]["elapsed_s"] == pytest.approx(600.0, abs=20.0)
    assert [c.args[0] for c in station.calls("ramp_bias")] == [4.3, 4.3, 0.0]


def test_pause_during_a_ramp_reissues_the_ramp_on_resume(
    station: RecordingStation, make_runner: Callable[..., ProtocolRunner]
) -> None:
    station.gates["ramp_bias"] = gate = threading.Event()
    runner = make_runner()
    runner.start(biased_hold(10.0))
    assert station._entered("ramp_bias").wait(5.0)
    runner.pause("check the image")
    wait_for(
        lambda: len(station.calls("ramp_bias")) == 1 and runner.progress.state.value == "paused"
    )
    gate.set()
    runner.resume()
    assert runner.wait(5.0)
    assert runner.progress.state is RunState.FINISHED
    ramps = station.calls("ramp_bias")
    up, down = ramps[:-1], ramps[-1]
    assert [c.args for c in up] == [(4.3, 0.5), (4.3, 0.5)]
    assert down.args == (0.0, 0.5)
    # the hold starts only once the re-issued ramp has reached +4.3 V
    assert up[-1].time < station.step_event("hold", "start").time


def test_pause_during_approach_reissues_it_with_the_remaining_travel(
    station: RecordingStation, make_runner: Callable[..., ProtocolRunner]
) -> None:
    station.gates["approach"] = gate = threading.Event()
    runner = make_runner()
    runner.start(Protocol(name="approach", steps=[Approach(max_travel_nm=5000)]))
    assert station._entered("approach").wait(5.0)
    runner.pause("drift")
    wait_for(lambda: runner.progress.state is RunState.PAUSED)
    gate.set()
    runner.resume()
    assert runner.wait(5.0)
    assert runner.progress.state is RunState.FINISHED
    assert [c.args for c in station.calls("approach")] == [(100.0, 5000.0), (100.0, 3800.0)]
    end = station.step_event("approach", "end")
    assert end.args[2]["travel_nm"] == pytest.approx(1200.0 + 3000.0)


# ----- abort, failure, and the safe end -------------------------------------------------------
@pytest.mark.parametrize("while_paused", [False, True])
def test_abort_makes_the_bias_safe_before_recording_stops(
    station: RecordingStation, make_runner: Callable[..., ProtocolRunner], while_paused: bool
) -> None:
    runner = make_runner()
    runner.start(biased_hold(600.0))
    wait_for(in_hold(runner, after_s=10.0))
    if while_paused:
        runner.pause("look")
    assert runner.abort("sample drifted away")
    assert runner.wait(5.0)

    assert runner.progress.state is RunState.ABORTED
    assert runner.progress.reason == "sample drifted away"
    after_hold = [c.name for c in station.log if c.time >= station.step_event("hold", "start").time]
    hardware = [name for name in after_hold if name in HARDWARE]
    assert hardware == ["make_safe", "stop_recording"]
    assert not station.output_on and not station.recording
    messages = [c.args[1] for c in station.events(EventKind.STATE)]
    assert messages[-1] == "protocol biased_hold aborted: sample drifted away"
    assert not any(
        c.args[2]["kind"] == "hold" and c.args[2]["phase"] == "end"
        for c in station.events(EventKind.STEP)
    )


@pytest.mark.parametrize("while_paused", [False, True])
def test_fail_ends_the_run_failed_with_the_bias_safe_first(
    station: RecordingStation, make_runner: Callable[..., ProtocolRunner], while_paused: bool
) -> None:
    """A failure outside the protocol (the run file stopped taking writes): abort's safe end,
    but the run is `failed` with that reason, and a later abort does not change it."""
    runner = make_runner()
    runner.start(biased_hold(600.0))
    wait_for(in_hold(runner, after_s=10.0))
    if while_paused:
        runner.pause("look")
    assert runner.fail("disk full in /data (ENOSPC)")
    assert not runner.abort("operator")  # the first reason stands
    assert runner.wait(5.0)

    assert runner.progress.state is RunState.FAILED
    assert runner.progress.reason == "disk full in /data (ENOSPC)"
    after_hold = [c.name for c in station.log if c.time >= station.step_event("hold", "start").time]
    assert [name for name in after_hold if name in HARDWARE] == ["make_safe", "stop_recording"]
    assert not station.output_on and not station.recording
    messages = [c.args[1] for c in station.events(EventKind.STATE)]
    assert messages[-1] == "protocol biased_hold failed: disk full in /data (ENOSPC)"
    assert not runner.fail("again")  # nothing running


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (StationError("microscope not answering after 5 attempts"), "StationError"),
        (LimitError("+4.3 V beyond the maximum of 4 V"), "LimitError"),
    ],
)
def test_an_exception_in_a_step_makes_safe_records_it_and_fails(
    station: RecordingStation, failure: Exception, error: str
) -> None:
    # The exception comes from the verb the step calls: set_microscope, or ramp_bias
    # refusing a limit before touching the source.
    verb = "set_microscope" if isinstance(failure, StationError) else "ramp_bias"
    station.failures[verb] = failure
    protocol = Protocol(
        name="failing",
        steps=[
            Acquire(action="start"),
            Bias(volts=1.0) if verb == "set_microscope" else Mark(text="before"),
            Microscope(beam=True) if verb == "set_microscope" else Bias(volts=4.3),
            Hold(duration_s=10),
        ],
    )
    done: list[str] = []
    runner = ProtocolRunner(station)
    runner.start(protocol, on_done=done.append)
    assert runner.wait(5.0)

    assert runner.progress.state is RunState.FAILED and done == ["failed"]
    assert str(failure) in (runner.progress.reason or "")
    tail = [c for c in station.log if c.name in (*HARDWARE, "event")][-5:]
    names = [c.name if c.name != "event" else c.args[0] for c in tail]
    assert names == [verb, "make_safe", EventKind.ERROR, "stop_recording", EventKind.STATE]
    assert tail[2].args[1].startswith(f"step 3 ({protocol.steps[2].kind}): {error}")
    assert station.calls("make_safe") == [tail[1]]  # once
    assert not any(c.args[2]["kind"] == "hold" for c in station.events(EventKind.STEP))


@pytest.mark.parametrize("outcome", ["finished", "aborted", "failed"])
def test_make_safe_ends_every_protocol(
    station: RecordingStation, make_runner: Callable[..., ProtocolRunner], outcome: str
) -> None:
    protocol = Protocol(
        name="short",
        steps=[Bias(volts=2.0), Hold(duration_s=300), Microscope(beam=False), Wait(duration_s=1)],
    )
    if outcome == "failed":
        station.failures["set_microscope"] = StationError("lost")
    runner = make_runner()
    runner.start(protocol)
    if outcome == "aborted":
        wait_for(in_hold(runner))
        runner.abort("stop")
    assert runner.wait(5.0)
    assert runner.progress.state.value == outcome
    assert station.hardware()[-1] == "make_safe"
    assert station.hardware().count("make_safe") == 1
    assert not station.output_on


def test_over_limit_protocol_is_refused_before_any_station_call(
    station: RecordingStation,
) -> None:
    runner = ProtocolRunner(station)
    protocol = Protocol(
        name="too_much",
        steps=[Acquire(action="start"), Bias(volts=4.3), Bias(volts=6.0), Hold(duration_s=1)],
    )
    with pytest.raises(LimitError, match=r"^step 3 \(bias\): \+6 V beyond"):
        runner.start(protocol)
    assert {c.name for c in station.log} == {"check_bias"}
    assert runner.progress.state is RunState.IDLE and not runner.busy
    assert runner.wait(0.0)


def test_a_stopped_nobody_asked_for_fails_the_run(
    station: RecordingStation, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner_module, "STOPPED_GRACE_S", 0.01)
    station.failures["retract"] = Stopped("retract stopped")
    runner = ProtocolRunner(station)
    runner.start(Protocol(name="r", steps=[{"retract": {"distance_nm": 500}}]))
    assert runner.wait(5.0)
    assert runner.progress.state is RunState.FAILED
    assert "without a pause or abort" in (runner.progress.reason or "")


# ----- conditional holds ---------------------------------------------------------------------
def test_hold_until_ends_when_the_live_condition_is_met(
    station: RecordingStation, make_runner: Callable[..., ProtocolRunner]
) -> None:
    station.live["rock_salt_fraction"] = None  # not measurable yet
    runner = make_runner()
    protocol = Protocol(
        name="until",
        steps=[Bias(volts=4.3), Hold(duration_s=3600, until="rock_salt_fraction >= 0.9")],
    )
    runner.start(protocol)
    wait_for(in_hold(runner, after_s=100.0))
    station.live["rock_salt_fraction"] = 0.5
    time.sleep(0.05)
    assert runner.progress.step_kind == "hold"
    station.live["rock_salt_fraction"] = 0.93
    assert runner.wait(5.0)
    end = station.step_event("hold", "end")
    assert end.args[2]["ended_by"] == "condition"
    assert end.args[2]["values"] == {"rock_salt_fraction": 0.93}
    assert end.args[2]["elapsed_s"] < 3600.0
    assert "rock_salt_fraction >= 0.9 for 2 s met after" in end.args[1]


def test_hold_until_times_out_when_nothing_is_measured(station: RecordingStation) -> None:
    runner = ProtocolRunner(station)
    protocol = Protocol(name="until", steps=[Hold(duration_s=100, until="expansion >= 0.25")])
    runner.start(protocol)
    assert runner.wait(5.0)
    assert runner.progress.state is RunState.FINISHED
    end = station.step_event("hold", "end")
    assert end.args[2]["ended_by"] == "timeout"
    assert end.args[2]["elapsed_s"] >= 100.0
