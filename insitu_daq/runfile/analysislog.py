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

A log gets a row when a result carries its quantity (pipeline.py: present = analysed); a
quantity analysed but not measurable is stored as NaN, so "not measurable" stays visible.
Everything is created at construction because the file goes to SWMR mode right after
(RunWriter._build): nothing can be created later, only grown. The reflections of one run
share one time dataset (they come from the same results), linked into each NXlog.
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
from insitu_daq.analysis.keys import PHASE_KEYS, PRESENCE_KEYS, d_spacing_key, intensity_key

log = logging.getLogger(__name__)

PROGRAM = "insitu-daq live analysis"
# Single-quantity logs: (group name, result key, units).
SCALAR_LOGS = (
    ("front_position", "front_position_nm", "nm"),
    ("front_velocity", "front_velocity_nm_s", "nm/s"),
    ("expansion", "expansion", "1"),
    ("projected_area", "projected_area_m2", "m^2"),
)


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
        process = _group(entry, "analysis", "NXprocess")
        process.create_dataset("program", data=PROGRAM)
        process.create_dataset("version", data=__version__)
        note = _group(process, "parameters", "NXnote")
        note.create_dataset("type", data="application/json")
        note.create_dataset("data", data=json.dumps(dict(parameters or {}), sort_keys=True))

        def time_dataset(group: h5py.Group) -> h5py.Dataset:
            dataset = _growing(group, "time", "<f8", "s")
            dataset.attrs["start"] = start
            return dataset

        # Per reflection: d and intensity, one time dataset shared by all of them.
        self._reflection_logs: dict[str, _Log] = {}
        d_spacing = _group(process, "d_spacing", "NXcollection")
        shared_time: h5py.Dataset | None = None
        for name in self.reflections:
            group = _group(d_spacing, name, "NXlog")
            if shared_time is None:
                shared_time = time_dataset(group)
            else:
                group["time"] = h5py.SoftLink(shared_time.name)
            value = _growing(group, "value", "<f8", "m")
            intensity = _growing(group, "intensity", "<f8", None)
            intensity.attrs["description"] = (
                "relative power above background in the reflection's window (spectrum.py)"
            )
            self._reflection_logs[name] = _Log(
                shared_time, {"value": value, "intensity": intensity}
            )
        self._d_time_rows = 0

        self._phase_logs: dict[str, _Log] = {}
        fractions = _group(process, "phase_fraction", "NXcollection")
        phase_time: h5py.Dataset | None = None
        for phase in PHASE_KEYS:
            group = _group(fractions, phase, "NXlog")
            if phase_time is None:
                phase_time = time_dataset(group)
            else:
                group["time"] = h5py.SoftLink(phase_time.name)
            presence = _growing(group, "presence", "<f8", "1")
            presence.attrs["description"] = (
                "share of the particle tiles in which the phase's marker is detected, whichever "
                "phase the tile was classified (phasemap.py)"
            )
            self._phase_logs[phase] = _Log(
                phase_time, {"value": _growing(group, "value", "<f8", "1"), "presence": presence}
            )
        self._phase_time_rows = 0

        self._scalar_logs: dict[str, _Log] = {}
        for name, key, units in SCALAR_LOGS:
            group = _group(process, name, "NXlog")
            self._scalar_logs[key] = _Log(
                time_dataset(group), {"value": _growing(group, "value", "<f8", units)}
            )

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

        if any(d_spacing_key(name) in values for name in self.reflections):
            _append(next(iter(self._reflection_logs.values())).time, self._d_time_rows, time_s)
            for name, entry in self._reflection_logs.items():
                d = _number(values.get(d_spacing_key(name)))
                _append(entry.columns["value"], self._d_time_rows, d)
                intensity = _number(values.get(intensity_key(name)))
                _append(entry.columns["intensity"], self._d_time_rows, intensity)
            self._d_time_rows += 1

        if any(key in values for key in PHASE_KEYS.values()):
            _append(next(iter(self._phase_logs.values())).time, self._phase_time_rows, time_s)
            for phase, entry in self._phase_logs.items():
                for column, keys in (("value", PHASE_KEYS), ("presence", PRESENCE_KEYS)):
                    value = _number(values.get(keys[phase]))
                    _append(entry.columns[column], self._phase_time_rows, value)
            self._phase_time_rows += 1

        for key, entry in self._scalar_logs.items():
            if key in values:
                _append(entry.time, entry.rows, time_s)
                _append(entry.columns["value"], entry.rows, _number(values[key]))
                entry.rows += 1
        self.results_appended += 1


def read_log(group: h5py.Group) -> tuple[np.ndarray, np.ndarray]:
    """(time, value) of an NXlog written here (for the report and tests)."""
    return group["time"][:], group["value"][:]
