"""LM/HRTEM interleaving in holds and waits: switches on the step's clock, recorded as events.

Driven against test_runner's `RecordingStation` (the in-memory Station double that logs every
call with its run-clock time); the real station's `set_microscope` is the daemon's, exercised
by the daemon's end-to-end tests. Time scales here are low enough (5-20 run seconds per wall
second) that a switch's run-clock time can be checked to a fraction of a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_runner import PROTOCOLS, Call, RecordingStation, wait_for

from insitu_daq.control.protocol import Acquire, Bias, Hold, Interleave, Microscope, Protocol, Wait
from insitu_daq.control.runner import ProtocolRunner, RunState
from insitu_daq.core.records import EventKind

LM_DOSE, HRTEM_DOSE = 2.0, 35.0


def interleaved(hold: Hold | Wait) -> Protocol:
    return Protocol(
        name="interleaved",
        steps=[
            Microscope(mode="lm", beam=True, dose_rate_e_per_a2_s=LM_DOSE),
            Microscope(mode="hrtem", dose_rate_e_per_a2_s=HRTEM_DOSE),
            Acquire(action="start"),
            Bias(volts=4.3, rate_volts_per_s=1.0),
            hold,
            Acquire(action="stop"),
        ],
    )


def bursts_of(every_s: float, dwell_s: float) -> Interleave:
    return Interleave(mode="lm", every_s=every_s, dwell_s=dwell_s)


def interleave_events(station: RecordingStation) -> list[Call]:
    return [c for c in station.events(EventKind.MICROSCOPE) if c.args[2]["cause"] == "interleave"]


def switches(station: RecordingStation) -> list[tuple[str, float]]:
    """(mode, run seconds since the hold started) of each interleave switch."""
    start = station_step_start(station)
    return [(c.args[2]["mode"], c.time - start) for c in interleave_events(station)]


def station_step_start(station: RecordingStation) -> float:
    (call,) = [
        c
        for c in station.events(EventKind.STEP)
        if c.args[2]["kind"] in ("hold", "wait") and c.args[2]["phase"] == "start"
    ]
    return call.time


@pytest.fixture
def make_runner() -> Iterator[Callable[[RecordingStation], ProtocolRunner]]:
    """Runners aborted and joined at the end of the test (no stray threads)."""
    runners: list[ProtocolRunner] = []

    def make(station: RecordingStation) -> ProtocolRunner:
        runner = ProtocolRunner(station)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.abort("test teardown")
        assert runner.wait(5.0)


def test_bursts_switch_at_the_scheduled_run_clock_times_and_the_hold_keeps_its_duration(
    make_runner: Callable[[RecordingStation], ProtocolRunner],
) -> None:
    station = RecordingStation(time_scale=5.0)
    runner = make_runner(station)
    runner.start(interleaved(Hold(duration_s=12.0, interleave=bursts_of(4.0, 1.0))))
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED

    # Bursts start at 4 and 8 s of the hold and last 1 s; none starts at its 12 s end.
    observed = switches(station)
    assert [mode for mode, _ in observed] == ["lm", "hrtem", "lm", "hrtem"]
    for (_, at), scheduled in zip(observed, (4.0, 5.0, 8.0, 9.0), strict=True):
        assert scheduled <= at < scheduled + 0.5, observed
    # Into LM at the dose rate LM had last, back to HRTEM at its own, through set_microscope.
    calls = station.calls("set_microscope")[2:]
    assert [c.args for c in calls] == [
        ("lm", None, LM_DOSE, None),
        ("hrtem", None, HRTEM_DOSE, None),
    ] * 2
    events = interleave_events(station)
    assert [e.args[2]["burst"] for e in events] == ["start", "end", "start", "end"]
    assert [e.args[2]["previous_mode"] for e in events] == ["hrtem", "lm", "hrtem", "lm"]
    assert all(e.args[2]["step"] == 5 for e in events)
    assert events[0].args[1] == "microscope: mode hrtem -> lm, dose rate 2 e/A^2/s (interleave)"
    # The hold lasted its 12 s of run clock, the interleave did not lengthen it.
    end = station.step_event("hold", "end")
    assert end.args[2]["elapsed_s"] == pytest.approx(12.0, abs=0.5)
    assert end.time - station_step_start(station) == pytest.approx(12.0, abs=0.5)


def test_a_burst_running_when_the_hold_ends_is_cut_short_and_the_mode_restored(
    make_runner: Callable[[RecordingStation], ProtocolRunner],
) -> None:
    station = RecordingStation(time_scale=10.0)
    runner = make_runner(station)
    # Bursts at 4-7 s and 8-11 s; the hold ends at 10 s, inside the second.
    runner.start(interleaved(Hold(duration_s=10.0, interleave=bursts_of(4.0, 3.0))))
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED
    observed = switches(station)
    assert [mode for mode, _ in observed] == ["lm", "hrtem", "lm", "hrtem"]
    assert observed[-1][1] == pytest.approx(10.0, abs=0.5)
    assert observed[-1][1] <= station.step_event("hold", "end").time - station_step_start(station)
    assert station.calls("set_microscope")[-1].args[0] == "hrtem"


def test_hold_until_met_during_a_burst_switches_back_then_ends_on_the_condition(
    make_runner: Callable[[RecordingStation], ProtocolRunner],
) -> None:
    class MeasuresInLm(RecordingStation):
        """Reports rock salt once it has been in LM: the condition comes true mid-burst."""

        def set_microscope(self, mode: str | None = None, *args: Any, **kwargs: Any) -> None:
            super().set_microscope(mode, *args, **kwargs)
            if mode == "lm" and self.calls("start_recording"):
                self.live["rock_salt_fraction"] = 0.95

    station = MeasuresInLm(time_scale=20.0)
    runner = make_runner(station)
    # `for 0 s`: met on the first update (persistence is test_condition.py's; this fake's
    # updates come one per 0.1 s poll, 2 s of this clock, so 2 s would end after the burst).
    hold = Hold(
        duration_s=600.0, until="rock_salt_fraction >= 0.9 for 0 s", interleave=bursts_of(5, 4)
    )
    runner.start(interleaved(hold))
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED
    end = station.step_event("hold", "end")
    assert end.args[2]["ended_by"] == "condition"
    # Met within the first burst (5-9 s), which is cut short: back to HRTEM, then the end.
    assert 5.0 <= end.args[2]["elapsed_s"] < 9.0
    assert [mode for mode, _ in switches(station)] == ["lm", "hrtem"]
    assert interleave_events(station)[-1].args[2]["step_elapsed_s"] < 9.0
    assert station.calls("set_microscope")[-1].args[0] == "hrtem"


def test_pause_in_a_burst_freezes_it_and_resume_finishes_its_dwell(
    make_runner: Callable[[RecordingStation], ProtocolRunner],
) -> None:
    station = RecordingStation(time_scale=20.0)
    runner = make_runner(station)
    runner.start(interleaved(Hold(duration_s=30.0, interleave=bursts_of(10.0, 4.0))))
    wait_for(lambda: len(interleave_events(station)) == 1)
    assert runner.pause("operator looks closer")
    paused_at = station.clock.now()
    calls_at_pause = len(station.calls("set_microscope"))
    time.sleep(0.5)  # 10 s of run clock: longer than the dwell, yet no switch while paused
    assert len(station.calls("set_microscope")) == calls_at_pause
    assert runner.resume()
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED

    events = interleave_events(station)
    assert [e.args[2]["mode"] for e in events] == ["lm", "hrtem", "lm", "hrtem"]
    # On the step's clock the burst still lasted its 4 s, the pause on top in run time.
    first_start, first_end = (e.args[2]["step_elapsed_s"] for e in events[:2])
    assert first_end - first_start == pytest.approx(4.0, abs=0.5)
    assert events[1].time - paused_at >= 10.0
    assert station.step_event("hold", "end").args[2]["elapsed_s"] == pytest.approx(30.0, abs=1.0)


def test_abort_in_a_burst_restores_nothing_and_frees_the_runner(
    make_runner: Callable[[RecordingStation], ProtocolRunner],
) -> None:
    station = RecordingStation(time_scale=20.0)
    runner = make_runner(station)
    runner.start(interleaved(Hold(duration_s=600.0, interleave=bursts_of(5.0, 3.0))))
    wait_for(lambda: len(interleave_events(station)) == 1)
    assert runner.abort("tip slipped")
    assert runner.wait(5.0)
    assert runner.progress.state is RunState.ABORTED
    # Bias safe and recording stopped as for any abort; the microscope is left in LM.
    into_lm = station.log.index(station.calls("set_microscope")[-1])
    assert station.log[into_lm].args[0] == "lm"
    after = [c.name for c in station.log[into_lm + 1 :] if c.name != "event"]
    assert after == ["make_safe", "stop_recording"]
    # The runner is free for the next run.
    runner.start(Protocol(name="next", steps=[Wait(duration_s=1.0)]))
    assert runner.wait(5.0)
    assert runner.progress.state is RunState.FINISHED


def test_progress_and_events_describe_the_interleave(
    make_runner: Callable[[RecordingStation], ProtocolRunner],
) -> None:
    station = RecordingStation(time_scale=20.0)
    runner = make_runner(station)
    gate = threading.Event()
    station.gates["ramp_bias"] = gate
    runner.start(interleaved(Wait(duration_s=600.0, interleave=bursts_of(5.0, 0.5))))
    gate.set()
    wait_for(lambda: runner.progress.step_kind == "wait")
    assert runner.progress.step_description == "wait 600 s, LM bursts of 0.5 s every 5 s"
    start = station.step_event("wait", "start")
    assert start.args[2]["settings"]["interleave"] == {"mode": "lm", "every_s": 5.0, "dwell_s": 0.5}


def test_burst_dose_rate_option_overrides_the_mode_s_last_one(
    make_runner: Callable[[RecordingStation], ProtocolRunner],
) -> None:
    station = RecordingStation(time_scale=20.0)
    runner = make_runner(station)
    every = Interleave(mode="lm", every_s=2.0, dwell_s=0.5, dose_rate_e_per_a2_s=5.0)
    runner.start(interleaved(Wait(duration_s=3.0, interleave=every)))
    assert runner.wait(10.0)
    assert [c.args[:3] for c in station.calls("set_microscope")[2:]] == [
        ("lm", None, 5.0),
        ("hrtem", None, HRTEM_DOSE),
    ]


@pytest.mark.parametrize("name", ["lno_4v3.yaml", "lno_4v3_until_rocksalt.yaml"])
def test_shipped_protocols_look_at_low_mag_in_the_baseline_and_the_hold(name: str) -> None:
    protocol = Protocol.load(PROTOCOLS / name)
    station = RecordingStation(time_scale=1000.0)
    station.live["rock_salt_fraction"] = None  # never measured: the until-hold times out
    runner = ProtocolRunner(station)
    runner.start(protocol)
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED
    kinds = [protocol.steps[e.args[2]["step"] - 1].kind for e in interleave_events(station)]
    assert "wait" in kinds and "hold" in kinds
    # every burst into LM comes back to HRTEM, and recording is in HRTEM when it stops
    modes = [e.args[2]["mode"] for e in interleave_events(station)]
    assert modes == ["lm", "hrtem"] * (len(modes) // 2)


def test_a_slow_microscope_does_not_eat_the_burst(
    make_runner: Callable[[RecordingStation], ProtocolRunner],
) -> None:
    class SlowMicroscope(RecordingStation):
        """Each microscope setting takes 1.5 s of run clock (a busy remote interface)."""

        def set_microscope(self, *args: Any, **kwargs: Any) -> None:
            super().set_microscope(*args, **kwargs)
            if self.calls("start_recording"):
                time.sleep(self.clock.wall_seconds(1.5))

    station = SlowMicroscope(time_scale=10.0)
    runner = make_runner(station)
    runner.start(interleaved(Hold(duration_s=12.0, interleave=bursts_of(4.0, 1.0))))
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED
    events = interleave_events(station)
    calls = station.calls("set_microscope")[2:]
    assert [e.args[2]["mode"] for e in events] == ["lm", "hrtem"] * (len(events) // 2)
    assert len(events) >= 2
    # In LM from the moment the switch completed (its event) to the call back: the full dwell,
    # though the switch itself took longer than the dwell.
    for into_lm, back in zip(events[::2], calls[1::2], strict=False):
        assert back.time - into_lm.time == pytest.approx(1.0, abs=0.4)
    assert station.calls("set_microscope")[-1].args[0] == "hrtem"
