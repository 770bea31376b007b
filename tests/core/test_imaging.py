"""Event-time imaging states (core/imaging.py): a frame's state is decided by its own time, however
the daemon's announcements and the frames interleave, are delayed, or are lost.

The daemon's side is the real ImagingAnnouncer (with a recording sink in place of a socket:
its order is the channel's order); the frames' side is every arrival position a frame can have
relative to that ordered stream of messages.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from insitu_daq.core.imaging import ImagingState, ImagingTimeline, Verdict
from insitu_daq.service.imaging_announcer import ImagingAnnouncer, unknown_state

PERIOD = 0.025
HALF = PERIOD / 2
HRTEM = ImagingState(-math.inf, -math.inf, "hrtem", 0.06e-9, 35.0)


def lm(start: float, end: float) -> ImagingState:
    return ImagingState(start, end, "lm", 1.0e-9, 5.0)


def hrtem(start: float, end: float) -> ImagingState:
    return ImagingState(start, end, "hrtem", 0.06e-9, 35.0)


@dataclass
class RecordingSink:
    """Collects what the announcer sends, in the order a socket would carry it."""

    messages: list[tuple]

    def set_imaging(self, state: ImagingState, seq: int) -> None:
        self.messages.append(("state", state, seq))

    def imaging_watermark(self, run_time_s: float, announced: int) -> None:
        self.messages.append(("watermark", run_time_s, announced))


class FakeRunClock:
    """The run clock, stepped by the test (the announcer reads it; no sleeping)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def announced_stream(switches: list[tuple[float, float, ImagingState]], end: float) -> list:
    """The messages a real announcer sends for a run with `switches` (start, end, state), a
    watermark every 10 ms of run time, until `end`."""
    sink = RecordingSink([])
    clock = FakeRunClock()
    announcer = ImagingAnnouncer([sink])
    announcer.open_run(clock, HRTEM)
    pending = list(switches)
    t = 0.0
    while t < end:
        t = round(t + 0.01, 6)
        clock.t = t
        if pending and pending[0][0] <= t:
            start, done, state = pending.pop(0)
            clock.t = start
            announcer.begin_switch()
            for tick in (start + 0.3 * (done - start), start + 0.6 * (done - start)):
                clock.t = tick  # watermarks while the switch is under way stay at its start
                announcer._send_watermark()
            clock.t = done
            announcer.end_switch(state)
            t = done
        else:
            announcer._send_watermark()
    return sink.messages


def truth_for(frame_time: float, switches: list[tuple[float, float, ImagingState]]) -> str:
    """The mode by event time, or "settling" when the exposure overlaps a switch."""
    mode = "hrtem"
    for start, done, state in switches:
        if frame_time + HALF <= start:
            break
        if frame_time - HALF < done + PERIOD:
            return "settling"
        mode = state.mode
    return mode


def consume(messages: list, frames: list[float], arrivals: list[int], drop: set[int]) -> dict:
    """A consumer as the analysis process is: frames held in arrival order and released while
    decidable. `arrivals[i]`: how many daemon messages came before frame i; `drop`: indices of
    daemon messages lost on the way."""
    timeline = ImagingTimeline()
    held: list[float] = []
    verdicts: dict[float, str] = {}

    def release() -> None:
        while held:
            verdict = timeline.classify(held[0], HALF, PERIOD)
            if verdict is Verdict.NOT_YET:
                return
            frame_time = held.pop(0)
            verdicts[frame_time] = verdict.mode if isinstance(verdict, ImagingState) else (
                verdict.value)  # fmt: skip

    next_message = 0
    for frame_time, arrival in zip(frames, arrivals, strict=True):
        while next_message < arrival:
            deliver(timeline, messages[next_message], next_message in drop)
            next_message += 1
            release()
        held.append(frame_time)
        release()
    for index in range(next_message, len(messages)):
        deliver(timeline, messages[index], index in drop)
        release()
    return verdicts


def deliver(timeline: ImagingTimeline, message: tuple, dropped: bool) -> None:
    if dropped:
        return
    if message[0] == "state":
        timeline.add(message[1], message[2])
    else:
        timeline.advance(message[1], message[2])


SWITCHES = [
    (1.0, 1.02, lm(1.0, 1.02)),
    (2.0, 2.03, hrtem(2.0, 2.03)),
    (3.5, 3.51, lm(3.5, 3.51)),
    (4.5, 4.52, hrtem(4.5, 4.52)),
]
FRAMES = [round(i * PERIOD, 6) for i in range(int(5.5 / PERIOD))]


def watermark_index(messages: list, run_time: float) -> int:
    """Index of the first message after which the watermark has passed `run_time`."""
    for index, message in enumerate(messages):
        if message[0] == "watermark" and message[1] >= run_time:
            return index + 1
    return len(messages)


@pytest.mark.parametrize(
    "name",
    ["in_time", "frames_early", "states_late_by_2s", "random_interleaving", "all_frames_first"],
)
def test_every_frame_gets_its_event_time_state_whatever_the_arrival_order(name: str) -> None:
    messages = announced_stream(SWITCHES, 5.6)
    rng = random.Random(7)
    if name == "in_time":  # each frame after the watermark passed it: the quiet PC
        arrivals = [watermark_index(messages, t + HALF) for t in FRAMES]
    elif name == "frames_early":  # each frame before anything about its time is known
        arrivals = [watermark_index(messages, t - 1.0) for t in FRAMES]
    elif name == "states_late_by_2s":  # the daemon 2 s behind the frames (a loaded PC)
        arrivals = [watermark_index(messages, t - 2.0) for t in FRAMES]
    elif name == "random_interleaving":
        arrivals = sorted(rng.randrange(len(messages) + 1) for _ in FRAMES)
    else:
        arrivals = [0] * len(FRAMES)
    verdicts = consume(messages, FRAMES, arrivals, drop=set())
    assert set(verdicts) == set(FRAMES)  # every frame decided once the stream is complete
    wrong = {t: (verdicts[t], truth_for(t, SWITCHES)) for t in FRAMES
             if verdicts[t] != truth_for(t, SWITCHES)}  # fmt: skip
    assert not wrong


def test_the_old_arrival_order_rule_would_have_misattributed_these_frames() -> None:
    """Sanity of the scenario above: deciding on arrival (the state known when the frame
    comes) puts LM frames into HRTEM when the states come late, as seen on a loaded PC."""
    messages = announced_stream(SWITCHES, 5.6)
    arrivals = [watermark_index(messages, t - 2.0) for t in FRAMES]
    timeline = ImagingTimeline()
    misattributed = 0
    next_message = 0
    for frame_time, arrival in zip(FRAMES, arrivals, strict=True):
        for message in messages[next_message:arrival]:
            deliver(timeline, message, dropped=False)
        next_message = arrival
        timeline.advance(math.inf)  # "decide now, with what is known"
        verdict = timeline.classify(frame_time, HALF, PERIOD)
        truth = truth_for(frame_time, SWITCHES)
        if isinstance(verdict, ImagingState) and truth != "settling" and verdict.mode != truth:
            misattributed += 1
    assert misattributed > 40


@pytest.mark.parametrize("seed", range(12))
def test_a_lost_message_never_gives_a_frame_the_wrong_state(seed: int) -> None:
    """Any daemon messages lost (a full queue): frames get their true state, or settling /
    no state, never another mode; frames before the first lost switch keep their state (the
    run-start state, message 0, arrives: a test below loses that too)."""
    messages = announced_stream(SWITCHES, 5.6)
    rng = random.Random(seed)
    states = [i for i, m in enumerate(messages) if m[0] == "state" and m[2] > 1]
    drop = set(rng.sample(states, k=1 + seed % 3))
    drop |= set(rng.sample(range(1, len(messages)), k=20))  # and some watermarks
    arrivals = sorted(rng.randrange(len(messages) + 1) for _ in FRAMES)
    verdicts = consume(messages, FRAMES, arrivals, drop)
    for t in FRAMES:
        verdict, truth = verdicts.get(t, "undecided"), truth_for(t, SWITCHES)
        assert verdict in (truth, "settling", "no_state"), (t, verdict, truth)
    before_first_switch = [t for t in FRAMES if t + HALF <= 1.0]
    assert all(verdicts[t] == "hrtem" for t in before_first_switch)


def test_a_lost_last_state_is_seen_from_the_watermark_count() -> None:
    timeline = ImagingTimeline()
    timeline.add(HRTEM, 1)
    timeline.advance(0.9, 1)
    # state 2 (LM from 1.0) lost; the next watermark says 2 were announced
    timeline.advance(2.0, 2)
    assert timeline.lost == 1
    assert timeline.classify(0.5, HALF, PERIOD).mode == "hrtem"
    assert timeline.classify(1.5, HALF, PERIOD) is Verdict.NO_STATE
    timeline.add(hrtem(2.5, 2.51), 3)  # the next one comes: known again after it settles
    timeline.advance(3.0, 3)
    assert timeline.classify(2.7, HALF, PERIOD).mode == "hrtem"


def test_a_switch_the_microscope_did_not_report_gives_no_state() -> None:
    timeline = ImagingTimeline()
    timeline.add(HRTEM, 1)
    timeline.add(unknown_state(1.0, 1.2), 2)
    timeline.advance(3.0, 2)
    assert timeline.classify(0.5, HALF, PERIOD).mode == "hrtem"
    assert timeline.classify(2.0, HALF, PERIOD) is Verdict.NO_STATE


def test_state_messages_round_trip_through_json_safe_form() -> None:
    for state in (HRTEM, lm(1.0, 1.02), unknown_state(-math.inf, -math.inf)):
        back = ImagingState.from_message(state.to_message())
        assert back.mode == state.mode and back.start == state.start
        assert (back.pixel_size_m == state.pixel_size_m) or (
            math.isnan(back.pixel_size_m) and math.isnan(state.pixel_size_m))  # fmt: skip
    with pytest.raises(ValueError, match="ends"):
        ImagingState.from_message({**lm(2.0, 2.1).to_message(), "end": 1.0})


def test_without_the_run_start_state_frames_have_no_state() -> None:
    messages = announced_stream(SWITCHES, 5.6)
    verdicts = consume(messages, FRAMES, [0] * len(FRAMES), drop={0})
    assert all(verdicts[t] == "no_state" for t in FRAMES if t + HALF <= 1.0)
    assert all(verdicts[t] in ("no_state", "settling", truth_for(t, SWITCHES)) for t in FRAMES)
