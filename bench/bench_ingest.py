"""Ingest throughput: Stream V2 frames into the run file, against a plain write of the same bytes.

What it measures. 1024 x 1024 uint16 frames rendered by the camera's own renderer (8 distinct
frames, cycled) are streamed by `SimulatedCamera.replay` as fast as the receiver takes them,
into the real ingest process (`IngestClient` spawns it; it decodes Stream V2 and writes each
payload into its HDF5 chunk), once with an uncompressed stream ("raw") and once bslz4.
PUSH/PULL with high-water marks makes the camera wait for a slow receiver, so nothing is lost
by construction; the file is checked anyway: every image_id 0..n-1 in order, every chunk
byte-identical to the payload sent, nothing dropped, missing or malformed.

References, in the same run and folder, before and after each ingest measurement:
- plain write: the same payload bytes per frame, `open(path, "wb").write`, one write a frame;
- minimal receiver: a process that PULLs the same stream and writes each message as it is
  (zero-copy, no decoding, no HDF5): what the transport alone allows on this machine.
Two figures per reference, ingest / reference:
- "cached": until the last frame is in the OS (ingest: the run closed; plain: the last write
  returned). This is the CPU cost of the path (the page cache takes GBs here);
- "durable": the same plus fsync of the file. On a long run the page cache fills and the disk
  sets the pace.
Target: ingest / plain >= 0.9. CPU time per frame of each process is printed too, and the CPU
cost of each step of the ingest path alone (one thread, no other load), to say where the time
goes; `--profile` runs the ingest process under cProfile (slower).

The camera runs in this process (one thread) and the ingest in its own, so the two share the
machine's cores; a real detector is another machine. The source ceiling (camera into a PULL
socket that only counts) shows the camera is not the limit.

Run:
    /tmp/v/bin/python bench/bench_ingest.py [--frames 1000] [--repeats 3] [--content lm|hrtem]
        [--compression raw bslz4] [--dir FOLDER] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zmq
from simproc import REPLAY_FRAMES, SHAPE, render_frames

from insitu_daq.core.config import DetectorConfig, StationConfig
from insitu_daq.drivers.stream2 import check_bslz4_framing, decode_message
from insitu_daq.ingest import IngestClient, chunks_for_file
from insitu_daq.ingest import process as ingest_process
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata, RunWriter
from insitu_daq.sim import stream2_encode as s2
from insitu_daq.sim.camera import DEFAULT_CHANNEL, SimulatedCamera
from insitu_daq.sim.station import SimStation

POLL_S = 0.02


# ----- frames ---------------------------------------------------------------------------------
def chunk_payload(frame: np.ndarray, compression: str | None) -> bytes:
    """The bytes the run file's chunk holds for this frame (= the Stream V2 payload)."""
    return frame.tobytes() if compression is None else s2.bslz4_compress(frame)


# ----- plain sequential write -----------------------------------------------------------------
@dataclass
class Timing:
    frames: int
    cached_s: float  # until everything is handed to the OS
    durable_s: float  # ... and fsync'ed
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process, cached

    def cpu_ms_per_frame(self, who: str) -> float:
        return self.cpu_s[who] / self.frames * 1e3

    @property
    def cached_fps(self) -> float:
        return self.frames / self.cached_s

    @property
    def durable_fps(self) -> float:
        return self.frames / self.durable_s


def drop_file(path: Path) -> None:
    """Remove a file and let the disk settle, so one measurement does not pay for another."""
    path.unlink(missing_ok=True)
    os.sync()


def minor_faults(pid: int) -> int:
    """Page faults served without I/O (fresh anonymous memory, mostly) of a process so far."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads); this one by default."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def plain_write(folder: Path, payloads: list[bytes], n_frames: int) -> Timing:
    path = folder / "plain.bin"
    cpu = cpu_seconds()
    started = time.monotonic()
    with open(path, "wb") as f:
        for index in range(n_frames):
            f.write(payloads[index % len(payloads)])
        f.flush()
        cached = time.monotonic()
        cpu = cpu_seconds() - cpu
        os.fsync(f.fileno())
    durable = time.monotonic()
    drop_file(path)
    return Timing(n_frames, cached - started, durable - started, {"plain": cpu})


# ----- source ceiling -------------------------------------------------------------------------
def source_ceiling(encoded: list[s2.EncodedChannels], n_frames: int) -> float:
    """Frames/s the replay camera reaches into a PULL socket that only counts."""
    with SimulatedCamera(SimStation(), port=0) as camera:
        context = zmq.Context()
        sock = context.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(camera.endpoints["stream2"])
        started = time.monotonic()
        camera.replay(encoded, n_frames)
        images = 0
        while images < n_frames:
            if sock.poll(5000):
                message = sock.recv(copy=False)
                images += len(message) > 10_000  # start/end are small
            else:
                raise RuntimeError("camera stopped sending")
        elapsed = time.monotonic() - started
        sock.close()
        context.term()
    return n_frames / elapsed


# ----- a minimal receiver: transport + plain write, no decoding, no HDF5 -------------------------
def _minimal_receiver(endpoint: str, path: str, n_frames: int, results: Any) -> None:
    """Child process: PULL the images and write each message as it is, zero-copy."""
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, DetectorConfig().receive_hwm)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    results.put("ready")
    cpu = cpu_seconds()
    images = 0
    with open(path, "wb") as f:
        while images < n_frames:
            message = sock.recv(copy=False)
            if len(message) > 10_000:  # start/end are small
                f.write(message.buffer)
                images += 1
        f.flush()
        cached = time.monotonic()
        cpu = cpu_seconds() - cpu
        os.fsync(f.fileno())
    durable = time.monotonic()
    sock.close()
    context.term()
    results.put((cached, durable, cpu))


def minimal_receiver_run(
    folder: Path, encoded: list[s2.EncodedChannels], n_frames: int, compression: str | None
) -> Timing:
    path = folder / "minimal.bin"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with SimulatedCamera(SimStation(), port=0, compression=compression) as camera:
        child = context.Process(
            target=_minimal_receiver,
            args=(camera.endpoints["stream2"], str(path), n_frames, results),
        )
        child.start()
        try:
            results.get(timeout=30)
            cpu = cpu_seconds()
            started = time.monotonic()
            camera.replay(encoded, n_frames)
            cached, durable, child_cpu = results.get(timeout=600)
            cpu = cpu_seconds() - cpu
        finally:
            child.join(10)
            if child.is_alive():
                child.terminate()
                child.join()
    drop_file(path)
    return Timing(
        n_frames, cached - started, durable - started, {"receiver": child_cpu, "camera": cpu}
    )


# ----- the ingest path ------------------------------------------------------------------------
@dataclass
class IngestRun:
    timing: Timing
    summary: dict
    checked: str
    profile: str = ""
    faults: int = 0  # minor page faults of the ingest process during the run
    hdf5_s: float = 0.0  # seconds inside HDF5 write and flush calls (the process's own stats)


def _profiled_child_main(*args: object) -> None:  # runs in the spawned ingest process
    profile = cProfile.Profile()
    profile.enable()
    try:
        ingest_process.child_main(*args)  # the original: the patch lives in the parent only
    finally:
        profile.disable()
        profile.dump_stats(os.environ["BENCH_INGEST_PROFILE"])


def wait_until_ingested(client: IngestClient, n_frames: int, timeout_s: float = 600.0) -> dict:
    """Poll the ingest until it has written `n_frames`, or received them all with none held
    (then check_file says which were not written); its last stats. RuntimeError if it stalls."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.sync()
        if stats["frames_written_total"] >= n_frames:
            return stats
        if stats["frames_received_total"] >= n_frames and stats["frames_held"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError(f"ingest stalled: {stats['frames_written_total']} written")
        time.sleep(POLL_S)


def ingest_run(
    folder: Path,
    encoded: list[s2.EncodedChannels],
    payloads: list[bytes],
    n_frames: int,
    compression: str | None,
    profile: bool,
) -> IngestRun:
    path = folder / "run.h5"
    with SimulatedCamera(SimStation(), port=0, compression=compression) as camera:
        config = StationConfig(
            data_dir=folder, detector=DetectorConfig(endpoint=camera.endpoints["stream2"])
        )
        profile_path = folder / "ingest.prof"
        if profile:
            os.environ["BENCH_INGEST_PROFILE"] = str(profile_path)
            original_child_main = ingest_process.child_main
            ingest_process.child_main = _profiled_child_main  # pickled by reference: this module
        client = IngestClient(config)
        try:
            client.start()
            geometry = FrameGeometry((DEFAULT_CHANNEL,), SHAPE, "<u2", compression)
            meta = RunMetadata("bench_ingest", "ingest throughput", time.time_ns())
            client.open_run(meta, path, geometry=geometry)
            client.start_recording()
            pid = client.pid
            assert pid is not None
            cpu_camera, cpu_ingest = cpu_seconds(), cpu_seconds(pid)
            faults = minor_faults(pid)
            hdf5_before = hdf5_seconds(client.sync())
            started = time.monotonic()
            camera.replay(encoded, n_frames)
            wait_until_ingested(client, n_frames)
            summary = client.close_run()
            cached = time.monotonic()
            cpu = {"camera": cpu_seconds() - cpu_camera, "ingest": cpu_seconds(pid) - cpu_ingest}
            faults = minor_faults(pid) - faults
            hdf5_s = hdf5_seconds(client.sync()) - hdf5_before
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            durable = time.monotonic()
        finally:
            client.stop()
            if profile:
                ingest_process.child_main = original_child_main
    checked = check_file(path, payloads, n_frames, summary)
    report = ""
    if profile and profile_path.exists():
        out = io.StringIO()
        pstats.Stats(str(profile_path), stream=out).sort_stats("tottime").print_stats(18)
        report = out.getvalue()
        profile_path.unlink()
    drop_file(path)
    timing = Timing(n_frames, cached - started, durable - started, cpu)
    return IngestRun(timing, summary, checked, report, faults, hdf5_s)


def hdf5_seconds(stats: dict[str, Any]) -> float:
    return stats["hdf5_write_seconds"]["sum"] + stats["hdf5_flush_seconds"]["sum"]


def check_file(path: Path, payloads: list[bytes], n_frames: int, summary: dict) -> str:
    """Every frame present, in order, byte-identical; nothing dropped. Raises if not."""
    problems = []
    for key in ("frames_dropped", "frames_missing", "gaps", "malformed", "write_errors"):
        if summary.get(key):
            problems.append(f"{key}={summary[key]}")
    with h5py.File(path, "r") as f:
        detector = f["/entry/instrument/detector"]
        data = detector["data"]
        image_id = detector["image_id"][:]
        frame_time = detector["frame_time"][:]
        if data.shape[0] != n_frames or len(image_id) != n_frames:
            problems.append(f"{data.shape[0]} frames, {len(image_id)} image_ids for {n_frames}")
        if not np.array_equal(image_id, np.arange(len(image_id))):
            problems.append("image_id not 0..n-1 in order")
        if np.any(np.diff(frame_time) < 0):
            problems.append("frame_time decreases")
        different = 0
        for index in range(min(data.shape[0], n_frames)):
            _, chunk = data.id.read_direct_chunk((index, 0, 0))
            different += chunk != payloads[index % len(payloads)]
        if different:
            problems.append(f"{different} chunks differ from the payload sent")
    if problems:
        raise RuntimeError(f"{path}: " + "; ".join(problems))
    return f"{n_frames}/{n_frames} frames, ids 0..{n_frames - 1}, chunks identical"


# ----- per-stage CPU cost, in one thread --------------------------------------------------------
def stage_breakdown(
    folder: Path, frames: list[np.ndarray], compression: str | None, n: int = 300
) -> dict[str, float]:
    """CPU ms/frame of each step the ingest process takes, one at a time, no contention."""
    camera_like = [
        s2.image_message(
            1, "BENCH", i, datetime.now(timezone.utc), (i, 50_000_000), (i + 1, 50_000_000),
            (1, 50_000_000), s2.encode_channels({DEFAULT_CHANNEL: frames[i % len(frames)]},
            compression), user_data={"replay_index": i},
        )
        for i in range(len(frames))
    ]  # fmt: skip
    messages = [camera_like[i % len(camera_like)] for i in range(n)]
    costs: dict[str, float] = {}

    def timed(name: str, function: Callable[[int], object]) -> None:
        started = time.process_time()
        for index in range(n):
            function(index)  # the result is dropped, as the ingest loop drops each frame's
        costs[name] = (time.process_time() - started) / n * 1e3

    timed("decode_message (CBOR, checks; payload a view)", lambda i: decode_message(messages[i], 0))
    decoded = [decode_message(message, 0) for message in camera_like]
    if compression == "bslz4":
        count = SHAPE[0] * SHAPE[1]
        payloads = [image.channel().payload for image in decoded]  # type: ignore[union-attr]
        timed(
            "  of which check_bslz4_framing",
            lambda i: check_bslz4_framing(payloads[i % len(payloads)], np.dtype("<u2"), count),
        )
    geometry = FrameGeometry((DEFAULT_CHANNEL,), SHAPE, "<u2", compression)
    path = folder / "stages.h5"
    writer = RunWriter(path, RunMetadata("stages", "stages", time.time_ns()), geometry)
    chunks = [chunks_for_file(image, geometry)[0] for image in decoded]  # type: ignore[arg-type]
    timed(
        "RunWriter.write_frame (HDF5 direct chunk of the view)",
        lambda i: writer.write_frame(i, 1, chunks[i % len(chunks)], i * 0.025, 0, 0, 0, 0, 0),
    )
    writer.close(time.time_ns())
    drop_file(path)
    plain = folder / "stages.bin"
    with open(plain, "wb") as f:
        bodies = [bytes(next(iter(c.values()))) for c in chunks]
        timed("plain write of the same bytes", lambda i: f.write(bodies[i % len(bodies)]))
    drop_file(plain)
    return costs


# ----- main -----------------------------------------------------------------------------------
def measure_mode(
    name: str, frames: list[np.ndarray], folder: Path, n_frames: int, repeats: int, profile: bool
) -> None:
    compression = None if name == "raw" else name
    payloads = [chunk_payload(frame, compression) for frame in frames]
    encoded = [s2.encode_channels({DEFAULT_CHANNEL: frame}, compression) for frame in frames]
    mb = statistics.fmean(len(p) for p in payloads) / 1e6
    ceiling = source_ceiling(encoded, min(n_frames, 1000))
    print(f"\n{name}: {mb:.3f} MB/frame; source ceiling (camera -> counting PULL, no file)"
          f" {ceiling:.0f} frames/s")  # fmt: skip
    plain_write(folder, payloads, n_frames)  # warm-up: the first write of a process is slow
    print("  frames/s cached; durable        plain (before/after)   minimal receiver    ingest"
          "        ratio ingest/plain   ingest/minimal")  # fmt: skip
    ratios: list[tuple[float, float, float, float]] = []
    for repeat in range(repeats):
        before = plain_write(folder, payloads, n_frames)
        minimal = minimal_receiver_run(folder, encoded, n_frames, compression)
        run = ingest_run(folder, encoded, payloads, n_frames, compression, profile)
        after = plain_write(folder, payloads, n_frames)
        plain_cached = statistics.fmean((before.cached_fps, after.cached_fps))
        plain_durable = statistics.fmean((before.durable_fps, after.durable_fps))
        t = run.timing
        ratio = (
            t.cached_fps / plain_cached,
            t.durable_fps / plain_durable,
            t.cached_fps / minimal.cached_fps,
            t.durable_fps / minimal.durable_fps,
        )
        ratios.append(ratio)
        print(f"  [{repeat + 1}] {before.cached_fps:5.0f}/{after.cached_fps:<5.0f};"
              f" {before.durable_fps:4.0f}/{after.durable_fps:<4.0f}"
              f"   {minimal.cached_fps:5.0f}; {minimal.durable_fps:4.0f}"
              f"    {t.cached_fps:5.0f}; {t.durable_fps:4.0f}"
              f"    {ratio[0]:.2f}; {ratio[1]:.2f}          {ratio[2]:.2f};"
              f" {ratio[3]:.2f}")  # fmt: skip
        plain_cpu = statistics.fmean(
            (before.cpu_ms_per_frame("plain"), after.cpu_ms_per_frame("plain"))
        )
        print(
            f"      CPU ms/frame: plain {plain_cpu:.2f}; minimal receiver"
            f" {minimal.cpu_ms_per_frame('receiver'):.2f} + camera"
            f" {minimal.cpu_ms_per_frame('camera'):.2f}; ingest process"
            f" {t.cpu_ms_per_frame('ingest'):.2f} + camera {t.cpu_ms_per_frame('camera'):.2f}"
        )
        print(f"      ingest process: {run.faults / n_frames:.0f} page faults/frame;"
              f" {run.hdf5_s / t.cached_s:.0%} of the run's time (cached) inside HDF5 write and"
              f" flush calls ({run.hdf5_s / n_frames * 1e3:.2f} ms/frame)")  # fmt: skip
        print(f"      ingest {t.cached_fps * mb:.0f} MB/s cached, {t.durable_fps * mb:.0f} MB/s"
              f" durable; file: {run.checked}; dropped {run.summary['frames_dropped']},"
              f" missing {run.summary['frames_missing']}")  # fmt: skip
        if run.profile:
            print("      ingest process profile (tottime):")
            print(run.profile)
    print("  ingest steps alone, CPU ms/frame (one thread, no other load):")
    for stage, ms in stage_breakdown(folder, frames, compression).items():
        print(f"    {stage:<48s} {ms:6.3f}")
    medians = [statistics.median(r[k] for r in ratios) for k in range(4)]
    verdict = "meets" if min(medians[:2]) >= 0.9 else "MISSES"
    print(f"  {name}: median ratio ingest/plain cached {medians[0]:.2f}, durable {medians[1]:.2f}"
          f" ({verdict} the 0.9 target); ingest/minimal receiver cached {medians[2]:.2f},"
          f" durable {medians[3]:.2f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1000, help="frames per measurement")
    parser.add_argument("--content", choices=("lm", "hrtem"), default="lm")
    parser.add_argument(
        "--compression", nargs="+", choices=("raw", "bslz4"), default=["raw", "bslz4"]
    )
    parser.add_argument("--repeats", type=int, default=3, help="plain/ingest/plain triples")
    parser.add_argument("--dir", type=Path, default=None, help="folder to write in (a disk)")
    parser.add_argument("--profile", action="store_true", help="cProfile the ingest process")
    args = parser.parse_args()

    base = args.dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench_ingest_", dir=base))
    print(f"bench_ingest: {args.frames} frames of {SHAPE[0]}x{SHAPE[1]} uint16 "
          f"({args.content} content, {REPLAY_FRAMES} distinct), folder {folder}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    frames = render_frames(args.content)
    try:
        for name in args.compression:
            measure_mode(name, frames, folder, args.frames, args.repeats, args.profile)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
