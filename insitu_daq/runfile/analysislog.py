"""The live analysis's part of the run file: /entry/analysis (NXprocess) and its NXlogs.

Layout (DESIGN.md; times in s since /entry/start_time, the run clock of the frames):

    /entry/analysis                 NXprocess  program, version, parameters (NXnote, JSON)
      /d_spacing                    NXcollection
        /<reflection>               NXlog  time [s], value [m] (NaN: not detected),
                                           intensity (relative power above background)
      /phase_fraction               NXcollection
        /layered, /disordered, /rock_salt   NXlog  time [s], value (0-1: share of the
                                           particle tiles classified so), presence (0-1:
                                           share in which the phase is seen at all)
      /front_position               NXlog  time [s], value [nm]
      /front_velocity               NXlog  time [s], value [nm/s]
      /expansion                    NXlog  time [s], value (A/A_ref - 1)
      /projected_area               NXlog  time [s], value [m^2]
      /results                      NXlog  time [s], image_id, latency [s], skipped,
                                           integrated_frames: one row per analysed frame

The groups and columns are built from the quantities' declarations (analysis/quantities.py:
group, column, units), so a newly declared quantity gets its log with no edit here. A log gets
a row when a result carries any of its quantities (pipeline.py: present = analysed); a
quantity analysed but not measurable is stored as NaN, so "not measurable" stays visible.
Everything is created at construction because the file goes to SWMR mode right after
(RunWriter._build): nothing can be created later, only grown. The members of a family (the
reflections of one run, the phases) share one time dataset (they come from the same results),
linked into each NXlog.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from insitu_daq import __version__
from insitu_daq.analysis.quantities import Quantity, members, registered
from insitu_daq.runfile.layout import ANALYSIS

log = logging.getLogger(__name__)

PROGRAM = "insitu-daq live analysis"


def _group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def _growing(group: h5py.Group, name: str, dtype: str, units: str | None) -> h5py.Dataset:
    dataset = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
    if units:
        dataset.attrs["units"] = units
    return dataset


def _append(dataset: h5py.Dataset, index: int, value: float) -> None:
    """Write row `index` (the log's own count, so a failed append is redone in place)."""
    dataset.resize((index + 1,))
    dataset[index] = value


def _number(value: Any) -> float:
    """A result value as a float; None (not measurable) and non-numbers become NaN."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class _Log:
    """One NXlog: its time dataset (possibly shared) and value-like columns."""

    def __init__(self, time: h5py.Dataset, columns: dict[str, h5py.Dataset]) -> None:
        self.time = time
        self.columns = columns
        self.rows = 0


class _GroupLog:
    """The NXlogs of one declared group: one for a single quantity, one per member for a
    family, with one time for all of them. `keys`: (result key, member, column) per column."""

    def __init__(self, logs: dict[str, _Log], keys: list[tuple[str, str, str]]) -> None:
        self.logs = logs
        self.keys = keys
        self.rows = 0

    def append(self, time_s: float, values: Mapping[str, Any]) -> None:
        if not any(key in values for key, _, _ in self.keys):
            return
        _append(next(iter(self.logs.values())).time, self.rows, time_s)
        for key, member, column in self.keys:
            _append(self.logs[member].columns[column], self.rows, _number(values.get(key)))
        self.rows += 1


class AnalysisLog:
    """Creates /entry/analysis under `entry` and appends live results to it."""

    def __init__(
        self,
        entry: h5py.Group,
        reflections: Sequence[str],
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        start = entry["start_time"][()] if "start_time" in entry else b""
        start = start.decode() if isinstance(start, bytes) else str(start)
        self.reflections = tuple(reflections)
        self.results_appended = 0
        self.malformed_total = 0  # results refused (no usable time), logged
        process = _group(entry, ANALYSIS, "NXprocess")
        process.create_dataset("program", data=PROGRAM)
        process.create_dataset("version", data=__version__)
        note = _group(process, "parameters", "NXnote")
        note.create_dataset("type", data="application/json")
        note.create_dataset("data", data=json.dumps(dict(parameters or {}), sort_keys=True))

        def time_dataset(group: h5py.Group) -> h5py.Dataset:
            dataset = _growing(group, "time", "<f8", "s")
            dataset.attrs["start"] = start
            return dataset

        declared: dict[str, list[Quantity]] = {}
        for quantity in registered():
            declared.setdefault(quantity.group, []).append(quantity)
        self._groups: list[_GroupLog] = []
        for name, quantities in declared.items():
            per = quantities[0].per
            if any(quantity.per != per for quantity in quantities):
                raise ValueError(f"analysis group {name}: a family and a single quantity mixed")
            parent = _group(process, name, "NXcollection") if per else process
            logs: dict[str, _Log] = {}
            keys: list[tuple[str, str, str]] = []
            shared_time: h5py.Dataset | None = None
            for member in members(quantities[0], self.reflections):
                group = _group(parent, member or name, "NXlog")
                if shared_time is None:
                    shared_time = time_dataset(group)
                else:
                    group["time"] = h5py.SoftLink(shared_time.name)
                columns = {}
                for quantity in quantities:
                    column = _growing(group, quantity.column, "<f8", quantity.unit)
                    if quantity.note:
                        column.attrs["description"] = quantity.note
                    columns[quantity.column] = column
                    keys.append((quantity.key_for(member), member, quantity.column))
                logs[member] = _Log(shared_time, columns)
            if logs:  # a run without reflections has no d_spacing member
                self._groups.append(_GroupLog(logs, keys))

        results = _group(process, "results", "NXlog")
        results.attrs["description"] = "one row per analysed frame"
        self._results = _Log(
            time_dataset(results),
            {
                "image_id": _growing(results, "image_id", "<i8", None),
                "latency": _growing(results, "latency", "<f8", "s"),
                "skipped": _growing(results, "skipped", "<i8", None),
                "integrated_frames": _growing(results, "integrated_frames", "<i8", None),
            },
        )
        self._results.columns["latency"].attrs["description"] = (
            "frame arrival at the ingest to the analysis result"
        )

    def append(self, result: Mapping[str, Any]) -> None:
        """One live result {"time", "image_id", "latency_s", "skipped", "values": {...}}."""
        time_s = _number(result.get("time"))
        values = result.get("values")
        if not math.isfinite(time_s) or not isinstance(values, Mapping):
            self.malformed_total += 1
            log.warning("analysis result without a time or values refused: %r", result)
            return
        results = self._results
        _append(results.time, results.rows, time_s)
        image_id = result.get("image_id")
        image_id = int(image_id) if isinstance(image_id, int) else -1
        _append(results.columns["image_id"], results.rows, image_id)
        _append(results.columns["latency"], results.rows, _number(result.get("latency_s")))
        for column, key in (("skipped", "skipped"), ("integrated_frames", "integrated_frames")):
            count = result.get(key)
            _append(results.columns[column], results.rows, count if isinstance(count, int) else -1)
        results.rows += 1

        for group in self._groups:
            group.append(time_s, values)
        self.results_appended += 1


def read_log(group: h5py.Group) -> tuple[np.ndarray, np.ndarray]:
    """(time, value) of an NXlog written here (for the report and tests)."""
    return group["time"][:], group["value"][:]
