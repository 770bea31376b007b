"""Web live view: what viewers cost the ingest, frame-to-screen latency, the page's memory.

Issue 11's three figures, each with the real processes: the ingest process (`IngestClient`),
the analysis process (`LiveAnalysis`, the daemon's `[analysis]` defaults) publishing previews
on its XPUB at `[web] preview_endpoint`, a real `insitu-daq web` process (its own process,
nice +15, as in production) and Debian's headless Chromium driven by Playwright on the live
page. In 1 and 2 this process plays the daemon as bench_analysis_live.py does (it wires ingest
and analysis as service/daemon.py does and forwards each result to the run file), and it also
publishes what the daemon's event stream would carry for them: each result on the `analysis`
topic and a status every second naming the run, so the page draws its plots as in a run. No
daemon, source-meter or holder runs there: no bias samples, no events (the page still gets
every preview, which come straight from the analysis process).

1. Ingest throughput with 0 and with N (default 5) viewers: bench_analysis_live.py's method
   (8 pre-rendered 1024 x 1024 HRTEM frames, bslz4, replayed by `SimulatedCamera.replay` as
   fast as the ingest takes them; frames/s = N frames / time until the run is closed; the file
   checked frame by frame, zero loss). Both variants run the analysis with previews on and the
   web process subscribed; "0 viewers": no page open; "N viewers": one Chromium with N pages
   (one browser context each, 1920 x 1080) open on the live page. Trials alternate 0, N, N, 0,
   0, N, ... so drift of the shared machine cancels; the ratio N/0 is taken per adjacent pair
   and its median reported (target >= 0.95). One uncounted trial of each variant first. A
   replay as fast as taken is a backlog throughout, so the ingest offers the analysis only
   `[analysis] min_rate_hz` frames a second (ingest/tap.py) and the previews follow: the ratio
   is what the viewers' presence and the previews they do get cost the ingest when it is the
   bottleneck. CPU per frame of each process (ingest, analysis, web, all of Chromium, this
   one) is printed for each trial.
2. Frame-to-screen latency at the camera's 40 frames/s: the live camera
   (`simproc.StationProcess`, its own process, rendering 1024 x 1024 bslz4 frames in real
   time) of an HRTEM or LM field, one page open, `--seconds` per mode after a warm-up.
   Latency = the page's Date.now() at the preview image's load event - the ingest's arrival
   stamp of the newest frame in the preview's sum (`received_ns`), as the page records it in
   `window.insituLatencies` (entries from the first snapshot left out); same host, same wall
   clock. Per kind (hrtem, lm, fft): p50 / p99, and split with the preview's `arrived_ns`
   (when it reached the web process) and the time the page's WebSocket delivered the update
   naming that version (a listener this bench adds to the page's WebSocket before the page
   loads; it parses each message once more) into: upstream (ingest -> analysis sum and
   measurement -> preview on the wire -> web process), web (the web process's encode, state
   and WebSocket send) and page (the image fetched over HTTP, decoded, shown). Target p50 <=
   300 ms. Also the web process's CPU cost of one preview, timed here on one thread
   (`--profile` to time each step).
3. The page's memory over a long run (`--memory-minutes M`, off by default): `insitu-daq sim`
   (1024 x 1024 bslz4 at 40 frames/s, time scale 1), `insitu-daq daemon` and `insitu-daq web`
   as three processes (as `insitu-daq demo` starts them), a protocol recording a hold at +1 V
   of `--memory-minutes` plus 5 min with 1 s low-magnification looks every 10 s; one page open
   for M minutes, sampled every `--every` s: the page's JS heap (CDP Performance.getMetrics
   JSHeapUsedSize, then again after a forced garbage collection via
   HeapProfiler.collectGarbage: the live set), its DOM nodes, the renderer's RSS (the page's
   Chromium renderer process) and all of Chromium's, and the web process's RSS. Reported: the
   samples at 0, 5, 15, 30 min (or the nearest) and the slope over the last 15 minutes
   (least squares; flat = the page thins its series, growing = a leak).

Diagnostics: `--viewer-kind client` runs 1's N viewers as clients that load the web process as
remote browsers would (a WebSocket each, every new preview image fetched over HTTP, in threads
here, nothing rendered), and 1 starts with the cores N idle Chromium pages take. `--driver
cdp` runs 3's page in a Chromium started here without Playwright, sampled over bare CDP
(Playwright enables the Network domain, whose agent keeps response bodies in the renderer).

Run (about 6 minutes with the defaults; the memory mode as long as asked, in the background):
    .venv/bin/python bench/bench_web.py [--viewers 5] [--frames 6000] [--pairs 4]
        [--viewer-kind chromium|client] [--seconds 30] [--modes hrtem lm]
        [--skip-throughput] [--skip-latency] [--profile]
    .venv/bin/python bench/bench_web.py --memory-minutes 30 [--every 30] [--csv FILE]
        [--driver playwright|cdp]
Chromium: Debian's /usr/bin/chromium (`--chromium PATH`); Playwright's own browsers are not
used. Needs $INSITU_DAQ_TESTDATA only as the test suite does (not at all here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bench_analysis_live import ANALYSIS_DEFAULTS, Daemon, percentile, spread
from bench_ingest import (
    check_file,
    chunk_payload,
    cpu_seconds,
    drop_file,
    wait_until_ingested,
)
from bench_memory import rss_mb, slope_mb_per_min
from simproc import SHAPE, StationProcess, render_frames

from insitu_daq.app.children import ChildProcess, check_children, child_process, wait_for_output
from insitu_daq.app.demo import (
    SIM_READY_TEXT,
    WEB_READY_TEXT,
    free_ports,
    station_toml,
    wait_for_daemon,
)
from insitu_daq.core.module_command import module_command
from insitu_daq.live.preview import PreviewTarget
from insitu_daq.service.api import ControlClient
from insitu_daq.service.api.events import EventPublisher
from insitu_daq.service.sinks import analysis_record
from insitu_daq.sim import stream2_encode as s2
from insitu_daq.sim.camera import DEFAULT_CHANNEL, SimulatedCamera
from insitu_daq.sim.station import SimStation

CHROMIUM = "/usr/bin/chromium"
# Playwright's own browser downloads are not reachable here: Debian's Chromium, started as
# tests/web/test_browser.py starts it.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1920, "height": 1080}
PREVIEW_RATE_HZ = 4.0  # [web] preview_rate_hz, the default
KINDS = ("hrtem", "lm", "fft")
WARMUP_S = 3.0  # latency trials: the first of the camera's frames, FFT plans, first renders
SETTLE_S = 0.5  # after a run opens: the web process's SUB has reconnected to the new analysis

# Added to the page before its own scripts: every preview version a WebSocket message names,
# with the page's Date.now() when the message came (the page's own listener runs after this).
PAGE_HOOK = """
(() => {
  const seen = [];
  window.benchPreviewMessages = seen;
  const Native = window.WebSocket;
  class BenchSocket extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (event) => {
        const at = Date.now();
        let message;
        try { message = JSON.parse(event.data); } catch (error) { return; }
        for (const [kind, p] of Object.entries(message.previews ?? {})) {
          if (p && p.version != null) {
            seen.push({ kind, version: p.version, at, received_ns: p.received_ns,
              arrived_ns: p.arrived_ns, snapshot: message.type === "snapshot" });
          }
        }
      });
    }
  }
  window.WebSocket = BenchSocket;
})();
"""


# ----- processes ----------------------------------------------------------------------------
def descendants(root: int) -> list[int]:
    """Every live process below `root` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def chromium_processes() -> dict[int, str]:
    """pid -> Chromium process type ("browser", "renderer", "gpu-process", ...) of the
    Chromium processes this bench started (below this process)."""
    found = {}
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if not Path(f"/proc/{pid}/comm").read_text().startswith("chrom"):
                continue
            # Chromium's children rewrite their command line as one space-separated string.
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
            kind = "browser"
            for arg in args:
                if arg.startswith(b"--type="):
                    kind = arg.split(b"=", 1)[1].decode()
            found[pid] = kind
    return found


def pss_mb(pid: int) -> float:
    """Proportional set size in MB (shared pages split between their sharers): summed over
    Chromium's processes it does not count their shared libraries and memory N times."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return 0.0
    return 0.0


def cpu_of(pids: dict[str, Any]) -> dict[str, float]:
    """CPU seconds so far per name: a pid, None (this process) or "chromium" (all of it)."""
    out = {}
    for name, pid in pids.items():
        if pid == "chromium":
            total = 0.0
            for chrome in chromium_processes():
                with contextlib.suppress(OSError):
                    total += cpu_seconds(chrome)
            out[name] = total
        else:
            with contextlib.suppress(OSError):
                out[name] = cpu_seconds(pid)
    return out


class WebView:
    """`insitu-daq web` on a station config of its own, its previews from `preview_endpoint`
    and its event stream from `events` (this bench publishes there, in place of a daemon)."""

    def __init__(self, folder: Path) -> None:
        names = ["source_meter", "holder", "microscope", "camera", "control", "events",
                 "metrics", "web", "preview"]  # fmt: skip
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.config = folder / "web-station.toml"
        self.config.write_text(station_toml(self.ports, folder / "runs", 1.0))
        self.url = f"http://127.0.0.1:{self.ports['web']}"
        self.preview = PreviewTarget(f"tcp://127.0.0.1:{self.ports['preview']}", PREVIEW_RATE_HZ)
        self.events = f"tcp://127.0.0.1:{self.ports['events']}"
        self._log = folder / "web.log"
        self._running: contextlib.ExitStack | None = None
        self.child: ChildProcess | None = None

    def start(self) -> None:
        self._running = contextlib.ExitStack()
        command = module_command("insitu_daq", "web", "--config", str(self.config))
        self.child = self._running.enter_context(child_process("web view", command, self._log))
        wait_for_output(self.child, WEB_READY_TEXT, timeout_s=30.0)

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as reply:
            lines = reply.read().decode().splitlines()
        return {name: float(value) for name, value in (line.split() for line in lines if line)}

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None


class StatusBeat:
    """The daemon's 1 Hz `status` on the event stream, as much of it as the page needs to
    place a run: its id and elapsed time (None between runs)."""

    def __init__(self, publisher: EventPublisher) -> None:
        self._publisher = publisher
        self._run: tuple[str, float] | None = None  # (run id, monotonic s at its start)
        self._last_run: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="status beat", daemon=True)

    def __enter__(self) -> StatusBeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def set_run(self, run_id: str | None) -> None:
        if run_id is None and self._run is not None:
            self._last_run = self._run[0]
        self._run = None if run_id is None else (run_id, time.monotonic())
        self.publish()

    def publish(self) -> None:
        run = self._run
        if run is None:
            status: dict[str, Any] = {"run_id": None, "last_run_id": self._last_run,
                                      "protocol": {"state": "idle"}}  # fmt: skip
        else:
            status = {
                "run_id": run[0],
                "run_offset_s": 0.0,  # no bias samples or events to place
                "protocol": {"state": "running", "protocol": "bench_web",
                             "run_elapsed_s": time.monotonic() - run[1]},
            }  # fmt: skip
        self._publisher.publish("status", status)

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            self.publish()


class WebDaemon(Daemon):
    """bench_analysis_live's daemon stand-in, with the analysis's previews on and each result
    also published on the event stream (the daemon's EventStreamSink)."""

    def __init__(
        self, folder: Path, endpoint: str, preview: PreviewTarget, publisher: EventPublisher
    ) -> None:
        self.publisher = publisher
        super().__init__(folder, endpoint, "on", preview=preview)

    def _on_result(self, result: dict[str, Any]) -> None:
        super()._on_result(result)
        self.publisher.publish("analysis", analysis_record(result))


class Viewers:
    """One headless Chromium and its pages on the live page, one browser context each."""

    def __init__(self, playwright: Any, url: str, chromium: str, hook: bool = False) -> None:
        self.url = url
        self.hook = hook
        self.browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        self.pages: list[Any] = []
        self.errors: list[str] = []

    def open(self, n: int, timeout_s: float = 30.0, settle_s: float = 2.0) -> None:
        """Up to `n` pages, each until its WebSocket has brought the first state; then
        `settle_s` for the new pages' first drawing, if any were opened."""
        if len(self.pages) >= n:
            return
        while len(self.pages) < n:
            context = self.browser.new_context(viewport=VIEWPORT)
            if self.hook:
                context.add_init_script(PAGE_HOOK)
            page = context.new_page()
            page.on("pageerror", lambda exc: self.errors.append(str(exc)))
            page.goto(self.url + "/")
            page.wait_for_function("() => window.insituState !== null", timeout=timeout_s * 1e3)
            self.pages.append(page)
        time.sleep(settle_s)

    def close_pages(self) -> None:
        for page in self.pages:
            page.context.close()
        self.pages = []

    def shown(self) -> int:
        """Preview images loaded by all open pages so far."""
        total = 0
        for page in self.pages:
            counts = page.evaluate("() => window.insituStats.previewsShown")
            total += sum(counts.values())
        return total

    def close(self) -> None:
        self.close_pages()
        self.browser.close()


class ClientViewers:
    """N viewers loading the web process as remote browsers would, without rendering: each a
    WebSocket and, for every preview version an update names, that image fetched over HTTP
    (newest only, one at a time), in a thread here. Stands in for viewers on other PCs: their
    rendering is not charged to this machine; only this process's small share is."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.fetched = 0
        self.errors: list[str] = []

    @property
    def pages(self) -> list[threading.Thread]:
        return self._threads

    def open(self, n: int, timeout_s: float = 30.0, settle_s: float = 1.0) -> None:
        if len(self._threads) >= n:
            return
        while len(self._threads) < n:
            thread = threading.Thread(target=self._watch, name="client viewer", daemon=True)
            thread.start()
            self._threads.append(thread)
        time.sleep(settle_s)

    def _watch(self) -> None:
        from websockets.sync.client import connect

        ws_url = "ws" + self.url.removeprefix("http") + "/ws"
        try:
            with connect(ws_url, max_size=None) as socket:
                while not self._stop.is_set():
                    try:
                        raw = socket.recv(timeout=0.2)
                    except TimeoutError:
                        continue
                    message = json.loads(raw)
                    for kind, preview in (message.get("previews") or {}).items():
                        if kind in KINDS and preview and preview.get("url"):
                            with urllib.request.urlopen(self.url + preview["url"]) as reply:
                                reply.read()
                            with self._lock:
                                self.fetched += 1
        except Exception as exc:  # reported, not fatal: the trial's figures say what happened
            self.errors.append(repr(exc))

    def close_pages(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5.0)
        self._threads = []
        self._stop = threading.Event()

    def shown(self) -> int:
        return self.fetched

    def close(self) -> None:
        self.close_pages()


def idle_page_cost(viewers: Viewers, n: int, seconds: float = 10.0) -> float:
    """Cores Chromium takes with `n` pages open on the live page and nothing happening (no run,
    no previews, no results; the page's 1 s timers only)."""
    viewers.open(n)
    before, started = cpu_of({"chromium": "chromium"}), time.monotonic()
    time.sleep(seconds)
    after = cpu_of({"chromium": "chromium"})
    return (after["chromium"] - before["chromium"]) / (time.monotonic() - started)


# ----- 1: ingest throughput with 0 and N viewers ---------------------------------------------
@dataclass
class ThroughputTrial:
    viewers: int
    fps: float
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU ms per frame, per process
    counts: dict[str, float] = field(default_factory=dict)
    checked: str = ""


def throughput_trial(
    folder: Path,
    web: WebView,
    viewers: Viewers | ClientViewers,
    publisher: EventPublisher,
    beat: StatusBeat,
    replay: tuple[list[s2.EncodedChannels], list[bytes]],
    n_frames: int,
    n_viewers: int,
    index: int,
) -> ThroughputTrial:
    """bench_analysis_live.throughput_trial with the analysis's previews on, the web process
    subscribed and `n_viewers` pages open."""
    encoded, payloads = replay
    if n_viewers:
        viewers.open(n_viewers)
    else:
        viewers.close_pages()
    path = folder / "run.h5"
    with SimulatedCamera(SimStation(), port=0, compression="bslz4") as camera:
        daemon = WebDaemon(folder, camera.endpoints["stream2"], web.preview, publisher)
        try:
            daemon.start()
            daemon.open_run(path, "hrtem", "bslz4")
            beat.set_run(f"throughput-{index}")
            time.sleep(SETTLE_S)
            web_before = web.metrics()
            shown_before = viewers.shown()
            pids = {**daemon.pids(), "web": web.pid, "chromium": "chromium", "bench": None}
            cpu = cpu_of(pids)
            started = time.monotonic()
            camera.replay(encoded, n_frames)
            stats = wait_until_ingested(daemon.ingest, n_frames)
            summary = daemon.ingest.close_run()
            elapsed = time.monotonic() - started
            after = cpu_of(pids)
            cpu_ms = {name: (after[name] - cpu[name]) / n_frames * 1e3 for name in after}
            beat.set_run(None)
            web_after = web.metrics()
            counts = {
                "offered": stats["analysis_offers_sent"],
                "analysed": (daemon.analysis.stats() if daemon.analysis else {}).get(
                    "frames_analysed_total", 0
                ),
                "previews to web": web_after["insitu_daq_web_previews_received_total"]
                - web_before["insitu_daq_web_previews_received_total"],
                "images shown": viewers.shown() - shown_before,
            }
        finally:
            daemon.stop()
    checked = check_file(path, payloads, n_frames, summary)
    drop_file(path)
    return ThroughputTrial(n_viewers, n_frames / elapsed, cpu_ms, counts, checked)


def measure_throughput(
    folder: Path,
    web: WebView,
    viewers: Viewers | ClientViewers,
    publisher: EventPublisher,
    beat: StatusBeat,
    n_frames: int,
    pairs: int,
    n_viewers: int,
) -> None:
    frames = render_frames("hrtem")
    payloads = [chunk_payload(frame, "bslz4") for frame in frames]
    encoded = [s2.encode_channels({DEFAULT_CHANNEL: frame}, "bslz4") for frame in frames]
    mb = statistics.fmean(len(p) for p in payloads) / 1e6
    print(f"\n1. ingest throughput: {n_frames} HRTEM frames {SHAPE[0]}x{SHAPE[1]} bslz4"
          f" ({mb:.2f} MB/frame) replayed as fast as taken; analysis + previews on, web process"
          f" subscribed; 0 vs {n_viewers} viewers ({type(viewers).__name__}), trials"
          f" 0,{n_viewers},{n_viewers},0,..., {pairs} adjacent pairs", flush=True)  # fmt: skip
    replay = (encoded, payloads)
    for variant in (0, n_viewers):  # warm-up, not counted (bench_analysis_live.py: why)
        throughput_trial(folder, web, viewers, publisher, beat, replay, n_frames, variant, -1)
    order = [(0, n_viewers) if k % 2 == 0 else (n_viewers, 0) for k in range(pairs)]
    trials: list[ThroughputTrial] = []
    for first, second in order:
        for variant in (first, second):
            index = len(trials)
            trial = throughput_trial(
                folder, web, viewers, publisher, beat, replay, n_frames, variant, index
            )
            trials.append(trial)
            cpu = ", ".join(f"{k} {v:.3f}" for k, v in trial.cpu_ms.items())
            counts = ", ".join(f"{k} {v:g}" for k, v in trial.counts.items())
            print(f"  [{index + 1}] {variant} viewers {trial.fps:7.0f} frames/s | CPU ms/frame:"
                  f" {cpu} | {counts} | {trial.checked}", flush=True)  # fmt: skip
    ratios = []
    for k in range(pairs):
        a, b = trials[2 * k], trials[2 * k + 1]
        with_viewers, without = (a, b) if a.viewers else (b, a)
        ratios.append(with_viewers.fps / without.fps)
    fps0 = [t.fps for t in trials if t.viewers == 0]
    fpsn = [t.fps for t in trials if t.viewers]
    ratio = statistics.median(ratios)
    verdict = "meets" if ratio >= 0.95 else "MISSES"
    print(f"  0 viewers {spread(fps0, '.0f')} frames/s; {n_viewers} viewers"
          f" {spread(fpsn, '.0f')} frames/s (median (min-max))")  # fmt: skip
    for name in trials[0].cpu_ms:
        cpu0 = [t.cpu_ms[name] for t in trials if not t.viewers and name in t.cpu_ms]
        cpun = [t.cpu_ms[name] for t in trials if t.viewers and name in t.cpu_ms]
        print(f"  CPU ms/frame {name}: 0 viewers {spread(cpu0, '.3f')}; {n_viewers} viewers"
              f" {spread(cpun, '.3f')}")  # fmt: skip
    print(f"  ratio {n_viewers}/0 viewers per pair {', '.join(f'{r:.3f}' for r in ratios)};"
          f" median {ratio:.3f} ({verdict} the 0.95 target)", flush=True)  # fmt: skip


# ----- 2: frame-to-screen latency at 40 frames/s ---------------------------------------------
@dataclass
class LatencyTrial:
    mode: str
    seconds: float
    total: dict[str, list[float]]  # kind -> ms
    upstream: dict[str, list[float]]  # received_ns -> arrived_ns
    web: dict[str, list[float]]  # arrived_ns -> the page's WebSocket message
    page: dict[str, list[float]]  # the message -> the image's load event
    unmatched: int  # latency entries whose version no message named (none expected)
    counts: dict[str, float]
    cpu_share: dict[str, float]


def latency_trial(
    folder: Path,
    web: WebView,
    viewers: Viewers,
    publisher: EventPublisher,
    beat: StatusBeat,
    mode: str,
    seconds: float,
) -> LatencyTrial:
    viewers.open(1)
    page = viewers.pages[0]
    path = folder / "live.h5"
    with StationProcess("render", content=mode, compression="bslz4", source_meter=False) as station:
        daemon = WebDaemon(folder, station.endpoints["stream2"], web.preview, publisher)
        try:
            daemon.start()
            daemon.open_run(path, mode, "bslz4")
            beat.set_run(f"latency-{mode}")
            time.sleep(SETTLE_S)
            station.call("arm", n_images=None)
            time.sleep(WARMUP_S)
            mark = page.evaluate("() => window.insituLatencies.length")
            pids = {**daemon.pids(), "web": web.pid, "camera": station.process.pid,
                    "chromium": "chromium", "bench": None}  # fmt: skip
            cpu, started = cpu_of(pids), time.monotonic()
            web_before = web.metrics()
            camera_before = station.call("counters")
            time.sleep(seconds)
            elapsed = time.monotonic() - started
            after = cpu_of(pids)
            cpu_share = {name: (after[name] - cpu[name]) / elapsed for name in after}
            camera_after = station.call("counters")
            web_after = web.metrics()
            entries = page.evaluate(f"() => window.insituLatencies.slice({mark})")
            messages = page.evaluate("() => window.benchPreviewMessages")
            station.call("disarm")
            beat.set_run(None)
            summary = daemon.ingest.close_run()
        finally:
            daemon.stop()
    drop_file(path)
    when = {(m["kind"], m["version"]): m for m in messages if not m["snapshot"]}
    total: dict[str, list[float]] = {}
    upstream: dict[str, list[float]] = {}
    web_ms: dict[str, list[float]] = {}
    page_ms: dict[str, list[float]] = {}
    unmatched = 0
    for entry in entries:
        if entry.get("snapshot"):
            continue
        kind = entry["kind"]
        total.setdefault(kind, []).append(entry["latency_ms"])
        message = when.get((kind, entry["version"]))
        if message is None or not isinstance(message.get("arrived_ns"), (int, float)):
            unmatched += 1
            continue
        loaded_ms = entry["latency_ms"] + message["received_ns"] / 1e6
        upstream.setdefault(kind, []).append((message["arrived_ns"] - message["received_ns"]) / 1e6)
        web_ms.setdefault(kind, []).append(message["at"] - message["arrived_ns"] / 1e6)
        page_ms.setdefault(kind, []).append(loaded_ms - message["at"])
    counts = {
        "camera frames/s": (camera_after["images_sent_total"] - camera_before["images_sent_total"])
        / elapsed,
        "previews to web/s": (
            web_after["insitu_daq_web_previews_received_total"]
            - web_before["insitu_daq_web_previews_received_total"]
        )
        / elapsed,
        "dropped by web": web_after["insitu_daq_web_previews_dropped_total"]
        - web_before["insitu_daq_web_previews_dropped_total"],
        "run dropped+missing": summary.get("frames_dropped", 0) + summary.get("frames_missing", 0),
    }
    return LatencyTrial(
        mode, elapsed, total, upstream, web_ms, page_ms, unmatched, counts, cpu_share
    )


def measure_latency(
    folder: Path,
    web: WebView,
    viewers: Viewers,
    publisher: EventPublisher,
    beat: StatusBeat,
    modes: list[str],
    seconds: float,
) -> None:
    print(f"\n2. frame-to-screen latency: live camera {SHAPE[0]}x{SHAPE[1]} bslz4 at 40 frames/s,"
          f" one page, {seconds:g} s per mode after {WARMUP_S:g} s; ms, p50 / p99 (n)",
          flush=True)  # fmt: skip
    all_p50 = []
    for mode in modes:
        trial = latency_trial(folder, web, viewers, publisher, beat, mode, seconds)
        rate = ", ".join(f"{k} {v:.1f}" for k, v in trial.counts.items())
        print(f"  {mode}: {rate}; matched all but {trial.unmatched}")
        print("  " + ", ".join(f"CPU {k} {v:.2f}" for k, v in trial.cpu_share.items()))
        print("    kind   total p50 / p99 (n)     | upstream p50 / p99 | web p50 / p99"
              " | page p50 / p99")  # fmt: skip
        for kind in KINDS:
            values = trial.total.get(kind)
            if not values:
                continue
            all_p50.append(percentile(values, 50))

            def pp(series: dict[str, list[float]], kind: str = kind) -> str:
                v = series.get(kind, [])
                return f"{percentile(v, 50):6.1f} / {percentile(v, 99):6.1f}"

            print(f"    {kind:6s} {pp(trial.total)} ({len(values):3d}) | {pp(trial.upstream)}"
                  f" | {pp(trial.web)} | {pp(trial.page)}", flush=True)  # fmt: skip
    if all_p50:
        worst = max(all_p50)
        verdict = "meets" if worst <= 300 else "MISSES"
        print(f"  highest p50 over kinds and modes {worst:.1f} ms ({verdict} the 300 ms target)")


def preview_path_ms(profile: bool, repeats: int = 20) -> None:
    """The web process's work for one preview (feeds.PreviewFeed._show), timed here on one
    thread at nice 0: CPU ms per step for an HRTEM sum (frame, spectrum, phase overlay) and
    an LM sum (frame only)."""
    from insitu_daq.web.images import encode_png, frame_jpeg, phase_overlay, spectrum_jpeg

    table = ANALYSIS_DEFAULTS.table()
    sums = {mode: np.sum(render_frames(mode), axis=0, dtype=np.float32) for mode in ("hrtem", "lm")}
    labels = np.random.default_rng(1).integers(0, 4, (8, 8), dtype=np.uint8)
    steps: dict[str, Any] = {
        "hrtem frame_jpeg": lambda: frame_jpeg(sums["hrtem"]),
        "hrtem spectrum_jpeg": lambda: spectrum_jpeg(sums["hrtem"], 0.06, table),
        "phase overlay + png": lambda: encode_png(
            phase_overlay(labels, 128, (0, 0), SHAPE, (512, 512))
        ),
        "lm frame_jpeg": lambda: frame_jpeg(sums["lm"]),
    }
    costs = {}
    for name, step in steps.items():
        step()  # first call: FFT plans, imports
        started = time.process_time()
        for _ in range(repeats):
            step()
        costs[name] = (time.process_time() - started) / repeats * 1e3
    hrtem = sum(v for k, v in costs.items() if not k.startswith("lm"))
    print(f"\n  web process, CPU per preview (one thread, here): HRTEM {hrtem:.1f} ms (frame,"
          f" spectrum, phase map), LM {costs['lm frame_jpeg']:.1f} ms")  # fmt: skip
    if profile:
        for name, ms in costs.items():
            print(f"    {name:22s} {ms:6.1f} ms")


# ----- 3: the page's memory over a long run ----------------------------------------------------
MEMORY_PROTOCOL = """
name: bench_web_memory
description: hold +1 V while recording, with LM looks, for the web page's memory benchmark
steps:
  - microscope: {{mode: lm, beam: on, dose_rate_e_per_a2_s: 10}}
  - approach: {{speed_nm_s: 500, max_travel_nm: 5000}}
  - acquire: start
  - wait: 3
  - microscope: {{mode: hrtem, dose_rate_e_per_a2_s: 35}}
  - bias: {{volts: 1.0, rate_volts_per_s: 1.0}}
  - hold:
      duration_s: {hold_s}
      interleave: {{mode: lm, every_s: 10, dwell_s: 1, dose_rate_e_per_a2_s: 10}}
  - bias: {{volts: 0, rate_volts_per_s: 1.0}}
  - acquire: stop
"""
MEMORY_COLUMNS = (
    "minutes", "heap_used_mb", "heap_used_after_gc_mb", "heap_total_mb", "dom_nodes",
    "listeners", "renderer_rss_mb", "renderer_anon_mb", "renderer_file_mb", "chromium_pss_mb",
    "web_rss_mb", "analysis_points", "events", "previews_shown",
)  # fmt: skip


class PlaywrightTarget:
    """The memory run's page through Playwright (as tests/web/test_browser.py drives it), CDP
    through `page.context.new_cdp_session(page)`. Playwright enables the Network domain on
    every page it drives."""

    def __init__(self, playwright: Any, url: str, chromium: str) -> None:
        self.viewers = Viewers(playwright, url, chromium)
        self.viewers.open(1)
        self.page = self.viewers.pages[0]
        self.cdp = self.page.context.new_cdp_session(self.page)

    def send(self, method: str) -> dict[str, Any]:
        return self.cdp.send(method)

    def evaluate(self, expression: str) -> Any:
        return self.page.evaluate(expression)

    def wait(self, seconds: float) -> None:
        self.page.wait_for_timeout(seconds * 1e3)  # Playwright's events are handled meanwhile

    @property
    def errors(self) -> list[str]:
        return list(self.viewers.errors)

    def close(self) -> None:
        self.viewers.close()


class CdpTarget:
    """The memory run's page in a Chromium started here without Playwright, on the DevTools
    protocol over its WebSocket with only what the samples use (Performance,
    HeapProfiler.collectGarbage, Runtime.evaluate): no Network domain, whose agent keeps
    recent response bodies in the renderer for the client to ask for."""

    def __init__(self, url: str, chromium: str, folder: Path) -> None:
        from websockets.sync.client import connect

        profile = folder / "chromium-profile"
        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_ARGS, "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={VIEWPORT['width']},{VIEWPORT['height']}", url],
            stdout=subprocess.DEVNULL, stderr=(folder / "chromium.log").open("w"),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30.0
            port_file = profile / "DevToolsActivePort"
            while not port_file.exists() or not port_file.read_text().strip():
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(
                        f"Chromium did not open its DevTools port; {folder}/chromium.log"
                    )
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            while True:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/json/list", timeout=5
                ) as reply:
                    pages = [t for t in json.load(reply) if t.get("type") == "page"]
                if pages and pages[0].get("url", "").startswith(url):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no page on {url} in Chromium")
                time.sleep(0.2)
            self._connection = connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
            self.socket = self._connection.__enter__()
            self._id = 0
            while not self._has_state():
                if time.monotonic() > deadline:
                    raise RuntimeError("the page got no state")
                time.sleep(0.2)
        except BaseException:  # no Chromium left behind by a start that failed
            self.process.kill()
            self.process.wait()
            raise

    def _has_state(self) -> bool:
        try:
            return bool(self.evaluate("window.insituState != null"))
        except RuntimeError:  # no execution context yet: the page is still loading
            return False

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)

    @property
    def errors(self) -> list[str]:
        return []  # not collected here (Runtime events are off)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._connection.__exit__(None, None, None)
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def rss_split_mb(pid: int) -> tuple[float, float]:
    """(RssAnon, RssFile + RssShmem) of a process in MB: Chromium's shared memory (decoded
    images among it) is file-backed, in /tmp when started with --disable-dev-shm-usage."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("RssAnon", "RssFile", "RssShmem"):
                values[name] = int(rest.split()[0]) / 1024
    return values.get("RssAnon", math.nan), values.get("RssFile", 0.0) + values.get("RssShmem", 0.0)


def page_sample(target: Any, web_pid: int, minutes: float) -> dict[str, float]:
    def metrics() -> dict[str, float]:
        return {m["name"]: m["value"] for m in target.send("Performance.getMetrics")["metrics"]}

    before = metrics()
    target.send("HeapProfiler.collectGarbage")
    after = metrics()
    processes = chromium_processes()
    renderers = [(rss_mb(pid) or 0.0, pid) for pid, kind in processes.items() if kind == "renderer"]
    renderer_rss, renderer = max(renderers, default=(math.nan, 0))  # the page's: the largest
    anon, file_backed = rss_split_mb(renderer) if renderer else (math.nan, math.nan)
    page_state = target.evaluate(
        """(() => { const s = window.insituState;
          return [s ? s.series.analysis.t.length : 0, s ? s.events.length : 0,
                  Object.values(window.insituStats.previewsShown).reduce((a, b) => a + b, 0)];
        })()"""
    )
    return {
        "minutes": minutes,
        "heap_used_mb": before["JSHeapUsedSize"] / 2**20,
        "heap_used_after_gc_mb": after["JSHeapUsedSize"] / 2**20,
        "heap_total_mb": after["JSHeapTotalSize"] / 2**20,
        "dom_nodes": after["Nodes"],
        "listeners": after["JSEventListeners"],
        "renderer_rss_mb": renderer_rss,
        "renderer_anon_mb": anon,
        "renderer_file_mb": file_backed,
        "chromium_pss_mb": sum(pss_mb(pid) for pid in processes),
        "web_rss_mb": rss_mb(web_pid) or math.nan,
        "analysis_points": page_state[0],
        "events": page_state[1],
        "previews_shown": page_state[2],
    }


def measure_memory(
    folder: Path,
    playwright: Any | None,
    chromium: str,
    minutes: float,
    every: float,
    csv: Path | None,
    frame_size: int,
) -> None:
    names = ["source_meter", "holder", "microscope", "camera", "control", "events", "metrics",
             "web", "preview"]  # fmt: skip
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    config = folder / "station.toml"
    # The demo's config, but the analysis at the daemon's default rate (the demo analyses every
    # frame because its run seconds are time-scaled; this run is in real time).
    text = station_toml(ports, folder / "runs", 1.0)
    config.write_text(
        text.replace("max_rate_hz = 40", f"max_rate_hz = {ANALYSIS_DEFAULTS.max_rate_hz:g}")
    )
    sim_command = module_command(
        "insitu_daq", "sim", "--time-scale", "1",
        "--source-meter-port", str(ports["source_meter"]), "--holder-port", str(ports["holder"]),
        "--microscope-port", str(ports["microscope"]), "--camera-port", str(ports["camera"]),
        "--frame-size", str(frame_size), "--frame-rate", "40",
    )  # fmt: skip
    control = f"tcp://127.0.0.1:{ports['control']}"
    url = f"http://127.0.0.1:{ports['web']}/"
    print(f"\n3. the page's memory: sim (1024x1024 at 40 frames/s, time scale 1) + daemon + web,"
          f" hold at +1 V with 1 s LM looks every 10 s; one page for {minutes:g} min, a sample"
          f" every {every:g} s; work folder {folder}", flush=True)  # fmt: skip
    samples: list[dict[str, float]] = []
    with contextlib.ExitStack() as running:
        sim = running.enter_context(
            child_process("simulated station", sim_command, folder / "sim.log")
        )
        wait_for_output(sim, SIM_READY_TEXT, timeout_s=60.0)
        daemon = running.enter_context(child_process(
            "daemon", module_command("insitu_daq", "daemon", "--config", str(config)),
            folder / "daemon.log"))  # fmt: skip
        wait_for_daemon(control, daemon, [sim])
        web = running.enter_context(child_process(
            "web view", module_command("insitu_daq", "web", "--config", str(config)),
            folder / "web.log"))  # fmt: skip
        wait_for_output(web, WEB_READY_TEXT, timeout_s=30.0)
        with ControlClient(control, timeout_s=10.0) as client:
            hold_s = (minutes + 5) * 60
            reply = client.request(
                "run", protocol_text=MEMORY_PROTOCOL.format(hold_s=hold_s), format="yaml"
            )
        print(f"  run {reply['run_id']} started; page {url}", flush=True)
        if playwright is not None:
            target: Any = PlaywrightTarget(playwright, url.rstrip("/"), chromium)
        else:
            target = CdpTarget(url, chromium, folder)
        running.callback(target.close)
        running.callback(_abort, control)
        target.send("Performance.enable")
        started = time.monotonic()
        next_at = started
        while True:
            now = time.monotonic()
            elapsed_min = (now - started) / 60
            sample = page_sample(target, web.pid, elapsed_min)
            samples.append(sample)
            print(f"  {elapsed_min:5.1f} min  heap {sample['heap_used_mb']:6.1f} MB (after GC"
                  f" {sample['heap_used_after_gc_mb']:6.1f})  DOM nodes {sample['dom_nodes']:.0f}"
                  f"  renderer {sample['renderer_rss_mb']:6.1f} MB (anon"
                  f" {sample['renderer_anon_mb']:6.1f}, file {sample['renderer_file_mb']:6.1f})"
                  f"  chromium"
                  f" {sample['chromium_pss_mb']:6.1f} MB (PSS)  web {sample['web_rss_mb']:6.1f} MB"
                  f"  points {sample['analysis_points']:.0f}  events {sample['events']:.0f}"
                  f"  images {sample['previews_shown']:.0f}", flush=True)  # fmt: skip
            if csv is not None:
                write_csv(csv, samples)
            if elapsed_min >= minutes:
                break
            check_children([sim, daemon, web])
            next_at += every
            target.wait(max(0.0, next_at - time.monotonic()))
        errors = target.errors
    if errors:
        print(f"  the page raised: {errors[:5]}")
    report_memory(samples, minutes)


def _abort(control: str) -> None:
    with contextlib.suppress(Exception), ControlClient(control, timeout_s=10.0) as client:
        client.request("abort", reason="bench_web memory run done")
        time.sleep(3.0)  # the bias ramps down before the daemon is stopped


def write_csv(path: Path, samples: list[dict[str, float]]) -> None:
    with path.open("w") as f:
        f.write(",".join(MEMORY_COLUMNS) + "\n")
        f.writelines(",".join(f"{s[c]:.4f}" for c in MEMORY_COLUMNS) + "\n" for s in samples)


def report_memory(samples: list[dict[str, float]], minutes: float) -> None:
    data = {c: np.array([s[c] for s in samples]) for c in MEMORY_COLUMNS}
    t = data["minutes"]
    marks = [m for m in (0, 5, 15, 30, minutes) if m <= t[-1] + 0.5]
    rows = sorted({int(np.argmin(np.abs(t - m))) for m in marks})
    print(f"\n  {len(samples)} samples over {t[-1]:.1f} min")
    print("  min    heap MB  heap after GC  DOM nodes  renderer RSS  chromium PSS  web RSS")
    for i in rows:
        print(f"  {t[i]:5.1f} {data['heap_used_mb'][i]:8.1f}"
              f" {data['heap_used_after_gc_mb'][i]:10.1f}"
              f" {data['dom_nodes'][i]:10.0f} {data['renderer_rss_mb'][i]:11.1f}"
              f" {data['chromium_pss_mb'][i]:13.1f} {data['web_rss_mb'][i]:8.1f}")  # fmt: skip
    window = t >= t[-1] - 15.0
    label = f"minutes {t[window][0]:.1f}-{t[-1]:.1f}"
    for column in ("heap_used_after_gc_mb", "heap_used_mb", "renderer_rss_mb", "renderer_anon_mb",
                   "renderer_file_mb", "chromium_pss_mb",
                   "web_rss_mb", "dom_nodes"):  # fmt: skip
        slope = slope_mb_per_min(t[window], data[column][window])
        unit = "/min" if column == "dom_nodes" else " MB/min"
        print(f"  slope {column} over {label}: {slope:+.3f}{unit}")


# ----- main ------------------------------------------------------------------------------------
@contextlib.contextmanager
def web_setup(folder: Path, chromium: str) -> Iterator[tuple[Any, ...]]:
    """The web process, this bench's event stream (in place of the daemon's) and a browser."""
    from playwright.sync_api import sync_playwright

    web = WebView(folder)
    publisher = EventPublisher(web.events)
    with contextlib.ExitStack() as stack:
        publisher.start()
        stack.callback(publisher.stop)
        web.start()
        stack.callback(web.stop)
        beat = stack.enter_context(StatusBeat(publisher))
        playwright = stack.enter_context(sync_playwright())
        viewers = Viewers(playwright, web.url, chromium)
        stack.callback(viewers.close)
        yield web, viewers, publisher, beat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--viewers", type=int, default=5, help="pages open in the N-viewer trials")
    parser.add_argument(
        "--frames", type=int, default=6000, help="bslz4 frames per throughput trial"
    )
    parser.add_argument("--pairs", type=int, default=4, help="adjacent (0, N) trial pairs")
    parser.add_argument(
        "--viewer-kind",
        choices=("chromium", "client"),
        default="chromium",
        help="throughput's viewers: Chromium pages on this machine, or clients that load the"
        " web process as remote browsers would (WebSocket + each new image), rendering nothing",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="per latency mode")
    parser.add_argument("--modes", nargs="+", choices=("hrtem", "lm"), default=["hrtem", "lm"])
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--profile", action="store_true", help="time each preview step")
    parser.add_argument(
        "--memory-minutes",
        type=float,
        default=0.0,
        help="run only the page-memory measurement, this long (e.g. 30)",
    )
    parser.add_argument("--every", type=float, default=30.0, help="s between memory samples")
    parser.add_argument("--csv", type=Path, default=None, help="memory samples to this file")
    parser.add_argument("--frame-size", type=int, default=1024, help="memory mode: camera side")
    parser.add_argument(
        "--driver",
        choices=("playwright", "cdp"),
        default="playwright",
        help="memory mode: drive the page with Playwright, or with bare CDP (no Network domain)",
    )
    parser.add_argument("--chromium", default=CHROMIUM)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench_web_"))
    print(f"bench_web: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, folder {folder},"
          f" {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)  # fmt: skip
    try:
        if args.memory_minutes > 0:
            if args.driver == "cdp":
                measure_memory(folder, None, args.chromium, args.memory_minutes,
                               args.every, args.csv, args.frame_size)  # fmt: skip
                return 0
            from playwright.sync_api import sync_playwright

            with sync_playwright() as playwright:
                measure_memory(folder, playwright, args.chromium, args.memory_minutes,
                               args.every, args.csv, args.frame_size)  # fmt: skip
            return 0
        with web_setup(folder, args.chromium) as parts:
            web, viewers, publisher, beat = parts
            if not args.skip_throughput:
                cores = idle_page_cost(viewers, args.viewers)
                viewers.close_pages()
                print(f"\n  {args.viewers} Chromium pages open, nothing happening: Chromium takes"
                      f" {cores:.2f} cores", flush=True)  # fmt: skip
                watching = viewers if args.viewer_kind == "chromium" else ClientViewers(web.url)
                measure_throughput(folder, web, watching, publisher, beat, args.frames,
                                   args.pairs, args.viewers)  # fmt: skip
                watching.close_pages()
            if not args.skip_latency:
                viewers.close_pages()
                viewers.hook = True  # the latency page only: it parses each message again
                measure_latency(folder, web, viewers, publisher, beat, args.modes, args.seconds)
            if viewers.errors:
                print(f"  the pages raised: {viewers.errors[:5]}")
        if not args.skip_latency:
            preview_path_ms(args.profile)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
