"""The run file: one NeXus HDF5 file per run, written in SWMR mode by one owner.

Layout (DESIGN.md, fixed): /entry with instrument/detector frames, sample bias and current
NXlogs, events, the protocol text and an NXdata link. Every group has @NX_class and every
dataset with a unit has @units. All times are seconds since /entry/start_time.

Why it is shaped so:
- SWMR forbids creating objects once readers may attach, so every group and dataset is made
  in `__init__` (the detector's from a `FrameGeometry` known before the run starts) and only
  grown afterwards.
- Frames go in as received: a bslz4 or lz4 payload is already an HDF5 chunk of the matching
  filter, so `write_direct_chunk` stores it with no decompress/recompress.
- The per-frame bias is interpolated from the bias log at frame_time. Bias samples arrive from
  another process and may lag the frames, so a frame's bias is written as NaN first and filled
  in once a sample later than its frame_time is known (or, at close, from the last sample).
- Per-frame columns are written in batches (see `write_frame`): readers count frames by
  `frame_time`; `data` may hold more rows until the next flush.
- Strings in growing datasets are fixed-length UTF-8: SWMR readers do not reliably see
  variable-length data appended by a writer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .analysis.reflections import DEFAULT_REFLECTIONS
from .analysislog import AnalysisLog
from .drivers.stream2 import hdf5_filter_options
from .framebias import FrameBiasEstimator
from .records import STATUS_LEVEL_CHANGE

log = logging.getLogger(__name__)

KIND_LENGTH = 32
MESSAGE_LENGTH = 256
DATE_LENGTH = 40
COLUMN_BATCH = 64  # frames whose per-frame columns are written together
# HDF5's chunk cache per dataset. Its default (1 MB) keeps every appended column chunk until
# the megabyte is full: ~25 growing datasets made the writer's memory grow for an hour of run
# (~150 bytes a frame). Appends only need the chunk being filled (8 KB for 1024 float64);
# frame chunks (one image each) are bigger than this and bypass the cache anyway.
CHUNK_CACHE_BYTES = 64 * 1024


def iso8601(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, tz=timezone.utc).isoformat()


@dataclass(frozen=True)
class FrameGeometry:
    """What the detector datasets must hold: channel names, (rows, cols), dtype, compression."""

    channels: tuple[str, ...]
    shape: tuple[int, int]
    dtype: str  # numpy dtype string, e.g. "<u2"
    compression: str | None  # "bslz4" | "lz4" | None: the chunk format stored

    def filter_options(self) -> dict[str, Any]:
        return hdf5_filter_options(self.compression)


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
    # Live analysis: the tracked reflections' names and the analysis parameters (analysislog.py).
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


def _group(parent: h5py.Group, name: str, nx_class: str, **attrs: Any) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    for key, value in attrs.items():
        group.attrs[key] = value
    return group


def _growing(
    group: h5py.Group, name: str, dtype: Any, units: str | None = None, chunk: int = 1024
) -> h5py.Dataset:
    dataset = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,))
    if units:
        dataset.attrs["units"] = units
    return dataset


def _scalar(group: h5py.Group, name: str, value: Any, units: str | None = None) -> None:
    dataset = group.create_dataset(name, data=value)
    if units:
        dataset.attrs["units"] = units


def _put(dataset: h5py.Dataset, index: int, values: np.ndarray) -> None:
    """Write rows [index, index+len) (growing the dataset to exactly that length).

    Writing at the row a record owns, rather than appending at the dataset's current end,
    keeps the columns of a record aligned even when an earlier write failed halfway: the
    record is simply written again at the same rows.
    """
    dataset.resize((index + len(values),))
    dataset[index:] = values


def _fixed(text: str, length: int) -> bytes:
    return text.encode("utf-8")[:length]


class RunWriter:
    """Owner of one run file. Not thread-safe: one thread (the ingest loop) calls it."""

    def __init__(self, path: Path, meta: RunMetadata, geometry: FrameGeometry) -> None:
        self.path = Path(path)
        self.meta = meta
        self.geometry = geometry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.path, "w", libver="latest", rdcc_nbytes=CHUNK_CACHE_BYTES)
        self._closed = False
        try:
            self._build()
            self._file.swmr_mode = True
        except BaseException:
            self._file.close()
            raise
        self.frames_written = 0
        self._pending_rows: list[tuple[Any, ...]] = []  # columns of frames not yet written
        self._row_datasets = (  # in the order of a pending row
            self._image_id,
            self._series_id,
            self._frame_time_ds,
            self._det_start,
            self._det_stop,
            self._series_date,
            self._received,
            self._clock_offset,
            self._clock_offset_err,
        )
        self.samples_written = 0
        self.level_changes_written = 0
        self.events_written = 0
        self.holder_positions_written = 0
        self.analysis_results_not_kept = 0  # write_analysis with no analysis log to keep them
        # Per-frame bias: a window of the bias log, and the times of the frames whose bias is
        # not filled in yet (frames from _first_pending_frame on).
        self._frame_bias_estimator = FrameBiasEstimator()
        self._pending_frame_times: list[float] = []
        self._first_pending_frame = 0
        self.frames_without_bias = 0  # given up on: no reading came within the window

    # ----- layout ----------------------------------------------------------------------------
    def _build(self) -> None:
        meta, geometry, f = self.meta, self.geometry, self._file
        start = iso8601(meta.start_time_ns)
        f.attrs["default"] = "entry"
        f.attrs["file_name"] = self.path.name
        f.attrs["file_time"] = start
        f.attrs["creator"] = "insitu-daq"
        entry = _group(f, "entry", "NXentry", default="data")
        _scalar(entry, "start_time", start)
        self._end_time = entry.create_dataset("end_time", data="", dtype=h5py.string_dtype())
        _scalar(entry, "run_id", meta.run_id)
        _scalar(entry, "title", meta.title)
        _scalar(entry, "program_name", "insitu-daq")
        entry["program_name"].attrs["version"] = meta.program_version

        instrument = _group(entry, "instrument", "NXinstrument")
        detector = _group(instrument, "detector", "NXdetector")
        self._data = {}
        rows, cols = geometry.shape
        for i, channel in enumerate(geometry.channels):
            name = "data" if i == 0 else f"data_{channel}"
            dataset = detector.create_dataset(
                name,
                shape=(0, rows, cols),
                maxshape=(None, rows, cols),
                chunks=(1, rows, cols),
                dtype=np.dtype(geometry.dtype),
                **geometry.filter_options(),
            )
            dataset.attrs["units"] = "counts"
            dataset.attrs["channel"] = channel
            self._data[channel] = dataset
        self._image_id = _growing(detector, "image_id", "<i8")
        self._series_id = _growing(detector, "series_id", "<i8")
        self._frame_time_ds = _growing(detector, "frame_time", "<f8", "s")
        self._frame_time_ds.attrs["start"] = start
        self._det_start = _growing(detector, "detector_start_time", "<f8", "s")
        self._det_stop = _growing(detector, "detector_stop_time", "<f8", "s")
        self._series_date = _growing(detector, "detector_series_date", f"S{DATE_LENGTH}")
        self._series_date.attrs["description"] = (
            "the detector's series_date (ISO 8601, its own clock): origin of its start/stop times"
        )
        self._received = _growing(detector, "received_time", "<f8", "s")
        self._frame_bias = _growing(detector, "bias_voltage", "<f8", "V")
        self._frame_current = _growing(detector, "current", "<f8", "A")
        self._clock_offset = _growing(detector, "detector_clock_offset", "<f8", "s")
        self._clock_offset.attrs["description"] = (
            "run clock minus detector clock per frame's series (lower envelope of arrival delay)"
        )
        self._clock_offset_err = _growing(detector, "detector_clock_offset_errors", "<f8", "s")
        if meta.pixel_size_m:
            _scalar(detector, "x_pixel_size", meta.pixel_size_m[0], "m")
            _scalar(detector, "y_pixel_size", meta.pixel_size_m[1], "m")
        if meta.count_time_s is not None:
            _scalar(detector, "count_time", meta.count_time_s, "s")
        _scalar(detector, "detector_description", meta.detector_description or "unknown")
        _scalar(detector, "compression", geometry.compression or "none")

        source_meter = _group(instrument, "source_meter", "NXsensor")
        _scalar(source_meter, "measurement", "current")
        for key, value in meta.source_meter.items():
            _scalar(source_meter, key, value, units_of(key))
        holder = _group(instrument, "holder", "NXpositioner")
        for key, value in meta.holder.items():
            _scalar(holder, key, value, units_of(key))
        position = _group(holder, "position", "NXlog")
        self._holder_time = _growing(position, "time", "<f8", "s")
        self._holder_time.attrs["start"] = start
        self._holder_value = _growing(position, "value", "<f8", "nm")
        microscope = _group(instrument, "microscope", "NXcollection")
        for key, value in meta.microscope.items():
            _scalar(microscope, key, value, units_of(key))

        sample = _group(entry, "sample", "NXsample")
        _scalar(sample, "name", meta.sample_name)
        _scalar(sample, "chemical_formula", meta.chemical_formula)
        bias = _group(sample, "bias_voltage", "NXlog")
        self._bias_time = _growing(bias, "time", "<f8", "s")
        self._bias_time.attrs["start"] = start
        self._bias_time_err = _growing(bias, "time_errors", "<f8", "s")
        self._bias_value = _growing(bias, "value", "<f8", "V")
        self._bias_setpoint = _growing(bias, "setpoint", "<f8", "V")
        current = _group(sample, "current", "NXlog")
        current["time"] = h5py.SoftLink("/entry/sample/bias_voltage/time")
        current["time_errors"] = h5py.SoftLink("/entry/sample/bias_voltage/time_errors")
        self._current_value = _growing(current, "value", "<f8", "A")
        self._status = _growing(current, "status", "<u4")
        self._status.attrs["description"] = "source-meter status word of each reading"
        level = _group(source_meter, "output_level", "NXlog")
        level.attrs["description"] = (
            "commanded terminal level (0 V with the output off), stamped by the SCPI write that"
            " set it (midpoint, half-width in time_errors); frames' bias_voltage is this level"
            " at frame_time plus the measured offset interpolated between readings"
        )
        self._level_time = _growing(level, "time", "<f8", "s")
        self._level_time.attrs["start"] = start
        self._level_time_err = _growing(level, "time_errors", "<f8", "s")
        self._level_value = _growing(level, "value", "<f8", "V")

        events = _group(entry, "events", "NXlog")
        self._event_time = _growing(events, "time", "<f8", "s", chunk=64)
        self._event_time.attrs["start"] = start
        self._event_kind = _growing(events, "kind", f"S{KIND_LENGTH}", chunk=64)
        self._event_message = _growing(events, "message", f"S{MESSAGE_LENGTH}", chunk=64)

        self._analysis_log = AnalysisLog(entry, meta.reflections, meta.analysis_parameters)

        protocol = _group(entry, "protocol", "NXnote")
        _scalar(protocol, "type", "text/plain")
        _scalar(protocol, "file_name", meta.protocol_name)
        _scalar(protocol, "data", meta.protocol_text)

        data = _group(entry, "data", "NXdata", signal="data")
        data.attrs["axes"] = ["frame_time", ".", "."]
        data.attrs["frame_time_indices"] = 0
        data["data"] = h5py.SoftLink("/entry/instrument/detector/data")
        data["frame_time"] = h5py.SoftLink("/entry/instrument/detector/frame_time")

    # ----- records ---------------------------------------------------------------------------
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
    ) -> None:
        """Append one frame. `chunks` maps channel -> stored chunk bytes or an array (raw).

        The pixels go into the file now; the per-frame columns (image_id, frame_time, ...)
        are kept and written in batches (at `flush()` or every COLUMN_BATCH frames): ten
        one-element appends per frame would cost more than a compressed frame's chunk.
        A reader therefore counts frames by `frame_time`, not by `data`, whose rows may run
        ahead until the next flush.
        """
        if len(self._pending_rows) >= COLUMN_BATCH:
            self._write_pending_rows()  # before this frame: a failure leaves it unwritten
        index = self.frames_written
        for channel, dataset in self._data.items():
            payload = chunks[channel]
            dataset.resize((index + 1, *dataset.shape[1:]))
            if isinstance(payload, np.ndarray):
                dataset[index] = payload
            else:
                dataset.id.write_direct_chunk((index, 0, 0), payload)
        self._pending_rows.append(
            (
                image_id,
                series_id,
                frame_time,
                detector_start,
                detector_stop,
                _fixed(series_date, DATE_LENGTH),
                received_time,
                clock_offset,
                clock_offset_error,
            )
        )
        self._pending_frame_times.append(frame_time)
        self.frames_written += 1

    def _write_pending_rows(self) -> None:
        """Write the per-frame columns of the frames whose pixels are already in."""
        rows = self._pending_rows
        if not rows:
            return
        first = self.frames_written - len(rows)
        columns = list(zip(*rows, strict=True))
        for dataset, values in zip(self._row_datasets, columns, strict=True):
            _put(dataset, first, np.array(values))
        nan = np.full(len(rows), np.nan)
        _put(self._frame_bias, first, nan)
        _put(self._frame_current, first, nan)
        self._pending_rows = []

    def retime_frames(
        self, first: int, frame_times: np.ndarray, offset: float, error: float
    ) -> None:
        """Rewrite frame_time of frames [first, first+len) after a better clock mapping."""
        self._write_pending_rows()
        last = first + len(frame_times)
        self._frame_time_ds[first:last] = frame_times
        self._clock_offset[first:last] = offset
        self._clock_offset_err[first:last] = error
        pending = self._first_pending_frame
        if last > pending:  # not filled in yet: they will be, at their new times
            start = max(first, pending)
            self._pending_frame_times[start - pending : last - pending] = list(
                frame_times[start - first :]
            )
        if first < pending:  # filled in already: again at the new times, if the log has them
            self._refill_frame_bias(first, np.asarray(frame_times[: pending - first]))

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
            _put(self._level_time, index, times[change])
            _put(self._level_time_err, index, half_widths[change])
            _put(self._level_value, index, setpoints[change])
            self._frame_bias_estimator.add_level_changes(times[change], setpoints[change])
            self.level_changes_written += int(np.count_nonzero(change))
            reading = ~change
            times, half_widths, volts = times[reading], half_widths[reading], volts[reading]
            setpoints, amps, status = setpoints[reading], amps[reading], status[reading]
        index = self.samples_written
        _put(self._bias_time, index, times)
        _put(self._bias_time_err, index, half_widths)
        _put(self._bias_value, index, volts)
        _put(self._bias_setpoint, index, setpoints)
        _put(self._current_value, index, amps)
        _put(self._status, index, status)
        self._frame_bias_estimator.add_readings(times, volts, amps)
        self.samples_written += len(times)

    def write_holder_position(self, time: float, position_nm: float) -> None:
        index = self.holder_positions_written
        _put(self._holder_time, index, np.array([time]))
        _put(self._holder_value, index, np.array([position_nm]))
        self.holder_positions_written += 1

    def write_analysis(self, result: dict[str, Any]) -> None:
        """A live-analysis result (from the analysis process, through the ingest), kept by
        the analysis log (analysislog.py) when this build has one; else counted, not kept."""
        analysis_log = getattr(self, "_analysis_log", None)
        if analysis_log is None:
            self.analysis_results_not_kept += 1
            return
        analysis_log.append(result)

    def write_event(self, time: float, kind: str, message: str) -> None:
        index = self.events_written
        _put(self._event_time, index, np.array([time]))
        _put(self._event_kind, index, np.array([_fixed(kind, KIND_LENGTH)]))
        _put(self._event_message, index, np.array([_fixed(message, MESSAGE_LENGTH)]))
        self.events_written += 1

    # ----- per-frame bias --------------------------------------------------------------------
    def _fill_frame_bias(self, final: bool) -> None:
        """Estimate the bias at the frame times that readings now bracket (framebias.py)."""
        first = self._first_pending_frame
        if first >= self.frames_written:
            return
        frame_times = np.asarray(self._pending_frame_times)
        last_reading = self._frame_bias_estimator.last_reading_time
        if final:
            ready = len(frame_times)
        elif last_reading is None:
            ready = 0
        else:
            ready = int(np.searchsorted(frame_times, last_reading))
        # Frames no reading will ever bracket (no source-meter, or it stopped answering) are
        # given up on, left NaN, once they fall out of the window: pending stays bounded.
        stale = int(
            np.searchsorted(frame_times, frame_times[-1] - self._frame_bias_estimator.keep_s)
        )
        if stale > ready:
            self.frames_without_bias += stale - ready
            self._pending_frame_times = self._pending_frame_times[stale:]
            self._first_pending_frame = first + stale
            self._fill_frame_bias(final)
            return
        if ready == 0:
            return
        self._estimate_frame_bias(first, frame_times[:ready])
        self._pending_frame_times = self._pending_frame_times[ready:]
        self._first_pending_frame = first + ready

    def _refill_frame_bias(self, first: int, frame_times: np.ndarray) -> None:
        """Frames [first, first+len) were filled in, then retimed: estimate them again."""
        oldest = self._frame_bias_estimator.oldest_time
        if oldest is None or not len(frame_times):
            return
        skip = int(np.searchsorted(frame_times, oldest))  # older than the window: keep
        if skip >= len(frame_times):
            return
        self._estimate_frame_bias(first + skip, frame_times[skip:])

    def _estimate_frame_bias(self, first: int, frame_times: np.ndarray) -> None:
        """Bias and current of frames [first, first+len) at `frame_times`, into the file."""
        volts, amps = self._frame_bias_estimator.estimate(frame_times)
        self._frame_bias[first : first + len(volts)] = volts
        self._frame_current[first : first + len(volts)] = amps

    def flush(self) -> None:
        self._write_pending_rows()
        self._fill_frame_bias(final=False)
        self._file.flush()

    def close(self, end_time_ns: int) -> None:
        """Write what is pending and close. If the file does not take it (disk full, read-only:
        the exception propagates), it is closed without writing more (`abandon`)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._write_pending_rows()
            self._fill_frame_bias(final=True)
            self._sort_events()
            self._end_time[()] = iso8601(end_time_ns)
            self._file.flush()  # a failure here, not in close, leaves HDF5 able to close
        except BaseException:
            self._detach_and_close()
            raise
        self._file.close()

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
        times = self._event_time[:]
        order = np.argsort(times, kind="stable")
        if np.all(order == np.arange(len(order))):
            return
        for dataset in (self._event_time, self._event_kind, self._event_message):
            dataset[:] = dataset[:][order]

    @property
    def closed(self) -> bool:
        return self._closed
