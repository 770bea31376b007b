"""Each frame's bias and current, estimated from the bias log, in bounded memory.

Why not simply interpolate the readings. The source-meter ramps in steps (`ramp_step_volts`,
10 mV by default) every few milliseconds, while the log reads V and I at 50 Hz: a straight line
between two readings cuts across the staircase and misses the level at a frame's time by up
to half a reading interval's worth of steps (2.6 ms median at 1 V/s, bench/bench_alignment.py).
The controller knows exactly when it changed the level: each SCPI write that set it is
stamped on the run clock (records.STATUS_LEVEL_CHANGE rows). So a frame's bias is

    commanded level at the frame's time  +  measured offset (reading - commanded level)

with the offset interpolated between readings: the readings still decide what the terminals
saw (a source that lags or sits off its setpoint shows up there), the stamps decide when it
stepped. Without level-change stamps (an older file, a source driven by something else) the
estimate falls back to interpolating the readings. The current is always interpolated from
the readings: it is measured, not commanded.

Memory. Only a window of the log is kept (`keep_s` of run time behind the newest reading):
the per-frame values are filled in as soon as readings bracket the frame, so nothing older
is ever needed, except by a retime of frames already filled (RunWriter.retime_frames); those
older than the window keep the value they had (a retime moves a frame by the change in the
detector-clock offset, typically well under a millisecond).
"""

from __future__ import annotations

import numpy as np

KEEP_S = 60.0  # run-clock seconds of log kept behind the newest reading


class _Columns:
    """Float64 columns that grow at the end and are trimmed at the front, amortised O(1)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = names
        self._data = np.empty((len(names), 256))
        self._start = 0
        self._stop = 0

    def __len__(self) -> int:
        return self._stop - self._start

    def column(self, name: str) -> np.ndarray:
        return self._data[self._names.index(name), self._start : self._stop]

    def append(self, *columns: np.ndarray) -> None:
        n = len(columns[0])
        if self._stop + n > self._data.shape[1]:
            live = self._data[:, self._start : self._stop]
            capacity = max(256, 2 * (len(self) + n))
            grown = np.empty((len(self._names), capacity))
            grown[:, : len(self)] = live
            self._data, self._stop, self._start = grown, len(self), 0
        for row, values in enumerate(columns):
            self._data[row, self._stop : self._stop + n] = values
        self._stop += n

    def drop_first(self, n: int) -> None:
        self._start = min(self._start + max(n, 0), self._stop)


class FrameBiasEstimator:
    """Bias and current at frame times from readings and stamped level changes."""

    def __init__(self, keep_s: float = KEEP_S) -> None:
        self.keep_s = keep_s
        self._readings = _Columns(("time", "volts", "amps"))
        self._changes = _Columns(("time", "level"))

    @property
    def last_reading_time(self) -> float | None:
        times = self._readings.column("time")
        return float(times[-1]) if len(times) else None

    @property
    def oldest_time(self) -> float | None:
        """Frames at or after this time can be (re)estimated from what is kept."""
        times = self._readings.column("time")
        return float(times[0]) if len(times) else None

    def add_readings(self, times: np.ndarray, volts: np.ndarray, amps: np.ndarray) -> None:
        if len(times):
            self._readings.append(times, volts, amps)
            self._forget_before(float(times[-1]) - self.keep_s)

    def add_level_changes(self, times: np.ndarray, levels: np.ndarray) -> None:
        if len(times):
            self._changes.append(times, levels)

    def estimate(self, frame_times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(volts, amps) at `frame_times` (sorted); NaN where there are no readings."""
        frame_times = np.asarray(frame_times, dtype=np.float64)
        times = self._readings.column("time")
        if not len(times):
            nan = np.full(len(frame_times), np.nan)
            return nan, nan.copy()
        volts = self._readings.column("volts")
        amps = np.interp(frame_times, times, self._readings.column("amps"))
        change_times = self._changes.column("time")
        if not len(change_times):
            return np.interp(frame_times, times, volts), amps
        estimate = np.interp(frame_times, times, volts)  # before the first stamped change
        stamped = frame_times >= change_times[0]
        if np.any(stamped):
            offsets = volts - self._commanded(times)
            at = frame_times[stamped]
            estimate[stamped] = self._commanded(at) + np.interp(at, times, offsets)
        return estimate, amps

    def _commanded(self, times: np.ndarray) -> np.ndarray:
        """The commanded terminal level in force at `times` (the first one before them)."""
        change_times = self._changes.column("time")
        index = np.searchsorted(change_times, times, side="right") - 1
        return self._changes.column("level")[np.clip(index, 0, len(change_times) - 1)]

    def _forget_before(self, time: float) -> None:
        # Keep the last entry before `time` too: it brackets (readings) or is in force (levels).
        readings = int(np.searchsorted(self._readings.column("time"), time)) - 1
        self._readings.drop_first(readings)
        changes = int(np.searchsorted(self._changes.column("time"), time)) - 1
        self._changes.drop_first(changes)
