"""The daemon's handle on the live analysis process (live/process.py): start, commands, results.

Commands go over a PUSH socket as JSON (`{"op": ...}`), never blocking the caller (a full
queue drops and counts); results come back over a PULL socket and are handed to `on_result`
in a listener thread.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from insitu_daq.analysis.pipeline import PipelineSettings
from insitu_daq.core.imaging import ImagingState
from insitu_daq.live.process import _child_main

log = logging.getLogger(__name__)

CONTROL_HWM = 1000


class AnalysisError(RuntimeError):
    """The analysis process could not start."""


class LiveAnalysis:
    """The daemon's handle on the analysis process. Thread-safe; never blocks the caller.

    `frame_endpoint` (an ipc:// path in a private temp dir) is where the ingest binds its tap;
    results arrive in a thread and go to `on_result(result)` (a dict, see
    AnalysisProcess._measure, live/process.py); `stats()` has the process's counters.
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
