"""The daemon's records fanned out to their subscribers (Bluesky's callback-router style).

What the daemon produces (bias sample batches, live-analysis results, events, the ingest's
events, status) is published here once, by kind; each subscriber says which kinds it takes.
Subscribers are called in subscription order, in the publishing thread (the bias delivery
thread, the analysis results listener, the ingest listener, the status thread), so each must
be thread-safe and quick, as the callbacks they replace were. A subscriber that raises is
logged (rate-limited) and counted, and the others still get the record: a failing metrics
update no longer costs the event stream its message, nor the run file its copy.

Kinds and their records:
- "samples": a batch of records.BIAS_SAMPLE_DTYPE on the daemon clock (readings and
  commanded level changes);
- "analysis": a live-analysis result (a dict with `values`, live/process.py);
- "event": a records.Event on the daemon clock;
- "ingest_event": an event the ingest process reported (a dict, already in the run file);
- "status": the daemon's status (Daemon.status);
- "series": `(name, rows)` of an instrument's time series declared in runfile/layout.py (the
  holder position...), rows already on the run clock (control/instruments/monitor.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

log = logging.getLogger(__name__)

KINDS = ("samples", "analysis", "event", "ingest_event", "status", "series")
ERROR_LOG_INTERVAL_S = 10.0  # a sink failing on every record logs its traceback this often

Sink = Callable[[str, Any], None]  # sink(kind, record)


class RecordSink:
    """A subscriber with one method per kind it takes, `on_<kind>(record)`; `bus.attach`
    subscribes it to exactly those kinds under its `name`."""

    name: ClassVar[str]

    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind in KINDS if callable(getattr(self, f"on_{kind}", None)))

    def __call__(self, kind: str, record: Any) -> None:
        getattr(self, f"on_{kind}")(record)


class RecordBus:
    """`subscribe` (or `attach`) the subscribers, then `publish` from any thread."""

    def __init__(self) -> None:
        self._subscribers: dict[str, tuple[tuple[str, Sink], ...]] = dict.fromkeys(KINDS, ())
        self._lock = threading.Lock()
        self.errors: dict[str, int] = {}  # per subscriber name: records it raised on
        self._logged_at: dict[str, float] = {}  # monotonic s of its last logged traceback

    def subscribe(self, kinds: Iterable[str], sink: Sink, name: str) -> None:
        """Call `sink(kind, record)` for every record of `kinds`, after earlier subscribers."""
        kinds = tuple(kinds)
        for kind in kinds:
            _check_kind(kind)
        with self._lock:
            for kind in kinds:
                self._subscribers[kind] = (*self._subscribers[kind], (name, sink))
            self.errors.setdefault(name, 0)

    def attach(self, sink: RecordSink) -> None:
        self.subscribe(sink.kinds(), sink, sink.name)

    def subscribers(self, kind: str) -> list[str]:
        """The names subscribed to `kind`, in the order they are called."""
        _check_kind(kind)
        return [name for name, _ in self._subscribers[kind]]

    def publish(self, kind: str, record: Any) -> None:
        """Hand `record` to every subscriber of `kind` in order; never raises for theirs."""
        _check_kind(kind)
        for name, sink in self._subscribers[kind]:  # a snapshot: subscribing replaces it
            try:
                sink(kind, record)
            except Exception:
                self._failed(name, kind)

    def publisher(self, kind: str) -> Callable[[Any], None]:
        """`publish` bound to `kind`: a callback for a producer (e.g. BiasController)."""
        _check_kind(kind)
        return lambda record: self.publish(kind, record)

    def _failed(self, name: str, kind: str) -> None:
        with self._lock:
            self.errors[name] = self.errors.get(name, 0) + 1
            count = self.errors[name]
            now = time.monotonic()
            due = now - self._logged_at.get(name, -ERROR_LOG_INTERVAL_S) >= ERROR_LOG_INTERVAL_S
            if due:
                self._logged_at[name] = now
        if due:
            log.exception("record subscriber %s failed on a %s record (%d so far)", name, kind,
                          count)  # fmt: skip


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r} (one of: {', '.join(KINDS)})")
