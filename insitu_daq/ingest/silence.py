"""When a recording run stops getting images: pure logic for the ingest, no I/O.

A detector that stops sending (hung, cable pulled, its process killed, never armed) breaks
nothing in the stream: no image_id is skipped, so no gap is reported, and the run file simply
has no frames from then on. The run goes on (the bias is logged, the protocol holds), so the
ingest says it instead: once a recording run has had no image for `after_s` wall seconds, a
`detector silent` event; when images come again, the interval without any (a `detector back`
event). Wall seconds, because that is the detector's time; the events name run-clock times.
"""

from __future__ import annotations


class DetectorSilence:
    """Tracks image arrivals; says once when a silence starts and once when it ends."""

    def __init__(self, after_s: float) -> None:
        if after_s <= 0:
            raise ValueError("after_s must be positive")
        self.after_ns = round(after_s * 1e9)
        self.silences_total = 0
        self._last_image_ns: int | None = None
        self._silent_since_ns: int | None = None

    @property
    def silent_since_ns(self) -> int | None:
        """Wall time (ns) since which nothing arrived, if a silence has been declared."""
        return self._silent_since_ns

    def image(self, arrived_ns: int) -> int | None:
        """An image arrived (wall ns); returns when the silence it ends began, else None."""
        self._last_image_ns = arrived_ns
        began, self._silent_since_ns = self._silent_since_ns, None
        return began

    def check(self, now_ns: int, watched_since_ns: int) -> int | None:
        """While recording since `watched_since_ns`: the start of a silence that has lasted
        `after_s` by `now_ns`, returned once; else None."""
        if self._silent_since_ns is not None:
            return None
        quiet_since = watched_since_ns
        if self._last_image_ns is not None:
            quiet_since = max(quiet_since, self._last_image_ns)
        if now_ns - quiet_since < self.after_ns:
            return None
        self._silent_since_ns = quiet_since
        self.silences_total += 1
        return quiet_since

    def forget(self) -> None:
        """A run closed: a silence it saw is not the next run's."""
        self._silent_since_ns = None
