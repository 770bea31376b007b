"""A recording that fails fails the run safely (issue 9).

Real file systems (tests/small_fs.py: a tmpfs that fills, an ext4 image the kernel turns
read-only; both need root, else skipped), the simulated station over its real sockets, the
daemon as a real process (test_daemon_e2e.LiveStation), `insitu-daq run` as a real process,
and the run file read back with h5py. What each test measures it prints (`pytest -s`). The
daemons run without live analysis (`analysis=False`): nothing here reads it, and they start in
about half the time.
"""

from __future__ import annotations

import errno
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters for reading)
import numpy as np
import pytest
from small_fs import (
    ext4,
    fill,
    make_read_only,
    mount_again,
    read_only_view,
    shut_down,
    tmpfs,
)
from test_daemon_e2e import LiveStation

from insitu_daq.control.protocol import Protocol
from insitu_daq.core.config import ConfigError, StationConfig, parse_config
from insitu_daq.core.records import BIAS_SAMPLE_DTYPE
from insitu_daq.ingest.counters import StreamRate
from insitu_daq.ingest.failure import (
    SpaceReserve,
    classify_write_error,
    reserve_path,
)
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata, RunWriter
from insitu_daq.service.api import ControlError, EventSubscriber
from insitu_daq.service.metrics import DaemonMetrics
from insitu_daq.service.recording_plan import RecordingPlan, RecordingRate, protocol_seconds

MiB = 1 << 20
DETECTOR = "/entry/instrument/detector"

# 400 s of hold at the tests' time scale of 20: 20 s of wall time, ~10 MB of the simulated
# camera's 128 x 128 bslz4 frames (~12.5 kB at 40 frames/s), so it fits a 24 MiB disk.
HOLD = """
name: fill_hold
steps:
  - approach: {speed_nm_s: 500, max_travel_nm: 5000}
  - acquire: start
  - bias: {volts: 1.0, rate_volts_per_s: 1.0}
  - hold: {duration_s: 400}
  - bias: 0
  - acquire: stop
"""
SHORT = HOLD.replace("duration_s: 400", "duration_s: 20")
TOO_LONG = HOLD.replace("duration_s: 400", "duration_s: 4000")  # ~100 MB planned
ROOMY = "[recording]\nmin_free_bytes = 0\n"


# ----- the mechanism, on a real full disk ------------------------------------------------------
def _frame(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 1000, (128, 128), dtype="<u2")  # raw: 32 KiB a frame


def test_a_full_disk_is_named_and_the_reserve_leaves_the_file_readable(tmp_path: Path) -> None:
    """Frames into a 4 MiB tmpfs until it is full: the error (OSError from a chunk write or an
    HDF5 RuntimeError from a flush, as h5py raises them) is classified as disk full in that
    folder; once the reserve is released the event and the close fit, and the file opens with
    every frame written before the failure."""
    with tmpfs(tmp_path / "disk", 4 * MiB) as disk:
        path = disk / "run.h5"
        reserve = SpaceReserve(reserve_path(path))
        geometry = FrameGeometry(("threshold_1",), (128, 128), "<u2", None)
        writer = RunWriter(path, RunMetadata("full", "full disk", time.time_ns()), geometry)
        rng = np.random.default_rng(0)
        failure = None
        for i in range(1000):
            try:
                writer.write_frame(i, 1, {"threshold_1": _frame(rng)}, float(i), 0, 0, 0, 0, 0)
                if i % 8 == 0:
                    writer.flush()
            except Exception as exc:  # whatever h5py raises: the classification's job
                failure = classify_write_error(exc, path, f"image {i}")
                break
        assert failure is not None, "the 4 MiB disk never filled"
        assert failure.kind == "disk_full"
        assert failure.errno == errno.ENOSPC
        assert failure.reason.startswith(f"disk full in {disk} (ENOSPC: No space left on device")
        kept = writer.frames_written
        assert reserve.release() == reserve.size
        writer.write_event(float(kept), "recording_failed", failure.reason)
        writer.close(time.time_ns())

        with h5py.File(path, "r") as f:
            frame_time = f[f"{DETECTOR}/frame_time"][:]
            assert len(frame_time) == kept > 50
            assert np.array_equal(frame_time, np.arange(kept))
            assert f[f"{DETECTOR}/data"].shape[0] >= kept
            assert f["/entry/events/message"][-1].decode() == failure.reason
            assert f["/entry/end_time"][()].decode()


def test_an_error_without_errno_is_not_a_recording_failure(tmp_path: Path) -> None:
    assert classify_write_error(ValueError("bad record"), tmp_path / "r.h5", "x") is None


# ----- planning -------------------------------------------------------------------------------
def test_the_plan_counts_the_recorded_steps_at_their_longest() -> None:
    limits = StationConfig().limits  # max ramp rate 1 V/s
    protocol = Protocol.parse(HOLD, "yaml")
    # approach 10 s (not recorded), ramp 1 s, hold 400 s, ramp down 1 s at the maximum rate
    assert protocol_seconds(protocol, limits) == pytest.approx((412.0, 402.0))
    rate = RecordingRate(1000.0, "test")
    plan = RecordingPlan.of(protocol, limits, rate, time_scale=20.0)
    assert plan.bytes == pytest.approx(1000.0 * 402.0 / 20.0)  # wall seconds x bytes per s
    unstopped = Protocol.parse(HOLD.replace("  - bias: 0\n  - acquire: stop\n", ""), "yaml")
    assert protocol_seconds(unstopped, limits)[1] == pytest.approx(402.0)  # the safe end


def test_the_plan_before_the_detector_is_heard_uses_the_config() -> None:
    config = parse_config({"detector": {"default_frame_rate_hz": 10.0}})
    rate = RecordingRate.of_stream(None, config)
    pixels = 1024 * 1024 * 2 * 0.5  # uint16, bslz4 assumed to keep half
    bias = 50 * BIAS_SAMPLE_DTYPE.itemsize
    assert rate.bytes_per_s == pytest.approx(10 * (pixels + 100) + bias, rel=0.01)
    assert "not heard" in rate.source


def test_the_plan_takes_the_measured_frame_size_or_the_assumed_one_whichever_is_larger() -> None:
    config = StationConfig()
    bias = 50 * BIAS_SAMPLE_DTYPE.itemsize
    stream = {"frames_per_s": 40.0, "raw_bytes_per_frame": 32768, "compression": "bslz4"}
    dark = RecordingRate.of_stream({**stream, "peak_bytes_per_frame": 200.0}, config)
    assert dark.bytes_per_s == pytest.approx(40 * (16384 + 100) + bias)  # a blanked beam
    assert "bslz4 assumed 0.5; measured 200 B" in dark.source
    noisy = RecordingRate.of_stream({**stream, "peak_bytes_per_frame": 30000.0}, config)
    assert noisy.bytes_per_s == pytest.approx(40 * (30000 + 100) + bias)
    assert "a frame measured" in noisy.source


def test_recording_on_failure_is_validated_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^recording\.on_failure: Input should be 'abort'"):
        parse_config({"recording": {"on_failure": "ignore"}})
    assert parse_config({"recording": {"on_failure": "pause"}}).recording.on_failure == "pause"


# ----- end to end: the daemon, the simulated station, a real disk -----------------------------
def _scpi(live: LiveStation, query: str) -> str:
    """Ask the simulated source-meter itself (its SCPI port), not the daemon."""
    host, port = live.sims.source_meter.tcp_address()
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(query.encode() + b"\n")
        return conn.makefile("rb").readline().decode().strip()


def _output_off_at_0v(live: LiveStation) -> bool:
    return _scpi(live, ":OUTP?") == "0" and float(_scpi(live, ":SOUR:VOLT?")) == 0.0


def _wait_stream_measured(live: LiveStation) -> None:
    live.wait_for(lambda s: s["ingest"].get("stream_rate") is not None, timeout_s=30)


def _start_cli(live: LiveStation, tmp_path: Path, text: str) -> subprocess.Popen[str]:
    protocol = tmp_path / "protocol.yaml"
    protocol.write_text(text)
    return subprocess.Popen(
        [sys.executable, "-m", "insitu_daq", "run", str(protocol),
         "--config", str(live.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _recording(live: LiveStation, frames: int = 20) -> dict:
    return live.wait_for(
        lambda s: (
            s["protocol"]["step_kind"] == "hold"
            and (s["ingest"].get("run") or {}).get("frames_written", 0) >= frames
        )
    )


def _failure_lines(log: str, since: str) -> list[str]:
    """Daemon log lines (its own and its ingest process's) about the failure."""
    return [line for line in log.splitlines() if since in line or "not recording" in line]


class FailureWatch:
    """The `recording_failed` event off the daemon's event stream, and when the simulated
    source-meter reported its output off at 0 V (polled over SCPI every 20 ms)."""

    def __init__(self, live: LiveStation) -> None:
        self.live = live
        self.subscriber = EventSubscriber(_events(live), topics=["event"])
        self.subscriber.__enter__()
        time.sleep(0.3)  # PUB/SUB: the subscription must be in place before the failure

    def wait(self, timeout_s: float = 30.0) -> tuple[dict, float]:
        """(the failure event, seconds from its first failed write to output off at 0 V)."""
        deadline = time.monotonic() + timeout_s
        event = None
        while event is None:
            assert time.monotonic() < deadline, f"no recording_failed\n{self.live.daemon_log()}"
            message = self.subscriber.receive(timeout_s=0.5)
            if message is not None and message[1].get("kind") == "recording_failed":
                event = message[1]
        while not _output_off_at_0v(self.live):
            assert time.monotonic() < deadline, "output still on"
            time.sleep(0.02)
        off_ns = time.time_ns()
        self.subscriber.close()
        return event, (off_ns - event["failed_at_ns"]) * 1e-9


def _events(live: LiveStation) -> str:
    text = live.config_path.read_text()
    return re.search(r'events = "([^"]+)"', text)[1]


def _run_file_events(path: Path) -> list[tuple[str, str]]:
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        kinds = [k.decode() for k in f["/entry/events/kind"][:]]
        messages = [m.decode() for m in f["/entry/events/message"][:]]
    return list(zip(kinds, messages, strict=True))


@pytest.fixture
def full_disk_station(tmp_path: Path):
    with tmpfs(tmp_path / "disk", 24 * MiB) as disk:
        live = LiveStation(tmp_path, data_dir=disk / "runs", extra_config=ROOMY, analysis=False)
        try:
            yield live, disk
        finally:
            live.close()


def test_disk_full_mid_run_fails_the_run_safely(full_disk_station, tmp_path: Path) -> None:
    live, disk = full_disk_station
    _wait_stream_measured(live)
    cli = _start_cli(live, tmp_path, HOLD)
    status = _recording(live)
    run_id, run_file = status["run_id"], Path(status["run_file"])
    watch = FailureWatch(live)
    filler = fill(disk)
    event, seconds_to_off = watch.wait()

    stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode != 0, stdout + stderr
    last = stdout.splitlines()[-1]
    assert re.fullmatch(
        rf"run {run_id}: failed: disk full in {disk / 'runs'} \(ENOSPC: No space left on device;"
        r" writing .+; \d+ frames recorded\)",
        last,
    ), last
    status = live.wait_closed(run_id)
    assert status["protocol"]["state"] == "failed"
    assert status["recording_failure"] == event["reason"] == last.split(": failed: ", 1)[1]
    assert _output_off_at_0v(live)
    _, history, _ = live.model_state()
    assert np.abs(np.diff([v for _, v in history])).max() <= 0.01 + 1e-9  # ramped, not stepped

    # The file: every frame recorded before the failure, and the failure event.
    with h5py.File(run_file, "r", libver="latest", swmr=True) as f:
        frames = f[f"{DETECTOR}/frame_time"].shape[0]
        assert frames >= event["frames_recorded"] > 20
        assert f[f"{DETECTOR}/data"].shape[0] >= frames
        assert f["/entry/end_time"][()].decode()  # closed properly, in the reserve's room
    events = _run_file_events(run_file)
    assert ("recording_failed", f"recording failed: {event['reason']}") in events
    assert any(kind == "state" and "failed: disk full" in message for kind, message in events)

    # The log says it, not per frame: at most about once a second (plus the first lines).
    log = live.daemon_log()
    lines = _failure_lines(log, "No space left")
    seconds = max(1.0, time.time_ns() * 1e-9 - event["failed_at_ns"] * 1e-9)
    assert 1 <= len(lines) <= seconds + 3, "\n".join(lines)
    lost = status["ingest"]["frames_dropped_by_reason"]["write_error"]
    print(
        f"\nMEASURED disk full: output off at 0 V {seconds_to_off:.2f} s after the first failed"
        f" write; {frames} frames kept, {lost} not written; {len(lines)} log lines about it"
        f" over {seconds:.1f} s; reason: {event['reason']}"
    )

    # The daemon keeps serving: a new run is refused while the disk is full, then runs.
    assert live.request("ping")["version"]
    with pytest.raises(ControlError, match=f"not enough space in {disk / 'runs'}"):
        live.run(SHORT, "short")
    filler.unlink()
    again = _start_cli(live, tmp_path, SHORT)
    stdout, stderr = again.communicate(timeout=90)
    assert again.returncode == 0, stdout + stderr + live.daemon_log()
    assert stdout.splitlines()[-1].endswith(": finished")


def test_data_folder_removed_mid_run_fails_the_run_safely(tmp_path: Path) -> None:
    """Writes into a file whose folder is gone still succeed (the inode lives on), so the
    ingest checks the file is still there at every flush."""
    live = LiveStation(tmp_path, extra_config=ROOMY, analysis=False)
    try:
        reply = live.run(HOLD, "fill_hold")
        _recording(live)
        watch = FailureWatch(live)
        shutil.rmtree(live.data_dir)
        event, seconds_to_off = watch.wait()
        status = live.wait_closed(reply["run_id"])
        assert status["protocol"]["state"] == "failed"
        reason = status["protocol"]["reason"]
        assert reason.startswith(f"data folder {live.data_dir} is gone (")
        assert reason == event["reason"]
        assert _output_off_at_0v(live)
        print(f"\nMEASURED folder gone: output off {seconds_to_off:.2f} s after it was seen")
        # Refused while it is missing; once it is back, a run works.
        with pytest.raises(ControlError, match=f"data folder {live.data_dir}: No such file"):
            live.run(SHORT, "short")
        live.data_dir.mkdir()
        reply = live.run(SHORT, "short")
        assert live.wait_closed(reply["run_id"])["protocol"]["state"] == "finished"
    finally:
        live.close()


@pytest.mark.parametrize(
    ("fault", "failure"),
    [
        ("read_only", "data folder {runs} is read-only (EROFS: Read-only file system; "),
        ("io_error", "write error in {runs} (EIO: Input/output error; "),
    ],
)
def test_a_disk_error_mid_run_fails_the_run_safely(
    tmp_path: Path, fault: str, failure: str
) -> None:
    """An ext4 image turned read-only by the kernel (as after a disk error), or shut down (every
    I/O then fails with EIO, as a disk that stopped answering).

    What the disk itself keeps of the file is measured, not asserted: HDF5's flush hands the
    data to the kernel, which writes it back within ~30 s (delayed allocation); a disk lost
    before that keeps the file's name, not its contents (the report says so)."""
    image, disk = tmp_path / "disk.img", tmp_path / "disk"
    with ext4(disk, image, 64 * MiB) as device:
        runs = disk / "runs"
        live = LiveStation(tmp_path, data_dir=runs, extra_config=ROOMY, analysis=False)
        try:
            _wait_stream_measured(live)  # the room check then plans with the real frame size
            reply = live.run(HOLD, "fill_hold")
            _recording(live)
            time.sleep(1.0)  # a few flushes
            before = live.request("status")["ingest"]
            flushed = before["run"]["frames_flushed"]
            watch = FailureWatch(live)
            make_read_only(device) if fault == "read_only" else shut_down(disk)
            event, seconds_to_off = watch.wait()
            status = live.wait_closed(reply["run_id"])
            assert status["protocol"]["state"] == "failed"
            reason = status["protocol"]["reason"]
            assert reason.startswith(failure.format(runs=runs)), reason
            assert _output_off_at_0v(live)
            assert live.request("ping")["version"]
            ingest = live.request("status")["ingest"]
            assert ingest["alive"] and ingest["pid"] == before["pid"]  # the same process
            refusal = re.escape(failure.format(runs=runs) + "a test write before the run)")
            with pytest.raises(ControlError, match=refusal):
                live.run(SHORT, "short")
            if fault == "read_only":  # readable as the kernel holds it (a shut-down disk: not)
                with h5py.File(reply["run_file"], "r", libver="latest", swmr=True) as f:
                    frames = f[f"{DETECTOR}/frame_time"].shape[0]
                assert frames >= flushed > 20  # what the last flush before the failure wrote
            lines = _failure_lines(live.daemon_log(), failure.split("(")[1].split(";")[0])
        finally:
            live.close()
        mount_again(disk, image)
        try:
            with h5py.File(reply["run_file"], "r", libver="latest", swmr=True) as f:
                kept = f"{f[f'{DETECTOR}/frame_time'].shape[0]} frames"
        except OSError as exc:
            kept = f"not readable ({exc})"
        print(
            f"\nMEASURED {fault}: output off {seconds_to_off:.2f} s after the first failed write;"
            f" {event['frames_recorded']} frames recorded; {len(lines)} log lines about it;"
            f" after a remount the disk's file: {kept}"
        )
        assert 1 <= len(lines) <= 6, "\n".join(lines)


def test_pause_on_failure_makes_the_bias_safe_and_resumes_once_there_is_room(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "disk", 24 * MiB) as disk:
        config = ROOMY + 'on_failure = "pause"\n'
        live = LiveStation(tmp_path, data_dir=disk / "runs", extra_config=config, analysis=False)
        try:
            _wait_stream_measured(live)
            reply = live.run(HOLD, "fill_hold")
            _recording(live)
            watch = FailureWatch(live)
            filler = fill(disk)
            event, seconds_to_off = watch.wait()
            status = live.wait_for(lambda s: s["protocol"]["state"] == "paused")
            assert status["protocol"]["reason"] == f"recording failed: {event['reason']}"
            assert _output_off_at_0v(live)
            print(f"\nMEASURED pause: output off {seconds_to_off:.2f} s after the failed write")
            refusal = (
                f"not resumed: not enough space in {disk / 'runs'} for the rest of this run"
                r" \(from step 4\): "
            )
            with pytest.raises(ControlError, match=refusal):
                live.request("resume")  # no run goes on unrecorded
            assert live.request("status")["protocol"]["state"] == "paused"
            time.sleep(6.0)  # paused on a full disk, frames still coming: the log stays quiet
            seconds = time.time() - event["failed_at_ns"] * 1e-9
            lines = _failure_lines(live.daemon_log(), "No space left")
            assert len(lines) <= seconds + 2, "\n".join(lines)
            assert any(re.search(r"not recording \(disk_full\): \d+ frames", x) for x in lines)
            print(f"MEASURED pause: {len(lines)} log lines about it in {seconds:.1f} s")

            filler.unlink()
            live.request("resume")
            before = live.request("status")["ingest"]["run"]["frames_written"]
            live.wait_for(lambda s: s["ingest"]["run"]["frames_written"] > before + 20)
            live.wait_for(lambda s: abs(s["bias"]["setpoint"] - 1.0) < 1e-9)  # re-ramped
            live.request("abort", reason="test over")
            status = live.wait_closed(reply["run_id"])
            assert status["protocol"]["state"] == "aborted"
            assert status["recording_failure"] is None
            events = _run_file_events(Path(reply["run_file"]))
            assert any(kind == "recording_failed" for kind, _ in events)
            assert any(message.startswith("recording again (") for _, message in events)
            with h5py.File(reply["run_file"], "r") as f:
                frame_time = f[f"{DETECTOR}/frame_time"][:]
            assert len(frame_time) > before + 20 and np.all(np.diff(frame_time) > 0)
        finally:
            live.close()


def test_a_run_that_cannot_fit_or_has_nowhere_to_go_is_refused_untouched(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "disk", 24 * MiB) as disk:
        live = LiveStation(tmp_path, data_dir=disk / "runs", extra_config=ROOMY, analysis=False)
        try:
            _wait_stream_measured(live)
            _, history_before, _ = live.model_state()
            with pytest.raises(ControlError) as refused:
                live.run(TOO_LONG, "too_long")
            message = str(refused.value)
            print(f"\nMEASURED refusal: {message}")
            assert "\n" not in message
            assert re.fullmatch(
                rf"not enough space in {disk / 'runs'} for this run: [\d.]+ MiB free,"
                r" [\d.]+ MiB planned: 4002 s recorded at [\d.]+ KiB/s \([\d.]+ frames/s"
                r" measured from the detector, [\d.]+ KiB a frame[^)]*\), \+ 1 MiB held to close"
                r" the file \+ 0 B to keep free \(recording.min_free_bytes\)",
                message,
            ), message
            with read_only_view(disk / "runs"):
                read_only = (
                    f"data folder {disk / 'runs'} is on a read-only file system: run refused"
                )
                with pytest.raises(ControlError, match=read_only):
                    live.run(SHORT, "short")
                live.wait_for(lambda s: s["data_disk"]["writable"] is False, timeout_s=10)
            _, history_after, _ = live.model_state()
            assert history_after == history_before  # the bias was never touched
            assert not list((disk / "runs").glob("*.h5"))
            reply = live.run(SHORT, "short")
            assert live.wait_closed(reply["run_id"])["protocol"]["state"] == "finished"
        finally:
            live.close()


def test_the_stream_rate_plans_with_the_bigger_frames_of_the_last_hour() -> None:
    rate = StreamRate()
    s = 1_000_000_000
    for i in range(400):  # 10 s of bright frames at 40 frames/s
        rate.add(i * s // 40, 12_000)
    for i in range(400, 1200):  # then 20 s of a blanked beam
        rate.add(i * s // 40, 300)
    measured = rate.to_dict()
    assert measured is not None
    assert measured["frames_per_s"] == pytest.approx(40.0)
    assert measured["bytes_per_frame"] == pytest.approx(300.0)
    assert measured["peak_bytes_per_frame"] == pytest.approx(12_000.0)
    for i in range(3700 * 40, 3700 * 40 + 400):  # an hour later: the bright frames are old
        rate.add(i * s // 40, 300)
    assert rate.to_dict()["peak_bytes_per_frame"] == pytest.approx(300.0)


def test_the_data_disk_metrics_show_free_space_and_recording_time_left() -> None:
    metrics = DaemonMetrics("127.0.0.1", 0)  # never started: read from its registry
    metrics.observe_data_disk(10 * MiB, 100 * MiB, True, bytes_per_s=MiB / 2)
    read = metrics.registry.get_sample_value
    assert read("insitu_daq_data_disk_free_bytes") == 10 * MiB
    assert read("insitu_daq_data_disk_size_bytes") == 100 * MiB
    assert read("insitu_daq_data_dir_up") == 1
    assert read("insitu_daq_data_disk_recording_capacity_seconds") == pytest.approx(20.0)
    metrics.observe_data_disk(None, None, False, bytes_per_s=MiB / 2)  # the folder is gone
    assert read("insitu_daq_data_dir_up") == 0
    assert np.isnan(read("insitu_daq_data_disk_free_bytes"))
    metrics.count_recording_failure("disk_full")
    assert read("insitu_daq_recording_failures_total", {"kind": "disk_full"}) == 1
