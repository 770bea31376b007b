"""Counters of the ingest process: a Prometheus-style histogram and an event rate limiter."""

from __future__ import annotations

import bisect
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
