"""Order and time the frames of a Stream V2 series before they are written: pure logic, no I/O.

`FrameSequencer` takes decoded messages in arrival order and hands back the images to write,
in `image_id` order, each at most once, so a run file's `image_id` only ever increases and
`frame_time` stays monotonic. A PUSH/PULL stream is ordered, but a detector's own readout
(several DCU threads) can swap neighbouring images, drop one, repeat one, or a previous
series' straggler can arrive late; none of that may stop ingest, and all of it is counted:

- in order: released at once (no latency on a healthy stream);
- out of order: held in a small reorder window (`window_frames` images or `window_s`
  seconds, whichever fills first) until the missing `image_id` arrives, then released in
  order and counted;
- gap: when the window passes over a missing `image_id` the range is reported (an event and
  a count) and the held images go out;
- late: an image whose slot was passed (already reported as part of a gap) is dropped, with
  an event, rather than written out of order;
- duplicate: an `image_id` already released or held is dropped and counted;
- stale series: an image of an older series than the current one is dropped and counted
  (unless that series keeps coming alone for two windows: then the detector restarted its
  numbering, its `start` was missed, and it becomes the current series); once the current
  series has ended, a series not seen before is a new one whatever its series_id (a
  re-armed detector whose `start` was missed);
- no `start` (a receiver connecting mid-series, as in the recorded EIGER2 data): the series
  is taken from its first images, and its first `image_id` from the lowest one seen once the
  window fills;
- a new series (a `start`, or images of a newer `series_id`) ends the current one: its held
  images are released (gaps reported) and the bookkeeping starts afresh;
- an armed series (`expect(series_id)`: the daemon armed the detector and was told the id
  it will stream): only that series is taken; a `start` or image of any other series_id,
  older or newer, is foreign and dropped as stale, never adopted, until `expect(None)`.

`DetectorClockMap` maps a series' detector times (exact `Fraction` seconds since its
`series_date`, on the detector's own clock) onto the run clock. An image can only arrive
after its exposure ended, so (arrival wall time - detector stop time) is the wall time of the
detector's time zero plus a transport delay that is never negative; the lower envelope (the
minimum) over the series is the best estimate of that zero, and it only improves (decreases)
as images arrive. A frame's run time is its exposure midpoint mapped through that estimate.
The uncertainty is half the spread of the few lowest delays (how far the envelope may still
be above the true zero); with a single image there is no spread and half the exposure is
used. What the envelope cannot see is a constant part of the delay (readout, compression);
it is small for a detector on the same network and is not modelled, nor is a drift between
the detector's time base and the wall clock over a series.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from insitu_daq.core.clock import RunClock
from insitu_daq.core.records import EventKind
from insitu_daq.drivers.stream2 import EndMessage, ImageMessage, Message, StartMessage

SeriesKey = tuple[int, str]  # (series_id, series_unique_id)

DEFAULT_WINDOW_FRAMES = 16
DEFAULT_WINDOW_S = 0.5
_RECENT_SERIES = 16  # finished series remembered, so their stragglers count as stale


@dataclass(frozen=True)
class SequenceEvent:
    """Something about the stream worth a line in /entry/events (kind from EventKind)."""

    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Released:
    """What one call to the sequencer produced: images to write (in order) and events."""

    frames: list[ImageMessage] = field(default_factory=list)
    events: list[SequenceEvent] = field(default_factory=list)

    def extend(self, other: Released) -> None:
        self.frames.extend(other.frames)
        self.events.extend(other.events)


@dataclass
class _Series:
    series_id: int
    unique_id: str
    expected: int | None  # next image_id to release; None until the first is known
    number_of_images: int | None = None  # from `start` (0 or None: open-ended)
    had_start: bool = False
    ended: bool = False
    max_seen: int = -1
    gaps: list[tuple[int, int]] = field(default_factory=list)  # reported missing ranges

    @property
    def key(self) -> SeriesKey:
        return (self.series_id, self.unique_id)

    def in_gap(self, image_id: int) -> bool:
        return any(first <= image_id <= last for first, last in self.gaps)


def _range_text(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


class FrameSequencer:
    """Reorders, de-duplicates and checks one detector stream; see the module docstring.

    `push(message, now)` for every decoded message, `poll(now)` when nothing arrived (so a
    gap is declared once the window's time is up), `flush()` to release everything held
    (e.g. when a run closes). `now` is any monotonic time in seconds.
    """

    def __init__(
        self, window_frames: int = DEFAULT_WINDOW_FRAMES, window_s: float = DEFAULT_WINDOW_S
    ) -> None:
        if window_frames < 1 or window_s < 0:
            raise ValueError("the reorder window needs >= 1 frame and >= 0 s")
        self.window_frames = window_frames
        self.window_s = window_s
        self._series: _Series | None = None
        self._held: dict[int, tuple[ImageMessage, float]] = {}
        self._finished: deque[SeriesKey] = deque(maxlen=_RECENT_SERIES)
        # an unknown older series arriving while the current one is silent (see _adopt)
        self.adopt_after = 2 * window_frames + 1
        self._stale_key: SeriesKey | None = None
        self._stale_streak = 0
        self._expected: int | None = None  # the armed series' id (expect())
        # counters
        self.images_total = 0  # images pushed
        self.released_total = 0
        self.series_total = 0
        self.series_without_start_total = 0
        self.gaps_total = 0
        self.missing_total = 0  # image_ids inside reported gaps
        self.duplicates_total = 0
        self.out_of_order_total = 0  # arrived after a higher image_id, reordered in the window
        self.late_total = 0  # arrived after their slot was passed (or the series end): dropped
        self.stale_total = 0  # images of an older series: dropped
        self.unmatched_end_total = 0  # `end` of a series that is not the current one

    # ----- state -----------------------------------------------------------------------------
    @property
    def series_key(self) -> SeriesKey | None:
        return None if self._series is None else self._series.key

    @property
    def held(self) -> int:
        """Images waiting in the reorder window."""
        return len(self._held)

    @property
    def next_image_id(self) -> int | None:
        return None if self._series is None else self._series.expected

    @property
    def expected_series_id(self) -> int | None:
        return self._expected

    def expect(self, series_id: int | None) -> Released:
        """Take only the series `series_id` from now on (None: any, as before).

        A current series of another id ends here: its held images are released now, so
        nothing of it is taken once the armed series' images may come."""
        self._expected = series_id
        out = Released()
        series = self._series
        if (
            series_id is not None
            and series is not None
            and series.series_id != series_id
            and not series.ended
        ):
            self._finish(out)
            series.ended = True
        return out

    # ----- input -----------------------------------------------------------------------------
    def push(self, message: Message, now: float) -> Released:
        """One decoded message, in arrival order."""
        out = Released()
        if isinstance(message, ImageMessage):
            self._image(message, now, out)
        elif isinstance(message, StartMessage):
            self._start(message, out)
        elif isinstance(message, EndMessage):
            self._end(message, out)
        return out

    def poll(self, now: float) -> Released:
        """Release what the window's time limit lets go of (call when the stream is quiet)."""
        out = Released()
        self._release(now, force=False, out=out)
        return out

    def flush(self) -> Released:
        """Release every held image now, reporting the gaps between them."""
        out = Released()
        self._release(0.0, force=True, out=out)
        return out

    # ----- messages --------------------------------------------------------------------------
    def _start(self, msg: StartMessage, out: Released) -> None:
        what = f"start of series {msg.series_id} ignored"
        if self._drop_foreign(msg.series_id, what, {"expected": self._expected}, out):
            return
        series = self._series
        if series is not None and series.key == (msg.series_id, msg.series_unique_id):
            # images of this series came first (cannot on one PUSH socket, but harmless)
            series.had_start = True
            series.number_of_images = msg.number_of_images
            return
        self._begin(msg.series_id, msg.series_unique_id, msg.number_of_images, True, out)

    def _end(self, msg: EndMessage, out: Released) -> None:
        series = self._series
        if series is None or series.ended or series.key != (msg.series_id, msg.series_unique_id):
            self.unmatched_end_total += 1
            return
        self._finish(out)
        series.ended = True

    def _image(self, msg: ImageMessage, now: float, out: Released) -> None:
        self.images_total += 1
        what = f"image {msg.image_id} of series {msg.series_id} dropped"
        if self._drop_foreign(msg.series_id, what, {"image_id": msg.image_id}, out):
            self.stale_total += 1
            return
        verdict = self._classify(msg)
        if verdict == "stale" and self._adopt(msg, out):
            verdict = "new"
        if verdict == "stale":
            self.stale_total += 1
            out.events.append(
                SequenceEvent(
                    EventKind.STALE,
                    f"image {msg.image_id} of stale series {msg.series_id} dropped",
                    {"series_id": msg.series_id, "image_id": msg.image_id},
                )
            )
            return
        if verdict == "new":
            self._begin(msg.series_id, msg.series_unique_id, None, False, out)
        series = self._series
        assert series is not None
        self._stale_streak = 0
        image_id = msg.image_id
        if series.expected is not None and image_id < series.expected:
            if series.in_gap(image_id):
                self._late(series, image_id, "after its slot was passed", out)
            else:
                self._duplicate(series, image_id, out)
            return
        if series.ended:
            self._late(series, image_id, "after the end of its series", out)
            return
        if image_id in self._held:
            self._duplicate(series, image_id, out)
            return
        if image_id < series.max_seen:
            self.out_of_order_total += 1
            out.events.append(
                SequenceEvent(
                    EventKind.OUT_OF_ORDER,
                    f"image {image_id} of series {series.series_id} arrived after image "
                    f"{series.max_seen}: reordered",
                    {"series_id": series.series_id, "image_id": image_id, "late": False},
                )
            )
        series.max_seen = max(series.max_seen, image_id)
        self._held[image_id] = (msg, now)
        self._release(now, force=False, out=out)

    def _late(self, series: _Series, image_id: int, why: str, out: Released) -> None:
        self.late_total += 1
        out.events.append(
            SequenceEvent(
                EventKind.OUT_OF_ORDER,
                f"image {image_id} of series {series.series_id} arrived {why}: dropped",
                {"series_id": series.series_id, "image_id": image_id, "late": True},
            )
        )

    def _duplicate(self, series: _Series, image_id: int, out: Released) -> None:
        self.duplicates_total += 1
        out.events.append(
            SequenceEvent(
                EventKind.DUPLICATE,
                f"duplicate image {image_id} of series {series.series_id} dropped",
                {"series_id": series.series_id, "image_id": image_id},
            )
        )

    def takes(self, series_id: int) -> bool:
        """False for a series other than the armed one (when one is expected)."""
        return self._expected is None or series_id == self._expected

    def _drop_foreign(self, series_id: int, what: str, data: dict[str, Any], out: Released) -> bool:
        """True, with a STALE event saying `what` was dropped, for a series other than the
        armed one."""
        if self.takes(series_id):
            return False
        out.events.append(
            SequenceEvent(
                EventKind.STALE,
                f"{what}: the detector was armed for series {self._expected}",
                {"series_id": series_id, **data},
            )
        )
        return True

    def _adopt(self, msg: ImageMessage, out: Released) -> bool:
        """True when an unknown 'stale' series keeps coming while the current one is silent:
        a detector that restarted its series numbers (and whose `start` was missed) must not
        be dropped forever. Stragglers of a finished series are never adopted."""
        key = (msg.series_id, msg.series_unique_id)
        if key in self._finished:
            return False
        if key != self._stale_key:
            self._stale_key, self._stale_streak = key, 0
        self._stale_streak += 1
        if self._stale_streak < self.adopt_after:
            return False
        out.events.append(
            SequenceEvent(
                EventKind.STALE,
                f"series {msg.series_id} taken as the current series after "
                f"{self._stale_streak - 1} of its images were dropped as stale "
                "(detector restarted its numbering?)",
                {"series_id": msg.series_id, "adopted": True},
            )
        )
        return True

    def _classify(self, msg: ImageMessage) -> str:
        """'current', 'new' or 'stale' for an image, from its series identity."""
        key = (msg.series_id, msg.series_unique_id)
        series = self._series
        if series is not None and key == series.key:
            return "current"
        if key in self._finished:
            return "stale"
        if series is None or msg.series_id > series.series_id:
            return "new"
        if series.ended:
            # A series this stream never sent, after the current one ended: the detector was
            # armed again (its `start` missed), with its numbers restarted or even the same
            # series_id (a restarted detector counts from 1 again: only series_unique_id
            # tells). Stragglers of series before are in `_finished`, and those of the
            # ended one match it (both above): dropped as stale or late.
            return "new"
        return "stale"

    # ----- series ----------------------------------------------------------------------------
    def _begin(
        self,
        series_id: int,
        unique_id: str,
        number_of_images: int | None,
        had_start: bool,
        out: Released,
    ) -> None:
        if self._series is not None and not self._series.ended:
            self._finish(out)
        self._series = _Series(
            series_id,
            unique_id,
            expected=0 if had_start else None,  # Stream V2 image_ids count from 0
            number_of_images=number_of_images,
            had_start=had_start,
        )
        self.series_total += 1
        if not had_start:
            self.series_without_start_total += 1

    def _finish(self, out: Released) -> None:
        """Release everything of the current series and report images it never sent."""
        series = self._series
        if series is None:
            return
        self._release(0.0, force=True, out=out)
        total = series.number_of_images
        if total and series.expected is not None and series.expected < total:
            self._gap(series, series.expected, total - 1, out)
            series.expected = total
        self._finished.append(series.key)

    def _gap(self, series: _Series, first: int, last: int, out: Released) -> None:
        count = last - first + 1
        self.gaps_total += 1
        self.missing_total += count
        series.gaps.append((first, last))
        out.events.append(
            SequenceEvent(
                EventKind.GAP,
                f"image_id {_range_text(first, last)} of series {series.series_id} missing "
                f"({count} frame{'s' if count > 1 else ''})",
                {"series_id": series.series_id, "first": first, "last": last, "count": count},
            )
        )

    def _release(self, now: float, force: bool, out: Released) -> None:
        series = self._series
        held = self._held
        while series is not None and held:
            if series.expected is None:
                if not (force or self._window_full(now)):
                    return
                series.expected = min(held)
            while series.expected in held:
                msg, _ = held.pop(series.expected)
                out.frames.append(msg)
                self.released_total += 1
                series.expected += 1
            if not held:
                return
            if not (force or self._window_full(now)):
                return
            lowest = min(held)
            self._gap(series, series.expected, lowest - 1, out)
            series.expected = lowest

    def _window_full(self, now: float) -> bool:
        if len(self._held) >= self.window_frames:
            return True
        oldest = min(arrived for _, arrived in self._held.values())
        return now - oldest >= self.window_s


# ----- the detector clock ---------------------------------------------------------------------
def fraction_ns(seconds: Fraction) -> int:
    """Exact detector seconds to integer nanoseconds (rounded)."""
    return round(seconds * 1_000_000_000)


class DetectorClockMap:
    """Detector clock -> wall clock for one series, from the lower envelope of arrival delays.

    `observe(start, stop, arrival_ns)` for each image (any order); `offset_ns` is the wall
    time (time.time_ns() scale) of the series' detector time zero, `error_ns` its uncertainty.
    """

    def __init__(self, keep_lowest: int = 5) -> None:
        if keep_lowest < 2:
            raise ValueError("keep_lowest must be >= 2 to have a spread")
        self.keep_lowest = keep_lowest
        self._lowest: list[int] = []  # the smallest (arrival - stop) seen, ascending, in ns
        self._min_exposure_ns: int | None = None
        self.samples = 0

    def observe(self, start_time: Fraction, stop_time: Fraction, arrival_ns: int) -> bool:
        """Add one image; True if the estimate of the zero moved (it only ever moves down)."""
        candidate = arrival_ns - fraction_ns(stop_time)
        exposure = max(0, fraction_ns(stop_time - start_time))
        if self._min_exposure_ns is None or exposure < self._min_exposure_ns:
            self._min_exposure_ns = exposure
        self.samples += 1
        improved = not self._lowest or candidate < self._lowest[0]
        if len(self._lowest) < self.keep_lowest or candidate < self._lowest[-1]:
            bisect.insort(self._lowest, candidate)
            del self._lowest[self.keep_lowest :]
        return improved

    @property
    def offset_ns(self) -> int | None:
        """Wall ns of detector time zero (None before the first image)."""
        return self._lowest[0] if self._lowest else None

    @property
    def error_ns(self) -> float:
        """Half the spread of the lowest delays; half the exposure while only one is known."""
        if len(self._lowest) >= 2:
            return (self._lowest[-1] - self._lowest[0]) / 2
        return (self._min_exposure_ns or 0) / 2

    def wall_ns(self, detector_time: Fraction) -> int:
        """Wall ns of a detector time of this series."""
        if self.offset_ns is None:
            raise ValueError("no image observed yet")
        return self.offset_ns + fraction_ns(detector_time)

    def run_time(self, detector_time: Fraction, clock: RunClock) -> float:
        """Run-clock seconds of a detector time (the clock's time_scale applies)."""
        return clock.from_wall_ns(self.wall_ns(detector_time))

    def frame_time(self, start_time: Fraction, stop_time: Fraction, clock: RunClock) -> float:
        """Run-clock seconds of an exposure's midpoint."""
        return self.run_time((start_time + stop_time) / 2, clock)

    def run_error(self, clock: RunClock) -> float:
        """The uncertainty in run-clock seconds."""
        return self.error_ns * 1e-9 * clock.time_scale
