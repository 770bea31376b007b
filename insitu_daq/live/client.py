"""The live analysis process: the newest frame from the ingest's tap in, results to the daemon.

DESIGN.md's data flow: Ingest --latest frame--> LiveAnalysis --results--> RunWriter. The
archive path never waits for analysis, so this runs in its own OS process (the machine has
two cores: ingest+write on one, analysis on the other), and everything between them drops
rather than blocks:

    ingest process  PUSH (binds `frame_endpoint`, SNDHWM 2, sends NOBLOCK: a full queue is a
                    skipped offer, counted by the ingest). The ingest has priority: it
                    offers a frame only when caught up with the detector; while behind it
                    withholds them (counted), but for one every 1/min_rate_hz s, and sends
                    the newest once caught up (ingest_tap.py)
        -> this process  PULL (connects, RCVHWM 2): takes every frame queued and adds it to
                    its mode's dose sum (decompressed: ~1 ms a bslz4 frame); measures the sum
                    at most `max_rate_hz` times a second, stamped at the newest frame, and
                    counts the frames summed without a result of their own as skipped
        -> daemon   results over a PUSH/PULL pair (`LiveAnalysis` below): JSON dicts.

Frame-tap messages (the ingest's contract): [header JSON, payload]; header {"image_id",
"series_id", "frame_time" (run-clock s), "shape": [h, w], "dtype": "<u2", "compression":
"bslz4" | "lz4" | null, "received_ns"}; payload = the chunk as written to the file (HDF5
filter framing) or the raw pixels. Only the analysed frame is decompressed.

What the frames show is told by the daemon, which drives the microscope, and decided by event
time (imaging.py): `set_imaging(state)` at run start and after each switch (with the run-clock
interval it took), and `imaging_watermark(t)` every few ms (every switch begun by run time t is
announced). Frames and these messages come on different channels, so a frame is held (not
decompressed; `frames_pending`) until the watermark has passed its exposure's end, and only
then summed in its mode: on a loaded PC a frame that arrives before the switch covering it is
known still goes into the right sum. A frame whose exposure overlaps a switch, or lies within
one frame period after it (the microscope settling), is skipped and counted as `settling`: a
frame half LM, half HRTEM would give garbage. Held frames beyond MAX_PENDING_FRAMES (the
daemon stopped announcing) are dropped oldest first and counted as `state_late`.
`bias_started(t)` ends the expansion reference (pipeline.py).

The process runs at niceness +10 (ANALYSIS_NICENESS): on two cores, whenever ingest and
analysis both want a core, the scheduler gives most of it to the ingest, so a burst of
analysis work shows up as frames the tap could not deliver rather than an ingest backlog; and
it measures at most `max_rate_hz` times a second, which bounds what it takes when the cores
are free. While the ingest is behind it offers frames only at `min_rate_hz` (it has priority:
ingest_tap.py), so the analysis then has little to sum: at full replay rate the ingest loses
~5 % to it (bench/README.md, live analysis). Bad input (malformed header, a payload that does
not decompress, an analysis error) is logged and counted, never fatal.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from insitu_daq.analysis.pipeline import FrameAnalyzer, PipelineSettings
from insitu_daq.core.imaging import ImagingState, ImagingTimeline, Verdict
from insitu_daq.core.worker import start_worker_process
from insitu_daq.drivers.stream2 import MalformedMessage, bslz4_decompress, lz4_decompress

log = logging.getLogger(__name__)

ANALYSIS_NICENESS = 10
FRAME_RCVHWM = 2
DEFAULT_FRAME_PERIOD_S = 0.025  # until two frames show the detector's own
STATS_INTERVAL_S = 1.0
POLL_MS = 200
CONTROL_HWM = 1000
# Frames held for their imaging state: 10 s at 40 frames/s. The daemon announces every ~10 ms,
# so more means it stalled; the oldest are then dropped (counted), not the process's memory.
MAX_PENDING_FRAMES = 400
DTYPES = ("<u1", "<u2", "<u4", "|u1", "uint8", "uint16", "uint32")
COUNTERS = (
    "frames_received",  # frame messages taken off the tap
    "frames_summed",  # added to their mode's dose sum (every usable frame received)
    "frames_analysed",  # results: the sum measured, stamped at its newest frame
    "frames_skipped",  # summed behind a newer frame: no result of its own
    "frames_settling",  # within a mode switch or the frame period after it
    "frames_no_state",  # no imaging state known for their time
    "frames_state_late",  # held for their state too long (MAX_PENDING_FRAMES): dropped
    "malformed",  # header or payload that did not decode
    "errors",  # the analysis raised
)


# ----- the process -------------------------------------------------------------------------
class _FrameHeaderError(ValueError):
    pass


@dataclass(frozen=True)
class _NewestFrame:
    """The last frame summed, waiting for its result (`AnalysisProcess._measure`)."""

    header: dict[str, Any]
    mode: str
    decode_s: float  # decompressing and summing it (part of the result's analysis_s)


def _header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _FrameHeaderError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _FrameHeaderError("header is not an object")
    try:
        shape = tuple(int(n) for n in header["shape"])
        frame_time = float(header["frame_time"])
        dtype = str(header.get("dtype", "<u2"))
    except (KeyError, TypeError, ValueError) as exc:
        raise _FrameHeaderError(f"header field missing or wrong: {exc}") from None
    if len(shape) != 2 or min(shape) <= 0 or not math.isfinite(frame_time):
        raise _FrameHeaderError(f"bad shape {shape} or frame_time {frame_time}")
    if dtype not in DTYPES:
        raise _FrameHeaderError(f"dtype {dtype!r} not one of {DTYPES}")
    compression = header.get("compression")
    if compression not in ("bslz4", "lz4", None):
        raise _FrameHeaderError(f"compression {compression!r} unknown")
    header.update(shape=shape, frame_time=frame_time, dtype=dtype)
    return header


def decode_frame(header: dict[str, Any], payload: bytes | memoryview) -> np.ndarray:
    """The 2-D pixel array of a tap message (MalformedMessage if the payload is wrong)."""
    shape, dtype = header["shape"], np.dtype(header["dtype"])
    count = shape[0] * shape[1]
    compression = header.get("compression")
    if compression == "bslz4":
        pixels = bslz4_decompress(bytes(payload), dtype, count)
    elif compression == "lz4":
        pixels = np.frombuffer(lz4_decompress(bytes(payload), count * dtype.itemsize), dtype)
    else:
        if len(payload) != count * dtype.itemsize:
            raise MalformedMessage(f"raw payload of {len(payload)} bytes for {shape} {dtype}")
        pixels = np.frombuffer(payload, dtype)
    return pixels.reshape(shape)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


class AnalysisProcess:
    """The loop of the spawned analysis process (module docstring)."""

    def __init__(
        self,
        settings: PipelineSettings,
        frame_endpoint: str,
        control_endpoint: str,
        results_endpoint: str,
        parent_pid: int,
        max_rate_hz: float | None = None,
    ) -> None:
        self.analyzer = FrameAnalyzer(settings)
        self.parent_pid = parent_pid
        # At most this many results a second (spectrum, phase map, segmentation): the costly
        # part. Frames in between are only decompressed and summed (~1 ms each); a frame is
        # never waited for. Bounds the CPU taken from the ingest.
        self._min_interval_s = 0.0 if not max_rate_hz else 1.0 / max_rate_hz
        self._next_analysis = 0.0  # monotonic s
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._timeline = ImagingTimeline()
        self._pending: deque[tuple[dict[str, Any], zmq.Frame]] = deque()  # waiting for state
        self._late_logged = 0.0  # monotonic s of the last "held too long" warning
        self._period_s = DEFAULT_FRAME_PERIOD_S
        self._last_seen: tuple[int, float] | None = None  # (image_id, frame_time)
        self._skipped_since_result = 0
        self._settling_since_result = 0
        self._newest: _NewestFrame | None = None  # summed, its result not yet due
        self._running = True
        self._context = zmq.Context()
        self.frames = self._context.socket(zmq.PULL)
        self.frames.setsockopt(zmq.RCVHWM, FRAME_RCVHWM)
        self.frames.setsockopt(zmq.LINGER, 0)
        self.frames.connect(frame_endpoint)
        self.control = self._context.socket(zmq.PULL)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(control_endpoint)
        self.results = self._context.socket(zmq.PUSH)
        self.results.setsockopt(zmq.LINGER, 1000)
        self.results.setsockopt(zmq.SNDHWM, 1000)
        self.results.connect(results_endpoint)

    def run(self) -> None:
        self._send({"kind": "ready", "pid": os.getpid()})
        poller = zmq.Poller()
        poller.register(self.frames, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        next_stats = time.monotonic() + STATS_INTERVAL_S
        try:
            while self._running:
                timeout_ms: float = POLL_MS
                if self._newest is not None:  # a result is due at the rate cap's next slot
                    wait_s = self._next_analysis - time.monotonic()
                    timeout_ms = min(POLL_MS, max(0.0, wait_s * 1e3 + 1))
                ready = dict(poller.poll(timeout_ms))
                self._drain_control()  # first: a switch known before the frames after it
                if self.frames in ready and self._running:
                    self._take_frames()
                if self._newest is not None and time.monotonic() >= self._next_analysis:
                    self._next_analysis = time.monotonic() + self._min_interval_s
                    self._measure()
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + STATS_INTERVAL_S
                    self._send({"kind": "stats", **self.stats()})
                    if os.getppid() != self.parent_pid:
                        log.warning("daemon %d gone: analysis stops", self.parent_pid)
                        break
        finally:
            self._send({"kind": "stats", **self.stats()})
            self._context.destroy(linger=1000)

    def stop(self) -> None:
        self._running = False

    def stats(self) -> dict[str, Any]:
        counters = {f"{k}_total": v for k, v in self.counters.items()}
        return {
            **counters,
            "frames_pending": len(self._pending),
            "imaging_states_lost_total": self._timeline.lost,
            "pid": os.getpid(),
        }

    # ----- control ---------------------------------------------------------------------------
    def _drain_control(self) -> None:
        while True:
            try:
                raw = self.control.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._command(json.loads(raw))
            except (ValueError, TypeError, KeyError) as exc:
                self.counters["malformed"] += 1
                log.warning("analysis control message refused: %s", exc)

    def _command(self, command: dict[str, Any]) -> None:
        op = command["op"]
        if op == "imaging":
            lost = self._timeline.lost
            self._timeline.add(ImagingState.from_message(command["state"]), int(command["seq"]))
            self._warn_lost(lost)
            self._release()
        elif op == "watermark":
            lost = self._timeline.lost
            self._timeline.advance(float(command["time"]), int(command["announced"]))
            self._warn_lost(lost)
            self._release()
        elif op == "bias_started":
            self.analyzer.bias_started(float(command["time"]))
        elif op == "new_run":
            self.analyzer.reset()
            self._newest = None
            self.counters["frames_no_state"] += len(self._pending)  # the last run's, undecided
            self._pending.clear()
            self._timeline.clear()
            self._last_seen = None
        elif op == "stop":
            self._running = False
        else:
            raise ValueError(f"unknown op {op!r}")

    def _warn_lost(self, lost_before: int) -> None:
        if self._timeline.lost > lost_before:
            log.warning(
                "%d imaging state(s) lost on the way: frames after run time %.3f s have no "
                "state until the next one", self._timeline.lost - lost_before,
                self._timeline.watermark,
            )  # fmt: skip

    # ----- frames ----------------------------------------------------------------------------
    def _take_frames(self) -> None:
        """Every queued frame into its mode's dose sum (the newest one waits for `_measure`)."""
        while True:
            try:
                parts = self.frames.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.counters["frames_received"] += 1
            self._add(parts)

    def _add(self, parts: list[zmq.Frame]) -> None:
        if len(parts) != 2:
            self.counters["malformed"] += 1
            log.warning("frame-tap message of %d parts, not 2", len(parts))
            return
        try:
            header = _header(parts[0].bytes)
        except _FrameHeaderError as exc:
            self.counters["malformed"] += 1
            log.warning("frame-tap header refused: %s", exc)
            return
        self._learn_period(header.get("image_id"), header["frame_time"])
        self._pending.append((header, parts[1]))
        if len(self._pending) > MAX_PENDING_FRAMES:
            late, _ = self._pending.popleft()
            self.counters["frames_state_late"] += 1
            if time.monotonic() - self._late_logged >= 1.0:  # once a second at most
                self._late_logged = time.monotonic()
                log.warning(
                    "frame %s held %d frames for its imaging state: dropped (%d so far)",
                    late.get("image_id"), MAX_PENDING_FRAMES, self.counters["frames_state_late"],
                )  # fmt: skip
        self._release()

    def _release(self) -> None:
        """Sum every held frame whose imaging state is now decided, in arrival order; stop at
        the first one still waiting for the watermark (the ones behind it are later)."""
        while self._pending:
            header, payload = self._pending[0]
            half = 0.5 * self._period_s
            state = self._timeline.classify(header["frame_time"], half, self._period_s)
            if state is Verdict.NOT_YET:
                return
            self._pending.popleft()
            if state is Verdict.SETTLING:
                self.counters["frames_settling"] += 1
                self._settling_since_result += 1
            elif state is Verdict.NO_STATE:
                self.counters["frames_no_state"] += 1
            else:
                assert isinstance(state, ImagingState)
                self._sum(header, payload, state)

    def _sum(self, header: dict[str, Any], payload: zmq.Frame, state: ImagingState) -> None:
        started = time.perf_counter()
        try:
            pixels = decode_frame(header, payload.buffer)
        except (MalformedMessage, ValueError) as exc:
            self.counters["malformed"] += 1
            log.warning("frame %s payload refused: %s", header.get("image_id"), exc)
            return
        frame_time = header["frame_time"]
        try:
            self.analyzer.add(pixels, frame_time, state.mode, state.pixel_size_m * 1e9)
        except Exception:
            self.counters["errors"] += 1
            log.exception("summing frame %s failed", header.get("image_id"))
            return
        if self._newest is not None:  # summed behind this one: no result of its own
            self.counters["frames_skipped"] += 1
            self._skipped_since_result += 1
        self.counters["frames_summed"] += 1
        self._newest = _NewestFrame(header, state.mode, time.perf_counter() - started)

    def _learn_period(self, image_id: Any, frame_time: float) -> None:
        if not isinstance(image_id, int):
            return
        last = self._last_seen
        self._last_seen = (image_id, frame_time)
        if last is not None and image_id > last[0] and frame_time > last[1]:
            period = (frame_time - last[1]) / (image_id - last[0])
            if 1e-5 < period < 10.0:
                self._period_s = period

    def _measure(self) -> None:
        """A result: the newest frame's sum measured, stamped at that frame."""
        newest, self._newest = self._newest, None
        assert newest is not None
        header = newest.header
        started = time.perf_counter()
        try:
            values = self.analyzer.measure()
        except Exception:
            self.counters["errors"] += 1
            log.exception("analysis of frame %s failed", header.get("image_id"))
            return
        self.counters["frames_analysed"] += 1
        analysis_s = newest.decode_s + time.perf_counter() - started
        received_ns = header.get("received_ns")
        latency = None
        if isinstance(received_ns, int):
            latency = (time.time_ns() - received_ns) / 1e9
        self._send(
            {
                "kind": "result",
                "time": header["frame_time"],
                "image_id": header.get("image_id"),
                "series_id": header.get("series_id"),
                "mode": newest.mode,
                "received_ns": received_ns,
                "latency_s": latency,
                "analysis_s": analysis_s,
                "skipped": self._skipped_since_result,
                "settling": self._settling_since_result,
                "integrated_frames": self.analyzer.last_integrated_frames,
                "values": values,
                "reasons": self.analyzer.last_reasons,
                "totals": self.stats(),
            }
        )
        self._skipped_since_result = 0
        self._settling_since_result = 0

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.results.send(json.dumps(_json_safe(message)).encode(), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("daemon not taking analysis results: %s dropped", message.get("kind"))


def _child_main(
    settings: PipelineSettings,
    frame_endpoint: str,
    control_endpoint: str,
    results_endpoint: str,
    parent_pid: int,
    log_level: int,
    max_rate_hz: float | None = None,
) -> None:
    """Entry point of the spawned analysis process."""
    start_worker_process("analysis", log_level)
    _lower_priority()
    process = AnalysisProcess(
        settings, frame_endpoint, control_endpoint, results_endpoint, parent_pid, max_rate_hz
    )
    signal.signal(signal.SIGTERM, lambda *_: process.stop())
    process.run()


def _lower_priority() -> None:
    """Yield the CPU to the ingest (nice +ANALYSIS_NICENESS), before any thread exists so that
    zmq's I/O threads inherit it.

    Not SCHED_IDLE, though it protects the ingest more (bench_analysis_live: on/off ingest
    ratio 0.73 -> 0.82 at full replay rate): under SCHED_IDLE the analysis gets nothing while
    both cores are busy, so on a loaded PC a `hold until` on a live value would wait for its
    timeout. nice keeps it a small share (~10 % of a contended core at +10 against the
    ingest's 0), and `max_rate_hz` bounds what it takes when cores are free.
    """
    try:
        os.nice(ANALYSIS_NICENESS)
    except OSError as exc:  # not fatal: the analysis still only takes what it can
        log.warning("could not lower the analysis process's priority: %s", exc)


# ----- the daemon side ----------------------------------------------------------------------
class AnalysisError(RuntimeError):
    """The analysis process could not start."""


class LiveAnalysis:
    """The daemon's handle on the analysis process. Thread-safe; never blocks the caller.

    `frame_endpoint` (an ipc:// path in a private temp dir) is where the ingest binds its tap;
    results arrive in a thread and go to `on_result(result)` (a dict, see
    AnalysisProcess._analyse); `stats()` has the process's counters.
    """

    def __init__(
        self,
        settings: PipelineSettings,
        on_result: Callable[[dict[str, Any]], None],
        start_timeout_s: float = 30.0,
        max_rate_hz: float | None = None,
    ) -> None:
        self.settings = settings
        self.on_result = on_result
        self.max_rate_hz = max_rate_hz
        self.start_timeout_s = start_timeout_s
        self._tmpdir = tempfile.mkdtemp(prefix="insitu-analysis-")  # mode 0700
        self.frame_endpoint = f"ipc://{self._tmpdir}/frames"
        self._control_endpoint = f"ipc://{self._tmpdir}/control"
        self._results_endpoint = f"ipc://{self._tmpdir}/results"
        self.process: multiprocessing.process.BaseProcess | None = None
        self._context: zmq.Context | None = None
        self._control: zmq.Socket | None = None
        self._results: zmq.Socket | None = None
        self._send_lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._listener: threading.Thread | None = None
        self._stats: dict[str, Any] = {}
        self._last_result = 0.0  # monotonic s of the newest result
        self._last_received_ns = 0  # ingest arrival (wall ns) of the newest result's frame
        self.commands_dropped_total = 0
        self.results_malformed_total = 0
        self.callback_errors_total = 0
        self._shut = False

    def start(self) -> None:
        """Spawn the process (returns at once; `wait_ready` waits for it)."""
        if self.process is not None:
            return
        self._context = zmq.Context()
        self._control = self._context.socket(zmq.PUSH)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.setsockopt(zmq.SNDHWM, CONTROL_HWM)
        self._control.bind(self._control_endpoint)
        self._results = self._context.socket(zmq.PULL)
        self._results.setsockopt(zmq.LINGER, 0)
        self._results.bind(self._results_endpoint)
        self._listener = threading.Thread(target=self._listen, name="analysis-results", daemon=True)
        self._listener.start()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_child_main,
            args=(
                self.settings,
                self.frame_endpoint,
                self._control_endpoint,
                self._results_endpoint,
                os.getpid(),
                logging.getLogger().getEffectiveLevel(),
                self.max_rate_hz,
            ),
            name="insitu-daq-analysis",
            daemon=True,
        )
        self.process.start()
        atexit.register(self.stop)

    def wait_ready(self) -> None:
        """Block until the process is up (AnalysisError if it died or timed out)."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + self.start_timeout_s
        while not self._ready.wait(0.05):
            if not self.process.is_alive() or time.monotonic() > deadline:
                code = self.process.exitcode
                self.stop()
                raise AnalysisError(f"analysis process did not start (exit code {code})")
        log.info("analysis process %d up", self.process.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def stats(self) -> dict[str, Any]:
        return {
            **self._stats,
            "alive": self.alive,
            "commands_dropped_total": self.commands_dropped_total,
            "results_malformed_total": self.results_malformed_total,
        }

    def wait_caught_up(
        self, arrived_ns: int, quiet_s: float = 0.25, timeout_s: float = 1.0
    ) -> bool:
        """Wait until a result for a frame that arrived at or after `arrived_ns` (wall ns)
        is in, or no result came for `quiet_s` (nothing to analyse: settling, no frames), at
        most `timeout_s`. At the end of a run, so its last frames' results reach the file."""
        deadline = time.monotonic() + timeout_s
        while self.alive and time.monotonic() < deadline:
            if self._last_received_ns >= arrived_ns:
                return True
            if time.monotonic() - self._last_result >= quiet_s:
                return True
            time.sleep(0.01)
        return False

    # ----- what frames show ------------------------------------------------------------------
    def new_run(self) -> None:
        """A run starts: forget the last run's state (reference, sums, switches)."""
        self._command({"op": "new_run"})

    def set_imaging(self, state: ImagingState, seq: int) -> None:
        """Frames from `state.start` on show `state` (start = end = -inf: at run start), the
        `seq`-th state announced since the run opened (1 first)."""
        self._command({"op": "imaging", "state": state.to_message(), "seq": seq})

    def imaging_watermark(self, run_time_s: float, announced: int) -> None:
        """Every imaging switch begun at or before `run_time_s` has been announced,
        `announced` states in all since the run opened."""
        self._command({"op": "watermark", "time": run_time_s, "announced": announced})

    def bias_started(self, time_s: float) -> None:
        self._command({"op": "bias_started", "time": time_s})

    def _command(self, command: dict[str, Any]) -> None:
        socket = self._control
        if socket is None or self._shut:
            self.commands_dropped_total += 1
            return
        with self._send_lock:
            try:
                socket.send(json.dumps(command).encode(), zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self.commands_dropped_total += 1
                log.warning("analysis command %s dropped: %s", command.get("op"), exc)

    # ----- results ---------------------------------------------------------------------------
    def _listen(self) -> None:
        socket = self._results
        assert socket is not None
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        while not self._closing.is_set():
            try:
                if not poller.poll(100):
                    continue
                raw = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                if self._closing.is_set():
                    return
                raise
            try:
                message = json.loads(raw)
                kind = message.pop("kind")
            except (ValueError, TypeError, KeyError, AttributeError):
                self.results_malformed_total += 1
                log.warning("analysis message not understood: %r", raw[:200])
                continue
            if kind == "ready":
                self._ready.set()
            elif kind == "stats":
                self._stats = message
            elif kind == "result":
                self._last_result = time.monotonic()
                received = message.get("received_ns")
                if isinstance(received, int):
                    self._last_received_ns = max(self._last_received_ns, received)
                self._stats = message.get("totals", self._stats)
                try:
                    self.on_result(message)
                except Exception:
                    self.callback_errors_total += 1
                    log.exception("analysis result handler")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the process and release everything; idempotent."""
        if self._shut:
            return
        self._command({"op": "stop"})
        self._shut = True
        process = self.process
        if process is not None:
            process.join(timeout_s)
            if process.is_alive():
                log.warning("analysis process did not stop: terminating it")
                process.terminate()
                process.join(timeout_s)
        self._closing.set()
        if self._listener is not None:
            self._listener.join(timeout_s)
        for socket in (self._control, self._results):
            if socket is not None:
                socket.close(0)
        if self._context is not None:
            self._context.term()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._tmpdir)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
