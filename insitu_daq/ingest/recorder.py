"""The frame path into the run file: one recorder that owns rows, clock and geometry.

For the detector stream, run or no run: the mapping of the current series' detector clock
onto the wall clock (sequence.DetectorClockMap), the geometry the stream announces (its latest
`start` or image; frames.py) and the stream's rate. For the open run (`attach`): the rows each
series takes in each frame stack, each frame's time on the run clock (never decreasing), and
the rewriting of those times as the clock mapping improves (`retime`).

What it does not decide stays in the ingest process (process.py): whether a frame is recorded
(the recording windows), what happens when the file stops taking writes (failure.py; the
recorder only asks `RunFile.takes_writes` and raises `FrameWriteError`), the counters of what
arrived, and the analysis tap. Payloads stay views into their ZeroMQ frames from the receiver
to `write_direct_chunk` (frames.chunks_for_file).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from insitu_daq.core.clock import RunClock
from insitu_daq.core.config import DetectorConfig
from insitu_daq.core.records import EventKind
from insitu_daq.drivers.stream2 import ImageMessage, MalformedMessage, StartMessage
from insitu_daq.ingest.counters import Histogram, StreamRate
from insitu_daq.ingest.frames import (
    GeometryMismatchError,
    chunks_for_file,
    default_geometry,
    geometry_of_image,
    geometry_of_start,
    iso_date,
)
from insitu_daq.ingest.sequence import DetectorClockMap, SeriesKey, fraction_ns
from insitu_daq.runfile.writer import FrameGeometry, GeometryRefusedError, RunWriter

# What the recorder counts (merged into the ingest's stats), and the drop reasons it decides
# (wire.DROP_REASONS has them all).
COUNTERS = (
    "frames_written_total",
    "frames_refiltered_total",
    "retimes_total",
    "file_layout_changes_total",
)
DROPS = ("geometry", "corrupt")

EventSink = Callable[..., None]  # (kind, message, data=None): the ingest's event report


class RunFile(Protocol):
    """What the recorder needs of the open run (process.py `_Run`)."""

    writer: RunWriter
    clock: RunClock
    dirty: bool  # the recorder sets it when it wrote; the ingest flushes

    @property
    def takes_writes(self) -> bool: ...


class FrameWriteError(Exception):
    """Writing image `image_id` into the run file raised (the exception is `__cause__`);
    `frame_time` is the time it had. What that means for the run is the ingest's to decide."""

    def __init__(self, image_id: int, frame_time: float) -> None:
        super().__init__(f"writing image {image_id} failed")
        self.image_id = image_id
        self.frame_time = frame_time


@dataclass
class _SeriesRows:
    """The file rows of one series in one frame stack of the open run, and the clock
    mapping they hold."""

    key: SeriesKey
    stack: int  # the frame stack (RunWriter.stack_for) the rows are in
    first_row: int
    offset_ns: int  # wall ns of detector time zero the rows were written with
    error_ns: float
    floor: float  # frame_time of the row before this series (frame_time never decreases)
    # exposure midpoints, detector ns (8 bytes a frame: the whole series may be retimed)
    mids_ns: array = field(default_factory=lambda: array("q"))


@dataclass
class _RunRows:
    """The open run's frame rows: the series in it and the current one's rows."""

    file: RunFile
    rows: _SeriesRows | None = None
    series: list[dict[str, Any]] = field(default_factory=list)
    last_frame_time: float = float("-inf")


class FrameRecorder:
    """Every released detector image goes through `take`; see the module docstring."""

    def __init__(
        self, detector: DetectorConfig, event: EventSink, write_seconds: Histogram
    ) -> None:
        """`event(kind, message, data=None)`: what the recorder has to say (a dropped image,
        a layout change, a new series), in order with the writes. `write_seconds`: every
        write call into HDF5 is timed into it."""
        self.detector = detector
        self._event = event
        self._write_seconds = write_seconds
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.dropped: dict[str, int] = dict.fromkeys(DROPS, 0)
        self._clock_map: DetectorClockMap | None = None
        self._clock_key: SeriesKey | None = None
        self._latest_start: StartMessage | None = None
        self._latest_geometry: FrameGeometry | None = None  # of the last image taken
        self._latest_image_ns = 0
        self._stream_rate = StreamRate()
        self._run: _RunRows | None = None

    # ----- the stream ------------------------------------------------------------------------
    def observe_start(self, start: StartMessage) -> None:
        self._latest_start = start

    def stream_geometry(self) -> FrameGeometry | None:
        """Geometry from the latest `start` or image seen; None while it is not known."""
        start = self._latest_start
        if start is not None and (start.received_ns or 0) >= self._latest_image_ns:
            return geometry_of_start(start, self.detector)  # None: wait for its first image
        return self._latest_geometry

    def configured_geometry(self) -> FrameGeometry:
        """The config's geometry, with channels and shape from the latest `start` if known."""
        return default_geometry(self.detector, self._latest_start)

    def detector_stats(self) -> dict[str, Any]:
        key, clock_map, geometry = self._clock_key, self._clock_map, self._latest_geometry
        return {
            "series_id": None if key is None else key[0],
            "series_unique_id": None if key is None else key[1],
            "geometry": None if geometry is None else asdict(geometry),
            "clock_offset_error_s": None if clock_map is None else clock_map.error_ns * 1e-9,
        }

    def stream_rate(self) -> dict[str, Any] | None:
        """The stream's rate and frame size (for service/recording_plan.py); None before an
        image."""
        stream_rate = self._stream_rate.to_dict()
        geometry = self._latest_geometry
        if geometry is None:
            return None
        if stream_rate is not None:
            pixels = geometry.shape[0] * geometry.shape[1] * np.dtype(geometry.dtype).itemsize
            stream_rate["raw_bytes_per_frame"] = pixels * len(geometry.channels)
            stream_rate["compression"] = geometry.compression or "none"
        return stream_rate

    # ----- the open run ----------------------------------------------------------------------
    def attach(self, file: RunFile) -> None:
        """A run file is open: frames taken with `record` go into it."""
        self._run = _RunRows(file)

    def detach(self) -> list[dict[str, Any]]:
        """The run is closed (after `end_series`); the series it held, for its summary."""
        run, self._run = self._run, None
        return [] if run is None else run.series

    def take(self, image: ImageMessage, record: bool) -> float | None:
        """Observe one released image and, if `record`, write it into the open run's file.

        Returns its frame_time on the run clock (for the tap), None when no run is open or
        the image was dropped before the file was touched (counted in `dropped`, evented).
        Raises FrameWriteError when the file's write raised.
        """
        key = (image.series_id, image.series_unique_id)
        if key != self._clock_key:
            self.end_series()
            self._clock_map, self._clock_key = DetectorClockMap(), key
        clock_map = self._clock_map
        assert clock_map is not None and image.received_ns is not None
        clock_map.observe(image.start_time, image.stop_time, image.received_ns)
        geometry = geometry_of_image(image, self.detector)
        self._latest_geometry = geometry
        self._latest_image_ns = image.received_ns
        stored = sum(
            channel.nbytes if geometry.compression is None else memoryview(channel.payload).nbytes
            for channel in image.channels.values()
        )
        self._stream_rate.add(image.received_ns, stored)
        run = self._run
        if run is None:
            return None
        if not record:
            offset_ns = clock_map.offset_ns
            assert offset_ns is not None  # observed above
            return run.file.clock.from_wall_ns(offset_ns + fraction_ns(image.mid_time))
        return self._write(run, image, key, clock_map, geometry)

    def _write(
        self,
        run: _RunRows,
        image: ImageMessage,
        key: SeriesKey,
        clock_map: DetectorClockMap,
        geometry: FrameGeometry,
    ) -> float | None:
        """Write one image into the frame stack of its geometry (made if new: the file's
        layout changes); its frame_time (None: dropped before the file was touched)."""
        writer = run.file.writer
        try:  # first: an image whose channels disagree never makes datasets
            chunks, refiltered = chunks_for_file(image, geometry)
        except GeometryMismatchError as exc:
            self.dropped["geometry"] += 1
            self._event(EventKind.ERROR, f"image {image.image_id} dropped: {exc}")
            return None
        except MalformedMessage as exc:
            self.dropped["corrupt"] += 1
            self._event(EventKind.MALFORMED, f"image {image.image_id} dropped: {exc}")
            return None
        try:
            stack, change = writer.stack_for(geometry)  # its datasets hold `geometry`'s chunks
        except GeometryRefusedError as exc:
            self.dropped["geometry"] += 1
            self._event(EventKind.ERROR, f"image {image.image_id} dropped: {exc}")
            return None
        if change is not None:
            self.counts["file_layout_changes_total"] += 1
            self._event(EventKind.LAYOUT, f"run file layout: {change}")
        rows = run.rows
        if rows is None or rows.key != key or rows.stack != stack:
            if rows is not None and rows.key == key:
                self.retime(force=True)  # the series goes on in another stack: these are done
            rows = self._new_rows(run, image, key, stack, clock_map)
        clock = run.file.clock
        mid_ns = fraction_ns(image.mid_time)
        frame_time = max(clock.from_wall_ns(rows.offset_ns + mid_ns), run.last_frame_time)
        half_exposure = fraction_ns(image.stop_time - image.start_time) * 0.5e-9 * clock.time_scale
        assert image.received_ns is not None
        started = time.perf_counter()
        try:
            writer.write_frame(
                image.image_id,
                image.series_id,
                chunks,
                frame_time,
                image.start_time_s,
                image.stop_time_s,
                clock.from_wall_ns(image.received_ns),
                clock.from_wall_ns(rows.offset_ns),
                rows.error_ns * 1e-9 * clock.time_scale,
                iso_date(image.series_date),
                stack=stack,
                half_exposure=max(half_exposure, 0.0),
            )
        except Exception as exc:
            raise FrameWriteError(image.image_id, frame_time) from exc
        finally:
            self._write_seconds.observe(time.perf_counter() - started)
        rows.mids_ns.append(mid_ns)
        run.last_frame_time = frame_time
        run.file.dirty = True
        self.counts["frames_written_total"] += 1
        if refiltered:
            self.counts["frames_refiltered_total"] += 1
        return frame_time

    def _new_rows(
        self,
        run: _RunRows,
        image: ImageMessage,
        key: SeriesKey,
        stack: int,
        clock_map: DetectorClockMap,
    ) -> _SeriesRows:
        """The rows a series starts in `stack`; a second series in the run is an event."""
        offset_ns = clock_map.offset_ns
        assert offset_ns is not None
        writer = run.file.writer
        rows = _SeriesRows(
            key, stack, writer.frames_in(stack), offset_ns, clock_map.error_ns, run.last_frame_time
        )
        run.rows = rows
        run.series.append(
            {
                "series_id": key[0],
                "series_unique_id": key[1],
                "detector": writer.detector_path(stack),
            }
        )
        if len(run.series) > 1:  # a detector restarted or re-armed mid-run
            before = run.series[-2]
            self._event(
                EventKind.INSTRUMENT,
                f"new detector series {key[0]} ({key[1]}) from image_id {image.image_id};"
                f" the previous one was {before['series_id']} ({before['series_unique_id']})",
                {"series_id": key[0], "series_unique_id": key[1]},
            )
        return rows

    def retime(self, force: bool) -> None:
        """Rewrite the current series' frame_time with the improved clock mapping (only when
        it improved, unless `force`; never into a file that takes no writes)."""
        run, clock_map = self._run, self._clock_map
        if run is None or clock_map is None or run.rows is None or not run.file.takes_writes:
            return
        rows = run.rows
        offset_ns = clock_map.offset_ns
        if rows.key != self._clock_key or not rows.mids_ns or offset_ns is None:
            return
        if not force and offset_ns >= rows.offset_ns:
            return
        clock = run.file.clock
        base = offset_ns - clock.start_ns
        times = (base + np.asarray(rows.mids_ns, dtype=np.int64)) * (1e-9 * clock.time_scale)
        times = np.maximum.accumulate(np.maximum(times, rows.floor))
        error = clock_map.run_error(clock)
        started = time.perf_counter()
        run.file.writer.retime_frames(
            rows.first_row, times, clock.from_wall_ns(offset_ns), error, stack=rows.stack
        )
        self._write_seconds.observe(time.perf_counter() - started)
        rows.offset_ns, rows.error_ns = offset_ns, clock_map.error_ns
        run.last_frame_time = float(times[-1])
        run.file.dirty = True
        run.series[-1].update(
            frames=len(rows.mids_ns),
            clock_offset_s=clock.from_wall_ns(offset_ns),
            clock_offset_error_s=error,
        )
        self.counts["retimes_total"] += 1

    def end_series(self) -> None:
        """A series ended (or the run closes): its rows get the final mapping."""
        self.retime(force=True)
