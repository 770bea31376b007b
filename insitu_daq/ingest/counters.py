"""Counters of the ingest process: a Prometheus-style histogram, an event rate limiter and
the detector stream's rate."""

from __future__ import annotations

import bisect
import collections
import itertools
from typing import Any


class Histogram:
    """Prometheus-style histogram: counts per upper bound, sum and count."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "le": list(self.bounds),
            "cumulative_counts": list(itertools.accumulate(self.counts)),
            "sum": self.sum,
            "count": self.count,
        }


class EventLimiter:
    """At most `per_second` events of one kind per second; the rest are counted."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._window: dict[str, tuple[float, int, int]] = {}  # kind -> (start, sent, held back)

    def allow(self, kind: str, now: float) -> bool:
        start, sent, held = self._window.get(kind, (now, 0, 0))
        if now - start >= 1.0:
            start, sent, held = now, 0, held
        if sent < self.per_second:
            self._window[kind] = (start, sent + 1, held)
            return True
        self._window[kind] = (start, sent, held + 1)
        return False

    def take_suppressed(self, now: float) -> list[tuple[str, int]]:
        """(kind, count) of events held back in windows that are over."""
        over = []
        for kind, (start, sent, held) in list(self._window.items()):
            if held and now - start >= 1.0:
                over.append((kind, held))
                self._window[kind] = (start, sent, 0)
        return over


class StreamRate:
    """The detector stream's frames per second and stored bytes per frame, for planning a
    run's recording: the rate over its last `window_s` of frames (kept when the stream stops:
    the last series seen is what the next run will record), and the largest mean frame size
    of such a window in the last `peak_hold_s` (frames of a blanked beam compress to almost
    nothing: the next run's frames are the bigger ones seen before)."""

    def __init__(self, window_s: float = 10.0, peak_hold_s: float = 3600.0) -> None:
        self.window_ns = int(window_s * 1e9)
        self._frames: collections.deque[tuple[int, int]] = collections.deque()  # (ns, bytes)
        self._bytes = 0
        self._bucket_ns = int(60e9)
        self._buckets = int(peak_hold_s * 1e9) // self._bucket_ns
        self._peaks: dict[int, float] = {}  # minute -> largest window mean bytes per frame

    def add(self, received_ns: int, stored_bytes: int) -> None:
        frames = self._frames
        if frames and received_ns < frames[-1][0]:  # a new stream whose clock is behind
            frames.clear()
            self._bytes = 0
        frames.append((received_ns, stored_bytes))
        self._bytes += stored_bytes
        while received_ns - frames[0][0] > self.window_ns:
            self._bytes -= frames.popleft()[1]
        minute = received_ns // self._bucket_ns
        mean = self._bytes / len(frames)
        if mean > self._peaks.get(minute, 0.0):
            if minute not in self._peaks:
                for old in [m for m in self._peaks if m <= minute - self._buckets]:
                    del self._peaks[old]
            self._peaks[minute] = mean

    def to_dict(self) -> dict[str, float] | None:
        """{"frames_per_s", "bytes_per_frame", "peak_bytes_per_frame"}; None until two frames
        were seen."""
        frames = self._frames
        if len(frames) < 2 or frames[-1][0] <= frames[0][0]:
            return None
        span_s = (frames[-1][0] - frames[0][0]) * 1e-9
        mean = self._bytes / len(frames)
        return {
            "frames_per_s": (len(frames) - 1) / span_s,
            "bytes_per_frame": mean,
            "peak_bytes_per_frame": max(mean, *self._peaks.values()),
        }
