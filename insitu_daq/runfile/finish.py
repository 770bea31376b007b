"""What a run file gets once its run is closed: per-mode NXdata and no empty datasets.

The writer closes the SWMR file first (so the file is complete even if this fails), then
opens it once more, writable, without SWMR (and without HDF5's file lock: a SWMR reader may
still hold it; it should reopen the file after the run closed).

Calibrated image axes. A run switches between HRTEM and low magnification, so the pixel size
changes within a stack and /entry/data (the whole stack, DESIGN.md's contract) cannot carry
one image calibration. Each (stack, imaging mode, pixel size) found in the per-frame
`imaging_mode` and `pixel_size` columns (runfile/frames.py) gets an NXdata of its own:

    /entry/images_<mode>[_<j>] NXdata  @signal="data" @axes=["frame_time", "y", "x"]
                                       @interpretation="image" @mode @detector
      data, data_<channel>     virtual datasets: that mode's frames of the stack, mapped
                               as slices of the stored frames (no copy; contiguous runs)
      frame_time, image_id     [k] of those frames
      frame_index              [k] their rows in the detector group (and in /entry/data)
      y, x                     pixel positions from 0, nm (uniform steps: the pixel size)
      pixel_size               m

(`_<j>`, j = 2, 3, ..., for a second pixel size of the same mode, or the same mode in
another frame stack.) Settling and unknown frames are in no such group; they stay in
/entry/data with the rest. The names do not begin with "data": RosettaSciIO's
`use_default=True` takes every NXdata whose path contains the default's (/entry/data).
nexusformat (2.1) takes any virtual dataset for a stack of one source file per frame and
misreads these (shape (runs of frames, y, x)): its users read the axes here and the frames
from /entry/data at `frame_index`.

The dose map. The exposure log (/entry/dose/exposure: each field's dose, service/dose.py)
becomes /entry/dose/map, an NXdata image of the dose per cell of the specimen
(analysis/dose.py: each exposure adds its dose to every cell its field touches):

    /entry/dose/map   NXdata @signal="dose" @axes=["y", "x"] @cell_size (nm)
      dose            [y, x] e/angstrom^2
      x, y            cell centres, nm (specimen coordinates: stage + image shift)

No empty datasets. NeXus readers (HyperSpy's RosettaSciIO reads every dataset as metadata)
fail on zero-size datasets, so a log nobody wrote (no holder position, no analysis of that
quantity, ...) is removed, with the soft links to it and the groups left empty; a run with
no frame at all keeps its empty frame datasets (the contract's /entry/data).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from insitu_daq.analysis.dose import CELL_NM, Field, map_of
from insitu_daq.runfile.frames import SETTLING, UNDECIDED, UNKNOWN
from insitu_daq.runfile.layout import DOSE_EXPOSURE, DOSE_MAP, ENTRY, frames_nxdata

_NOT_A_MODE = {SETTLING.encode(), UNKNOWN.encode(), UNDECIDED.encode()}


@dataclass
class FinishResult:
    imaging_groups: list[str] = field(default_factory=list)  # NXdata paths made
    removed: list[str] = field(default_factory=list)  # empty datasets, links, groups removed


def finish_run_file(path: Path, detectors: Sequence[tuple[str, int]]) -> FinishResult:
    """Finish the closed run file at `path`; `detectors`: (NXdetector path, frames) of each
    frame stack, the first the contract's."""
    result = FinishResult()
    with h5py.File(path, "r+", libver="latest", locking=False) as f:
        entry = f[ENTRY]
        for detector, frames in detectors:
            if frames:
                result.imaging_groups += _imaging_groups(entry, f[detector], frames)
        _dose_map(f)
        first, frames = detectors[0]
        keep = () if frames else (first, frames_nxdata(0))
        result.removed = _prune_empty(f, keep)
    return result


# ----- the dose map ---------------------------------------------------------------------------
def exposures_of(f: h5py.File) -> list[tuple[Field, float]]:
    """The (field, dose) rows of a run file's dose exposure log (none: an empty list)."""
    log = DOSE_EXPOSURE
    if log.path not in f or log.column("dose") not in f:
        return []
    dose, x0, x1, y0, y1 = (
        f[log.column(name)][()] for name in ("dose", "x_min", "x_max", "y_min", "y_max")
    )
    n = min(len(dose), len(x0), len(x1), len(y0), len(y1))
    return [
        (Field(float(x0[i]), float(x1[i]), float(y0[i]), float(y1[i])), float(dose[i]))
        for i in range(n)
    ]


def _dose_map(f: h5py.File) -> None:
    exposures = exposures_of(f)
    if not exposures:
        return
    xs, ys, grid = map_of(exposures, CELL_NM).grid()
    if not grid.size:
        return
    nxdata = f.create_group(DOSE_MAP)
    nxdata.attrs.update(NX_class="NXdata", signal="dose", axes=["y", "x"])
    nxdata.attrs["cell_size"] = CELL_NM
    nxdata.attrs["description"] = (
        "highest dose any point in each cell of the specimen may have had: every exposure"
        " adds its dose to each cell its field touches (/entry/dose/exposure)"
    )
    nxdata.create_dataset("dose", data=grid).attrs["units"] = "e/angstrom^2"
    nxdata.create_dataset("x", data=xs).attrs["units"] = "nm"
    nxdata.create_dataset("y", data=ys).attrs["units"] = "nm"


# ----- per-mode NXdata ------------------------------------------------------------------------
def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs [start, stop) of sorted row indices."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.r_[0, breaks]
    stops = np.r_[breaks, len(rows)]
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def _group_name(entry: h5py.Group, mode: str) -> str:
    base = "images_" + (re.sub(r"[^a-z0-9]+", "_", mode.lower()).strip("_") or "mode")
    if base not in entry:
        return base
    j = 2
    while f"{base}_{j}" in entry:
        j += 1
    return f"{base}_{j}"


def _imaging_groups(entry: h5py.Group, detector: h5py.Group, frames: int) -> list[str]:
    n = min(frames, len(detector["frame_time"]), len(detector["imaging_mode"]))
    modes = detector["imaging_mode"][:n]
    pixels = detector["pixel_size"][:n]
    frame_time = detector["frame_time"][:n]
    image_id = detector["image_id"][:n]
    known = np.array([m not in _NOT_A_MODE for m in modes], dtype=bool)
    known &= np.isfinite(pixels) & (pixels > 0)
    channels = [
        name
        for name, item in detector.items()
        if isinstance(item, h5py.Dataset) and item.ndim == 3 and "channel" in item.attrs
    ]
    channels.sort(key=lambda name: (name != "data", name))
    made = []
    seen: set[tuple[bytes, float]] = set()
    for index in np.flatnonzero(known):
        key = (bytes(modes[index]), float(pixels[index]))
        if key in seen:
            continue
        seen.add(key)
        rows = np.flatnonzero(known & (modes == key[0]) & (pixels == key[1]))
        made.append(_imaging_group(entry, detector, channels, key, rows, frame_time, image_id))
    return made


def _imaging_group(
    entry: h5py.Group,
    detector: h5py.Group,
    channels: list[str],
    key: tuple[bytes, float],
    rows: np.ndarray,
    frame_time: np.ndarray,
    image_id: np.ndarray,
) -> str:
    mode, pixel_m = key[0].decode(), key[1]
    group = entry.create_group(_group_name(entry, mode))
    group.attrs["NX_class"] = "NXdata"
    group.attrs["signal"] = "data"
    group.attrs["axes"] = ["frame_time", "y", "x"]
    group.attrs["frame_time_indices"] = 0
    group.attrs["y_indices"] = 1
    group.attrs["x_indices"] = 2
    group.attrs["interpretation"] = "image"  # RosettaSciIO reads it from the group
    group.attrs["mode"] = mode
    group.attrs["detector"] = detector.name
    if len(channels) > 1:
        group.attrs["auxiliary_signals"] = channels[1:]
    runs = _runs(rows)
    for name in channels:
        source = detector[name]
        layout = h5py.VirtualLayout(shape=(len(rows), *source.shape[1:]), dtype=source.dtype)
        virtual = h5py.VirtualSource(source)
        at = 0
        for start, stop in runs:
            layout[at : at + stop - start] = virtual[start:stop]
            at += stop - start
        dataset = group.create_virtual_dataset(name, layout)
        dataset.attrs["units"] = "counts"
        dataset.attrs["interpretation"] = "image"
        dataset.attrs["channel"] = source.attrs["channel"]
    time = group.create_dataset("frame_time", data=frame_time[rows])
    time.attrs["units"] = "s"
    time.attrs["start"] = detector["frame_time"].attrs.get("start", "")
    group.create_dataset("image_id", data=image_id[rows])
    index = group.create_dataset("frame_index", data=rows)
    index.attrs["description"] = f"the frames' rows in {detector.name} (its data, its columns)"
    pixel_nm = pixel_m * 1e9
    rows_px, cols_px = detector[channels[0]].shape[1:]
    for axis, size in (("y", rows_px), ("x", cols_px)):
        values = group.create_dataset(axis, data=np.arange(size) * pixel_nm)
        values.attrs["units"] = "nm"
        values.attrs["long_name"] = f"{axis} (specimen plane)"
    pixel = group.create_dataset("pixel_size", data=pixel_m)
    pixel.attrs["units"] = "m"
    return group.name


# ----- no empty datasets ----------------------------------------------------------------------
def _kept(path: str, keep: Sequence[str]) -> bool:
    return any(path == k or path.startswith(k + "/") for k in keep)


def _prune_empty(f: h5py.File, keep: Sequence[str]) -> list[str]:
    """Remove zero-size datasets, then soft links left dangling, then groups left empty
    by these removals; returns the paths removed."""
    removed: list[str] = []
    emptied: set[str] = set()
    empty: list[str] = []
    f.visititems(
        lambda name, item: (
            empty.append("/" + name) if isinstance(item, h5py.Dataset) and item.size == 0 else None
        )
    )
    for path in empty:
        if _kept(path, keep):
            continue
        del f[path]
        removed.append(path)
        emptied.add(path.rsplit("/", 1)[0] or "/")
    groups: list[str] = ["/"]
    f.visititems(
        lambda name, item: groups.append("/" + name) if isinstance(item, h5py.Group) else None
    )
    for path in groups:
        group = f[path]
        for name in list(group):
            link = group.get(name, getlink=True)
            full = f"{path.rstrip('/')}/{name}"
            if isinstance(link, h5py.SoftLink) and link.path not in f and not _kept(full, keep):
                del group[name]
                removed.append(full)
                emptied.add(path)
    for path in sorted(emptied, key=lambda p: p.count("/"), reverse=True):
        while path != "/" and path in f and not len(f[path]) and not _kept(path, keep):
            del f[path]
            removed.append(path)
            path = path.rsplit("/", 1)[0] or "/"
    return removed
