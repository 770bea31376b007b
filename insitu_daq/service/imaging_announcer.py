"""The daemon's side of the event-time imaging timeline (core/imaging.py): what it tells its sinks.

The daemon drives the microscope, so it is the one that knows the imaging state. It tells each
sink (the live analysis; the ingest, which records every frame's state) the state at run start
and after each switch, and every `interval_s` a watermark: "every switch begun at or before run
time W has been announced". While a switch is under way the watermark stays at the switch's
start, since the state after it is not known until the microscope reports it.

Every announcement and every watermark is sent under one lock, and each sink's channel keeps
the order of what is sent on it, so a sink never sees a watermark past a switch it has not yet
been told of, however late either arrives. A switch whose result the microscope does not
report is announced with mode "unknown" (its frames are then "no state", never a guess) so
the watermark never stalls.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from insitu_daq.core.imaging import UNKNOWN_MODE, ImagingState

log = logging.getLogger(__name__)

WATERMARK_INTERVAL_S = 0.01  # wall s: a frame waits for at most about this for its state


class ImagingSink(Protocol):
    """What consumes the timeline: LiveAnalysis, IngestClient."""

    def set_imaging(self, state: ImagingState, seq: int) -> None: ...

    def imaging_watermark(self, run_time_s: float, announced: int) -> None: ...


def unknown_state(start: float, end: float) -> ImagingState:
    return ImagingState(start, end, UNKNOWN_MODE, math.nan, math.nan)


class ImagingAnnouncer:
    """Announces the open run's imaging timeline to `sinks` and keeps the watermark moving."""

    def __init__(
        self, sinks: Sequence[ImagingSink], interval_s: float = WATERMARK_INTERVAL_S
    ) -> None:
        self._sinks = list(sinks)
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._run_now: Callable[[], float] | None = None  # the open run's clock
        self._switch_started: float | None = None  # run s of the switch under way
        self._announced = 0  # states announced in the open run (so a sink sees one it lost)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sink_errors_total = 0

    def add_sink(self, sink: ImagingSink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._tick, name="imaging-watermark", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)

    # ----- a run -----------------------------------------------------------------------------
    def open_run(self, run_now: Callable[[], float], state: ImagingState) -> None:
        """A run opened (the sinks know it): its state at start, then watermarks on its clock."""
        with self._lock:
            self._run_now = run_now
            self._switch_started = None
            self._announced = 0
            self._announce(state)
            self._send_watermark()

    def close_run(self) -> None:
        """A last watermark (every frame until now is decidable), then silence."""
        with self._lock:
            if self._run_now is not None:
                self._send_watermark()
            self._run_now = None
            self._switch_started = None

    # ----- a switch --------------------------------------------------------------------------
    def begin_switch(self) -> float | None:
        """Before the microscope is told to switch: hold the watermark here (run s; None when
        no run is open: nobody needs to know)."""
        with self._lock:
            if self._run_now is None:
                return None
            self._switch_started = self._run_now()
            return self._switch_started

    def now(self) -> float | None:
        """The open run's clock (run s), None outside a run."""
        run_now = self._run_now
        return None if run_now is None else run_now()

    def end_switch(self, state: ImagingState) -> None:
        """The switch begun by `begin_switch` is done and the microscope now shows `state`
        (its start is the begin's; an unknown_state when the microscope did not say)."""
        with self._lock:
            if self._run_now is None:
                return
            self._announce(state)
            self._switch_started = None
            self._send_watermark()

    # ----- inside the lock -------------------------------------------------------------------
    def _tick(self) -> None:
        while not self._stop.wait(self._interval_s):
            with self._lock:
                if self._run_now is not None:
                    self._send_watermark()

    def _announce(self, state: ImagingState) -> None:
        self._announced += 1
        seq = self._announced
        self._send(lambda sink: sink.set_imaging(state, seq))

    def _send_watermark(self) -> None:
        assert self._run_now is not None
        held = self._switch_started
        watermark = held if held is not None else self._run_now()
        announced = self._announced
        self._send(lambda sink: sink.imaging_watermark(watermark, announced))

    def _send(self, deliver: Callable[[ImagingSink], None]) -> None:
        for sink in self._sinks:
            try:
                deliver(sink)
            except Exception:  # a sink that fails must not stop the others or the ticks
                self.sink_errors_total += 1
                log.exception("imaging announcement to %s failed", type(sink).__name__)
