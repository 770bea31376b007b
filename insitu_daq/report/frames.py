"""Which frame of a run file is which, and sums of frames: for the report figure and the web
view's replay (web/replay.py).

A run's frames are in one NXdetector per frame geometry (runfile/frames.py, layout.detector).
`read_frame_index` lists every frame of every geometry with its time, imaging mode and pixel
size. A frame's mode is its `imaging_mode` column where the ingest decided it ("hrtem", "lm",
"settling"). Where it did not ("" while the run is written, "unknown" when no imaging state
reached the ingest, as in files written before it did), the runner's microscope events say
it, as the report figure reads them: the mode of the last switch before the frame, and
"settling" within SETTLE_S after that switch.

Reads only, from a file open for reading (SWMR or not): a column still being written may be
shorter than `frame_time`, and `data` may hold more rows than `frame_time` until the writer's
next flush, so a frame counts only once both have it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import h5py
import numpy as np

from insitu_daq.runfile import layout
from insitu_daq.runfile.frames import SETTLING, UNDECIDED, UNKNOWN
from insitu_daq.runfile.h5util import read_column

# A frame this soon after an imaging-mode switch may still show the previous mode (the camera
# integrates across the switch; live analysis skips it as settling too): run seconds.
SETTLE_S = 0.3
_UNDECIDED_MODES = (UNDECIDED, UNKNOWN)


@dataclass(frozen=True)
class FrameIndex:
    """Every frame of a run file: one entry per frame, stacks one after the other."""

    time: np.ndarray  # run s (frame_time)
    mode: np.ndarray  # str: "hrtem", "lm", "settling", "" (not known)
    pixel_m: np.ndarray  # specimen-plane pixel size, m (NaN: not known)
    image_id: np.ndarray
    stack: np.ndarray  # which frame geometry (layout.detector(stack))
    row: np.ndarray  # the frame's row in that geometry's `data`

    def __len__(self) -> int:
        return len(self.time)

    def of_mode(self, mode: str) -> np.ndarray:
        """Indices of the frames taken in `mode`, in file order."""
        return np.flatnonzero(self.mode == mode)


def frame_stacks(file: h5py.File) -> list[h5py.Group]:
    """The NXdetector group of each frame geometry, the first (the contract's) first."""
    instrument = file[layout.INSTRUMENT]
    stacks = {layout.stack_of(name): name for name in instrument}
    return [instrument[stacks[k]] for k in sorted(k for k in stacks if k is not None)]


def event_modes(changes: list[tuple[float, str]], frame_time: np.ndarray) -> np.ndarray:
    """Each frame's mode by the microscope events (report/events.py `imaging_modes`): the
    mode switched to last before it, SETTLING within SETTLE_S of that switch, "" before any."""
    modes = np.full(len(frame_time), UNDECIDED, dtype=object)
    if not changes:
        return modes
    times = np.array([t for t, _ in changes])
    names = np.array([m for _, m in changes], dtype=object)
    which = np.searchsorted(times, frame_time, side="right") - 1
    known = which >= 0
    modes[known] = names[which[known]]
    settling = known & (frame_time - times[np.maximum(which, 0)] < SETTLE_S)
    modes[settling] = SETTLING
    return modes


def _padded(values: np.ndarray, n: int, fill: object) -> np.ndarray:
    """`values` cut or padded with `fill` to n (a column the writer has not caught up on)."""
    out = np.full(n, fill, dtype=object if isinstance(fill, str) else values.dtype)
    k = min(n, len(values))
    out[:k] = values[:k]
    return out


def _stack_index(
    group: h5py.Group, number: int, changes: list[tuple[float, str]], start_mode: str | None
) -> FrameIndex:
    frame_time = read_column(group, "frame_time")
    data = group.get("data")
    n = min(len(frame_time), data.shape[0] if data is not None else 0)
    frame_time = frame_time[:n].astype(float)
    column = [m.decode() for m in read_column(group, "imaging_mode", "S1")]
    mode = _padded(np.array(column, dtype=object), n, UNDECIDED)
    undecided = np.isin(mode, _UNDECIDED_MODES)
    mode[undecided] = event_modes(changes, frame_time[undecided])
    pixel = _padded(read_column(group, "pixel_size").astype(float), n, np.nan)
    # The detector's x_pixel_size is the run's pixel at its start (RunMetadata), so it stands
    # in only for frames in the mode the run started in.
    start_pixel = group.get("x_pixel_size")
    if start_pixel is not None and start_mode:
        unknown = ~np.isfinite(pixel) & (mode == start_mode)
        pixel[unknown] = float(start_pixel[()])
    image_id = _padded(read_column(group, "image_id", "<i8"), n, -1)
    return FrameIndex(
        time=frame_time,
        mode=mode.astype(str),
        pixel_m=pixel.astype(float),
        image_id=image_id.astype(np.int64),
        stack=np.full(n, number, dtype=np.int64),
        row=np.arange(n, dtype=np.int64),
    )


def read_frame_index(
    file: h5py.File, changes: list[tuple[float, str]], start_mode: str | None = None
) -> FrameIndex:
    """Every frame of every geometry. `changes`: the microscope events' mode changes
    (report/events.py `imaging_modes`); `start_mode`: the mode the run started in."""
    parts = [
        _stack_index(group, number, changes, start_mode)
        for number, group in enumerate(frame_stacks(file))
    ]
    if not parts:
        empty = np.zeros(0)
        ints = np.zeros(0, dtype=np.int64)
        return FrameIndex(empty, np.zeros(0, dtype=str), empty, ints, ints, ints)
    return FrameIndex(
        *(np.concatenate([getattr(p, field.name) for p in parts]) for field in fields(FrameIndex))
    )


def sum_rows(data: h5py.Dataset, rows: Iterable[int]) -> np.ndarray:
    """The float64 sum of the frames at `rows` of one geometry's `data` (a dose sum). OSError
    if a frame cannot be read (a compression filter missing: import hdf5plugin first)."""
    image = np.zeros(data.shape[1:], dtype=np.float64)
    for row in sorted(rows):
        image += data[row]
    return image
