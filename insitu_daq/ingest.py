"""The ingest process: DECTRIS Stream V2 in, the run file out (DESIGN.md, data flow).

Two halves, two OS processes (DESIGN.md: "ingest+write and analysis in separate processes",
"one writer owns the run file"):

- `IngestProcess` runs in its own process (multiprocessing, "spawn": no fork of a threaded
  daemon). It owns the Stream2Receiver (PULL connected to `config.detector.endpoint`) and the
  RunWriter, and is the only thing that touches the run file. Its loop waits on the detector
  socket and the command socket together; per turn it first takes everything the daemon sent
  (commands and records, in order), then up to a batch of detector messages, then does the
  timed work (reorder-window expiry, clock retiming, flush, stats).
- `IngestClient` lives in the daemon. It starts the process and talks to it over two ZeroMQ
  ipc sockets in a private temporary directory (mode 0700, so only this user can connect;
  both ends are this program, so messages are pickled): one ordered channel daemon -> ingest
  for commands AND records (bias samples as raw bytes of `BIAS_SAMPLE_DTYPE`, events, holder
  positions), so `close_run` is handled after the last record sent before it; one channel
  ingest -> daemon for replies, stats (every `STATS_INTERVAL_S`) and events (to a callback).

The archive path moves bytes: a payload in the file's chunk format (bslz4 or lz4 as received,
or raw) goes to `write_direct_chunk` unchanged. With `detector.archive_compression = "none"`
compressed payloads are decompressed and stored raw. A payload whose compression differs from
the file's (a detector reconfigured mid-run) is decompressed and written through the file's
filter, and counted.

Frames pass the FrameSequencer (image_id order, gaps, duplicates, late and stale images,
sequence.py) and the DetectorClockMap (run-clock `frame_time` of the exposure midpoint).
All frames received are sequenced and timed, also with no run open or while not recording,
so the clock map of a running series is already good when a run starts; only frames received
while a run is open and recording are written. "Received while recording" is decided by the
frame's arrival stamp against the instants this process handled start/stop_recording (what
already reached the detector socket is taken before such a command). A run file that exists
is never overwritten.
As the clock envelope improves, the series' rows already in the file are retimed (at most
once per flush) so each series ends with one consistent mapping; frame_time never decreases.

It never dies on bad input: a malformed message, an image that does not fit the file, or an
exception while writing is counted, logged and reported as an event (rate-limited per kind),
and the loop goes on. The file is flushed at least every `sampling.flush_interval_s`, so it
survives a crash up to the last flush (SWMR). SIGINT is ignored (the daemon handles Ctrl-C and
then closes the run through this process); SIGTERM, or the daemon's death, closes the run
cleanly (after a grace period for SIGTERM, since the daemon gets it too and still has a
ramp-down to record).

Spawning imports the main module of the daemon again in the child: a script that starts an
IngestClient needs the usual `if __name__ == "__main__":` guard (the console script has it).

Stats (`IngestClient.stats()`): flat counters (`frames_received_total`,
`frames_written_total`, `frames_dropped_total`, `frames_missing_total`, `gaps_total`,
`malformed_total`, ...), `frames_dropped_by_reason`, `hdf5_write_seconds` as a Prometheus
histogram (`le` upper bounds, `cumulative_counts`, `sum`, `count`: one observation per write
call into HDF5), `hdf5_flush_seconds` (`sum`, `count`), `run` (the open run or None) and
`detector` (series, geometry, clock-mapping uncertainty).
"""

from __future__ import annotations

import atexit
import bisect
import itertools
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from .clock import RunClock
from .config import DetectorConfig, StationConfig
from .drivers.stream2 import (
    ImageMessage,
    MalformedMessage,
    Message,
    StartMessage,
    Stream2Receiver,
    decode_message,
)
from .records import BIAS_SAMPLE_DTYPE, Event, EventKind
from .runfile import FrameGeometry, RunMetadata, RunWriter
from .sequence import (
    DetectorClockMap,
    FrameSequencer,
    Released,
    SeriesKey,
    fraction_ns,
)

log = logging.getLogger(__name__)

# ----- the wire between the two processes (multipart: kind, pickled or raw payload) ----------
CMD = b"cmd"  # daemon -> ingest: {"op": ..., "id": ...}
SAMPLES = b"samples"  # daemon -> ingest: raw bytes of a BIAS_SAMPLE_DTYPE batch
EVENT = b"event"  # daemon -> ingest: an Event; ingest -> daemon: Event.to_dict()
HOLDER = b"holder"  # daemon -> ingest: struct <dd (run time, position nm)
READY = b"ready"  # ingest -> daemon, once, when its sockets are up
REPLY = b"reply"  # ingest -> daemon: {"id": ..., "ok": bool, ...}
STATS = b"stats"  # ingest -> daemon: the stats dict
_HOLDER_RECORD = struct.Struct("<dd")

STATS_INTERVAL_S = 0.25
DETECTOR_BATCH = 64  # detector messages per loop turn before the commands are looked at again
COMMAND_BATCH = 1000
POLL_MS = 20  # loop wake-up when idle: the reorder window's time resolution
EVENTS_PER_KIND_PER_S = 20  # beyond this an event kind is counted, not reported, until next s
TERM_GRACE_S = 30.0  # after SIGTERM, wait this long for the daemon's shutdown
REPORT_SEND_TIMEOUT_MS = 2000
RECORD_HWM = 100_000  # records queued towards the ingest process before they are dropped

# Upper bounds (s) of the insitu_daq_hdf5_write_seconds histogram.
HDF5_WRITE_BUCKETS_S = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 1.0
)  # fmt: skip

_STATE_CHANGES = ("open_run", "start_recording", "stop_recording", "close_run", "shutdown")
DROP_REASONS = ("duplicate", "late", "stale_series", "geometry", "corrupt", "write_error")

_STREAM_DTYPES = {"uint8": "|u1", "uint16": "<u2", "uint32": "<u4"}


class IngestError(RuntimeError):
    """The ingest process refused a command, did not answer, or is not running."""


# ----- frame geometry -------------------------------------------------------------------------
def _dtype_of_name(name: Any) -> str | None:
    """numpy dtype string of a Stream V2 `image_dtype` such as "uint16le" (None if unknown)."""
    if not isinstance(name, str):
        return None
    match = re.fullmatch(r"(u?int|float)(8|16|32|64)(le|be)?", name.strip().lower())
    if match is None:
        return None
    kind = {"uint": "u", "int": "i", "float": "f"}[match.group(1)]
    size = int(match.group(2)) // 8
    order = "|" if size == 1 else ">" if match.group(3) == "be" else "<"
    return f"{order}{kind}{size}"


def _stored(compression: str | None, detector: DetectorConfig) -> str | None:
    if detector.archive_compression == "none" or compression in (None, "none"):
        return None
    return compression


def geometry_of_image(image: ImageMessage, detector: DetectorConfig) -> FrameGeometry:
    """The file geometry that stores `image` (and the images like it)."""
    first = image.channel()
    return FrameGeometry(
        tuple(image.channels), first.shape, first.dtype.str, _stored(first.compression, detector)
    )


def geometry_of_start(start: StartMessage, detector: DetectorConfig) -> FrameGeometry | None:
    """The geometry a `start` announces, if it says everything (dtype and compression are
    extensions some detectors do not send: then the first image decides)."""
    dtype = _dtype_of_name(start.get("image_dtype"))
    compression = start.get("compression")
    if not start.channels or start.image_shape is None or dtype is None:
        return None
    if compression not in ("bslz4", "lz4", "none", None):
        return None
    return FrameGeometry(
        tuple(start.channels), start.image_shape, dtype, _stored(compression, detector)
    )


def default_geometry(detector: DetectorConfig, start: StartMessage | None = None) -> FrameGeometry:
    """The configured geometry, with channels and shape from a `start` when it has them."""
    channels = tuple(start.channels) if start is not None and start.channels else None
    shape = start.image_shape if start is not None else None
    return FrameGeometry(
        channels or tuple(detector.default_channels),
        shape or (detector.default_shape[0], detector.default_shape[1]),
        _STREAM_DTYPES[detector.default_dtype],
        _stored(detector.default_compression, detector),
    )


def _iso(value: Any) -> str:
    """A series_date as ISO 8601 text (the decoder hands out datetime, date or str)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else value.isoformat()


class GeometryMismatchError(ValueError):
    """An image that does not fit the open file's geometry."""


def chunks_for_file(
    image: ImageMessage, geometry: FrameGeometry
) -> tuple[dict[str, bytes | np.ndarray], bool]:
    """Each channel's chunk for the file, and whether one had to go through the filter.

    A payload already in the file's chunk format is passed on untouched; a compressed one
    for a raw file is decompressed to raw bytes; any other compression becomes an array that
    h5py writes through the file's filter. Raises GeometryMismatchError or MalformedMessage.
    """
    if set(image.channels) != set(geometry.channels):
        raise GeometryMismatchError(
            f"channels {sorted(image.channels)} != {sorted(geometry.channels)}"
        )
    dtype = np.dtype(geometry.dtype)
    chunks: dict[str, bytes | np.ndarray] = {}
    refiltered = False
    for name in geometry.channels:
        channel = image.channels[name]
        if channel.shape != geometry.shape or channel.dtype != dtype:
            raise GeometryMismatchError(
                f"channel {name!r} is {channel.shape} {channel.dtype.str}, "
                f"the file holds {geometry.shape} {dtype.str}"
            )
        if channel.compression == geometry.compression:
            chunks[name] = channel.direct_chunk()
        elif geometry.compression is None:
            chunks[name] = channel.to_array().tobytes()
        else:
            chunks[name] = channel.to_array()
            refiltered = True
    return chunks, refiltered


# ----- counters -------------------------------------------------------------------------------
class _Histogram:
    """Prometheus-style histogram: counts per upper bound, sum and count."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "le": list(self.bounds),
            "cumulative_counts": list(itertools.accumulate(self.counts)),
            "sum": self.sum,
            "count": self.count,
        }


class _EventLimiter:
    """At most `per_second` events of one kind per second; the rest are counted."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._window: dict[str, tuple[float, int, int]] = {}  # kind -> (start, sent, held back)

    def allow(self, kind: str, now: float) -> bool:
        start, sent, held = self._window.get(kind, (now, 0, 0))
        if now - start >= 1.0:
            start, sent, held = now, 0, held
        if sent < self.per_second:
            self._window[kind] = (start, sent + 1, held)
            return True
        self._window[kind] = (start, sent, held + 1)
        return False

    def take_suppressed(self, now: float) -> list[tuple[str, int]]:
        """(kind, count) of events held back in windows that are over."""
        over = []
        for kind, (start, sent, held) in list(self._window.items()):
            if held and now - start >= 1.0:
                over.append((kind, held))
                self._window[kind] = (start, sent, 0)
        return over


# ----- the process side -----------------------------------------------------------------------
@dataclass
class _SeriesRows:
    """The file rows of one series in the open run, and the clock mapping they hold."""

    key: SeriesKey
    first_row: int
    offset_ns: int  # wall ns of detector time zero the rows were written with
    error_ns: float
    floor: float  # frame_time of the row before this series (frame_time never decreases)
    mids_ns: list[int] = field(default_factory=list)  # exposure midpoints, detector ns


@dataclass
class _Run:
    writer: RunWriter
    clock: RunClock
    geometry_source: str
    counters_at_open: dict[str, int]
    recording: list[list[int | None]] = field(default_factory=list)  # [start_ns, stop_ns]
    rows: _SeriesRows | None = None
    series: list[dict[str, Any]] = field(default_factory=list)
    last_frame_time: float = float("-inf")
    frames_flushed: int = 0
    samples_flushed: int = 0
    dirty: bool = False

    @property
    def is_recording(self) -> bool:
        return bool(self.recording) and self.recording[-1][1] is None

    def recording_at(self, wall_ns: int) -> bool:
        return any(
            start is not None and start <= wall_ns and (stop is None or wall_ns < stop)
            for start, stop in self.recording
        )


@dataclass
class _PendingOpen:
    request_id: int
    meta: RunMetadata
    path: Path
    clock: RunClock
    deadline: float  # monotonic


class IngestProcess:
    """The loop of the ingest process (see the module docstring). Runs in the child."""

    def __init__(
        self,
        config: StationConfig,
        command_endpoint: str,
        report_endpoint: str,
        clock: RunClock,
        parent_pid: int | None = None,
    ) -> None:
        self.config = config
        self.detector = config.detector
        self.clock = clock  # the daemon's clock: the time of events sent back
        self.parent_pid = parent_pid
        self._command_endpoint = command_endpoint
        self._report_endpoint = report_endpoint
        self.sequencer = FrameSequencer(
            self.detector.reorder_window_frames, self.detector.reorder_window_s
        )
        self._clock_map: DetectorClockMap | None = None
        self._clock_key: SeriesKey | None = None
        self._latest_start: StartMessage | None = None
        self._latest_geometry: FrameGeometry | None = None  # of the last image released
        self._latest_image_ns = 0
        self._run: _Run | None = None
        self._pending_open: _PendingOpen | None = None
        self._limiter = _EventLimiter(EVENTS_PER_KIND_PER_S)
        self.hdf5_write = _Histogram(HDF5_WRITE_BUCKETS_S)
        self.hdf5_flush = _Histogram(())
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "malformed_total",
                "frames_received_total",
                "frames_written_total",
                "frames_not_recording_total",
                "frames_refiltered_total",
                "samples_written_total",
                "events_written_total",
                "holder_positions_written_total",
                "records_without_run_total",
                "write_errors_total",
                "errors_total",
                "events_suppressed_total",
                "reports_dropped_total",
                "retimes_total",
            ),
            0,
        )
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._done = False
        self._term_at: float | None = None
        now = time.monotonic()
        self._next_flush = now
        self._next_stats = now
        self._next_parent_check = now

    # ----- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until shutdown, SIGTERM (after the grace period) or the daemon's death."""
        self._context = zmq.Context()
        self._reports = self._context.socket(zmq.PUSH)
        self._reports.setsockopt(zmq.LINGER, 1000)
        self._reports.setsockopt(zmq.SNDHWM, 10_000)
        self._reports.setsockopt(zmq.SNDTIMEO, REPORT_SEND_TIMEOUT_MS)
        self._reports.connect(self._report_endpoint)
        try:
            self._receiver = Stream2Receiver(
                self.detector.endpoint, rcvhwm=self.detector.receive_hwm, context=self._context
            )
        except zmq.ZMQError as exc:
            error = f"detector.endpoint {self.detector.endpoint!r}: {exc}"
            self._report(READY, {"pid": os.getpid(), "error": error}, reliable=True)
            self._context.destroy(linger=1000)  # also the receiver's half-made socket
            return
        self._commands = self._context.socket(zmq.PULL)
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.connect(self._command_endpoint)
        poller = zmq.Poller()
        poller.register(self._commands, zmq.POLLIN)
        poller.register(self._receiver.socket, zmq.POLLIN)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._report(READY, {"pid": os.getpid()}, reliable=True)
            log.info("ingest process %d receiving %s", os.getpid(), self.detector.endpoint)
            while not self._done:
                poller.poll(POLL_MS)
                self._turn()
        finally:
            self._stop()

    def _turn(self) -> None:
        if self._pending_open is None:
            self._drain_commands()
        self._drain_detector()
        self._guarded("timed work", self._housekeeping)

    def _stop(self) -> None:
        if self._run is not None:
            self._guarded("closing the run", self._close_run)
        self._receiver.close()
        self._commands.close(linger=0)
        self._reports.close(linger=1000)
        self._context.term()
        orphaned = self.parent_pid is not None and os.getppid() != self.parent_pid
        if orphaned and self._command_endpoint.startswith("ipc://"):
            # the daemon died without cleaning up: remove its private socket directory
            folder = os.path.dirname(self._command_endpoint[len("ipc://") :])
            shutil.rmtree(folder, ignore_errors=True)
        log.info("ingest process %d stopped", os.getpid())

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._term_at is None:
            self._term_at = time.monotonic()
            log.warning("ingest: SIGTERM; closing the run in %.0f s unless told", TERM_GRACE_S)

    # ----- inputs ----------------------------------------------------------------------------
    def _drain_commands(self) -> None:
        for _ in range(COMMAND_BATCH):
            if self._done or self._pending_open is not None:
                return
            try:
                parts = self._commands.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._guarded("a record from the daemon", self._handle_record, parts)

    def _drain_detector(self, limit: int = DETECTOR_BATCH) -> None:
        for _ in range(limit):
            raw = self._receiver.receive_raw(0)
            if raw is None:
                return
            buf, received_ns = raw
            self._guarded("a detector message", self._handle_detector, buf, received_ns)

    def _handle_detector(self, buf: bytes, received_ns: int) -> None:
        try:
            message: Message = decode_message(buf, received_ns)
        except MalformedMessage as exc:
            self.counts["malformed_total"] += 1
            self._event(
                EventKind.MALFORMED,
                f"malformed Stream V2 message ({len(buf)} bytes) dropped: {exc}",
                {"bytes": len(buf)},
            )
            return
        if isinstance(message, StartMessage):
            self._latest_start = message
        elif isinstance(message, ImageMessage):
            self.counts["frames_received_total"] += 1
        self._take(self.sequencer.push(message, time.monotonic()))

    def _take(self, released: Released) -> None:
        """Events and frames out of the sequencer."""
        for event in released.events:
            self._event(event.kind, event.message, event.data)
        for image in released.frames:
            self._guarded(f"image {image.image_id}", self._frame, image)

    def _handle_record(self, parts: list[bytes]) -> None:
        kind, payload = parts[0], parts[1] if len(parts) > 1 else b""
        if kind == CMD:
            self._command(pickle.loads(payload))
        elif kind == SAMPLES:
            self._samples(np.frombuffer(payload, dtype=BIAS_SAMPLE_DTYPE))
        elif kind == EVENT:
            self._client_event(pickle.loads(payload))
        elif kind == HOLDER:
            self._holder(*_HOLDER_RECORD.unpack(payload))
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    # ----- frames ----------------------------------------------------------------------------
    def _frame(self, image: ImageMessage) -> None:
        key = (image.series_id, image.series_unique_id)
        if key != self._clock_key:
            self._end_series_timing()
            self._clock_map, self._clock_key = DetectorClockMap(), key
        assert self._clock_map is not None and image.received_ns is not None
        self._clock_map.observe(image.start_time, image.stop_time, image.received_ns)
        self._latest_geometry = geometry_of_image(image, self.detector)
        self._latest_image_ns = image.received_ns
        run = self._run
        if run is None or not run.recording_at(image.received_ns):
            self.counts["frames_not_recording_total"] += 1
            return
        self._write_frame(run, image, key, self._clock_map)

    def _write_frame(
        self, run: _Run, image: ImageMessage, key: SeriesKey, clock_map: DetectorClockMap
    ) -> None:
        writer = run.writer
        try:
            chunks, refiltered = chunks_for_file(image, writer.geometry)
        except GeometryMismatchError as exc:
            self.dropped["geometry"] += 1
            self._event(EventKind.ERROR, f"image {image.image_id} dropped: {exc}")
            return
        except MalformedMessage as exc:
            self.dropped["corrupt"] += 1
            self._event(EventKind.MALFORMED, f"image {image.image_id} dropped: {exc}")
            return
        rows = run.rows
        if rows is None or rows.key != key:
            offset_ns = clock_map.offset_ns
            assert offset_ns is not None
            rows = _SeriesRows(
                key, writer.frames_written, offset_ns, clock_map.error_ns, run.last_frame_time
            )
            run.rows = rows
            run.series.append({"series_id": key[0], "series_unique_id": key[1]})
        clock = run.clock
        mid_ns = fraction_ns(image.mid_time)
        frame_time = max(clock.from_wall_ns(rows.offset_ns + mid_ns), run.last_frame_time)
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
                _iso(image.series_date),
            )
        except Exception as exc:
            self.dropped["write_error"] += 1
            self.counts["write_errors_total"] += 1
            log.exception("writing image %d failed", image.image_id)
            self._event(EventKind.ERROR, f"writing image {image.image_id} failed: {exc}")
            return
        finally:
            self.hdf5_write.observe(time.perf_counter() - started)
        rows.mids_ns.append(mid_ns)
        run.last_frame_time = frame_time
        run.dirty = True
        self.counts["frames_written_total"] += 1
        if refiltered:
            self.counts["frames_refiltered_total"] += 1

    def _retime(self, force: bool) -> None:
        """Rewrite the current series' frame_time with the improved clock mapping."""
        run, clock_map = self._run, self._clock_map
        if run is None or clock_map is None or run.rows is None:
            return
        rows = run.rows
        offset_ns = clock_map.offset_ns
        if rows.key != self._clock_key or not rows.mids_ns or offset_ns is None:
            return
        if not force and offset_ns >= rows.offset_ns:
            return
        clock = run.clock
        base = offset_ns - clock.start_ns
        times = (base + np.asarray(rows.mids_ns, dtype=np.int64)) * (1e-9 * clock.time_scale)
        times = np.maximum.accumulate(np.maximum(times, rows.floor))
        error = clock_map.run_error(clock)
        started = time.perf_counter()
        run.writer.retime_frames(rows.first_row, times, clock.from_wall_ns(offset_ns), error)
        self.hdf5_write.observe(time.perf_counter() - started)
        rows.offset_ns, rows.error_ns = offset_ns, clock_map.error_ns
        run.last_frame_time = float(times[-1])
        run.dirty = True
        run.series[-1].update(
            frames=len(rows.mids_ns),
            clock_offset_s=clock.from_wall_ns(offset_ns),
            clock_offset_error_s=error,
        )
        self.counts["retimes_total"] += 1

    def _end_series_timing(self) -> None:
        """A series ended (or the run closes): its rows get the final mapping."""
        self._retime(force=True)

    # ----- records from the daemon -----------------------------------------------------------
    def _samples(self, batch: np.ndarray) -> None:
        run = self._run
        if run is None:
            self.counts["records_without_run_total"] += 1
            return
        started = time.perf_counter()
        run.writer.write_bias_samples(
            np.ascontiguousarray(batch["time"]),
            np.ascontiguousarray(batch["time_error"]),
            np.ascontiguousarray(batch["voltage"]),
            np.ascontiguousarray(batch["setpoint"]),
            np.ascontiguousarray(batch["current"]),
            np.ascontiguousarray(batch["status"]),
        )
        self.hdf5_write.observe(time.perf_counter() - started)
        self.counts["samples_written_total"] += len(batch)
        run.dirty = True

    def _client_event(self, event: Event) -> None:
        run = self._run
        if run is None:
            self.counts["records_without_run_total"] += 1
            return
        self._write_event(run, event.time, event.kind, event.message)

    def _holder(self, time_s: float, position_nm: float) -> None:
        run = self._run
        if run is None:
            self.counts["records_without_run_total"] += 1
            return
        started = time.perf_counter()
        run.writer.write_holder_position(time_s, position_nm)
        self.hdf5_write.observe(time.perf_counter() - started)
        self.counts["holder_positions_written_total"] += 1
        run.dirty = True

    def _write_event(self, run: _Run, time_s: float, kind: str, message: str) -> None:
        started = time.perf_counter()
        run.writer.write_event(time_s, kind, message)
        self.hdf5_write.observe(time.perf_counter() - started)
        self.counts["events_written_total"] += 1
        run.dirty = True

    # ----- commands --------------------------------------------------------------------------
    def _command(self, command: dict[str, Any]) -> None:
        op, request_id = command.get("op"), command.get("id")
        if op in _STATE_CHANGES:
            # What reached this host before the command is taken first, so "received before
            # start/stop_recording" means received, not merely read by this loop.
            self._drain_detector(limit=self.detector.receive_hwm)
        try:
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                raise IngestError(f"unknown command {op!r}")
            result = handler(request_id, command)
        except Exception as exc:
            log.warning("ingest: command %s refused: %s", op, exc)
            self._reply(request_id, False, error=str(exc) or type(exc).__name__)
            return
        if result is not None:
            self._reply(request_id, True, **result)

    def _op_ping(self, request_id: int, command: dict[str, Any]) -> dict[str, Any]:
        return {"stats": self.stats()}

    def _op_open_run(self, request_id: int, command: dict[str, Any]) -> dict[str, Any] | None:
        if self._run is not None:
            raise IngestError(f"run {self._run.writer.meta.run_id} is still open")
        meta: RunMetadata = command["meta"]
        clock: RunClock = command.get("clock") or RunClock(1.0, start_ns=meta.start_time_ns)
        path, geometry = Path(command["path"]), command.get("geometry")
        if path.exists():
            raise IngestError(f"{path} exists: a run file is never overwritten")
        if geometry is not None:
            return self._open(meta, path, clock, geometry, "the daemon")
        geometry = self._stream_geometry()
        if geometry is not None:
            return self._open(meta, path, clock, geometry, "the stream")
        # Wait (still receiving frames, holding back later records) for the detector to speak.
        deadline = time.monotonic() + self.detector.geometry_timeout_s
        self._pending_open = _PendingOpen(request_id, meta, path, clock, deadline)
        return None

    def _op_start_recording(self, request_id: int, command: dict[str, Any]) -> dict[str, Any]:
        run = self._require_run()
        if not run.is_recording:
            run.recording.append([time.time_ns(), None])
        return {"recording": True, "time": run.clock.now()}

    def _op_stop_recording(self, request_id: int, command: dict[str, Any]) -> dict[str, Any]:
        run = self._require_run()
        if run.is_recording:
            run.recording[-1][1] = time.time_ns()
        return {"recording": False, "time": run.clock.now()}

    def _op_close_run(self, request_id: int, command: dict[str, Any]) -> dict[str, Any]:
        self._require_run()
        return {"summary": self._close_run()}

    def _op_shutdown(self, request_id: int, command: dict[str, Any]) -> dict[str, Any]:
        summary = self._close_run() if self._run is not None else None
        self._done = True
        return {"summary": summary}

    def _require_run(self) -> _Run:
        if self._run is None:
            raise IngestError("no run is open")
        return self._run

    # ----- runs ------------------------------------------------------------------------------
    def _stream_geometry(self) -> FrameGeometry | None:
        """Geometry from the latest `start` or image seen; None while it is not known."""
        start = self._latest_start
        if start is not None and (start.received_ns or 0) >= self._latest_image_ns:
            return geometry_of_start(start, self.detector)  # None: wait for its first image
        return self._latest_geometry

    def _check_pending_open(self) -> None:
        pending = self._pending_open
        if pending is None:
            return
        geometry, source = self._stream_geometry(), "the stream"
        if geometry is None:
            if time.monotonic() < pending.deadline:
                return
            geometry, source = default_geometry(self.detector, self._latest_start), "the config"
        self._pending_open = None
        try:
            result = self._open(pending.meta, pending.path, pending.clock, geometry, source)
        except Exception as exc:
            log.warning("ingest: open_run refused: %s", exc)
            self._reply(pending.request_id, False, error=str(exc))
            return
        self._reply(pending.request_id, True, **result)

    def _open(
        self,
        meta: RunMetadata,
        path: Path,
        clock: RunClock,
        geometry: FrameGeometry,
        source: str,
    ) -> dict[str, Any]:
        writer = RunWriter(path, meta, geometry)
        run = _Run(writer, clock, source, self._counters())
        self._run = run
        compression = geometry.compression or "raw"
        text = (
            f"ingest: {len(geometry.channels)} channel(s) {geometry.shape[0]}x"
            f"{geometry.shape[1]} {geometry.dtype} {compression} (from {source})"
        )
        writer.flush()
        run.frames_flushed = 0
        self._next_flush = time.monotonic() + self.config.sampling.flush_interval_s
        log.info("ingest: run %s open at %s; %s", meta.run_id, path, text)
        return {"path": str(path), "geometry": asdict(geometry), "geometry_source": source}

    def _close_run(self) -> dict[str, Any]:
        run = self._run
        assert run is not None
        try:
            self._take(self.sequencer.flush())  # frames received in the run, held for a gap
            self._end_series_timing()
        finally:
            self._run = None
            if run.is_recording:
                run.recording[-1][1] = time.time_ns()
            run.writer.close(time.time_ns())
        summary = self._summary(run)
        log.info(
            "ingest: run %s closed: %d frames written, %d dropped, %d missing",
            summary["run_id"],
            summary["frames_written"],
            summary["frames_dropped"],
            summary["frames_missing"],
        )
        return summary

    def _summary(self, run: _Run) -> dict[str, Any]:
        now, before = self._counters(), run.counters_at_open
        delta = {key: value - before.get(key, 0) for key, value in now.items()}
        dropped = {reason: delta[f"dropped_{reason}"] for reason in DROP_REASONS}
        return {
            "run_id": run.writer.meta.run_id,
            "path": str(run.writer.path),
            "closed": True,
            "frames_written": run.writer.frames_written,
            "frames_received": delta["frames_received_total"],
            "frames_not_recording": delta["frames_not_recording_total"],
            "frames_dropped": sum(dropped.values()),
            "dropped_by_reason": dropped,
            "frames_missing": delta["frames_missing_total"],
            "gaps": delta["gaps_total"],
            "out_of_order": delta["out_of_order_total"],
            "malformed": delta["malformed_total"],
            "samples_written": run.writer.samples_written,
            "events_written": run.writer.events_written,
            "write_errors": delta["write_errors_total"],
            "series": run.series,
            "geometry": asdict(run.writer.geometry),
            "geometry_source": run.geometry_source,
        }

    # ----- timed work ------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        self._take(self.sequencer.poll(now))
        self._check_pending_open()
        for kind, count in self._limiter.take_suppressed(now):
            self._event(kind, f"{count} more {kind} events in the last second (not listed)")
        run = self._run
        if run is not None and now >= self._next_flush:
            self._next_flush = now + self.config.sampling.flush_interval_s
            self._retime(force=False)
            if run.dirty:
                started = time.perf_counter()
                run.writer.flush()
                self.hdf5_flush.observe(time.perf_counter() - started)
                run.dirty = False
                run.frames_flushed = run.writer.frames_written
                run.samples_flushed = run.writer.samples_written
        if now >= self._next_stats:
            self._next_stats = now + STATS_INTERVAL_S
            self._report(STATS, self.stats())
        if now >= self._next_parent_check:
            self._next_parent_check = now + 0.5
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.error("ingest: the daemon (pid %d) is gone; closing the run", self.parent_pid)
                self._done = True
        if self._term_at is not None and now - self._term_at >= TERM_GRACE_S:
            log.error("ingest: no shutdown %.0f s after SIGTERM; closing the run", TERM_GRACE_S)
            self._done = True

    # ----- reporting -------------------------------------------------------------------------
    def _counters(self) -> dict[str, int]:
        seq = self.sequencer
        dropped = dict(self.dropped)
        dropped["duplicate"] += seq.duplicates_total
        dropped["late"] += seq.late_total
        dropped["stale_series"] += seq.stale_total
        return {
            **self.counts,
            **{f"dropped_{reason}": count for reason, count in dropped.items()},
            "frames_dropped_total": sum(dropped.values()),
            "messages_received_total": self._receiver.received_total,
            "gaps_total": seq.gaps_total,
            "frames_missing_total": seq.missing_total,
            "out_of_order_total": seq.out_of_order_total,
            "series_total": seq.series_total,
            "series_without_start_total": seq.series_without_start_total,
            "frames_held": seq.held,
        }

    def stats(self) -> dict[str, Any]:
        counters = self._counters()
        stats: dict[str, Any] = {
            "pid": os.getpid(),
            "time_ns": time.time_ns(),
            **counters,
            "frames_dropped_by_reason": {r: counters[f"dropped_{r}"] for r in DROP_REASONS},
            "hdf5_write_seconds": self.hdf5_write.to_dict(),
            "hdf5_flush_seconds": {"sum": self.hdf5_flush.sum, "count": self.hdf5_flush.count},
        }
        clock_map = self._clock_map
        stats["detector"] = {
            "endpoint": self.detector.endpoint,
            "series_id": None if self._clock_key is None else self._clock_key[0],
            "series_unique_id": None if self._clock_key is None else self._clock_key[1],
            "geometry": None if self._latest_geometry is None else asdict(self._latest_geometry),
            "clock_offset_error_s": None if clock_map is None else clock_map.error_ns * 1e-9,
        }
        run = self._run
        stats["run"] = (
            None
            if run is None
            else {
                "run_id": run.writer.meta.run_id,
                "path": str(run.writer.path),
                "recording": run.is_recording,
                "frames_written": run.writer.frames_written,
                "frames_flushed": run.frames_flushed,
                "samples_written": run.writer.samples_written,
                "samples_flushed": run.samples_flushed,
            }
        )
        stats["opening_run"] = self._pending_open is not None
        return stats

    def _event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """An ingest event: logged, into the run file (if open) and to the daemon."""
        if not self._limiter.allow(kind, time.monotonic()):
            self.counts["events_suppressed_total"] += 1
            return
        log.warning("ingest event %s: %s", kind, message)
        payload = dict(data or {})
        payload["source"] = "ingest"
        run = self._run
        if run is not None:
            run_time = run.clock.now()
            payload["run_time"] = run_time
            try:
                self._write_event(run, run_time, kind, message)
            except Exception:
                self.counts["write_errors_total"] += 1
                log.exception("writing an ingest event failed")
        self._report(EVENT, Event(self.clock.now(), kind, message, payload).to_dict())

    def _reply(self, request_id: int | None, ok: bool, **payload: Any) -> None:
        self._report(REPLY, {"id": request_id, "ok": ok, **payload}, reliable=True)

    def _report(self, kind: bytes, obj: Any, reliable: bool = False) -> None:
        try:
            self._reports.send_multipart([kind, pickle.dumps(obj)], 0 if reliable else zmq.NOBLOCK)
        except zmq.Again:
            self.counts["reports_dropped_total"] += 1
            if reliable:
                log.error("ingest: the daemon did not take a %s report", kind.decode())

    def _guarded(self, what: str, function: Callable[..., Any], *args: Any) -> None:
        """Run one unit of work; an exception is counted, logged and evented, never fatal."""
        try:
            function(*args)
        except Exception as exc:
            self.counts["errors_total"] += 1
            log.exception("ingest: %s failed", what)
            try:
                self._event(EventKind.ERROR, f"ingest: {what} failed: {exc}")
            except Exception:
                log.exception("ingest: reporting an error failed")


def _child_main(
    config: StationConfig,
    command_endpoint: str,
    report_endpoint: str,
    clock: RunClock,
    parent_pid: int,
    log_level: int,
) -> None:
    """Entry point of the spawned ingest process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle
    logging.basicConfig(
        level=log_level,
        format="%(asctime)s ingest[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    IngestProcess(config, command_endpoint, report_endpoint, clock, parent_pid).run()


# ----- the daemon side ------------------------------------------------------------------------
@dataclass
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None


class IngestClient:
    """The daemon's handle on the ingest process. Thread-safe.

    Records (`write_samples`, `write_event`, `write_holder_position`) never block: if the
    process is not running or its queue is full they are dropped, counted in
    `records_dropped_total` and logged. Commands wait for the process's answer.
    """

    def __init__(
        self,
        config: StationConfig,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        clock: RunClock | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.config = config
        self.on_event = on_event
        self.clock = clock or RunClock()
        self.start_timeout_s = start_timeout_s
        self.records_dropped_total = 0
        self.events_received_total = 0
        self.process: multiprocessing.process.BaseProcess | None = None
        self._context: zmq.Context | None = None
        self._commands: zmq.Socket | None = None
        self._reports: zmq.Socket | None = None
        self._tmpdir: str | None = None
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stats: dict[str, Any] = {}
        self._ready = threading.Event()
        self._start_error: str | None = None
        self._closing = threading.Event()
        self._listener: threading.Thread | None = None
        self._shut = False

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the process and wait until its sockets are up (IngestError if it fails)."""
        if self.process is not None:
            return
        self._tmpdir = tempfile.mkdtemp(prefix="insitu-ingest-")  # mode 0700
        command_endpoint = f"ipc://{self._tmpdir}/commands"
        report_endpoint = f"ipc://{self._tmpdir}/reports"
        self._context = zmq.Context()
        self._commands = self._context.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.setsockopt(zmq.SNDHWM, RECORD_HWM)
        self._commands.setsockopt(zmq.SNDTIMEO, 2000)
        self._commands.bind(command_endpoint)
        self._reports = self._context.socket(zmq.PULL)
        self._reports.setsockopt(zmq.LINGER, 0)
        self._reports.bind(report_endpoint)
        self._listener = threading.Thread(target=self._listen, name="ingest-reports", daemon=True)
        self._listener.start()
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=_child_main,
            args=(
                self.config,
                command_endpoint,
                report_endpoint,
                self.clock,
                os.getpid(),
                logging.getLogger().getEffectiveLevel(),
            ),
            name="insitu-daq-ingest",
            daemon=True,
        )
        self.process.start()
        atexit.register(self.shutdown)
        deadline = time.monotonic() + self.start_timeout_s
        while not self._ready.wait(0.05):
            if not self.process.is_alive() or time.monotonic() > deadline:
                code = self.process.exitcode
                self.shutdown()
                raise IngestError(f"ingest process did not start (exit code {code})")
        if self._start_error is not None:
            error = self._start_error
            self.shutdown()
            raise IngestError(error)
        log.info("ingest process %d up", self.process.pid)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Close any open run, stop the process and release everything; idempotent."""
        if self._shut:
            return
        self._shut = True
        atexit.unregister(self.shutdown)
        process = self.process
        if process is not None:
            if process.is_alive() and self._ready.is_set() and self._start_error is None:
                try:
                    self._request("shutdown", timeout_s)
                except IngestError as exc:
                    log.error("ingest shutdown: %s", exc)
            process.join(timeout_s)
            if process.is_alive():
                log.error("ingest process %d did not stop; terminating it", process.pid)
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(2.0)
        self._closing.set()
        if self._listener is not None:
            self._listener.join(2.0)
        with self._send_lock:
            for sock in (self._commands, self._reports):
                if sock is not None:
                    sock.close(linger=0)
            self._commands = self._reports = None
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> IngestClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----- commands --------------------------------------------------------------------------
    def open_run(
        self,
        meta: RunMetadata,
        path: str | Path,
        clock: RunClock | None = None,
        geometry: FrameGeometry | None = None,
    ) -> dict[str, Any]:
        """Create the run file. `clock`: the run's clock (default: time_scale 1 from
        meta.start_time_ns). `geometry`: None takes it from the stream (the latest start or
        image; waiting up to detector.geometry_timeout_s), else from the config defaults.
        Returns {"path", "geometry", "geometry_source"}; IngestError if refused."""
        timeout = self.config.detector.geometry_timeout_s + 30.0
        return self._request(
            "open_run", timeout, meta=meta, path=str(path), clock=clock, geometry=geometry
        )

    def start_recording(self) -> dict[str, Any]:
        """Frames received from now on are written (until stop_recording)."""
        return self._request("start_recording", 10.0)

    def stop_recording(self) -> dict[str, Any]:
        return self._request("stop_recording", 10.0)

    def close_run(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Close the run file after every record sent before; returns its summary.

        Never raises: if no run is open or the process is gone the summary says
        {"closed": False, "error": ...} (and the error is logged).
        """
        try:
            return self._request("close_run", timeout_s)["summary"]
        except IngestError as exc:
            log.error("ingest close_run: %s", exc)
            return {"closed": False, "error": str(exc)}

    def sync(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Wait until everything sent before is handled; returns fresh stats."""
        stats = self._request("ping", timeout_s)["stats"]
        self._stats = stats
        return self._with_client_counters(stats)

    def stats(self) -> dict[str, Any]:
        """The latest stats the process sent (every STATS_INTERVAL_S), plus client counters."""
        return self._with_client_counters(self._stats)

    def _with_client_counters(self, stats: dict[str, Any]) -> dict[str, Any]:
        return {
            **stats,
            "alive": self.alive,
            "records_dropped_total": self.records_dropped_total,
        }

    # ----- records ---------------------------------------------------------------------------
    def write_samples(self, batch: np.ndarray) -> None:
        """Bias/current samples (records.BIAS_SAMPLE_DTYPE) on the run clock."""
        if batch.dtype != BIAS_SAMPLE_DTYPE:
            raise TypeError(f"bias samples must be BIAS_SAMPLE_DTYPE, not {batch.dtype}")
        if len(batch):
            self._send_record([SAMPLES, np.ascontiguousarray(batch).tobytes()])

    def write_event(self, event: Event) -> None:
        """An event (time on the run clock) for /entry/events."""
        try:
            payload = pickle.dumps(event)
        except Exception:  # data the file does not keep anyway; the event itself goes
            log.warning("event data of %r not picklable; sent without it", event.kind)
            payload = pickle.dumps(Event(event.time, event.kind, event.message))
        self._send_record([EVENT, payload])

    def write_holder_position(self, time_s: float, position_nm: float) -> None:
        self._send_record([HOLDER, _HOLDER_RECORD.pack(time_s, position_nm)])

    # ----- transport -------------------------------------------------------------------------
    def _send_record(self, parts: list[bytes]) -> None:
        with self._send_lock:
            sock = self._commands
            if sock is not None and self.alive:
                try:
                    sock.send_multipart(parts, zmq.NOBLOCK)
                    return
                except zmq.Again:
                    pass
            self.records_dropped_total += 1
            dropped = self.records_dropped_total
        if dropped == 1 or dropped % 1000 == 0:
            log.error("ingest process not taking records: %d dropped so far", dropped)

    def _request(self, op: str, timeout_s: float, **args: Any) -> dict[str, Any]:
        if not self.alive:
            raise IngestError("the ingest process is not running")
        request_id = next(self._ids)
        waiter = _Waiter()
        with self._pending_lock:
            self._pending[request_id] = waiter
        try:
            with self._send_lock:
                if self._commands is None:
                    raise IngestError("the ingest client is shut down")
                try:
                    self._commands.send_multipart(
                        [CMD, pickle.dumps({"op": op, "id": request_id, **args})]
                    )
                except zmq.Again:
                    raise IngestError(f"the ingest process does not take {op}") from None
            deadline = time.monotonic() + timeout_s
            while not waiter.done.wait(0.05):
                if not self.alive:
                    code = self.process.exitcode if self.process is not None else None
                    raise IngestError(f"the ingest process exited (code {code}) during {op}")
                if time.monotonic() > deadline:
                    raise IngestError(f"the ingest process did not answer {op} in {timeout_s} s")
        finally:
            with self._pending_lock:
                self._pending.pop(request_id, None)
        reply = waiter.reply or {}
        if not reply.get("ok"):
            raise IngestError(f"{op}: {reply.get('error', 'refused')}")
        return reply

    def _listen(self) -> None:
        sock = self._reports
        assert sock is not None
        while not self._closing.is_set():
            try:
                if not sock.poll(100):
                    continue
                kind, payload = sock.recv_multipart()
                obj = pickle.loads(payload)
            except zmq.ZMQError:
                if self._closing.is_set():
                    return
                log.exception("ingest reports")
                continue
            except Exception:
                log.exception("unreadable report from the ingest process")
                continue
            if kind == REPLY:
                with self._pending_lock:
                    waiter = self._pending.get(obj.get("id"))
                if waiter is not None:
                    waiter.reply = obj
                    waiter.done.set()
            elif kind == STATS:
                self._stats = obj
            elif kind == EVENT:
                self.events_received_total += 1
                if self.on_event is not None:
                    try:
                        self.on_event(obj)
                    except Exception:
                        log.exception("ingest event callback")
            elif kind == READY:
                self._start_error = obj.get("error")
                self._ready.set()
