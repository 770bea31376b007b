"""Live analysis: latency from frame arrival to the daemon, and what it costs the ingest.

Everything real except the detector: the simulated camera streams Stream V2 into the real
ingest process (`IngestClient`), whose frame tap (ingest/tap.py) offers each frame to the real
analysis process (`LiveAnalysis`); results come back to this process, which plays the daemon:
it stamps each result as `LiveAnalysis` hands it over and forwards it to the run file as the
daemon does (`IngestClient.write_analysis`).

1. Latency (issue 4: p50 and p99). The live camera (`simproc.StationProcess`, its own
   process, rendering 1024 x 1024 frames at 40 frames/s, bslz4) of an HRTEM or LM field, for
   `--seconds` per trial. Latency = (time the daemon receives the result) - (the tap header's
   `received_ns`, stamped by the ingest when the frame arrived); same host, same wall clock.
   Split into: wait (arrival to the start of decoding: the ingest's write and tap, transport,
   and waiting for the analysis of an earlier frame to finish), analysis (decompress + the
   pipeline, the process's own `analysis_s`) and return (result to the daemon). The first
   `WARMUP_S` of each trial are left out (first render of a field, FFT plans). HRTEM results
   that include a phase map (every `phase_map_interval_s` of run time) are shown apart too.
2. Counts at 40 frames/s: frames received, analysed, skipped (queued behind a newer one),
   tap offers skipped by the ingest (the analysis's queue was full) or withheld (the ingest
   was behind: it has priority, ingest/tap.py), and the camera's and ingest's own counters
   (nothing late, dropped or missing), plus CPU of each process.
3. Ingest throughput with analysis on / off: bench_ingest.py's method (pre-rendered frames
   replayed by `SimulatedCamera.replay` in this process as fast as the ingest takes them;
   frames/s = N / time until the run is closed; the file checked frame by frame, zero loss),
   HRTEM content, raw and bslz4. "on": the analysis process connected to the tap, analysing
   as the HRTEM daemon would (a replay as fast as taken is a backlog throughout: the ingest
   withholds its offers but for `[analysis] min_rate_hz` a second, and the newest once it
   has caught up); "off": no tap (the daemon with analysis disabled). Trials
   alternate off/on, on/off, ... so drift of the shared machine cancels; the ratio is taken
   per adjacent pair and its median reported. Target >= 0.95.

Run (about 4-5 minutes with the defaults):
    /tmp/v/bin/python bench/bench_analysis_live.py [--seconds 12] [--repeats 3]
        [--frames 1000] [--modes hrtem lm] [--compression raw bslz4] [--skip-latency]
        [--skip-throughput] [--diagnose idle tap] [--max-rate HZ] [--min-rate HZ]
"idle" adds throughput trials with the analysis process under SCHED_IDLE (set from here on all
its threads) instead of its nice +5; "tap" adds trials with the ingest's tap bound and nothing
connected (the cost of offering alone). `tap offer alone` times `AnalysisTap.offer` in one
thread, and the ingest's check for a waiting detector message (getsockopt ZMQ_EVENTS).
--max-rate / --min-rate: the `[analysis]` max_rate_hz / min_rate_hz for every trial of the run.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from bench_ingest import (
    check_file,
    chunk_payload,
    cpu_seconds,
    drop_file,
    wait_until_ingested,
)
from simproc import SHAPE, StationProcess, render_frames

from insitu_daq.analysis.quantities import PHASE_FRACTION, RESULT_KEYS
from insitu_daq.analysis.reflections import PHASES
from insitu_daq.core.config import AnalysisConfig, DetectorConfig, StationConfig
from insitu_daq.core.imaging import ImagingState
from insitu_daq.drivers.stream2 import ImageMessage, decode_message
from insitu_daq.ingest import IngestClient
from insitu_daq.ingest.tap import AnalysisTap
from insitu_daq.live.client import LiveAnalysis
from insitu_daq.live.preview import PreviewTarget
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata
from insitu_daq.service.daemon import pipeline_settings
from insitu_daq.sim import stream2_encode as s2
from insitu_daq.sim.camera import DEFAULT_CHANNEL, SimulatedCamera
from insitu_daq.sim.optics import DEFAULT_MODES, ImagingMode
from insitu_daq.sim.station import SimStation

ANALYSIS_DEFAULTS = AnalysisConfig()

WARMUP_S = 2.0  # results of frames that arrived this soon after the camera started: left out
PHASE_KEY = PHASE_FRACTION.key_for(PHASES[0])  # present in a result only when it has a phase map


def pixel_size_m(mode: str) -> float:
    return DEFAULT_MODES[ImagingMode(mode)].pixel_size_nm * 1e-9


class Daemon:
    """The daemon's side of the live analysis, as service/daemon.py wires it (only what is
    timed)."""

    def __init__(
        self, folder: Path, endpoint: str, analysis: str, preview: PreviewTarget | None = None
    ) -> None:
        """analysis: "on" (as the daemon), "off" (disabled: no tap); diagnostics: "idle" (on,
        the analysis process under SCHED_IDLE instead of its nice +5), "tap" (the ingest
        offers frames on its tap but no analysis process is connected). `preview`: where the
        analysis publishes previews for the web view (bench_web.py; none here)."""
        self.results: list[tuple[int, dict[str, Any]]] = []  # (wall ns at receipt, result)
        self.idle = analysis == "idle"
        self.analysis = (
            LiveAnalysis(  # the daemon's defaults ([analysis] of a station config)
                pipeline_settings(ANALYSIS_DEFAULTS),
                on_result=self._on_result,
                max_rate_hz=ANALYSIS_DEFAULTS.max_rate_hz,
                preview=preview,
            )
            if analysis in ("on", "idle")
            else None
        )
        tap = f"ipc://{folder}/tap" if analysis == "tap" else None
        if self.analysis is not None:
            tap = self.analysis.frame_endpoint
        config = StationConfig(
            data_dir=folder, detector=DetectorConfig(endpoint=endpoint), analysis=ANALYSIS_DEFAULTS
        )
        self.ingest = IngestClient(config, analysis_endpoint=tap)

    def _on_result(self, result: dict[str, Any]) -> None:
        self.results.append((time.time_ns(), result))
        self.ingest.write_analysis({key: result[key] for key in RESULT_KEYS if key in result})

    def start(self) -> None:
        if self.analysis is not None:
            self.analysis.start()  # as the daemon: spawned first, comes up while ingest does
        self.ingest.start()
        if self.analysis is not None:
            self.analysis.wait_ready()
            if self.idle:
                self._sched_idle(self.pids()["analysis"])

    @staticmethod
    def _sched_idle(pid: int) -> None:
        """Every thread of `pid` under SCHED_IDLE: it runs only when a core has nothing else."""
        for task in os.listdir(f"/proc/{pid}/task"):
            os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))

    def open_run(self, path: Path, mode: str, compression: str | None) -> None:
        geometry = FrameGeometry((DEFAULT_CHANNEL,), SHAPE, "<u2", compression)
        meta = RunMetadata("bench_analysis_live", "live analysis", time.time_ns())
        self.ingest.open_run(meta, path, geometry=geometry)
        if self.analysis is not None:
            self.analysis.new_run()
            state = ImagingState(-math.inf, -math.inf, mode, pixel_size_m(mode), math.nan)
            self.analysis.set_imaging(state, 1)
            self.analysis.imaging_watermark(math.inf, 1)  # one state for the whole run
        self.ingest.start_recording()

    def pids(self) -> dict[str, int]:
        pids = {"ingest": self.ingest.pid}
        if self.analysis is not None and self.analysis.process is not None:
            pids["analysis"] = self.analysis.process.pid
        return {name: pid for name, pid in pids.items() if pid is not None}

    def stop(self) -> None:
        if self.analysis is not None:
            self.analysis.stop()
        self.ingest.stop()


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process (None: this one)."""
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def spread(values: list[float], fmt: str = ".1f") -> str:
    """median (min-max)"""
    if not values:
        return "-"
    return (
        f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"
        if len(values) > 1
        else f"{values[0]:{fmt}}"
    )


# ----- 1 and 2: the live camera at 40 frames/s --------------------------------------------------
@dataclass
class LiveTrial:
    latency_ms: list[float]  # arrival -> daemon, results after the warm-up
    wait_ms: list[float]
    analysis_ms: list[float]
    return_ms: list[float]
    mapped_latency_ms: list[float]  # the results with a phase map
    seconds: float
    counts: dict[str, float]
    cpu_share: dict[str, float]  # CPU seconds per wall second, per process


def live_trial(folder: Path, mode: str, compression: str | None, seconds: float) -> LiveTrial:
    path = folder / "live.h5"
    with StationProcess(
        "render", content=mode, compression=compression, source_meter=False
    ) as station:
        daemon = Daemon(folder, station.endpoints["stream2"], "on")
        try:
            daemon.start()
            daemon.open_run(path, mode, compression)
            pids = {**daemon.pids(), "camera": station.process.pid, "daemon": None}
            armed_ns = time.time_ns()
            station.call("arm", n_images=None)
            time.sleep(WARMUP_S)
            cpu, started = cpu_of(pids), time.monotonic()
            analysis_before = daemon.analysis.stats() if daemon.analysis else {}
            ingest_before = daemon.ingest.sync()
            camera_before = station.call("counters")
            time.sleep(seconds)
            elapsed = time.monotonic() - started
            cpu = {name: (s - cpu[name]) / elapsed for name, s in cpu_of(pids).items()}
            analysis_after = daemon.analysis.stats() if daemon.analysis else {}
            ingest_after = daemon.ingest.sync()
            camera_after = station.call("counters")
            station.call("disarm")
            assert daemon.analysis is not None
            daemon.analysis.wait_caught_up(time.time_ns(), timeout_s=2.0)
            summary = daemon.ingest.close_run()
        finally:
            daemon.stop()
    drop_file(path)

    def delta(after: dict[str, Any], before: dict[str, Any], key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    counts = {
        "camera sent": delta(camera_after, camera_before, "images_sent_total"),
        "camera late": delta(camera_after, camera_before, "frames_late_total"),
        "ingest written": delta(ingest_after, ingest_before, "frames_written_total"),
        "tap offered": delta(ingest_after, ingest_before, "analysis_offers_sent"),
        "tap skipped": delta(ingest_after, ingest_before, "analysis_offers_skipped"),
        "tap withheld": delta(ingest_after, ingest_before, "analysis_offers_withheld"),
        "received": delta(analysis_after, analysis_before, "frames_received_total"),
        "analysed": delta(analysis_after, analysis_before, "frames_analysed_total"),
        "skipped": delta(analysis_after, analysis_before, "frames_skipped_total"),
        "settling+no state": delta(analysis_after, analysis_before, "frames_settling_total")
        + delta(analysis_after, analysis_before, "frames_no_state_total"),
        "errors+malformed": delta(analysis_after, analysis_before, "errors_total")
        + delta(analysis_after, analysis_before, "malformed_total"),
        "run: dropped+missing": summary.get("frames_dropped", 0) + summary.get("frames_missing", 0),
    }
    after_warmup = [
        (at, r)
        for at, r in daemon.results
        if isinstance(r.get("received_ns"), int) and r["received_ns"] >= armed_ns + WARMUP_S * 1e9
    ]
    latency = [(at - r["received_ns"]) / 1e6 for at, r in after_warmup]
    analysis = [r["analysis_s"] * 1e3 for _, r in after_warmup]
    in_process = [r["latency_s"] * 1e3 for _, r in after_warmup]
    return LiveTrial(
        latency_ms=latency,
        wait_ms=[p - a for p, a in zip(in_process, analysis, strict=True)],
        analysis_ms=analysis,
        return_ms=[total - p for total, p in zip(latency, in_process, strict=True)],
        mapped_latency_ms=[
            (at - r["received_ns"]) / 1e6 for at, r in after_warmup if PHASE_KEY in r["values"]
        ],
        seconds=elapsed,
        counts=counts,
        cpu_share=cpu,
    )


def measure_latency(
    folder: Path, mode: str, compression: str | None, seconds: float, repeats: int
) -> None:
    name = compression or "raw"
    print(f"\n{mode} {SHAPE[0]}x{SHAPE[1]} {name}, live camera at 40 frames/s, {repeats} trials"
          f" of {seconds:.0f} s (after {WARMUP_S:.0f} s warm-up)")  # fmt: skip
    trials = [live_trial(folder, mode, compression, seconds) for _ in range(repeats)]
    print("  latency ms   p50    p99    max   | wait p50 p99 | analysis p50 p99 | return p50 p99"
          " | results")  # fmt: skip
    for index, t in enumerate(trials):
        print(f"  [{index + 1}]      {percentile(t.latency_ms, 50):6.1f} "
              f"{percentile(t.latency_ms, 99):6.1f} {max(t.latency_ms, default=math.nan):6.1f}"
              f" | {percentile(t.wait_ms, 50):5.1f} {percentile(t.wait_ms, 99):5.1f}"
              f" | {percentile(t.analysis_ms, 50):6.1f} {percentile(t.analysis_ms, 99):6.1f}"
              f" | {percentile(t.return_ms, 50):5.2f} {percentile(t.return_ms, 99):5.2f}"
              f" | {len(t.latency_ms)}")  # fmt: skip
        if t.mapped_latency_ms:
            print(f"       with a phase map ({len(t.mapped_latency_ms)}): p50"
                  f" {percentile(t.mapped_latency_ms, 50):.1f}, max"
                  f" {max(t.mapped_latency_ms):.1f} ms")  # fmt: skip
        rate = {k: v / t.seconds for k, v in t.counts.items()}
        print("       per s: " + ", ".join(f"{k} {v:.1f}" for k, v in rate.items()))
        print("       CPU (cores): " + ", ".join(f"{k} {v:.2f}" for k, v in t.cpu_share.items()))
    p50 = [percentile(t.latency_ms, 50) for t in trials]
    p99 = [percentile(t.latency_ms, 99) for t in trials]
    analysed = [t.counts["analysed"] / t.seconds for t in trials]
    skipped = [
        (t.counts["skipped"] + t.counts["tap skipped"] + t.counts["tap withheld"]) / t.seconds
        for t in trials
    ]
    print(f"  {mode} {name}: latency p50 {spread(p50)} ms, p99 {spread(p99)} ms (median"
          f" (min-max) of {repeats}); analysed {spread(analysed)}/s, skipped"
          f" {spread(skipped)}/s")  # fmt: skip


# ----- 3: ingest throughput with analysis on / off --------------------------------------------
@dataclass
class ThroughputTrial:
    analysis: str  # "off", "on", "tap" (Daemon)
    fps: float
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU ms per frame, per process
    counts: dict[str, int] = field(default_factory=dict)
    checked: str = ""


def throughput_trial(
    folder: Path,
    encoded: list[s2.EncodedChannels],
    payloads: list[bytes],
    n_frames: int,
    compression: str | None,
    analysis: str,
) -> ThroughputTrial:
    """bench_ingest.ingest_run's measurement, with or without the analysis on the tap."""
    path = folder / "run.h5"
    with SimulatedCamera(SimStation(), port=0, compression=compression) as camera:
        daemon = Daemon(folder, camera.endpoints["stream2"], analysis)
        try:
            daemon.start()
            daemon.open_run(path, "hrtem", compression)
            pids = {**daemon.pids(), "camera+daemon": None}
            cpu = cpu_of(pids)
            started = time.monotonic()
            camera.replay(encoded, n_frames)
            stats = wait_until_ingested(daemon.ingest, n_frames)
            summary = daemon.ingest.close_run()
            elapsed = time.monotonic() - started
            cpu = {name: (s - cpu[name]) / n_frames * 1e3 for name, s in cpu_of(pids).items()}
            counts = {
                "offered": stats["analysis_offers_sent"],
                "tap skipped": stats["analysis_offers_skipped"],
                "tap withheld": stats["analysis_offers_withheld"],
            }
            if daemon.analysis is not None:
                totals = daemon.analysis.stats()
                counts["analysed"] = totals.get("frames_analysed_total", 0)
                counts["skipped"] = totals.get("frames_skipped_total", 0)
        finally:
            daemon.stop()
    checked = check_file(path, payloads, n_frames, summary)
    drop_file(path)
    return ThroughputTrial(analysis, n_frames / elapsed, cpu, counts, checked)


def tap_offer_ms(frame: np.ndarray, compression: str | None, folder: Path, n: int = 3000) -> dict:
    """CPU ms of one `AnalysisTap.offer` (what the ingest does per frame for the analysis), one
    thread: with nobody connected, with a peer whose queue is full (analysis busy), and
    withheld (the ingest behind); and of the ingest's check for a waiting detector message."""
    channels = s2.encode_channels({DEFAULT_CHANNEL: frame}, compression)
    now = datetime.now(timezone.utc)
    raw = s2.image_message(1, "BENCH", 0, now, (0, 1), (1, 40), (1, 40), channels)
    image = decode_message(raw, time.time_ns())
    assert isinstance(image, ImageMessage)
    costs = {}
    context = zmq.Context()
    for case in ("nobody connected", "queue full"):
        tap = AnalysisTap(context, f"ipc://{folder}/tap-step", ANALYSIS_DEFAULTS.min_rate_hz)
        peer = None
        if case == "queue full":
            peer = context.socket(zmq.PULL)
            peer.setsockopt(zmq.RCVHWM, 2)
            peer.connect(tap.bound_endpoint)
            while tap.offers_sent < 8 and tap.offers_skipped < 1000:  # fill both queues
                tap.offer(image, 0.0)
                time.sleep(0.001)
        started = time.process_time()
        for index in range(n):
            tap.offer(image, index * 0.025)
        costs[case] = (time.process_time() - started) / n * 1e3
        if case == "queue full":
            started = time.process_time()
            for index in range(n):
                tap.offer(image, index * 0.025, behind=True)  # the floor is 1/min_rate_hz away
            costs["withheld"] = (time.process_time() - started) / n * 1e3
            started = time.process_time()
            for _ in range(n):
                bool(peer.getsockopt(zmq.EVENTS) & zmq.POLLIN)  # ingest_process._detector_waiting
            costs["detector-waiting check"] = (time.process_time() - started) / n * 1e3
        tap.close()
        if peer is not None:
            peer.close(0)
    context.term()
    return costs


def measure_throughput(
    folder: Path,
    frames: list[np.ndarray],
    compression: str | None,
    n_frames: int,
    repeats: int,
    variants: tuple[str, ...],
) -> None:
    name = compression or "raw"
    payloads = [chunk_payload(frame, compression) for frame in frames]
    encoded = [s2.encode_channels({DEFAULT_CHANNEL: frame}, compression) for frame in frames]
    mb = statistics.fmean(len(p) for p in payloads) / 1e6
    print(f"\ningest {name} ({mb:.2f} MB/frame), {n_frames} HRTEM frames replayed as fast as"
          f" taken; analysis {'/'.join(variants)}, order rotated, {repeats} rounds")  # fmt: skip
    # Warm-up: one full-length trial of each variant, not counted. The first trials of a run
    # come out up to 2x slower for on and off alike (1400-1500 against ~3000 bslz4 frames/s,
    # still rising over the first ~20 s of trials; 2026-11-24), which a 200-frame warm-up did
    # not absorb: an "off" first in the round then made the round's ratio 1.2-1.4.
    for variant in variants:
        throughput_trial(folder, encoded, payloads, n_frames, compression, variant)
    rounds: list[dict[str, ThroughputTrial]] = []
    for index in range(repeats):
        order = variants[index % len(variants) :] + variants[: index % len(variants)]
        trials = {}
        for variant in order:
            trial = throughput_trial(folder, encoded, payloads, n_frames, compression, variant)
            trials[variant] = trial
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in trial.cpu_ms.items())
            counts = ", ".join(f"{k} {v}" for k, v in trial.counts.items() if variant != "off")
            print(f"  [{index + 1}] analysis {variant:3s} {trial.fps:7.0f} frames/s | CPU"
                  f" ms/frame: {cpu} | {counts} | {trial.checked}")  # fmt: skip
        rounds.append(trials)
    steps = tap_offer_ms(frames[0], compression, folder)
    print("  tap offer alone, CPU ms/frame: " + ", ".join(f"{k} {v:.3f}" for k, v in steps.items()))
    fps = {v: [r[v].fps for r in rounds] for v in variants}
    print(f"  {name}: " + "; ".join(f"{v} {spread(fps[v], '.0f')} frames/s" for v in variants))
    for variant in variants[1:]:
        ratios = [r[variant].fps / r["off"].fps for r in rounds]
        ratio = statistics.median(ratios)
        verdict = "meets" if ratio >= 0.95 else "MISSES"
        target = f" ({verdict} the 0.95 target)" if variant == "on" else ""
        print(f"  {name}: ratio {variant}/off per round {', '.join(f'{r:.3f}' for r in ratios)};"
              f" median {ratio:.3f}{target}")  # fmt: skip


# ----- main -----------------------------------------------------------------------------------
def main() -> int:
    global ANALYSIS_DEFAULTS  # --max-rate, --min-rate: one setting for every trial of this run
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="per latency trial")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=1000, help="per raw throughput trial"
                        " (bslz4: 3x, its frames are 11x smaller)")  # fmt: skip
    parser.add_argument("--modes", nargs="+", choices=("hrtem", "lm"), default=["hrtem", "lm"])
    parser.add_argument(
        "--compression", nargs="+", choices=("raw", "bslz4"), default=["raw", "bslz4"]
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--diagnose",
        nargs="*",
        choices=("idle", "tap"),
        default=[],
        help="extra throughput variants: analysis under SCHED_IDLE; the tap with no analysis",
    )
    parser.add_argument(
        "--max-rate",
        type=float,
        default=ANALYSIS_DEFAULTS.max_rate_hz,
        help="the analysis's [analysis] max_rate_hz (default: the daemon's)",
    )
    parser.add_argument(
        "--min-rate",
        type=float,
        default=ANALYSIS_DEFAULTS.min_rate_hz,
        help="the [analysis] min_rate_hz: frames offered a second while the ingest is behind",
    )
    args = parser.parse_args()
    ANALYSIS_DEFAULTS = AnalysisConfig(max_rate_hz=args.max_rate, min_rate_hz=args.min_rate)

    folder = Path(tempfile.mkdtemp(prefix="bench_analysis_live_"))
    print(f"bench_analysis_live: {SHAPE[0]}x{SHAPE[1]} uint16, folder {folder},"
          f" {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; analysis max_rate_hz"
          f" {args.max_rate:g}, min_rate_hz {args.min_rate:g}")  # fmt: skip
    try:
        if not args.skip_latency:
            for mode in args.modes:
                measure_latency(folder, mode, "bslz4", args.seconds, args.repeats)
        if not args.skip_throughput:
            frames = render_frames("hrtem")
            variants = ("off", "on", *args.diagnose)
            for name in args.compression:
                compression = None if name == "raw" else name
                n_frames = args.frames if compression is None else 3 * args.frames
                measure_throughput(folder, frames, compression, n_frames, args.repeats, variants)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
