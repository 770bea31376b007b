"""Which imaging state each frame was taken in, decided by event time.

The microscope is driven by the daemon; frames come from the detector through the ingest.
They reach the ingest and the live analysis on different channels, so on a busy PC a frame
taken after a mode switch can arrive before the switch is known. A frame is therefore never
judged by what is known when it arrives, but by its own time against the timeline of states,
and only once the timeline is known to be complete past the frame's exposure: the daemon
sends a *watermark* W, meaning "every switch that began at or before run time W has been
announced to you" (a stream processor's watermark). A frame whose exposure ends at or before
W is decidable; a later one waits.

The daemon holds the watermark at a switch's start while the switch is under way (it cannot
know the new state before the microscope reports it), announces the state once the switch is
done, then lets the watermark move on. Its announcements and watermarks leave through one
ordered channel per consumer, under one lock, so no watermark can overtake the switch it
covers (service side: service/imaging_announcer.py). A channel may still drop a message when its
queue is full; each watermark therefore says how many states were announced so far in the run.
A timeline that has fewer knows one was lost after its previous watermark, and from there on
until the next state it receives its frames have no state (never a guess).

Pure: no I/O, no clock. Used by the live analysis (which frames to sum in which mode) and the
ingest (each frame's mode, pixel size and dose rate in the run file).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

UNKNOWN_MODE = "unknown"  # the microscope did not report its state after a switch


@dataclass(frozen=True)
class ImagingState:
    """What frames show from `start` on; the switch to it took from `start` to `end`."""

    start: float  # run s the change was commanded (-inf: the state at run start)
    end: float  # run s it was done (-inf: at run start)
    mode: str  # "hrtem", "lm", or UNKNOWN_MODE
    pixel_size_m: float  # NaN when unknown
    dose_rate_e_per_a2_s: float  # at the specimen: 0 while the beam is blanked; NaN unknown
    # Where the field is on the specimen (stage + image shift, nm; NaN when unknown): the
    # region its dose goes to (analysis/dose.py).
    field_x_nm: float = math.nan
    field_y_nm: float = math.nan

    def to_message(self) -> dict[str, Any]:
        """JSON-safe (-inf as -1e300, NaN as None)."""
        return {
            "start": _finite(self.start),
            "end": _finite(self.end),
            "mode": self.mode,
            "pixel_size_m": None if math.isnan(self.pixel_size_m) else self.pixel_size_m,
            "dose_rate_e_per_a2_s": None
            if math.isnan(self.dose_rate_e_per_a2_s)
            else self.dose_rate_e_per_a2_s,
            "field_center_nm": None
            if math.isnan(self.field_x_nm) or math.isnan(self.field_y_nm)
            else [self.field_x_nm, self.field_y_nm],
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ImagingState:
        """The inverse of to_message (ValueError/KeyError/TypeError on a malformed one)."""
        start, end = _time(message["start"]), _time(message["end"])
        if end < start:
            raise ValueError(f"imaging switch ends ({end}) before it starts ({start})")
        pixel = message.get("pixel_size_m")
        dose = message.get("dose_rate_e_per_a2_s")
        field = message.get("field_center_nm") or (math.nan, math.nan)
        state = cls(
            start=start,
            end=end,
            mode=str(message["mode"]),
            pixel_size_m=math.nan if pixel is None else float(pixel),
            dose_rate_e_per_a2_s=math.nan if dose is None else float(dose),
            field_x_nm=float(field[0]),
            field_y_nm=float(field[1]),
        )
        if not (math.isnan(state.pixel_size_m) or state.pixel_size_m > 0):
            raise ValueError(f"pixel size {state.pixel_size_m} m is not positive")
        return state

    @property
    def known(self) -> bool:
        return self.mode != UNKNOWN_MODE and self.pixel_size_m > 0


def _finite(t: float) -> float:
    return -1e300 if t == -math.inf else t


def _time(value: Any) -> float:
    t = float(value)
    return -math.inf if t <= -1e300 else t


class Verdict(Enum):
    """Why a frame has no usable state (beside an ImagingState)."""

    NOT_YET = "not_yet"  # the timeline is not known past the frame's exposure: ask again
    SETTLING = "settling"  # its exposure overlaps a switch or the settling after it
    NO_STATE = "no_state"  # before any known state, or the microscope's state unknown


class ImagingTimeline:
    """The imaging states of one run, in start order, and the watermark.

    `settling_s`: after a switch ends the microscope settles for this long (a frame period is
    the default the analysis uses: the frame that straddles the end is half in the old state).
    """

    def __init__(self, keep: int = 256) -> None:
        self._states: list[ImagingState] = []
        self._starts: list[float] = []
        self._keep = keep
        self.watermark = -math.inf
        self.received = 0  # states added since clear()
        self.lost = 0  # states announced but never received (a dropped message)

    def clear(self) -> None:
        self._states.clear()
        self._starts.clear()
        self.watermark = -math.inf
        self.received = 0
        self.lost = 0

    def add(self, state: ImagingState, seq: int | None = None) -> None:
        """A switch was done (or the state at run start), the `seq`-th announced in the run
        (1 first; None: not checked). States before it that never came: unknown from where
        they may have begun (`_lose`)."""
        if seq is not None and seq > self.received + self.lost + 1:
            self._lose(seq - 1 - self.received - self.lost)
        self.received += 1
        self._insert(state)

    def _lose(self, count: int) -> None:
        """`count` announced states never came. They began after the watermark so far (every
        state begun before it had come then) and after the last state received (states are
        announced in order, on one ordered channel): the state is unknown from there."""
        self.lost += count
        since = max(self.watermark, self._starts[-1] if self._starts else -math.inf)
        self._insert(ImagingState(since, since, UNKNOWN_MODE, math.nan, math.nan))

    def _insert(self, state: ImagingState) -> None:
        index = bisect.bisect_right(self._starts, state.start)
        self._starts.insert(index, state.start)
        self._states.insert(index, state)
        if len(self._states) > self._keep:  # a run's recent switches are all a frame needs
            del self._states[0]
            del self._starts[0]

    def advance(self, watermark: float, announced: int | None = None) -> None:
        """Every switch begun at or before `watermark` has been announced, `announced` states
        in all (None: not checked). Never goes back.

        Fewer received than announced: the missing ones began after the previous watermark
        (all before it had been received then), so from there the state is unknown until the
        next state received.
        """
        if announced is not None and announced > self.received + self.lost:
            self._lose(announced - self.received - self.lost)
        if watermark > self.watermark:
            self.watermark = watermark

    def classify(
        self, frame_time: float, half_exposure_s: float, settling_s: float
    ) -> ImagingState | Verdict:
        """The state of a frame whose exposure is `frame_time` +- `half_exposure_s`.

        SETTLING when the exposure overlaps [start, end + settling_s) of a switch; NOT_YET
        while the watermark has not passed the exposure's end; NO_STATE before the first
        state or after a switch whose result the microscope did not report.
        """
        exposure_start = frame_time - half_exposure_s
        exposure_end = frame_time + half_exposure_s
        if exposure_end > self.watermark:
            return Verdict.NOT_YET
        # The last state that began before the exposure ended covers it (or is switching).
        index = bisect.bisect_left(self._starts, exposure_end) - 1
        if index < 0:
            return Verdict.NO_STATE
        state = self._states[index]
        if exposure_start < state.end + settling_s:
            return Verdict.SETTLING
        return state if state.known else Verdict.NO_STATE

    def at(self, time: float) -> ImagingState | None:
        """The state begun last at or before run time `time` (switching or not); None before
        the first."""
        index = bisect.bisect_right(self._starts, time) - 1
        return self._states[index] if index >= 0 else None

    def exposure(self, start: float, end: float) -> list[tuple[ImagingState, float, float]]:
        """(state, seconds, dose e/A^2) for each state from run time `start` to `end`, in order.

        A state covers [its start, the next's start); while its switch is under way (until
        its `end`) the rate is the higher of the two states' (the beam lit one or the other:
        the dose is not under-counted). A state whose rate is unknown gives NaN. Before the
        first state kept: the first state's. Call for times the watermark has passed.
        """
        pieces: list[tuple[ImagingState, float, float]] = []
        if not self._states or not end > start:
            return pieces
        first = max(0, bisect.bisect_right(self._starts, start) - 1)
        for index in range(first, len(self._states)):
            state = self._states[index]
            if index > first and state.start >= end:
                break
            begin = max(start, state.start) if index > first else start
            stop = self._starts[index + 1] if index + 1 < len(self._states) else math.inf
            stop = min(stop, end)
            if stop <= begin:
                continue
            rate = state.dose_rate_e_per_a2_s
            switching = max(0.0, min(stop, state.end) - begin)
            before = self._states[index - 1].dose_rate_e_per_a2_s if index else rate
            if switching and (math.isnan(rate) or math.isnan(before)):
                dose = math.nan
            else:
                dose = (stop - begin - switching) * rate + switching * max(rate, before)
            pieces.append((state, stop - begin, dose))
        return pieces

    def dose(self, start: float, end: float) -> float:
        """The dose from `start` to `end` (e/A^2; NaN if any part's rate is unknown)."""
        return sum((dose for _, _, dose in self.exposure(start, end)), 0.0)
