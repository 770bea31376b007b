"""The fault matrix (tests/FAULTS.md), end to end: each fault injected into a running station,
and what the operator relies on read back from the simulators and the real run file.

The simulated instruments run in this process (their model's `bias_history` is the ground
truth of what reached the sample) and `insitu-daq daemon` runs as a real process on them, over
their real TCP sockets, ZeroMQ streams and pseudo-terminals (test_daemon_e2e.LiveStation). The
moment of each fault is marked in the run file first (`mark`), so the file itself says how long
the daemon took to react, in run (station) seconds; the station runs TIME_SCALE times faster
than the wall clock. Each test prints its figures (`pytest -s`); FAULTS.md quotes them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_daemon_e2e import TIME_SCALE, LiveStation

from insitu_daq.control.guardian import LOG_FILE_NAME
from insitu_daq.core.config import RetryConfig
from insitu_daq.core.module_command import module_command
from insitu_daq.sim.camera import SimulatedCamera

FRAME_SHAPE = (128, 128)
FRAME_RATE_HZ = 40.0
RAMP_STEP_V = 0.01  # the station's ramp_step_volts (the default)

# Contact, record, +1 V, hold, then a holder move while still biased, ramp down, stop.
FAULT_HOLD = """
name: fault_hold
steps:
  - approach: {{speed_nm_s: 500, max_travel_nm: 5000}}
  - acquire: start
  - bias: {{volts: 1.0, rate_volts_per_s: 1.0}}
  - hold: {{duration_s: {hold_s}}}
  - retract: {{distance_nm: 500}}
  - bias: 0
  - acquire: stop
"""


@pytest.fixture
def live(tmp_path: Path):
    station = LiveStation(tmp_path, frame_shape=FRAME_SHAPE, analysis=False)  # none read here
    yield station
    station.close()


# ----- reading the run file --------------------------------------------------------------------
@dataclass
class Event:
    time: float  # run seconds
    kind: str
    message: str


def _events(run_file: str) -> list[Event]:
    with h5py.File(run_file, "r", libver="latest", swmr=True) as f:
        events = f["/entry/events"]
        return [
            Event(float(t), k.decode(), m.decode())
            for t, k, m in zip(
                events["time"][:], events["kind"][:], events["message"][:], strict=True
            )
        ]


def _first(events: list[Event], text: str, kind: str | None = None) -> Event:
    found = [e for e in events if text in e.message and (kind is None or e.kind == kind)]
    assert found, f"no event with {text!r}: " + "; ".join(e.message for e in events)
    return found[0]


@dataclass
class Frames:
    image_id: np.ndarray
    frame_time: np.ndarray
    series_date: np.ndarray  # the detector's series_date per frame: one per series
    received_time: np.ndarray  # run seconds when the ingest took the frame off its socket
    detector_mid: np.ndarray  # exposure midpoint on the detector's own clock (s)

    def series(self) -> list[np.ndarray]:
        """The image_ids of each series, in the order the file has them."""
        change = np.flatnonzero(self.series_date[1:] != self.series_date[:-1]) + 1
        return np.split(self.image_id, change)


def _frames(run_file: str) -> Frames:
    with h5py.File(run_file, "r", libver="latest", swmr=True) as f:
        detector = f["/entry/instrument/detector"]
        return Frames(
            detector["image_id"][:],
            detector["frame_time"][:],
            detector["detector_series_date"][:],
            detector["received_time"][:],
            (detector["detector_start_time"][:] + detector["detector_stop_time"][:]) / 2,
        )


def _bias_log(run_file: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(run_file, "r", libver="latest", swmr=True) as f:
        log = f["/entry/sample/bias_voltage"]
        return log["time"][:], log["setpoint"][:]


def _output_level(run_file: str) -> tuple[np.ndarray, np.ndarray]:
    """The commanded terminal level's log: every change, stamped by the SCPI write."""
    with h5py.File(run_file, "r", libver="latest", swmr=True) as f:
        level = f["/entry/instrument/source_meter/output_level"]
        return level["time"][:], level["value"][:]


def _contiguous(ids: np.ndarray) -> bool:
    return len(ids) > 0 and np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids)))


def _assert_ramped_and_off(live: LiveStation) -> None:
    """The output is off and every change of the applied bias was one ramp step at most."""
    _, history, (volts, amps, _) = live.model_state()
    assert (volts, amps) == (0.0, 0.0), "output still on"
    steps = np.abs(np.diff([v for _, v in history]))
    assert steps.max() <= RAMP_STEP_V + 1e-9, f"a step of {steps.max():.4f} V"


def _wall(run_seconds: float) -> float:
    return run_seconds / TIME_SCALE


def _restart_camera(live: LiveStation, port: int) -> SimulatedCamera:
    """A new camera process on the same port (its series numbering starts afresh)."""
    camera = SimulatedCamera(
        live.sims.station, port=port, shape=FRAME_SHAPE, frame_rate_hz=FRAME_RATE_HZ
    )
    camera.start()
    camera.arm()
    live.sims.camera = camera  # LiveStation.close() stops it
    return camera


# ----- holder ----------------------------------------------------------------------------------
def test_holder_lost_mid_hold_fails_the_run_in_the_hold_with_the_bias_made_safe(
    live: LiveStation,
) -> None:
    # A hold far longer than the loss takes to notice: the run must end in it, not at the
    # retract after it.
    reply = live.run(FAULT_HOLD.format(hold_s=400), "holder_lost")
    live.wait_in_hold()
    live.request("mark", text="fault: holder lost")
    live.sims.holder.stop()  # the controller stops answering on its line
    status = live.wait_closed(reply["run_id"])

    assert status["protocol"]["state"] == "failed"
    assert status["protocol"]["reason"].startswith("holder not answering")
    _assert_ramped_and_off(live)
    events = _events(reply["run_file"])
    fault = _first(events, "fault: holder lost", "mark")
    # The holder monitor polls it during the hold ([holder] poll_interval_s), retried by the
    # link as for a move; when the link gives up, the loss is an event and the run fails.
    retries = [e for e in events if e.kind == "instrument" and e.message.startswith("holder:")]
    assert len(retries) == RetryConfig().attempts - 1
    lost = _first(events, "holder not answering", "instrument")
    off = _first(events, "output off", "bias")
    failed = _first(events, "protocol fault_hold failed: holder not answering", "state")
    assert fault.time < retries[0].time < lost.time < off.time < failed.time
    assert not [e for e in events if e.message.startswith("step 5/7 retract")]
    frames = _frames(reply["run_file"])
    assert _contiguous(frames.image_id)  # every frame until recording stopped, none lost
    assert frames.frame_time[-1] > lost.time  # recorded until the run ended
    assert status["ingest"]["frames_dropped_total"] == 0
    with h5py.File(reply["run_file"], "r") as f:  # polled until the loss (every 0.5 wall s)
        position_time = f["/entry/instrument/holder/position/time"][()]
    assert fault.time - 2.0 * TIME_SCALE < position_time[-1] < lost.time
    print(
        f"\nholder lost: noticed {_wall(lost.time - fault.time):.2f} wall s later (in the hold);"
        f" output off {_wall(off.time - lost.time):.2f} wall s after that"
        f" ({len(retries)} retries); {len(frames.image_id)} frames kept, none lost"
    )


# ----- source-meter ----------------------------------------------------------------------------
def test_source_meter_lost_aborts_the_run_and_is_ramped_down_once_it_answers(
    live: LiveStation,
) -> None:
    from insitu_daq.sim.lineserver import TcpLineServer
    from insitu_daq.sim.sourcemeter import MAX_LINE

    reply = live.run(FAULT_HOLD.format(hold_s=3000), "source_meter_lost")
    live.wait_in_hold()
    sim = live.sims.source_meter
    port = sim.tcp_address()[1]
    live.request("mark", text="fault: source-meter lost")
    sim.stop()  # it stops answering; its output stays on at 1 V
    status = live.wait_closed(reply["run_id"])
    assert status["protocol"]["state"] == "aborted"
    assert status["protocol"]["reason"].startswith(
        "source-meter lost: source-meter unreachable after 5 attempts"
    )
    assert live.model_state()[2][0] == 1.0  # nobody can switch it off while it is gone
    back = TcpLineServer("sourcemeter", "127.0.0.1", port, sim.instrument.handle_line, MAX_LINE)
    back.start()  # the same instrument answers again on its address
    try:
        back_at = _model_time(live)
        deadline = time.monotonic() + 60
        while live.model_state()[2][0] != 0.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        _assert_ramped_and_off(live)
        zero_at = live.model_state()[1][-1][0]
    finally:
        # The daemon stops while the instrument answers: otherwise it cannot confirm the bias
        # safe, and its guardian keeps trying to reach a closed port for 10 minutes.
        live.close()
        back.stop()
    events = _events(reply["run_file"])
    fault = _first(events, "fault: source-meter lost", "mark")
    lost = _first(events, "source-meter lost (", "instrument")
    retries = [e for e in events if e.message.startswith("source-meter retry ")]
    gave_up = _first(events, "source-meter unreachable after 5 attempts", "instrument")
    aborted = _first(events, "protocol fault_hold aborted: source-meter lost", "state")
    assert fault.time < lost.time < gave_up.time < aborted.time
    # 5 attempts: the one that found it lost, 3 retries announced, the last one gave up
    assert len(retries) == RetryConfig().attempts - 2
    frames = _frames(reply["run_file"])
    assert _contiguous(frames.image_id) and frames.frame_time[-1] > retries[-1].time
    times, _ = _bias_log(reply["run_file"])
    assert times[-1] < gave_up.time  # no readings while it was gone (a gap, not made up)
    print(
        f"\nsource-meter lost: noticed {_wall(lost.time - fault.time):.2f} wall s after the"
        f" fault; run aborted {_wall(aborted.time - fault.time):.2f} wall s after it"
        f" ({len(retries) + 1} retries); ramped to 0 V and off"
        f" {_wall(zero_at - back_at):.2f} wall s after it answered again;"
        f" {len(frames.image_id)} frames kept, none lost"
    )


# ----- detector --------------------------------------------------------------------------------
def test_a_silent_detector_is_recorded_and_the_run_goes_on(live: LiveStation) -> None:
    reply = live.run(FAULT_HOLD.format(hold_s=200), "detector_silent")
    live.wait_in_hold()
    camera = live.sims.camera
    live.request("mark", text="fault: detector silent")
    camera.stop()  # no `end` message: a hung detector, a pulled cable
    time.sleep(3.0)  # longer than detector.silent_after_s (2 s)
    silent_status = live.request("status")
    _restart_camera(live, camera.port)
    status = live.wait_closed(reply["run_id"])

    assert status["protocol"]["state"] == "finished"  # the hold went on, biased
    assert silent_status["ingest"]["detector_silences_total"] == 1
    _assert_ramped_and_off(live)
    events = _events(reply["run_file"])
    fault = _first(events, "fault: detector silent", "mark")
    silent = _first(events, "detector silent: no image since", "instrument")
    back = _first(events, "detector back: no image from", "instrument")
    frames = _frames(reply["run_file"])
    before, after = frames.series()
    last_received = frames.received_time[len(before) - 1]
    since = float(silent.message.split("since ")[1].split(" s")[0])
    start, end = map(float, back.message.removesuffix(" s").split("from ")[1].split(" s to "))
    assert since == start
    assert abs(since - last_received) < 1e-3  # silent since the last image arrived
    assert since < fault.time + 1.0 * TIME_SCALE
    assert silent.time - since >= 2.0 * TIME_SCALE  # declared after silent_after_s, once
    assert end - start >= 3.0 * TIME_SCALE
    assert abs(end - frames.received_time[len(before)]) < 1e-3  # ...to the first image after
    assert _contiguous(before) and _contiguous(after)  # both series whole
    times, _ = _bias_log(reply["run_file"])
    during = times[(times > start) & (times < end)]
    gaps = np.diff(np.concatenate(([start], during, [end])))
    assert gaps.max() < 1.0 * TIME_SCALE  # the bias log went on: it does not need frames
    print(
        f"\ndetector silent: event {_wall(silent.time - since):.2f} wall s after the last image;"
        f" bias log max gap during the silence {_wall(gaps.max()) * 1e3:.0f} ms;"
        f" {len(before)} + {len(after)} frames kept; silence {_wall(end - start):.2f} wall s"
    )


def test_a_detector_restarted_mid_run_adds_a_new_series_to_the_same_file(
    live: LiveStation,
) -> None:
    reply = live.run(FAULT_HOLD.format(hold_s=100), "detector_restart")
    live.wait_in_hold()
    camera = live.sims.camera
    time.sleep(0.5)
    live.request("mark", text="fault: detector restarted")
    camera.stop()  # the camera process dies mid-series (no `end`)...
    _restart_camera(live, camera.port)  # ...and its replacement numbers series afresh
    status = live.wait_closed(reply["run_id"])

    assert status["protocol"]["state"] == "finished"
    assert status["ingest"]["frames_dropped_total"] == 0
    assert status["ingest"]["frames_missing_total"] == 0
    events = _events(reply["run_file"])
    fault = _first(events, "fault: detector restarted", "mark")
    new_series = _first(events, "new detector series 1 (", "instrument")
    assert "from image_id 0; the previous one was 1 (" in new_series.message
    frames = _frames(reply["run_file"])
    series = frames.series()
    assert len(series) == 2  # told apart by their series_date (both are series 1)
    before, after = series
    assert _contiguous(before) and _contiguous(after) and after[0] == 0
    assert np.all(np.diff(frames.frame_time) > 0)
    first_after = frames.frame_time[len(before)]
    assert fault.time < first_after <= new_series.time
    print(
        f"\ndetector restarted: {len(before)} + {len(after)} frames kept, none dropped;"
        f" first frame of the new series {_wall(first_after - fault.time):.2f} wall s after"
        " the restart"
    )


# ----- disk ------------------------------------------------------------------------------------
STALL_S = 3.0


@pytest.fixture
def strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.skip("strace not installed: nothing else here stalls one process's disk writes")
    return path


def _slow_writes(stats: dict) -> tuple[int, float]:
    """HDF5 writes that took longer than the histogram's last bound (1 s), and flush seconds."""
    writes = stats["hdf5_write_seconds"]
    return writes["count"] - writes["cumulative_counts"][-1], stats["hdf5_flush_seconds"]["sum"]


def test_a_disk_stalled_for_seconds_loses_no_frame_and_no_bias_sample(
    live: LiveStation, strace: str
) -> None:
    reply = live.run(FAULT_HOLD.format(hold_s=200), "slow_disk")
    status = live.wait_in_hold()
    time.sleep(0.5)
    slow_before, flush_before = _slow_writes(live.request("status")["ingest"])
    live.request("mark", text="fault: disk stalled")
    # The ingest process's next pwrite64 (HDF5 writes through it) is held STALL_S at the
    # kernel's syscall entry by ptrace, as a stalled disk holds it; its other threads (ZeroMQ's
    # receivers) and the daemon run on. A real process, a real syscall, a real stall.
    tracer = subprocess.Popen(
        [strace, "-qq", "-f", "-p", str(status["ingest"]["pid"]), "-o", "/dev/null",
         "-e", "trace=pwrite64", "-e", f"inject=pwrite64:delay_enter={STALL_S:g}s:when=1"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        during = live.request("status")  # the daemon answers while its writer is stuck
        time.sleep(STALL_S + 0.5)
    finally:
        tracer.send_signal(signal.SIGINT)  # detach
        _, tracer_errors = tracer.communicate(timeout=10)
    assert "Operation not permitted" not in tracer_errors, tracer_errors
    final = live.wait_closed(reply["run_id"])

    assert final["protocol"]["state"] == "finished"
    assert during["protocol"]["step_kind"] == "hold"
    slow_after, flush_after = _slow_writes(final["ingest"])
    stalled_write = slow_after > slow_before or flush_after - flush_before >= STALL_S
    assert stalled_write, "no write or flush of the ingest was held: the fault did not happen"
    ingest = final["ingest"]
    assert ingest["frames_dropped_total"] == 0 and ingest["frames_missing_total"] == 0
    assert ingest["records_dropped_total"] == 0  # no bias sample or event lost on the way
    frames = _frames(reply["run_file"])
    assert _contiguous(frames.image_id)  # frames of the stall waited in ZeroMQ's queues
    # The frames of the stall waited in ZeroMQ's queues (the detector's and the ingest's)...
    waited = frames.received_time - frames.frame_time
    assert waited.max() > 0.5 * STALL_S * TIME_SCALE
    # ...and are timed by the detector's clock, not by when the stalled writer got to them.
    detector_steps = np.diff(frames.detector_mid) * TIME_SCALE
    assert np.allclose(np.diff(frames.frame_time), detector_steps, atol=1e-3)
    events = _events(reply["run_file"])
    fault = _first(events, "fault: disk stalled", "mark")
    assert not [e for e in events if "detector silent" in e.message]  # the writer, not it
    times, _ = _bias_log(reply["run_file"])
    around = times[(times > fault.time) & (times < fault.time + (STALL_S + 1.0) * TIME_SCALE)]
    assert len(around) > 0
    gap = np.diff(np.concatenate(([fault.time], around))).max()
    assert gap < 1.0 * TIME_SCALE  # the bias is read by the daemon, not by the stalled writer
    print(
        f"\nslow disk: one write held {STALL_S:g} s; {len(frames.image_id)} frames kept, none"
        f" lost; the longest a frame waited to be written {_wall(waited.max()):.2f} s;"
        f" bias log largest gap {_wall(gap) * 1e3:.0f} ms; records dropped 0;"
        f" flush seconds +{flush_after - flush_before:.2f},"
        f" writes over 1 s +{slow_after - slow_before}"
    )


# ----- the daemon stopped or killed -------------------------------------------------------------
def _follow(live: LiveStation, tmp_path: Path) -> subprocess.Popen[str]:
    """`insitu-daq run` of a long hold, as the operator's terminal runs it."""
    protocol = tmp_path / "long_hold.yaml"
    protocol.write_text(FAULT_HOLD.format(hold_s=3000))
    return subprocess.Popen(
        [*module_command("insitu_daq"), "run", str(protocol),
         "--config", str(tmp_path / "station.toml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_sigterm_of_the_daemon_ramps_down_and_closes_the_run_with_its_reason(
    live: LiveStation, tmp_path: Path
) -> None:
    runner = _follow(live, tmp_path)
    try:
        status = live.wait_in_hold()
        run_file = status["run_file"]
        time.sleep(0.5)
        live.request("mark", text="fault: SIGTERM")
        live.process.send_signal(signal.SIGTERM)
        assert live.process.wait(timeout=60) == 0, live.daemon_log()
        output, _ = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()
    _assert_ramped_and_off(live)
    events = _events(run_file)
    fault = _first(events, "fault: SIGTERM", "mark")
    aborting = _first(events, "aborting: daemon stopping", "state")
    off = _first(events, "output off", "bias")
    aborted = _first(events, "protocol fault_hold aborted: daemon stopping", "state")
    assert fault.time < aborting.time < off.time < aborted.time
    frames = _frames(run_file)
    assert _contiguous(frames.image_id)
    level_time, level = _output_level(run_file)
    ramp = level[level_time > fault.time]  # the ramp-down is in the file, step by step
    assert ramp[-1] == 0.0 and len(ramp) >= 1.0 / RAMP_STEP_V - 1
    assert np.all(np.diff(np.concatenate(([1.0], ramp))) >= -RAMP_STEP_V - 1e-9)
    with h5py.File(run_file, "r") as f:
        assert f["/entry/end_time"][()].decode()  # closed, not just flushed
    log_text = (live.data_dir / LOG_FILE_NAME).read_text()
    assert "stopped with the bias safe; standing down" in log_text
    # The operator's terminal says how the run ended (the daemon's last status), exit code 1.
    assert runner.returncode == 1
    assert output.splitlines()[-1].endswith(": aborted: daemon stopping"), output
    print(
        f"\nSIGTERM: at 0 V {_wall(level_time[-1] - fault.time):.2f} wall s and output off"
        f" {_wall(off.time - fault.time):.2f} wall s after the signal;"
        f" {len(frames.image_id)} frames kept; daemon exit code 0; `insitu-daq run` exit code"
        f" {runner.returncode}, last line {output.splitlines()[-1]!r}"
    )


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists():
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):  # exited; its reaper (not us) has not collected it yet
            return
        assert time.monotonic() < deadline, f"pid {pid} still running"
        time.sleep(0.05)


def _model_time(live: LiveStation) -> float:
    with live.sims.station.model() as model:
        return model.time_s


def test_sigkill_of_the_daemon_the_guardian_ramps_down_and_the_file_keeps_every_frame(
    live: LiveStation, tmp_path: Path
) -> None:
    runner = _follow(live, tmp_path)
    try:
        status = live.wait_in_hold()
        run_file, guardian, ingest = (
            status["run_file"], status["guardian"]["pid"], status["ingest"]["pid"]
        )  # fmt: skip
        time.sleep(1.0)  # more than one flush interval into the hold
        live.request("mark", text="fault: SIGKILL of the daemon")
        killed_at = _model_time(live)
        live.process.send_signal(signal.SIGKILL)
        live.process.wait(timeout=10)
        _wait_gone(guardian, 30.0)  # it made the source-meter safe, then left
        _wait_gone(ingest, 30.0)  # it closed the run file when its daemon was gone
        output, _ = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()
    _assert_ramped_and_off(live)
    _, history, _ = live.model_state()
    zero_at = history[-1][0]  # model (station) seconds of the last change: to 0 V
    log_text = (live.data_dir / LOG_FILE_NAME).read_text()
    assert "its pipe closed without 'clean'" in log_text
    assert "output ON at +1 V" in log_text and "output OFF" in log_text
    frames = _frames(run_file)
    assert _contiguous(frames.image_id)
    events = _events(run_file)
    fault = _first(events, "fault: SIGKILL of the daemon", "mark")
    assert frames.frame_time[-1] > fault.time  # frames up to the kill, closed by the ingest
    ended = [e for e in events if e.kind == "state" and "protocol fault_hold " in e.message]
    assert [e.message for e in ended] == ["protocol fault_hold started (7 steps)"]  # no end...
    gone = events[-1]  # ...but the ingest process closing the file says why it ended
    assert (gone.kind, gone.message) == (
        "error",
        f"the daemon (pid {live.process.pid}) is gone: run closed by the ingest process;"
        " the bias is left to its guardian (guardian.log), if one is alive",
    )
    with h5py.File(run_file, "r") as f:
        assert f["/entry/end_time"][()].decode()
    assert runner.returncode == 1 and output.splitlines()[-1] == "no status from the daemon"
    print(
        f"\nSIGKILL daemon: at 0 V and output off {_wall(zero_at - killed_at):.2f} wall s after"
        f" the kill (guardian); {len(frames.image_id)} frames kept, the last"
        f" {_wall(frames.frame_time[-1] - fault.time):.2f} wall s after the kill;"
        f" `insitu-daq run` exit code 1: {output.splitlines()[-1]!r}"
    )


def test_sigkill_of_daemon_and_guardian_leaves_the_bias_on_until_insitu_daq_safe(
    live: LiveStation, tmp_path: Path
) -> None:
    config = tmp_path / "station.toml"
    safe = [*module_command("insitu_daq"), "safe", "--config", str(config),
            "--time-scale", str(TIME_SCALE)]  # fmt: skip
    reply = live.run(FAULT_HOLD.format(hold_s=3000), "both_killed")
    status = live.wait_in_hold()
    refused = subprocess.run(safe, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1  # a daemon drives the source-meter: it is asked to abort
    assert "a daemon answers on tcp://127.0.0.1:" in refused.stderr
    live.request("mark", text="fault: SIGKILL of daemon and guardian")
    # Stopped first, so that it cannot replace its guardian between the two kills (as when
    # both die at once: the OOM killer, `systemctl kill -s KILL` of the whole unit).
    live.process.send_signal(signal.SIGSTOP)
    os.kill(status["guardian"]["pid"], signal.SIGKILL)
    live.process.send_signal(signal.SIGKILL)
    live.process.wait(timeout=10)
    _wait_gone(status["guardian"]["pid"], 10.0)
    _wait_gone(status["ingest"]["pid"], 30.0)
    time.sleep(2.0)  # 40 station seconds: nothing is left to ramp it down

    volts, amps, _ = live.model_state()[2]
    assert volts == 1.0 and amps != 0.0  # still biased, output on
    _, history_before, _ = live.model_state()
    assert history_before[-1][1] == 1.0
    began = time.monotonic()
    recovery = subprocess.run(safe, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - began
    assert recovery.returncode == 0, recovery.stderr
    assert recovery.stdout.endswith(": at 0 V, output off\n")
    assert "output ON at +1 V; ramping to 0 V" in recovery.stderr
    _assert_ramped_and_off(live)
    again = subprocess.run(safe, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "output already off" in again.stderr
    frames = _frames(reply["run_file"])
    assert _contiguous(frames.image_id)
    last = _events(reply["run_file"])[-1]
    assert last.message.startswith(f"the daemon (pid {live.process.pid}) is gone: run closed")
    print(
        f"\nSIGKILL daemon + guardian: output still on at +{volts:g} V 2 s later;"
        f" `insitu-daq safe` ramped it down and off in {took:.2f} wall s (a new process);"
        f" {len(frames.image_id)} frames kept"
    )


def test_insitu_daq_safe_says_in_one_line_when_the_source_meter_cannot_be_reached(
    tmp_path: Path,
) -> None:
    import socket

    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    config = tmp_path / "station.toml"
    config.write_text(
        f'data_dir = "runs"\n[source_meter]\nresource = "TCPIP::127.0.0.1::{port}::SOCKET"\n'
        "[retry]\nattempts = 2\nfirst_delay_s = 0.05\nmax_delay_s = 0.1\n"
        '[api]\ncontrol = "tcp://127.0.0.1:1"\n'
    )
    result = subprocess.run(
        [*module_command("insitu_daq"), "safe", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"insitu-daq: error: source-meter TCPIP::127.0.0.1::{port}::SOCKET not reached:"
        " its output may still be on"
    )
