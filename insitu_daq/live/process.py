"""The live analysis process: the newest frame from the ingest's tap in, results to the daemon.

DESIGN.md's data flow: Ingest --latest frame--> LiveAnalysis --results--> RunWriter. The
archive path never waits for analysis, so this runs in its own OS process (the machine has
two cores: ingest+write on one, analysis on the other), and everything between them drops
rather than blocks:

    ingest process  PUSH (binds `frame_endpoint`, SNDHWM 2, sends NOBLOCK: a full queue is a
                    skipped offer, counted by the ingest). The ingest has priority: it
                    offers a frame only when caught up with the detector; while behind it
                    withholds them (counted), but for one every 1/min_rate_hz s, and sends
                    the newest once caught up (ingest/tap.py)
        -> this process  PULL (connects, RCVHWM 2): takes every frame queued and adds it to
                    its mode's dose sum (decompressed: ~1 ms a bslz4 frame); measures the sum
                    at most `max_rate_hz` times a second, stamped at the newest frame, and
                    counts the frames summed without a result of their own as skipped
        -> daemon   results over a PUSH/PULL pair (`LiveAnalysis`, live/client.py): JSON dicts.

Frame-tap messages are parsed and decoded by live/frames.py.

What the frames show is told by the daemon, which drives the microscope, and decided by event
time (core/imaging.py): `set_imaging(state)` at run start and after each switch (with the run-clock
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
ingest/tap.py), so the analysis then has little to sum: at full replay rate the ingest loses
~5 % to it (bench/README.md, live analysis). Bad input (malformed header, a payload that does
not decompress, an analysis error) is logged and counted, never fatal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from insitu_daq.analysis.pipeline import FrameAnalyzer, PipelineSettings
from insitu_daq.core.imaging import ImagingState, ImagingTimeline, Verdict
from insitu_daq.core.worker import start_worker_process
from insitu_daq.drivers.stream2 import MalformedMessage
from insitu_daq.live.frames import FrameHeaderError, decode_frame, parse_header
from insitu_daq.live.preview import PreviewPublisher, PreviewTarget

log = logging.getLogger(__name__)

ANALYSIS_NICENESS = 10
FRAME_RCVHWM = 2
DEFAULT_FRAME_PERIOD_S = 0.025  # until two frames show the detector's own
STATS_INTERVAL_S = 1.0
POLL_MS = 200
# Frames held for their imaging state: 10 s at 40 frames/s. The daemon announces every ~10 ms,
# so more means it stalled; the oldest are then dropped (counted), not the process's memory.
MAX_PENDING_FRAMES = 400
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


@dataclass(frozen=True)
class _NewestFrame:
    """The last frame summed, waiting for its result (`AnalysisProcess._measure`)."""

    header: dict[str, Any]
    mode: str
    decode_s: float  # decompressing and summing it (part of the result's analysis_s)


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
        preview: PreviewTarget | None = None,
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
        self.previews = None if preview is None else PreviewPublisher(self._context, preview)

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
            header = parse_header(parts[0].bytes)
        except FrameHeaderError as exc:
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
        self._offer_preview(header)

    def _offer_preview(self, header: dict[str, Any]) -> None:
        """The result's sum to the web view, if one is due (live/preview.py). A preview that
        fails is logged and counted; the analysis goes on."""
        sum_ = self.analyzer.last_sum
        if self.previews is None or sum_ is None:
            return
        try:
            self.previews.offer(sum_, header, self.analyzer.last_integrated_frames)
        except Exception:
            self.counters["errors"] += 1
            log.exception("preview of frame %s failed", header.get("image_id"))

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
    preview: PreviewTarget | None = None,
) -> None:
    """Entry point of the spawned analysis process."""
    start_worker_process("analysis", log_level)
    _lower_priority()
    process = AnalysisProcess(
        settings, frame_endpoint, control_endpoint, results_endpoint, parent_pid, max_rate_hz,
        preview,
    )  # fmt: skip
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
