"""HDF5 building blocks of the run file, re-finding handles after the file is reopened, and
reading a run file back (`open_for_reading`; `read_column`, `read_text`: a log or text
that may be absent), for the report.

The run file is written in SWMR mode, in which HDF5 cannot create objects (DESIGN.md: the
file is read while written). When a run needs new datasets (a new frame geometry,
runfile/frames.py) the writer closes the file, reopens it without SWMR, creates them and
goes back to SWMR. Closing invalidates every handle into the file, and the writer's parts
(its frame stacks, the analysis log) hold many: `handle_paths` notes where each one is held
and by which path, `rebind` puts fresh handles from the reopened file in the same places.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

_PACKAGE = __name__.rsplit(".", 1)[0]  # objects of this package's classes are walked


def read_column(group: h5py.Group, path: str, dtype: str = "<f8") -> np.ndarray:
    """A dataset's values; empty when absent (a closed run file leaves out a log nobody
    wrote: runfile/finish.py)."""
    dataset = group.get(path)
    return np.zeros(0, dtype=dtype) if dataset is None else dataset[:]


def open_for_reading(path: str | Path) -> h5py.File:
    """A run file open read-only: plainly when no writer has it open, else as a SWMR reader.

    Not SWMR always: a SWMR reader skips HDF5's end-of-file check (the file may grow), and
    reading a truncated file (a copy cut short) then retries each block past its end without
    end (HDF5 2.0: minutes, then still waiting). Opened plainly, HDF5 refuses a truncated file
    at once; a file a writer in another process has open (its consistency flags set: a run
    being written, or a writer that died) is refused with "already open for write" and read
    as a SWMR reader. (In the writer's own process HDF5 shares its open file: plain works.)
    """
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "already open for" not in str(exc):
            raise
    return h5py.File(path, "r", libver="latest", swmr=True)


def read_text(group: h5py.Group, path: str) -> str:
    """A scalar string dataset's text; "" when absent."""
    dataset = group.get(path)
    if dataset is None:
        return ""
    value = dataset[()]
    return value.decode() if isinstance(value, bytes) else str(value)


def group(parent: h5py.Group, name: str, nx_class: str, **attrs: Any) -> h5py.Group:
    made = parent.create_group(name)
    made.attrs["NX_class"] = nx_class
    for key, value in attrs.items():
        made.attrs[key] = value
    return made


def growing(
    parent: h5py.Group, name: str, dtype: Any, units: str | None = None, chunk: int = 1024
) -> h5py.Dataset:
    dataset = parent.create_dataset(
        name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,)
    )
    if units:
        dataset.attrs["units"] = units
    return dataset


def scalar(parent: h5py.Group, name: str, value: Any, units: str | None = None) -> h5py.Dataset:
    dataset = parent.create_dataset(name, data=value)
    if units:
        dataset.attrs["units"] = units
    return dataset


def put(dataset: h5py.Dataset, index: int, values: np.ndarray) -> None:
    """Write rows [index, index+len) (growing the dataset to exactly that length).

    Writing at the row a record owns, rather than appending at the dataset's current end,
    keeps the columns of a record aligned even when an earlier write failed halfway: the
    record is simply written again at the same rows.
    """
    dataset.resize((index + len(values),))
    dataset[index:] = values


def fixed(text: str, length: int) -> bytes:
    """Text for a fixed-length string column (SWMR readers do not reliably see appended
    variable-length strings)."""
    return text.encode("utf-8")[:length]


# ----- handles across a reopen ---------------------------------------------------------------
HandleSlot = tuple[Any, Any, str]  # (holder: object, dict or list; attribute/key/index; path)


def handle_paths(root: object) -> list[HandleSlot]:
    """Every dataset or group handle reachable from `root`, with where it is held.

    Walks attributes of objects of this package's classes, dict values and list items (not
    h5py.File objects: the caller replaces the file). A handle in a tuple cannot be put back
    and is refused (TypeError), so such a holder is found by the tests, not in a run.
    """
    slots: list[HandleSlot] = []
    seen: set[int] = set()

    def visit(holder: Any, key: Any, value: Any) -> None:
        if isinstance(value, h5py.File):
            return
        if isinstance(value, (h5py.Dataset, h5py.Group)):
            slots.append((holder, key, value.name))
            return
        if id(value) in seen:
            return
        if isinstance(value, dict):
            seen.add(id(value))
            for item_key, item in value.items():
                visit(value, item_key, item)
        elif isinstance(value, list):
            seen.add(id(value))
            for index, item in enumerate(value):
                visit(value, index, item)
        elif isinstance(value, tuple):
            if any(isinstance(item, (h5py.Dataset, h5py.Group)) for item in value):
                raise TypeError(f"an HDF5 handle held in a tuple ({key!r}) cannot be rebound")
        elif type(value).__module__.startswith(_PACKAGE) and hasattr(value, "__dict__"):
            seen.add(id(value))
            for name, item in vars(value).items():
                visit(value, name, item)

    seen.add(id(root))
    for name, item in vars(root).items():
        visit(root, name, item)
    return slots


def rebind(slots: list[HandleSlot], file: h5py.File) -> None:
    """Put the handle of each noted path, from `file`, where the old one was held."""
    for holder, key, path in slots:
        handle = file[path]
        if isinstance(holder, (dict, list)):
            holder[key] = handle
        else:
            setattr(holder, key, handle)
