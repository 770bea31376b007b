"""The daemon's handle on the live analysis process (live/process.py): start, commands, results.

Commands go over a PUSH socket as JSON (`{"op": ...}`), never blocking the caller (a full
queue drops and counts); results come back over a PULL socket and are handed to `on_result`
in a listener thread. The lifecycle is core/worker.py's `WorkerHandle`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from insitu_daq.analysis.pipeline import PipelineSettings
from insitu_daq.core.imaging import ImagingState
from insitu_daq.core.worker import WorkerHandle
from insitu_daq.live.preview import PreviewTarget
from insitu_daq.live.process import _child_main

log = logging.getLogger(__name__)

CONTROL_HWM = 1000


class AnalysisError(RuntimeError):
    """The analysis process could not start."""


class LiveAnalysis(WorkerHandle):
    """The daemon's handle on the analysis process. Thread-safe; never blocks the caller.

    `frame_endpoint` (an ipc:// path in a private temp dir) is where the ingest binds its tap;
    results arrive in a thread and go to `on_result(result)` (a dict, see
    AnalysisProcess._measure, live/process.py); `stats()` has the process's counters.
    """

    name = "analysis"
    error = AnalysisError
    stop_timeout_s = 5.0

    def __init__(
        self,
        settings: PipelineSettings,
        on_result: Callable[[dict[str, Any]], None],
        start_timeout_s: float = 30.0,
        max_rate_hz: float | None = None,
        preview: PreviewTarget | None = None,
    ) -> None:
        super().__init__(start_timeout_s)
        self.preview = preview
        self.settings = settings
        self.on_result = on_result
        self.max_rate_hz = max_rate_hz
        self.frame_endpoint = self.endpoint("frames")
        self._control: zmq.Socket | None = None
        self._stats: dict[str, Any] = {}
        self._last_result = 0.0  # monotonic s of the newest result
        self._last_received_ns = 0  # ingest arrival (wall ns) of the newest result's frame
        self.commands_dropped_total = 0
        self.results_malformed_total = 0
        self.callback_errors_total = 0

    def start(self) -> None:
        """Spawn the process (returns at once; `wait_ready` waits for it)."""
        if self.process is not None:
            return
        self._control = self._bind(zmq.PUSH, "control", SNDHWM=CONTROL_HWM)
        results = self._bind(zmq.PULL, "results")
        parent_pid, log_level = self._parent_args()
        self._spawn(
            results,
            _child_main,
            (
                self.settings,
                self.frame_endpoint,
                self.endpoint("control"),
                self.endpoint("results"),
                parent_pid,
                log_level,
                self.max_rate_hz,
                self.preview,
            ),
        )

    def wait_ready(self) -> None:
        """Block until the process is up (AnalysisError if it died or timed out)."""
        super().wait_ready()
        log.info("analysis process %d up", self.pid)

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
    def _on_message(self, parts: list[bytes]) -> None:
        try:
            (raw,) = parts
            message = json.loads(raw)
            kind = message.pop("kind")
        except (ValueError, TypeError, KeyError, AttributeError):
            self.results_malformed_total += 1
            log.warning("analysis message not understood: %r", b"".join(parts)[:200])
            return
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

    def _ask_to_stop(self, timeout_s: float) -> None:
        """Fire and forget: the process stops within a poll (the join in `stop` waits)."""
        self._command({"op": "stop"})
