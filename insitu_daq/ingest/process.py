"""The ingest process: DECTRIS Stream V2 in, the run file out (see ingest/ for the design).

`IngestProcess` runs in its own process (multiprocessing "spawn", started by
`ingest_client.IngestClient`; `child_main` is its entry point). It owns the Stream2Receiver
(PULL connected to `config.detector.endpoint`), the RunWriter and, when asked, the frame tap
for the live analysis (ingest/tap.py), and is the only thing that touches the run file. Its
loop waits on the detector socket and the command socket together; per turn it first takes
everything the daemon sent (commands and records, in order), then up to a batch of detector
messages, then does the timed work (reorder-window expiry, clock retiming, flush, stats).
Each released image goes through the `FrameRecorder` (recorder.py: rows, clock mapping,
geometry); this module decides whether it is recorded and what a failed write means.

The ingest has priority over the analysis. Each image is offered on the tap with whether the
ingest is behind once it has been handled: further images released with it by the sequencer,
or a detector message waiting on the receiver socket (`_detector_waiting`, a getsockopt of
ZMQ_EVENTS, 1.6 us). While behind, the tap holds the newest image back (sending one every
`1 / [analysis] min_rate_hz` s all the same) and the end of the loop turn that finds the
socket empty sends it (ingest/tap.py): the analysis's FFTs then run while the ingest has time,
not during a backlog, where they slowed it through the two cores' shared cache.

Detector messages are received zero-copy (`recv(copy=False)`): each image's payload stays a
view into its ZeroMQ frame through decoding, the file write and the tap. At start the process
asks glibc to keep freed frame-sized buffers (`tune_malloc`): without it every 2 MB frame is
mapped and faulted in afresh, which made raw ingest page-fault bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from insitu_daq.core.clock import RunClock
from insitu_daq.core.config import StationConfig
from insitu_daq.core.imaging import ImagingState
from insitu_daq.core.records import BIAS_SAMPLE_DTYPE, Event, EventKind
from insitu_daq.core.worker import start_worker_process
from insitu_daq.drivers.stream2 import (
    ImageMessage,
    MalformedMessage,
    Message,
    StartMessage,
    Stream2Receiver,
    decode_message,
)
from insitu_daq.ingest.counters import EventLimiter, Histogram
from insitu_daq.ingest.failure import (
    RESERVE_BYTES,
    RecordingFailure,
    SpaceReserve,
    classify_write_error,
    file_identity,
    file_moved,
    reserve_path,
)
from insitu_daq.ingest.recorder import FrameRecorder, FrameWriteError
from insitu_daq.ingest.sequence import FrameSequencer, Released
from insitu_daq.ingest.silence import DetectorSilence
from insitu_daq.ingest.tap import AnalysisTap
from insitu_daq.ingest.wire import (
    ANALYSIS,
    CMD,
    DROP_REASONS,
    EVENT,
    HDF5_WRITE_BUCKETS_S,
    IMAGING,
    IMAGING_WATERMARK,
    READY,
    RECORDING_FAILED,
    REPLY,
    SAMPLES,
    SERIES,
    STATS,
    STATS_INTERVAL_S,
    WATERMARK_RECORD,
    IngestError,
    series_dtype,
)
from insitu_daq.runfile import layout
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata, RunWriter

log = logging.getLogger(__name__)

DETECTOR_BATCH = 64  # detector messages per loop turn before the commands are looked at again
COMMAND_BATCH = 1000
POLL_MS = 20  # loop wake-up when idle: the reorder window's time resolution
EVENTS_PER_KIND_PER_S = 20  # beyond this an event kind is counted, not reported, until next s
TERM_GRACE_S = 30.0  # after SIGTERM, wait this long for the daemon's shutdown
REPORT_SEND_TIMEOUT_MS = 2000
# After a recording failure: at most one log line this often about what is not written, and
# the small records (events, bias samples, positions) still tried while they fit in half the
# freed reserve (the other half is for the close), so the ramp-down and the end are in the file.
FAILURE_LOG_INTERVAL_S = 5.0
AFTER_FAILURE_BUDGET_BYTES = RESERVE_BYTES // 2
EVENT_BYTES = 300  # what an event costs in the file (time, kind S32, message S256, chunking)

_STATE_CHANGES = ("open_run", "start_recording", "stop_recording", "close_run", "shutdown")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024  # frames (2 MB raw) come from the heap, not mmap
MALLOC_TRIM_THRESHOLD = 256 * 1024 * 1024  # free heap kept before it is given back


def tune_malloc() -> dict[str, int]:
    """Keep frame-sized buffers in the heap between frames (glibc only); what was set.

    glibc serves blocks above its mmap threshold with a fresh mmap and gives freed heap tops
    above its trim threshold back to the OS, so a 2 MB frame buffer freed after every frame
    is faulted in page by page for the next one (~700 page faults a raw frame, most of the
    ingest's CPU time). Raising both thresholds keeps a few frames' worth of buffers mapped.
    The cost is bounded: up to MALLOC_TRIM_THRESHOLD of freed memory stays resident after a
    burst (e.g. a full receive queue) until it is reused. INSITU_DAQ_MALLOPT=0 in the
    environment leaves malloc alone (for comparison, or a platform where it misbehaves).
    """
    if not sys.platform.startswith("linux"):
        return {}
    if os.environ.get("INSITU_DAQ_MALLOPT", "1") == "0":
        log.info("ingest: INSITU_DAQ_MALLOPT=0; malloc left as it is")
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (musl and others have no such symbol: not glibc)
    except (OSError, AttributeError):
        log.info("ingest: not glibc; malloc left as it is")
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    wanted = {"M_MMAP_THRESHOLD": MALLOC_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": MALLOC_TRIM_THRESHOLD}
    numbers = {"M_MMAP_THRESHOLD": _M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD}
    done = {name: value for name, value in wanted.items() if mallopt(numbers[name], value) == 1}
    log.info("ingest: glibc mallopt %s", ", ".join(f"{k}={v}" for k, v in done.items()) or "failed")
    return done


# ----- the process side -----------------------------------------------------------------------
@dataclass
class _Run:
    writer: RunWriter
    clock: RunClock
    geometry_source: str
    counters_at_open: dict[str, int]
    recording: list[list[int | None]] = field(default_factory=list)  # [start_ns, stop_ns]
    series: list[dict[str, Any]] = field(default_factory=list)  # the recorder's, at close
    frames_flushed: int = 0
    samples_flushed: int = 0
    dirty: bool = False
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file as opened
    reserve: SpaceReserve | None = None  # space kept for the end of the run (recording_failure)
    # Once the file stops taking writes (ingest/failure.py): why, and what is not written.
    failure: RecordingFailure | None = None
    budget_left: int = 0  # bytes of small records still tried after the failure
    frames_not_written: int = 0
    records_not_written: int = 0
    lost_logged: tuple[int, int] = (0, 0)
    next_failure_log: float = 0.0  # monotonic

    @property
    def takes_writes(self) -> bool:
        """For the frame recorder (recorder.RunFile): the file has not stopped taking writes."""
        return self.failure is None

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
        analysis_endpoint: str | None = None,
    ) -> None:
        self.config = config
        self.analysis_endpoint = analysis_endpoint
        self._tap: AnalysisTap | None = None
        self.detector = config.detector
        self.clock = clock  # the daemon's clock: the time of events sent back
        self.parent_pid = parent_pid
        self._command_endpoint = command_endpoint
        self._report_endpoint = report_endpoint
        self.sequencer = FrameSequencer(
            self.detector.reorder_window_frames, self.detector.reorder_window_s
        )
        self._silence = DetectorSilence(self.detector.silent_after_s)
        self._run: _Run | None = None
        self._pending_open: _PendingOpen | None = None
        self._limiter = EventLimiter(EVENTS_PER_KIND_PER_S)
        self.hdf5_write = Histogram(HDF5_WRITE_BUCKETS_S)
        self.hdf5_flush = Histogram(())
        self.recorder = FrameRecorder(self.detector, self._event, self.hdf5_write)
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "malformed_total",
                "frames_received_total",
                "frames_not_recording_total",
                "samples_written_total",
                "events_written_total",
                # per series (runfile/layout.py): "holder_positions_written_total", ...
                *(f"{name}s_written_total" for name in layout.SERIES),
                "records_without_run_total",
                "write_errors_total",
                "recording_failures_total",
                "records_not_written_total",
                "errors_total",
                "events_suppressed_total",
                "reports_dropped_total",
                "analysis_results_written_total",
                "analysis_results_without_run_total",
                "imaging_states_total",
                "imaging_watermarks_total",
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
        if self.analysis_endpoint is not None:
            try:
                self._tap = AnalysisTap(
                    self._context, self.analysis_endpoint, self.config.analysis.min_rate_hz
                )
            except zmq.ZMQError as exc:
                error = f"analysis endpoint {self.analysis_endpoint!r}: {exc}"
                self._report(READY, {"pid": os.getpid(), "error": error}, reliable=True)
                self._receiver.close()
                self._context.destroy(linger=1000)
                return
        self._commands = self._context.socket(zmq.PULL)
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.connect(self._command_endpoint)
        poller = zmq.Poller()
        poller.register(self._commands, zmq.POLLIN)
        poller.register(self._receiver.socket, zmq.POLLIN)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            ready: dict[str, Any] = {"pid": os.getpid()}
            if self._tap is not None:
                ready["analysis_endpoint"] = self._tap.bound_endpoint
            self._report(READY, ready, reliable=True)
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
        tap = self._tap
        if tap is not None and tap.holding and not self._detector_waiting():
            tap.caught_up()  # the image held back while the ingest was behind

    def _stop(self) -> None:
        if self._run is not None:
            self._guarded("closing the run", self._close_run)
        self._receiver.close()
        if self._tap is not None:
            self._tap.close()
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
            raw = self._receiver.receive_raw(0, copy=False)
            if raw is None:
                return
            buf, received_ns = raw
            self._guarded("a detector message", self._handle_detector, buf, received_ns)

    def _handle_detector(self, buf: memoryview, received_ns: int) -> None:
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
        # Another series than the one the detector was armed for is no sign of it: its
        # geometry is not the run's, and its images do not end a silence.
        armed = self.sequencer.takes(message.series_id)
        if isinstance(message, StartMessage):
            if armed:
                self.recorder.observe_start(message)
        elif isinstance(message, ImageMessage):
            self.counts["frames_received_total"] += 1
            if armed:
                self._detector_heard(received_ns)
        self._take(self.sequencer.push(message, time.monotonic()))

    def _take(self, released: Released) -> None:
        """Events and frames out of the sequencer."""
        for event in released.events:
            self._event(event.kind, event.message, event.data)
        last = len(released.frames) - 1
        for index, image in enumerate(released.frames):
            self._guarded(f"image {image.image_id}", self._frame, image, index < last)

    def _handle_record(self, parts: list[bytes]) -> None:
        kind, payload = parts[0], parts[1] if len(parts) > 1 else b""
        if kind == CMD:
            self._command(pickle.loads(payload))
        elif kind == SAMPLES:
            self._samples(np.frombuffer(payload, dtype=BIAS_SAMPLE_DTYPE))
        elif kind == EVENT:
            self._client_event(pickle.loads(payload))
        elif kind == SERIES:
            self._series(payload.decode(), parts[2])
        elif kind == ANALYSIS:
            self._analysis(json.loads(payload))
        elif kind == IMAGING:
            message = json.loads(payload)
            self._imaging_state(ImagingState.from_message(message), int(message["seq"]))
        elif kind == IMAGING_WATERMARK:
            self._imaging_watermark(*WATERMARK_RECORD.unpack(payload))
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    # ----- frames ----------------------------------------------------------------------------
    def _frame(self, image: ImageMessage, more_released: bool = False) -> None:
        """Record one released image (if recording) and offer it on the tap (if a run is open).

        more_released: the sequencer released further images with this one (not yet handled).
        """
        run = self._run
        assert image.received_ns is not None
        if run is None or not run.recording_at(image.received_ns):
            self.counts["frames_not_recording_total"] += 1
            frame_time = self.recorder.take(image, record=False)
        elif run.failure is not None:  # the file takes no more frames (counted, not logged)
            self.dropped["write_error"] += 1
            run.frames_not_written += 1
            frame_time = self.recorder.take(image, record=False)
        else:
            try:
                frame_time = self.recorder.take(image, record=True)
            except FrameWriteError as exc:
                frame_time = exc.frame_time
                self._frame_not_written(run, exc)
        if frame_time is not None and self._tap is not None:
            self._tap.offer(image, frame_time, behind=more_released or self._detector_waiting())

    def _frame_not_written(self, run: _Run, exc: FrameWriteError) -> None:
        """The run file's write of a frame raised: a recording failure if an I/O error."""
        self.dropped["write_error"] += 1
        self.counts["write_errors_total"] += 1
        cause = exc.__cause__ or exc
        failure = self._classify(run, cause, f"image {exc.image_id}")
        if failure is not None:
            run.frames_not_written += 1
            self._recording_failed(run, failure)
            return
        log.error("writing image %d failed", exc.image_id, exc_info=cause)
        self._event(EventKind.ERROR, f"writing image {exc.image_id} failed: {cause}")

    def _check_detector_silence(self) -> None:
        """A recording run without an image for detector.silent_after_s: say so, once."""
        run = self._run
        if run is None or not run.is_recording or self._detector_waiting():
            return  # (images queued on the socket: the ingest is behind, not the detector)
        began = self._silence.check(time.time_ns(), run.recording[-1][0])
        if began is not None:
            since = run.clock.from_wall_ns(began)
            self._event(
                EventKind.INSTRUMENT,
                f"detector silent: no image since {since:.3f} s while recording",
                {"silent_since": since},
            )

    def _detector_heard(self, received_ns: int) -> None:
        """An image arrived: the end of a silence declared in this run is an event too."""
        began = self._silence.image(received_ns)
        run = self._run
        if began is not None and run is not None:
            start, end = run.clock.from_wall_ns(began), run.clock.from_wall_ns(received_ns)
            self._event(
                EventKind.INSTRUMENT,
                f"detector back: no image from {start:.3f} s to {end:.3f} s",
                {"silent_since": start, "silent_until": end},
            )

    def _detector_waiting(self) -> bool:
        """A detector message is already queued on the receiver socket (the ingest is behind)."""
        return bool(self._receiver.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    # ----- records from the daemon -----------------------------------------------------------
    def _run_for_record(self) -> _Run | None:
        """The open run a record belongs to; None (the record counted, then dropped) if none."""
        if self._run is None:
            self.counts["records_without_run_total"] += 1
        return self._run

    def _samples(self, batch: np.ndarray) -> None:
        run = self._run_for_record()
        if run is None:
            return
        if not self._recordable(run, batch.nbytes):
            return
        started = time.perf_counter()
        written = self._file_write(
            run,
            "bias samples",
            run.writer.write_bias_samples,
            np.ascontiguousarray(batch["time"]),
            np.ascontiguousarray(batch["time_error"]),
            np.ascontiguousarray(batch["voltage"]),
            np.ascontiguousarray(batch["setpoint"]),
            np.ascontiguousarray(batch["current"]),
            np.ascontiguousarray(batch["status"]),
        )
        self.hdf5_write.observe(time.perf_counter() - started)
        if not written:
            return
        self.counts["samples_written_total"] += len(batch)
        run.dirty = True

    def _analysis(self, result: dict[str, Any]) -> None:
        run = self._run
        if run is None:
            self.counts["analysis_results_without_run_total"] += 1
            return
        if not self._recordable(run, EVENT_BYTES):
            return
        if not self._file_write(run, "an analysis result", run.writer.write_analysis, result):
            return
        self.counts["analysis_results_written_total"] += 1
        run.dirty = True

    def _imaging_state(self, state: ImagingState, seq: int) -> None:
        run = self._run_for_record()
        if run is None:
            return
        run.writer.add_imaging_state(state, seq)
        self.counts["imaging_states_total"] += 1
        run.dirty = True  # the next flush decides the frames it covers

    def _imaging_watermark(self, run_time_s: float, announced: int) -> None:
        run = self._run_for_record()
        if run is None:
            return
        run.writer.advance_imaging(run_time_s, announced)
        self.counts["imaging_watermarks_total"] += 1
        run.dirty = True

    def _client_event(self, event: Event) -> None:
        run = self._run_for_record()
        if run is None:
            return
        self._write_event(run, event.time, event.kind, event.message)

    def _series(self, name: str, payload: bytes) -> None:
        """Rows of a time series declared in runfile/layout.py, for its log."""
        rows = np.frombuffer(payload, dtype=series_dtype(name))
        run = self._run_for_record()
        if run is None:
            return
        if not self._recordable(run, len(payload)):
            return
        started = time.perf_counter()
        what = f"a {name.replace('_', ' ')} record"
        written = self._file_write(run, what, run.writer.write_series, name, rows)
        self.hdf5_write.observe(time.perf_counter() - started)
        if not written:
            return
        self.counts[f"{name}s_written_total"] += len(rows)
        run.dirty = True

    def _write_event(self, run: _Run, time_s: float, kind: str, message: str) -> None:
        if not self._recordable(run, EVENT_BYTES):
            return
        started = time.perf_counter()
        written = self._file_write(run, "an event", run.writer.write_event, time_s, kind, message)
        self.hdf5_write.observe(time.perf_counter() - started)
        if not written:
            return
        self.counts["events_written_total"] += 1
        run.dirty = True

    # ----- when the file stops taking writes -------------------------------------------------
    def _classify(self, run: _Run, exc: BaseException, what: str) -> RecordingFailure | None:
        """The recording failure a write's exception is (None: not an I/O error)."""
        context = f"writing {what}; {run.writer.frames_written} frames recorded"
        return classify_write_error(exc, run.writer.path, context)

    def _file_write(self, run: _Run, what: str, write: Callable[..., Any], *args: Any) -> bool:
        """One write into the run file; False if the file did not take it (an I/O error: the
        recording has failed). Exceptions that are not I/O errors propagate as before."""
        try:
            write(*args)
        except Exception as exc:
            failure = self._classify(run, exc, what)
            if failure is None:
                raise
            self.counts["write_errors_total"] += 1
            self._recording_failed(run, failure)
            return False
        return True

    def _recordable(self, run: _Run, nbytes: int) -> bool:
        """Whether a small record may still go to the file: always before a failure; after
        it, while the budget lasts (then counted, not written)."""
        if run.failure is None:
            return True
        if run.budget_left >= nbytes:
            run.budget_left -= nbytes
            return True
        run.records_not_written += 1
        self.counts["records_not_written_total"] += 1
        return False

    def _recording_failed(self, run: _Run, failure: RecordingFailure) -> None:
        """The run file stopped taking writes: tell the daemon once (it makes the bias safe),
        then free the reserve and try to leave the event and a last flush in the file."""
        if run.failure is not None:  # a write after the failure failed too: stop trying
            run.budget_left = 0
            return
        run.failure = failure
        self.counts["recording_failures_total"] += 1
        run_id = run.writer.meta.run_id
        log.error("ingest: run %s: recording failed: %s", run_id, failure.reason)
        self._report(
            RECORDING_FAILED,
            {
                "run_id": run_id,
                "kind": failure.kind,
                "reason": failure.reason,
                "errno": failure.errno,
                "failed_at_ns": time.time_ns(),
                "frames_recorded": run.writer.frames_written,
                "time": self.clock.now(),
            },
            reliable=True,
        )
        if run.reserve is not None:
            run.reserve.release()
        run.budget_left = AFTER_FAILURE_BUDGET_BYTES
        run.next_failure_log = time.monotonic() + FAILURE_LOG_INTERVAL_S
        if run.writer.closed:  # it failed closing: nothing more goes in
            return
        self._write_event(
            run, run.clock.now(), EventKind.RECORDING_FAILED, f"recording failed: {failure.reason}"
        )
        self._flush(run)

    def _log_failure(self, run: _Run, now: float) -> None:
        """While a run is not recording: one line every FAILURE_LOG_INTERVAL_S at most."""
        if run.failure is None or now < run.next_failure_log:
            return
        run.next_failure_log = now + FAILURE_LOG_INTERVAL_S
        lost = (run.frames_not_written, run.records_not_written)
        if lost != run.lost_logged:
            run.lost_logged = lost
            log.warning(
                "ingest: run %s not recording (%s): %d frames and %d records not written since",
                run.writer.meta.run_id,
                run.failure.kind,
                *lost,
            )

    def _flush(self, run: _Run) -> None:
        """Flush the run file (a failed flush is a recording failure)."""
        if run.failure is not None and run.budget_left <= 0:
            return
        started = time.perf_counter()
        flushed = self._file_write(run, "a flush", run.writer.flush)
        self.hdf5_flush.observe(time.perf_counter() - started)
        if flushed:
            run.dirty = False
            run.frames_flushed = run.writer.frames_written
            run.samples_flushed = run.writer.samples_written

    def _check_in_place(self, run: _Run) -> None:
        """The run file is still where it was opened (its folder may have been removed)."""
        if run.failure is not None or run.identity is None:
            return
        context = f"{run.writer.frames_written} frames recorded went with it"
        failure = file_moved(run.writer.path, run.identity, context)
        if failure is not None:
            self._recording_failed(run, failure)

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
        geometry = self.recorder.stream_geometry()
        if geometry is not None:
            return self._open(meta, path, clock, geometry, "the stream")
        # Wait (still receiving frames, holding back later records) for the detector to speak.
        deadline = time.monotonic() + self.detector.geometry_timeout_s
        self._pending_open = _PendingOpen(request_id, meta, path, clock, deadline)
        return None

    def _op_start_recording(self, request_id: int, command: dict[str, Any]) -> dict[str, Any]:
        run = self._require_run()
        if "series_id" in command:  # an armed detector: only its series is taken
            self._take(self.sequencer.expect(command["series_id"]))
        started_ns = time.time_ns()
        if not run.is_recording:
            run.recording.append([started_ns, None])
        # The window's edge on the run clock from its own stamp: frames are taken by their
        # wall-clock receive stamps, and the run clock's monotonic reading (`now()`) may differ
        # from the wall clock by milliseconds (a CI run had a frame 2.3 ms "after" the stop).
        return {"recording": True, "time": run.clock.from_wall_ns(started_ns)}

    def _op_stop_recording(self, request_id: int, command: dict[str, Any]) -> dict[str, Any]:
        run = self._require_run()
        stopped_ns = time.time_ns()
        if run.is_recording:
            run.recording[-1][1] = stopped_ns
        return {"recording": False, "time": run.clock.from_wall_ns(stopped_ns)}  # as above

    def _op_retry_recording(self, request_id: int, command: dict[str, Any]) -> dict[str, Any]:
        """After a recording failure, write into the run file again if it takes writes now
        (the operator made room); IngestError with the reason if it does not."""
        run = self._require_run()
        failure = run.failure
        if failure is None:
            return {"recording": run.is_recording}
        if failure.kind == "folder_gone":
            raise IngestError(f"cannot record again: {failure.reason}")
        try:
            reserve = SpaceReserve(reserve_path(run.writer.path))
        except OSError as exc:
            context = f"{run.writer.frames_written} frames recorded"
            again = classify_write_error(exc, run.writer.path, context)
            raise IngestError(f"cannot record again: {again.reason if again else exc}") from None
        run.reserve = reserve
        run.failure = None
        if not self._file_write(run, "a flush", run.writer.flush):
            reason = run.failure.reason if run.failure is not None else "flush failed"
            raise IngestError(f"cannot record again: {reason}")
        lost = f"{run.frames_not_written} frames and {run.records_not_written} records"
        log.warning("ingest: run %s recording again (%s not written)", run.writer.meta.run_id, lost)
        self._write_event(
            run, run.clock.now(), EventKind.STATE, f"recording again ({lost} not written)"
        )
        return {"recording": run.is_recording, "frames_not_written": run.frames_not_written}

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
    def _check_pending_open(self) -> None:
        pending = self._pending_open
        if pending is None:
            return
        geometry, source = self.recorder.stream_geometry(), "the stream"
        if geometry is None:
            if time.monotonic() < pending.deadline:
                return
            geometry, source = self.recorder.configured_geometry(), "the config"
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
        # The reserve first: a disk without room for it has none for the run either.
        reserve = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            reserve = SpaceReserve(reserve_path(path))
            writer = RunWriter(path, meta, geometry)
        except Exception as exc:
            if reserve is not None:
                reserve.release()
            failure = classify_write_error(exc, path, "creating the run file")
            if failure is None:
                raise
            raise IngestError(failure.reason) from None
        run = _Run(writer, clock, source, self._counters(), reserve=reserve)
        run.identity = file_identity(path)
        self._run = run
        self.recorder.attach(run)
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
            self._file_write(run, "the frame times", self.recorder.end_series)
        finally:
            self._run = None
            run.series = self.recorder.detach()
            self._silence.forget()
            if self._tap is not None:
                self._tap.discard_held()  # never a frame of a closed run to the next one
            if run.is_recording:
                run.recording[-1][1] = time.time_ns()
            if run.reserve is not None:
                run.reserve.release()  # the close may need its space
            if run.failure is None:
                self._file_write(run, "the end of the run", run.writer.close, time.time_ns())
            if run.failure is not None:
                self._close_failed(run)
        summary = self._summary(run)
        log.info(
            "ingest: run %s closed: %d frames written, %d dropped, %d missing",
            summary["run_id"],
            summary["frames_written"],
            summary["frames_dropped"],
            summary["frames_missing"],
        )
        return summary

    def _close_failed(self, run: _Run) -> None:
        """Close a run file that stopped taking writes: as much as it still takes when the disk
        was full (the reserve is free now), nothing more when it is read-only or failing (each
        further write would fail again; RunWriter.abandon)."""
        assert run.failure is not None
        try:
            if run.failure.kind in ("disk_full", "folder_gone"):
                run.writer.close(time.time_ns())
            else:
                run.writer.abandon()
        except Exception as exc:
            log.error(
                "ingest: run %s file not closed cleanly (%s): it holds what the last flush wrote",
                run.writer.meta.run_id,
                exc,
            )

    def _summary(self, run: _Run) -> dict[str, Any]:
        finished = run.writer.finished
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
            "recording_failure": None if run.failure is None else run.failure.reason,
            "frames_not_written": run.frames_not_written,
            "records_not_written": run.records_not_written,
            "series": run.series,
            "geometry": asdict(run.writer.geometry),
            "geometry_source": run.geometry_source,
            "geometries": [asdict(geometry) for geometry in run.writer.geometries],
            "file_layout_changes": run.writer.layout_changes,
            "frames_without_imaging": run.writer.frames_without_imaging,
            "imaging_groups": [] if finished is None else finished.imaging_groups,
            "finish_error": run.writer.finish_error,
        }

    # ----- timed work ------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        self._take(self.sequencer.poll(now))
        self._check_pending_open()
        self._check_detector_silence()
        for kind, count in self._limiter.take_suppressed(now):
            self._event(kind, f"{count} more {kind} events in the last second (not listed)")
        run = self._run
        if run is not None and now >= self._next_flush:
            self._next_flush = now + self.config.sampling.flush_interval_s
            self._check_in_place(run)
            if run.failure is None:
                self._file_write(run, "the frame times", self.recorder.retime, False)
            if run.dirty:
                self._flush(run)
            self._log_failure(run, now)
        if now >= self._next_stats:
            self._next_stats = now + STATS_INTERVAL_S
            self._report(STATS, self.stats())
        if now >= self._next_parent_check:
            self._next_parent_check = now + 0.5
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.error("ingest: the daemon (pid %d) is gone; closing the run", self.parent_pid)
                # The run's last word: the daemon could not record how (or that) it ended.
                self._event(
                    EventKind.ERROR,
                    f"the daemon (pid {self.parent_pid}) is gone: run closed by the ingest"
                    " process; the bias is left to its guardian (guardian.log), if one is alive",
                )
                self._done = True
        if self._term_at is not None and now - self._term_at >= TERM_GRACE_S:
            log.error("ingest: no shutdown %.0f s after SIGTERM; closing the run", TERM_GRACE_S)
            self._done = True

    # ----- reporting -------------------------------------------------------------------------
    def _counters(self) -> dict[str, int]:
        seq = self.sequencer
        dropped = dict(self.dropped)
        for reason, count in self.recorder.dropped.items():
            dropped[reason] += count
        dropped["duplicate"] += seq.duplicates_total
        dropped["late"] += seq.late_total
        dropped["stale_series"] += seq.stale_total
        return {
            **self.counts,
            **self.recorder.counts,
            **{f"dropped_{reason}": count for reason, count in dropped.items()},
            "frames_dropped_total": sum(dropped.values()),
            "messages_received_total": self._receiver.received_total,
            "gaps_total": seq.gaps_total,
            "frames_missing_total": seq.missing_total,
            "out_of_order_total": seq.out_of_order_total,
            "series_total": seq.series_total,
            "series_without_start_total": seq.series_without_start_total,
            "detector_silences_total": self._silence.silences_total,
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
            "analysis_offers_sent": 0 if self._tap is None else self._tap.offers_sent,
            "analysis_offers_skipped": 0 if self._tap is None else self._tap.offers_skipped,
            "analysis_offers_withheld": 0 if self._tap is None else self._tap.offers_withheld,
            "analysis_last_offered_id": None if self._tap is None else self._tap.last_offered_id,
        }
        stats["detector"] = {
            "endpoint": self.detector.endpoint,
            **self.recorder.detector_stats(),
            "expected_series_id": self.sequencer.expected_series_id,  # armed (SIMPLON)
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
                "recording_failure": None if run.failure is None else run.failure.reason,
                "frames_not_written": run.frames_not_written,
            }
        )
        stats["stream_rate"] = self.recorder.stream_rate()
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


def child_main(
    config: StationConfig,
    command_endpoint: str,
    report_endpoint: str,
    clock: RunClock,
    parent_pid: int,
    log_level: int,
    analysis_endpoint: str | None = None,
    station_locks: tuple[object, ...] = (),
) -> None:
    """Entry point of the spawned ingest process. `station_locks` (stationlock.InheritedFd):
    descriptors it keeps open, and so locked, until it exits; nothing else uses them."""
    start_worker_process("ingest", log_level)
    tune_malloc()
    IngestProcess(
        config, command_endpoint, report_endpoint, clock, parent_pid, analysis_endpoint
    ).run()
