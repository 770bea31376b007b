"""The run file: one NeXus HDF5 file per run, written in SWMR mode by one owner.

Layout (DESIGN.md, fixed; its paths and growing logs declared in layout.py): /entry with
instrument/detector frames, sample bias and current NXlogs, events, the protocol text and an
NXdata link. Every group has @NX_class and every dataset with a unit has @units. All times
are seconds since /entry/start_time.

Why it is shaped so:
- SWMR forbids creating objects once readers may attach, so every group and dataset the run
  is known to need is made in `__init__` (the detector's from the `FrameGeometry` known when
  the run opens) and only grown afterwards.
- The frames follow the stream (runfile/frames.py): a series that starts after the run
  opened with another geometry re-makes the still empty frame datasets; a new geometry once
  frames are stored gets its own /entry/instrument/detector_<k> and /entry/frames_<k>. Either
  briefly leaves SWMR (`_change_layout`: close, reopen without SWMR, create, SWMR again): a
  SWMR reader must reopen the file then (the ingest records a `file_layout` event).
- Frames go in as received: a bslz4 or lz4 payload is already an HDF5 chunk of the matching
  filter, so `write_direct_chunk` stores it with no decompress/recompress.
- The per-frame bias is interpolated from the bias log at frame_time. Bias samples arrive from
  another process and may lag the frames, so a frame's bias is written as NaN first and filled
  in once a sample later than its frame_time is known (or, at close, from the last sample).
  The per-frame imaging state (mode, pixel size, dose rate) likewise waits for the daemon's
  imaging watermark to pass the frame (core/imaging.py, runfile/frames.py).
- Per-frame columns are written in batches (see `write_frame`): readers count frames by
  `frame_time`; `data` may hold more rows until the next flush.
- Strings in growing datasets are fixed-length UTF-8: SWMR readers do not reliably see
  variable-length data appended by a writer.
- At close the file is finished (runfile/finish.py): one NXdata per imaging mode and pixel
  size with calibrated axes, and no empty dataset (a log nobody wrote is left out).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from insitu_daq.analysis.reflections import DEFAULT_REFLECTIONS
from insitu_daq.core.imaging import ImagingState, ImagingTimeline
from insitu_daq.core.records import STATUS_LEVEL_CHANGE
from insitu_daq.runfile.analysislog import AnalysisLog
from insitu_daq.runfile.finish import FinishResult, finish_run_file
from insitu_daq.runfile.framebias import FrameBiasEstimator
from insitu_daq.runfile.frames import FrameGeometry, FrameStack
from insitu_daq.runfile.frameseries import FrameSeries
from insitu_daq.runfile.h5util import fixed as _fixed
from insitu_daq.runfile.h5util import group as _group
from insitu_daq.runfile.h5util import growing as _growing
from insitu_daq.runfile.h5util import handle_paths, rebind
from insitu_daq.runfile.h5util import put as _put
from insitu_daq.runfile.h5util import scalar as _scalar
from insitu_daq.runfile.layout import (
    BIAS_VOLTAGE,
    CURRENT,
    DATA,
    DETECTOR,
    DOSE,
    END_TIME,
    ENTRY,
    EVENTS,
    HOLDER,
    INSTRUMENT,
    KIND_LENGTH,
    LOGS,
    MESSAGE_LENGTH,
    MICROSCOPE,
    OUTPUT_LEVEL,
    PER_FRAME,
    PROTOCOL,
    PROTOCOL_FILE_NAME,
    RUN_ID,
    SAMPLE,
    SERIES,
    SOURCE_METER,
    START_TIME,
    TITLE,
    Log,
    detector,
    frames_nxdata,
)

__all__ = ["FrameGeometry", "GeometryRefusedError", "RunMetadata", "RunWriter", "units_of"]

log = logging.getLogger(__name__)

# HDF5's chunk cache per dataset. Its default (1 MB) keeps every appended column chunk until
# the megabyte is full: ~25 growing datasets made the writer's memory grow for an hour of run
# (~150 bytes a frame). Appends only need the chunk being filled (8 KB for 1024 float64);
# frame chunks (one image each) are bigger than this and bypass the cache anyway.
CHUNK_CACHE_BYTES = 64 * 1024
# Frame geometries one run file takes (each its own NXdetector); a stream changing geometry
# more often than this is refused (its frames dropped, counted and evented), not followed
# with a reopen of the file every frame.
MAX_GEOMETRIES = 8


def iso8601(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, tz=timezone.utc).isoformat()


class GeometryRefusedError(RuntimeError):
    """A frame geometry the run file does not take (MAX_GEOMETRIES reached)."""


@dataclass(frozen=True)
class RunMetadata:
    """Static facts written once: who, what, with which instruments."""

    run_id: str
    title: str
    start_time_ns: int
    sample_name: str = "LiNiO2 particle"
    chemical_formula: str = "LiNiO2"
    protocol_text: str = ""
    protocol_name: str = ""
    detector_description: str = ""
    pixel_size_m: tuple[float, float] | None = None  # (x, y)
    count_time_s: float | None = None
    source_meter: dict[str, Any] = field(default_factory=dict)  # model, serial, compliance...
    holder: dict[str, Any] = field(default_factory=dict)
    microscope: dict[str, Any] = field(default_factory=dict)
    program_version: str = ""
    # Live analysis: the tracked reflections' names and the analysis parameters
    # (runfile/analysislog.py).
    reflections: tuple[str, ...] = DEFAULT_REFLECTIONS.names
    analysis_parameters: dict[str, Any] = field(default_factory=dict)


# Metadata keys say their unit in their name (compliance_amperes, pixel_size_nm, ...).
_UNIT_SUFFIXES = (
    ("_volts_per_s", "V/s"),
    ("_e_per_a2_s", "e/angstrom^2/s"),
    ("_e_per_a2", "e/angstrom^2"),
    ("_amperes", "A"),
    ("_volts", "V"),
    ("_nm", "nm"),
    ("_hz", "Hz"),
    ("_s", "s"),
)


def units_of(key: str) -> str | None:
    """The unit a metadata key names by its suffix, or None."""
    return next((unit for suffix, unit in _UNIT_SUFFIXES if key.endswith(suffix)), None)


class RunWriter:
    """Owner of one run file. Not thread-safe: one thread (the ingest loop) calls it."""

    def __init__(
        self,
        path: Path,
        meta: RunMetadata,
        geometry: FrameGeometry,
        max_geometries: int = MAX_GEOMETRIES,
    ) -> None:
        self.path = Path(path)
        self.meta = meta
        self.max_geometries = max_geometries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # fs_strategy "none": HDF5 never reuses freed file space. Re-making the empty frame
        # datasets for a late series (stack_for) frees their space, and HDF5 2.0 reusing it
        # for the new datasets' chunk index failed the first chunk write ("duplicate entry in
        # cache"). The run file only grows otherwise (20000 frames: the same size either way).
        self._file = h5py.File(
            self.path, "w", libver="latest", rdcc_nbytes=CHUNK_CACHE_BYTES, fs_strategy="none"
        )
        self._closed = False
        self._stacks: list[FrameStack] = []
        # Per-frame columns of logged series (a heating holder's temperature: layout.PER_FRAME).
        self._frame_series = [FrameSeries(declared) for declared in PER_FRAME]
        try:
            self._build(geometry)
            self._file.swmr_mode = True
        except BaseException:
            self._file.close()
            raise
        self.samples_written = 0
        self.level_changes_written = 0
        self.events_written = 0
        self.series_written = dict.fromkeys(SERIES, 0)  # rows of each generic series
        self.analysis_results_not_kept = 0  # write_analysis with no analysis log to keep them
        self.layout_changes = 0  # times the file left SWMR to make datasets (_change_layout)
        self.finished: FinishResult | None = None  # what close() did to finish the file
        self.finish_error: str | None = None
        # Per-frame bias: a window of the bias log (the frame stacks keep what is pending).
        self._frame_bias_estimator = FrameBiasEstimator()
        # Per-frame imaging state: the microscope's states of this run and the watermark.
        self.imaging = ImagingTimeline()

    # ----- layout ----------------------------------------------------------------------------
    def _build(self, geometry: FrameGeometry) -> None:
        meta, f = self.meta, self._file
        start = iso8601(meta.start_time_ns)
        self._start = start
        f.attrs["default"] = ENTRY.lstrip("/")
        f.attrs["file_name"] = self.path.name
        f.attrs["file_time"] = start
        f.attrs["creator"] = "insitu-daq"
        entry = _group(f, ENTRY, "NXentry", default=DATA.rsplit("/", 1)[1])
        _scalar(f, START_TIME, start)
        self._end_time = f.create_dataset(END_TIME, data="", dtype=h5py.string_dtype())
        _scalar(f, RUN_ID, meta.run_id)
        _scalar(f, TITLE, meta.title)
        _scalar(entry, "program_name", "insitu-daq")
        entry["program_name"].attrs["version"] = meta.program_version

        _group(f, INSTRUMENT, "NXinstrument")
        self._add_stack(geometry)

        source_meter = _group(f, SOURCE_METER, "NXsensor")
        _scalar(source_meter, "measurement", "current")
        for key, value in meta.source_meter.items():
            _scalar(source_meter, key, value, units_of(key))
        holder = _group(f, HOLDER, "NXpositioner")
        for key, value in meta.holder.items():
            _scalar(holder, key, value, units_of(key))
        microscope = _group(f, MICROSCOPE, "NXcollection")
        for key, value in meta.microscope.items():
            _scalar(microscope, key, value, units_of(key))

        sample = _group(f, SAMPLE, "NXsample")
        _scalar(sample, "name", meta.sample_name)
        _scalar(sample, "chemical_formula", meta.chemical_formula)
        _group(f, DOSE, "NXcollection")  # the dose exposure log's (and the map's at close)
        # The growing logs (layout.LOGS): their datasets by path, for the write_* below.
        self._datasets: dict[str, h5py.Dataset] = {}
        for declared in LOGS:
            self._build_log(declared, start)

        self._analysis_log = AnalysisLog(entry, meta.reflections, meta.analysis_parameters)

        protocol = _group(f, PROTOCOL, "NXnote")
        _scalar(protocol, "type", "text/plain")
        _scalar(f, PROTOCOL_FILE_NAME, meta.protocol_name)
        _scalar(protocol, "data", meta.protocol_text)

        self._link_nxdata(f, frames_nxdata(0), DETECTOR)

    def _build_log(self, declared: Log, start: str) -> None:
        group = _group(self._file, declared.path, "NXlog")
        if declared.description:
            group.attrs["description"] = declared.description
        times = ("time", "time_errors") if declared.time_errors else ("time",)
        if declared.time_from is not None:
            for name in times:
                group[name] = h5py.SoftLink(f"{declared.time_from}/{name}")
        else:
            for name in times:
                dataset = _growing(group, name, "<f8", "s", chunk=declared.chunk)
                self._datasets[dataset.name] = dataset
            group["time"].attrs["start"] = start
        for column in declared.columns:
            dataset = _growing(group, column.name, column.dtype, column.units, declared.chunk)
            if column.description:
                dataset.attrs["description"] = column.description
            self._datasets[dataset.name] = dataset

    def _append(self, declared: Log, index: int, **columns: np.ndarray) -> None:
        """Write rows from `index` of `declared`'s columns (time included)."""
        for name, values in columns.items():
            _put(self._datasets[declared.column(name)], index, values)

    @staticmethod
    def _link_nxdata(file: h5py.File, path: str, detector: str) -> None:
        data = _group(file, path, "NXdata", signal="data")
        data.attrs["axes"] = ["frame_time", ".", "."]
        data.attrs["frame_time_indices"] = 0
        data["data"] = h5py.SoftLink(f"{detector}/data")
        data["frame_time"] = h5py.SoftLink(f"{detector}/frame_time")

    def _add_stack(self, geometry: FrameGeometry) -> FrameStack:
        """A frame stack for `geometry`: /entry/instrument/detector for the first, then
        detector_<k> with its NXdata /entry/frames_<k> (the file must be writable, not SWMR;
        not "data_<k>": RosettaSciIO's use_default takes every NXdata path containing
        the default's, /entry/data)."""
        index = len(self._stacks)
        meta = self.meta
        scalars: dict[str, tuple[Any, str | None]] = {}
        if meta.pixel_size_m:
            scalars["x_pixel_size"] = (meta.pixel_size_m[0], "m")
            scalars["y_pixel_size"] = (meta.pixel_size_m[1], "m")
        if meta.count_time_s is not None:
            scalars["count_time"] = (meta.count_time_s, "s")
        path = detector(index)
        group = _group(self._file, path, "NXdetector")
        stack = FrameStack.create(group, geometry, self._start, meta.detector_description, scalars)
        self._stacks.append(stack)
        for series in self._frame_series:
            series.add_stack(group)
        if index:
            self._link_nxdata(self._file, frames_nxdata(index), path)
        return stack

    def _change_layout(self, change: Callable[[], None]) -> None:
        """Leave SWMR to create objects: flush, close, reopen writable, `change`, SWMR again.

        Every handle the writer holds is found again by its path (h5util.rebind). The file
        is reopened without HDF5's file locking: a SWMR reader holds a shared lock that
        would refuse the writer; such a reader must reopen the file afterwards (it sees the
        new objects only then, and may read an inconsistent view during these milliseconds).
        """
        for stack in self._stacks:
            stack.write_pending_rows()
        slots = handle_paths(self)
        self._file.close()
        self._file = h5py.File(
            self.path, "r+", libver="latest", rdcc_nbytes=CHUNK_CACHE_BYTES, locking=False
        )
        try:
            rebind(slots, self._file)
            del slots  # (it keeps the old holders: handles `change` lets go of must close)
            change()
        finally:
            self._file.swmr_mode = True
            self.layout_changes += 1

    # ----- frames ----------------------------------------------------------------------------
    @property
    def geometry(self) -> FrameGeometry:
        """The first frame geometry (/entry/instrument/detector, /entry/data)."""
        return self._stacks[0].geometry

    @property
    def geometries(self) -> list[FrameGeometry]:
        return [stack.geometry for stack in self._stacks]

    @property
    def frames_written(self) -> int:
        return sum(stack.frames for stack in self._stacks)

    @property
    def frames_without_bias(self) -> int:
        return sum(stack.frames_without_bias for stack in self._stacks)

    @property
    def frames_without_imaging(self) -> int:
        """Frames given up on ("unknown") before the run closed: no watermark passed them."""
        return sum(stack.frames_without_imaging for stack in self._stacks)

    def frames_in(self, stack: int) -> int:
        return self._stacks[stack].frames

    def detector_path(self, stack: int) -> str:
        return self._stacks[stack].path

    def stack_for(self, geometry: FrameGeometry) -> tuple[int, str | None]:
        """The frame stack that takes frames of `geometry`, and what the file had to change
        for it (None: nothing). The first stack's datasets are made anew while they hold no
        frame (a series that began after the run opened); otherwise a geometry not seen in
        this run gets a new stack. GeometryRefusedError past `max_geometries`."""
        for index, stack in enumerate(self._stacks):
            if stack.geometry.holds(geometry):
                return index, None
        first = self._stacks[0]
        if len(self._stacks) == 1 and first.frames == 0:
            before = first.geometry.describe()
            self._change_layout(lambda: first.replace_geometry(geometry))
            return 0, (
                f"frames of {first.path} re-made for {geometry.describe()} (was {before}, "
                "no frame stored): SWMR readers reopen the file"
            )
        if len(self._stacks) >= self.max_geometries:
            raise GeometryRefusedError(
                f"{geometry.describe()} would be frame geometry {len(self._stacks) + 1} of "
                f"this run; at most {self.max_geometries} are taken"
            )
        made: list[FrameStack] = []
        self._change_layout(lambda: made.append(self._add_stack(geometry)))
        return len(self._stacks) - 1, (
            f"{made[0].path} made for frames of {geometry.describe()} (a new geometry): "
            "SWMR readers reopen the file"
        )

    def write_frame(
        self,
        image_id: int,
        series_id: int,
        chunks: dict[str, bytes | memoryview | np.ndarray],
        frame_time: float,
        detector_start: float,
        detector_stop: float,
        received_time: float,
        clock_offset: float,
        clock_offset_error: float,
        series_date: str = "",
        stack: int = 0,
        half_exposure: float | None = None,
    ) -> None:
        """Append one frame to `stack` (stack_for). `chunks` maps channel -> stored chunk
        bytes or an array (raw). `half_exposure`: half the exposure in run seconds (default
        from the detector times, for a run clock at time_scale 1).

        The pixels go into the file now; the per-frame columns (image_id, frame_time, ...)
        are kept and written in batches (at `flush()` or every COLUMN_BATCH frames): ten
        one-element appends per frame would cost more than a compressed frame's chunk.
        A reader therefore counts frames by `frame_time`, not by `data`, whose rows may run
        ahead until the next flush.
        """
        if half_exposure is None:
            half_exposure = max(detector_stop - detector_start, 0.0) / 2
        row = (
            image_id,
            series_id,
            frame_time,
            detector_start,
            detector_stop,
            series_date,
            received_time,
            clock_offset,
            clock_offset_error,
        )
        self._stacks[stack].write(chunks, row, half_exposure)
        for series in self._frame_series:
            series.add_frame(stack, frame_time)

    def retime_frames(
        self, first: int, frame_times: np.ndarray, offset: float, error: float, stack: int = 0
    ) -> None:
        """Rewrite frame_time of frames [first, first+len) of `stack` after a better clock
        mapping (their bias, imaging and per-frame series are decided again at the new
        times)."""
        self._stacks[stack].retime(
            first, np.asarray(frame_times), offset, error, self._frame_bias_estimator
        )
        for series in self._frame_series:
            series.retime(stack, first, np.asarray(frame_times))

    # ----- imaging ---------------------------------------------------------------------------
    def add_imaging_state(self, state: ImagingState, seq: int | None = None) -> None:
        """The microscope's imaging state from `state.start` on (any order of arrival), the
        `seq`-th of the run (None: not checked for lost ones; core/imaging.py)."""
        self.imaging.add(state, seq)

    def advance_imaging(self, watermark: float, announced: int | None = None) -> None:
        """Every switch begun at or before run time `watermark` has been announced,
        `announced` states in all (None: not checked)."""
        self.imaging.advance(watermark, announced)

    # ----- records ---------------------------------------------------------------------------
    def write_bias_samples(
        self,
        times: np.ndarray,
        half_widths: np.ndarray,
        volts: np.ndarray,
        setpoints: np.ndarray,
        amps: np.ndarray,
        status: np.ndarray,
    ) -> None:
        """Readings go to the bias/current logs, level changes to the output-level log."""
        status = status.astype("<u4")
        change = (status & STATUS_LEVEL_CHANGE) != 0
        if np.any(change):
            index = self.level_changes_written
            self._append(
                OUTPUT_LEVEL, index,
                time=times[change], time_errors=half_widths[change], value=setpoints[change],
            )  # fmt: skip
            self._frame_bias_estimator.add_level_changes(times[change], setpoints[change])
            self.level_changes_written += int(np.count_nonzero(change))
            reading = ~change
            times, half_widths, volts = times[reading], half_widths[reading], volts[reading]
            setpoints, amps, status = setpoints[reading], amps[reading], status[reading]
        index = self.samples_written
        self._append(
            BIAS_VOLTAGE,
            index,
            time=times,
            time_errors=half_widths,
            value=volts,
            setpoint=setpoints,
        )
        self._append(CURRENT, index, value=amps, status=status)
        self._frame_bias_estimator.add_readings(times, volts, amps)
        self.samples_written += len(times)

    def write_series(self, name: str, rows: np.ndarray) -> None:
        """Rows of a generic time series (layout.SERIES[name]): a structured array with a field
        per column of its log (`Log.row_fields`)."""
        declared = SERIES[name]
        fields = {field: rows[field] for field in rows.dtype.names or ()}
        self._append(declared, self.series_written[name], **fields)
        self.series_written[name] += len(rows)
        for series in self._frame_series:
            if series.declared is declared:
                series.add_rows(rows["time"], rows[series.column])

    def write_analysis(self, result: dict[str, Any]) -> None:
        """A live-analysis result (from the analysis process, through the ingest), kept by
        the analysis log (runfile/analysislog.py) when this build has one; else counted, not
        kept."""
        analysis_log = getattr(self, "_analysis_log", None)
        if analysis_log is None:
            self.analysis_results_not_kept += 1
            return
        analysis_log.append(result)

    def write_event(self, time: float, kind: str, message: str) -> None:
        self._append(
            EVENTS, self.events_written,
            time=np.array([time]),
            kind=np.array([_fixed(kind, KIND_LENGTH)]),
            message=np.array([_fixed(message, MESSAGE_LENGTH)]),
        )  # fmt: skip
        self.events_written += 1

    # ----- per-frame fills, flush, close ------------------------------------------------------
    def _fill(self, final: bool) -> None:
        for stack in self._stacks:
            stack.write_pending_rows()
            stack.fill_bias(self._frame_bias_estimator, final)
            stack.fill_imaging(self.imaging, final)
        for series in self._frame_series:
            series.fill(final)

    def flush(self) -> None:
        self._fill(final=False)
        self._file.flush()

    def close(self, end_time_ns: int) -> None:
        """Write what is pending, close, then finish the file (runfile/finish.py: per-mode
        NXdata, no empty datasets). A failure to finish is logged and kept in
        `finish_error`: the file is complete without it. If the file does not take what is
        pending (disk full, read-only: the exception propagates), it is closed without writing
        more (`abandon`) and not finished."""
        if self._closed:
            return
        self._closed = True
        try:
            self._fill(final=True)
            self._sort_events()
            self._end_time[()] = iso8601(end_time_ns)
            self._file.flush()  # a failure here, not in close, leaves HDF5 able to close
        except BaseException:
            self._detach_and_close()
            raise
        self._file.close()
        detectors = [(stack.path, stack.frames) for stack in self._stacks]
        try:
            self.finished = finish_run_file(self.path, detectors)
        except Exception as exc:
            self.finish_error = f"{type(exc).__name__}: {exc}"
            log.exception("finishing the run file %s failed", self.path)

    def abandon(self) -> None:
        """Close a file that does not take writes (read-only, I/O errors), writing nothing
        more: it keeps what its last successful flush wrote, as after a crash."""
        if self._closed:
            return
        self._closed = True
        self._detach_and_close()

    def _detach_and_close(self) -> None:
        """HDF5 flushes at close; when that fails it leaves its objects half-closed, and freeing
        them later crashed the process (HDF5 2.0, a read-only disk). So the file's descriptor
        is pointed at /dev/null first: the close succeeds and the file keeps what its last
        successful flush wrote (SWMR keeps that readable)."""
        try:
            fd = self._file.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        except Exception:  # not the sec2 driver, or already closed: close as it is
            log.exception("run file %s: could not detach it before closing", self.path)
        self._file.close()

    def _sort_events(self) -> None:
        """Events come from several threads with their own stamps; the file keeps time order."""
        columns = [self._datasets[EVENTS.column(c)] for c in ("time", "kind", "message")]
        order = np.argsort(columns[0][:], kind="stable")
        if np.all(order == np.arange(len(order))):
            return
        for dataset in columns:
            dataset[:] = dataset[:][order]

    @property
    def closed(self) -> bool:
        return self._closed
