"""A logged series at each frame's time: the per-frame columns declared by `Log.per_frame`.

A heating holder's temperature is read every `poll_interval_s` and changes smoothly (the
controller ramps it), so a frame's temperature is the log's first column interpolated
linearly at the frame's `frame_time` (clamped to the first and last readings), into the
column `per_frame` of the frame's NXdetector. A frame is filled in once a reading at or after
its time is known, or at close from the last readings. Unlike the per-frame bias (a commanded
staircase between readings: runfile/framebias.py) nothing steps between readings here.

A frame retimed (a better detector-clock mapping: RunWriter.retime_frames) is filled again
at its new time, from the readings kept: the last KEEP_S of run time (a retime moves frames by
milliseconds; older ones keep their value).

What it leaves out, on purpose:
- A run whose log gets no reading at all (a holder without a heater) writes nothing: the
  column stays empty and the run file's finishing removes it (runfile/finish.py), as it does
  the empty log. Frames kept waiting for a first reading are bounded to KEEP_S of run time;
  older ones are given NaN when readings come.
"""

from __future__ import annotations

import h5py
import numpy as np

from insitu_daq.runfile.h5util import growing, put
from insitu_daq.runfile.layout import Log

# Run-clock seconds of frames kept waiting for a first reading, and of readings kept behind
# the newest for retimed frames.
KEEP_S = 60.0


class FrameSeries:
    """One per-frame log's column, for every frame stack of the run."""

    def __init__(self, declared: Log) -> None:
        if declared.per_frame is None:
            raise ValueError(f"{declared.path} declares no per-frame column")
        self.declared = declared
        self.column = declared.columns[0].name  # the value interpolated at frame times
        self._times: list[float] = []
        self._values: list[float] = []
        # Per frame stack, by its index: its column, the frames written into it so far, the
        # times of the frames not filled yet, and those given up on before any reading came.
        self._datasets: list[h5py.Dataset] = []
        self._written: list[int] = []
        self._pending: list[list[float]] = []
        self._unfilled: list[int] = []

    def add_stack(self, detector: h5py.Group) -> None:
        """A new frame stack: its (empty) column made here, in its NXdetector group."""
        assert self.declared.per_frame is not None
        units = self.declared.columns[0].units
        dataset = growing(detector, self.declared.per_frame, "<f8", units)
        dataset.attrs["description"] = (
            f"{self.declared.path}/{self.column} interpolated at frame_time (NaN: no reading)"
        )
        self._datasets.append(dataset)
        self._written.append(0)
        self._pending.append([])
        self._unfilled.append(0)

    def add_frame(self, stack: int, frame_time: float) -> None:
        pending = self._pending[stack]
        pending.append(frame_time)
        if not self._times and frame_time - pending[0] > KEEP_S:
            drop = int(np.searchsorted(pending, frame_time - KEEP_S))
            del pending[:drop]
            self._unfilled[stack] += drop

    def retime(self, stack: int, first: int, frame_times: np.ndarray) -> None:
        """Frames [first, first+len) of `stack` now have these times."""
        written = self._written[stack]
        waiting = written + self._unfilled[stack]  # index of the first pending frame
        pending = self._pending[stack]
        for index, frame_time in enumerate(frame_times, first):
            if index >= waiting and index - waiting < len(pending):
                pending[index - waiting] = float(frame_time)
        again = frame_times[: max(0, written - first)]
        if len(again) and self._times:
            times, values = np.asarray(self._times), np.asarray(self._values)
            keep = again >= times[0]  # older than the readings kept: left as filled
            rows = np.flatnonzero(keep) + first
            if len(rows):
                self._datasets[stack][rows[0] : rows[-1] + 1] = np.interp(
                    again[keep], times, values
                )

    def add_rows(self, times: np.ndarray, values: np.ndarray) -> None:
        self._times.extend(float(t) for t in times)
        self._values.extend(float(v) for v in values)

    def fill(self, final: bool) -> None:
        """Fill in the frames readings now bracket (all of them when `final`)."""
        if not self._times:
            return  # nothing logged (yet): nothing written
        times, values = np.asarray(self._times), np.asarray(self._values)
        for stack, pending in enumerate(self._pending):
            if self._unfilled[stack]:
                nan = np.full(self._unfilled[stack], np.nan)
                put(self._datasets[stack], self._written[stack], nan)
                self._written[stack] += len(nan)
                self._unfilled[stack] = 0
            if not pending:
                continue
            frame_times = np.asarray(pending)
            ready = len(pending) if final else int(np.searchsorted(frame_times, times[-1], "right"))
            if not ready:
                continue
            filled = np.interp(frame_times[:ready], times, values)
            put(self._datasets[stack], self._written[stack], filled)
            self._written[stack] += ready
            del pending[:ready]
        self._forget_old_rows()

    def _forget_old_rows(self) -> None:
        """Keep the readings of the last KEEP_S, and from the last one before the oldest
        waiting frame."""
        times = self._times
        keep_from = max(0, int(np.searchsorted(times, times[-1] - KEEP_S)) - 1)
        oldest = min((pending[0] for pending in self._pending if pending), default=None)
        if oldest is not None:
            keep_from = min(keep_from, max(0, int(np.searchsorted(times, oldest)) - 1))
        if keep_from > 0:
            del self._times[:keep_from]
            del self._values[:keep_from]
