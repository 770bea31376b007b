"""The live values a protocol's `hold ... until` conditions read (control/conditions.py).

A record subscriber (service/bus.py): while a run is open, each bias batch adds the measured
current and the charge passed since the run started (a trapezoid over the readings), each
live-analysis result its values, all stamped on the run clock. The runner takes them every
0.1 s through `updates(names, after)` with a cursor (Station.live_updates).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from insitu_daq.control.conditions import CHIP_TEMPERATURE, LiveUpdate
from insitu_daq.control.station import FROM_NOW
from insitu_daq.core.records import level_change_mask
from insitu_daq.runfile.layout import TEMPERATURE
from insitu_daq.service.bus import RecordSink

log = logging.getLogger(__name__)

# ~80 s of analysis results and bias batches; the runner takes them every 0.1 s.
LIVE_UPDATES_KEPT = 4096


class OpenRun(Protocol):
    """What a subscriber needs of the open run (service/daemon.py `ActiveRun`)."""

    offset_s: float  # daemon-clock seconds at the run's start


class LiveValues(RecordSink):
    """The latest live values of the open run, for the runner's conditions. Thread-safe."""

    name = "live values"

    def __init__(
        self,
        current_run: Callable[[], OpenRun | None],
        connected: Callable[[], bool],
        kept: int = LIVE_UPDATES_KEPT,
    ) -> None:
        """`current_run()`: the open run or None; `connected()`: whether the source-meter's
        readings are real (a lost instrument's current is None, not its last value)."""
        self._current_run = current_run
        self._connected = connected
        self._updates: deque[tuple[int, LiveUpdate]] = deque(maxlen=kept)
        self._seq = 0
        self._lock = threading.Lock()
        self.charge_coulombs = 0.0  # integral of the measured current since the run started
        self._last_reading: tuple[float, float] | None = None  # (daemon time, current)

    def new_run(self) -> None:
        """A run starts: the last run's values and charge are forgotten."""
        with self._lock:
            self._updates.clear()
            self.charge_coulombs = 0.0
            self._last_reading = None

    # ----- records in ------------------------------------------------------------------------
    def on_samples(self, batch: np.ndarray) -> None:
        run = self._current_run()
        if run is None:
            return
        readings = batch[~level_change_mask(batch)]
        if not len(readings):
            return
        self._integrate_charge(readings)
        connected = self._connected()
        self.add(
            float(readings["time"][-1]) - run.offset_s,
            {
                "current_amperes": float(readings["current"][-1]) if connected else None,
                "charge_coulombs": self.charge_coulombs,
            },
        )

    def on_analysis(self, result: dict[str, Any]) -> None:
        frame_time = result.get("time")
        if isinstance(frame_time, (int, float)) and self._current_run() is not None:
            self.add(float(frame_time), result["values"])

    def on_series(self, record: tuple[str, list[tuple[Any, ...]]]) -> None:
        """A heating holder's readings (time, half-width, value, setpoint; run clock): each
        one an update, so a condition sees every reading at the time it was taken."""
        name, rows = record
        if name != TEMPERATURE.record or self._current_run() is None:
            return
        for row in rows:
            self.add(float(row[0]), {CHIP_TEMPERATURE: row[2]})

    def _integrate_charge(self, readings: np.ndarray) -> None:
        """Charge since the run started: trapezoid over the readings' currents."""
        times = readings["time"].astype(float)
        currents = readings["current"].astype(float)
        if self._last_reading is not None:
            times = np.concatenate(([self._last_reading[0]], times))
            currents = np.concatenate(([self._last_reading[1]], currents))
        if len(times) > 1:
            dt = np.diff(times)
            ok = dt > 0
            self.charge_coulombs += float(np.sum(0.5 * (currents[1:] + currents[:-1])[ok] * dt[ok]))
        self._last_reading = (float(times[-1]), float(currents[-1]))

    def add(self, time_s: float, values: dict[str, Any]) -> None:
        """One live update (run-clock event time) for the runner's conditions."""
        numbers = {
            key: float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else None
            for key, value in values.items()
        }
        with self._lock:
            self._seq += 1
            self._updates.append((self._seq, LiveUpdate(time_s, numbers)))

    # ----- the runner's side -----------------------------------------------------------------
    def updates(self, names: frozenset[str], after: int) -> tuple[int, list[LiveUpdate]]:
        """The live updates since cursor `after` that carry any of `names` (Station)."""
        with self._lock:
            cursor = self._seq
            if after == FROM_NOW:
                return cursor, []
            if self._updates and self._updates[0][0] > after + 1:
                log.warning("%d live updates were dropped before the runner took them",
                            self._updates[0][0] - after - 1)  # fmt: skip
            updates = [
                update for seq, update in self._updates
                if seq > after and not names.isdisjoint(update.values)
            ]  # fmt: skip
        return cursor, updates
