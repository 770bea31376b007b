"""The daemon's handle on the ingest process (see ingest/ for the design).

`IngestClient` lives in the daemon. It spawns the ingest process (ingest/process.py) and talks
to it over two ZeroMQ ipc sockets in a private temporary directory (mode 0700, so only this
user can connect; the lifecycle is core/worker.py's `WorkerHandle`; both ends are this
program, so messages are pickled; ingest/wire.py):
one ordered channel daemon -> ingest for commands AND records (bias samples as raw bytes of
`BIAS_SAMPLE_DTYPE`, events, holder positions, live-analysis results, imaging states and
watermarks), so `close_run` is handled after the last record sent before it; one channel
ingest -> daemon for replies, stats (every `STATS_INTERVAL_S`), events (to a callback) and,
once per run, a recording failure (to another callback: the run file stopped taking writes,
ingest/failure.py).

Spawning imports the main module of the daemon again in the child: a script that starts an
IngestClient needs the usual `if __name__ == "__main__":` guard (the console script has it).
"""

from __future__ import annotations

import itertools
import json
import logging
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from insitu_daq.core.clock import RunClock
from insitu_daq.core.config import StationConfig
from insitu_daq.core.imaging import ImagingState
from insitu_daq.core.records import BIAS_SAMPLE_DTYPE, Event
from insitu_daq.core.stationlock import InheritedFd
from insitu_daq.core.worker import WorkerHandle
from insitu_daq.ingest import process as ingest_process
from insitu_daq.ingest.wire import (
    ANALYSIS,
    CMD,
    EVENT,
    IMAGING,
    IMAGING_WATERMARK,
    READY,
    RECORDING_FAILED,
    REPLY,
    SAMPLES,
    SERIES,
    STATS,
    WATERMARK_RECORD,
    IngestError,
    series_dtype,
)
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata

log = logging.getLogger(__name__)

RECORD_HWM = 100_000  # records queued towards the ingest process before they are dropped


@dataclass
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None


class IngestClient(WorkerHandle):
    """The daemon's handle on the ingest process. Thread-safe.

    Records (`write_samples`, `write_event`, `write_series`, `write_analysis`,
    `set_imaging`, `imaging_watermark`) never block: if the process is not running or its
    queue is full they are dropped, counted in `records_dropped_total` and logged. Commands
    wait for the process's answer.
    """

    name = "ingest"
    error = IngestError
    stop_timeout_s = 10.0

    def __init__(
        self,
        config: StationConfig,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        clock: RunClock | None = None,
        start_timeout_s: float = 30.0,
        analysis_endpoint: str | None = None,
        on_recording_failed: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """`analysis_endpoint`: where the ingest process binds its frame tap for the live
        analysis (ingest/tap.py; e.g. "tcp://127.0.0.1:0"); None: no tap.
        `on_recording_failed(report)`: the open run's file stopped taking writes (called once
        per failure from the listener thread; report: run_id, kind, reason, errno,
        failed_at_ns, frames_recorded, time)."""
        super().__init__(start_timeout_s)
        self.config = config
        self.on_recording_failed = on_recording_failed
        self.analysis_endpoint = analysis_endpoint
        self.bound_analysis_endpoint: str | None = None  # as bound (the port of a ":0")
        self.on_event = on_event
        self.clock = clock or RunClock()
        self.records_dropped_total = 0
        self.events_received_total = 0
        self._commands: zmq.Socket | None = None
        self._pending: dict[int, _Waiter] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stats: dict[str, Any] = {}
        self._start_error: str | None = None

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self, keep_locked: tuple[int, ...] = ()) -> None:
        """Spawn the process and wait until its sockets are up (IngestError if it fails).

        `keep_locked`: descriptors of station locks (core/stationlock.py) the process inherits
        and so keeps locked until it exits (after a killed daemon, until it has left the detector).
        """
        if self.process is not None:
            return
        self._commands = self._bind(zmq.PUSH, "commands", SNDHWM=RECORD_HWM, SNDTIMEO=2000)
        reports = self._bind(zmq.PULL, "reports")
        parent_pid, log_level = self._parent_args()
        self._spawn(
            reports,
            ingest_process.child_main,
            (
                self.config,
                self.endpoint("commands"),
                self.endpoint("reports"),
                self.clock,
                parent_pid,
                log_level,
                self.analysis_endpoint,
            ),
            {"station_locks": tuple(InheritedFd(fd) for fd in keep_locked)},
        )
        self.wait_ready()
        if self._start_error is not None:
            error = self._start_error
            self.stop()
            raise IngestError(error)
        log.info("ingest process %d up", self.pid)

    def _ask_to_stop(self, timeout_s: float) -> None:
        """Close any open run and stop: a request the process answers when done."""
        if self._ready.is_set() and self._start_error is None:
            try:
                self._request("shutdown", timeout_s)
            except IngestError as exc:
                log.error("ingest shutdown: %s", exc)

    def __enter__(self) -> IngestClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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

    def start_recording(self, series_id: int | None = None) -> dict[str, Any]:
        """Frames received from now on are written (until stop_recording).

        `series_id`: the detector was armed for this series, so only its frames are taken
        (any other series' are dropped as stale; ingest/sequence.py)."""
        if series_id is None:
            return self._request("start_recording", 10.0)
        return self._request("start_recording", 10.0, series_id=int(series_id))

    def stop_recording(self) -> dict[str, Any]:
        return self._request("stop_recording", 10.0)

    def retry_recording(self) -> dict[str, Any]:
        """After a recording failure: write into the run file again, if it takes writes now
        (IngestError with the reason if not)."""
        return self._request("retry_recording", 10.0)

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

    def write_series(self, name: str, rows: Any) -> None:
        """Rows of the time series `name` (declared in runfile/layout.py, e.g. "holder_position"):
        (run time s, *columns) tuples or a structured array of `series_dtype(name)`.
        ValueError for a series no log declares."""
        dtype = series_dtype(name)
        self._send_record([SERIES, name.encode(), np.asarray(rows, dtype=dtype).tobytes()])

    def write_analysis(self, result: dict[str, Any]) -> None:
        """A live-analysis result for the open run's analysis log (JSON-serialisable;
        TypeError if not). Dropped and counted by the ingest process when no run is open."""
        self._send_record([ANALYSIS, json.dumps(result).encode()])

    def set_imaging(self, state: ImagingState, seq: int) -> None:
        """The microscope's imaging state from `state.start` on (run-clock seconds): a switch
        that took from `state.start` to `state.end`, or the state at run start (both -inf;
        send it right after open_run, before any frame of the run can be decided). Each
        frame's imaging_mode, pixel_size and dose_rate in the run file are decided by the
        frame's time against these states, once `imaging_watermark` has passed the frame.
        `seq`: the how-many-th state of the run this is (1 first), so a lost one is seen."""
        self._send_record([IMAGING, json.dumps({**state.to_message(), "seq": seq}).encode()])

    def imaging_watermark(self, run_time_s: float, announced: int) -> None:
        """Every imaging switch begun at or before run time `run_time_s` has been sent with
        `set_imaging` (on this same ordered channel, so the watermark never overtakes them),
        `announced` states in all since the run opened."""
        self._send_record([IMAGING_WATERMARK, WATERMARK_RECORD.pack(run_time_s, announced)])

    # ----- transport -------------------------------------------------------------------------
    def _send_record(self, parts: list[bytes]) -> None:
        with self._send_lock:
            sock = self._commands
            if sock is not None and not self._shut and self.alive:
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
                if self._commands is None or self._shut:
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

    def _on_message(self, parts: list[bytes]) -> None:
        kind, payload = parts
        obj = pickle.loads(payload)
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
        elif kind == RECORDING_FAILED:
            if self.on_recording_failed is not None:
                try:
                    self.on_recording_failed(obj)
                except Exception:
                    log.exception("recording failure callback")
        elif kind == READY:
            self._start_error = obj.get("error")
            self.bound_analysis_endpoint = obj.get("analysis_endpoint")
            self._ready.set()
