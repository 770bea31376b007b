"""One daemon per station, end to end: `insitu-daq sim` and `insitu-daq daemon` as real
processes on real sockets, a second daemon and a second sim started as a user would, the run
file read back.

The fault (issue 9): a second daemon started for the same station connected its ingest to
the detector before it failed on the metrics port, and the detector's PUSH socket dealt the
running recording's frames between the two (29 frames lost in ~3 s). Now it is refused before
it starts anything, and the running recording loses nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from insitu_daq.app.children import ChildProcess, terminate
from insitu_daq.app.demo import free_ports, station_toml, wait_for_daemon
from insitu_daq.control.guardian import LOG_FILE_NAME
from insitu_daq.core.config import load_config
from insitu_daq.core.module_command import module_command
from insitu_daq.core.stationlock import LOCK_DIR_ENV, daemon_resources
from insitu_daq.service.api import ControlClient

EXE = module_command("insitu_daq")
FINAL = ("finished", "aborted", "failed")
INSTRUMENTS = ("source_meter", "holder", "microscope", "camera")

RECORDING = """
name: recording
steps:
  - approach: {speed_nm_s: 500, max_travel_nm: 5000}
  - acquire: start
  - bias: {volts: 1.0, rate_volts_per_s: 1.0}
  - hold: {duration_s: 3000}
"""

# A slow ramp (wall seconds at time scale 1), so that the guardian of a killed daemon is
# still ramping down while the next daemon tries to start.
SLOW_RAMP_V_PER_S = 0.1
HOLDING = f"""
name: holding
steps:
  - bias: {{volts: 1.0, rate_volts_per_s: {SLOW_RAMP_V_PER_S}}}
  - hold: {{duration_s: 3000}}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}  # with the session's lock folder


@dataclass
class Station:
    """`insitu-daq sim` on fixed ports and the station TOML of a daemon for it."""

    sim: subprocess.Popen[str]
    ports: dict[str, int]
    config: Path
    data_dir: Path
    time_scale: float

    @property
    def control(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['control']}"

    def sim_command(self) -> list[str]:
        return [
            *EXE, "sim", "--time-scale", str(self.time_scale),
            "--source-meter-port", str(self.ports["source_meter"]),
            "--holder-port", str(self.ports["holder"]),
            "--microscope-port", str(self.ports["microscope"]),
            "--camera-port", str(self.ports["camera"]),
            "--frame-size", "64", "--frame-rate", "40",
        ]  # fmt: skip

    def daemon_command(self) -> list[str]:
        return [*EXE, "daemon", "--config", str(self.config), "--time-scale", str(self.time_scale)]


def _wait_printed(process: subprocess.Popen[str], text: str, timeout_s: float = 30.0) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    for line in process.stdout:
        if text in line or time.monotonic() > deadline:
            return
    raise AssertionError(f"exited (code {process.wait()}) before printing {text!r}")


@contextlib.contextmanager
def _station(tmp_path: Path, time_scale: float, limits: str = "") -> Iterator[Station]:
    names = [*INSTRUMENTS, "control", "events", "metrics"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    config = tmp_path / "station.toml"
    config.write_text(station_toml(ports, tmp_path / "runs", time_scale) + limits)
    station = Station(None, ports, config, tmp_path / "runs", time_scale)  # type: ignore[arg-type]
    station.sim = subprocess.Popen(
        station.sim_command(), stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        _wait_printed(station.sim, "Ctrl-C to stop.")
        yield station
    finally:
        terminate(station.sim)
        station.sim.stdout.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def _daemon(station: Station, log: Path) -> Iterator[subprocess.Popen[str]]:
    with log.open("w") as out:
        daemon = subprocess.Popen(
            station.daemon_command(), stdout=out, stderr=subprocess.STDOUT, text=True, env=_env()
        )
        try:
            try:
                wait_for_daemon(
                    station.control, ChildProcess("daemon", daemon, log), timeout_s=60.0
                )
            except RuntimeError as exc:
                raise AssertionError(f"{exc}\n{log.read_text()}") from None
            yield daemon
        finally:
            terminate(daemon)


def _status(station: Station) -> dict:
    with ControlClient(station.control, timeout_s=10.0) as client:
        return client.request("status")


def _wait_for(station: Station, what: str, condition, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = _status(station)
        if condition(status):
            return status
        assert time.monotonic() < deadline, f"{what}: last status {status}"
        time.sleep(0.1)


def _refused(command: list[str]) -> tuple[str, float]:
    """Run a command that must be refused: its one-line error and how long it took."""
    began = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=_env())
    took = time.monotonic() - began
    assert result.returncode != 0, result.stdout + result.stderr
    assert result.stdout == ""  # nothing started: not even the "running" banner
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    assert result.stderr.startswith("insitu-daq: error: "), result.stderr
    return result.stderr.strip(), took


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError):  # a zombie of this test's own child is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    return False


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if not _gone(p)]}"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    """The processes `pid` started (read from /proc while it lives)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
                if ppid == pid:
                    found.append(int(entry.name))
    return found


def _lock_files_open(pid: int) -> set[str]:
    """The lock files (of this session's folder) process `pid` has open."""
    folder = os.environ[LOCK_DIR_ENV]
    names = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if os.path.dirname(target) == folder:
                names.add(os.path.basename(target))
    return names


def _assert_who_holds_what(station: Station, daemon: subprocess.Popen[str], guardian: int) -> None:
    """The daemon every lock; its guardian the source-meter's, its ingest the detector's (both
    passed on purpose); its other children (the analysis process...) none."""
    files = {r.kind: r.file_name for r in daemon_resources(load_config(station.config))}
    assert len(files) == 5  # four instruments, and the ports (one kind, checked by count)
    assert {f for f in _lock_files_open(daemon.pid) if not f.startswith("port_")} == {
        files[kind] for kind in ("detector", "source-meter", "holder", "microscope")
    }
    assert len([f for f in _lock_files_open(daemon.pid) if f.startswith("port_")]) == 3
    children = _children(daemon.pid)
    assert guardian in children
    assert _lock_files_open(guardian) == {files["source-meter"]}
    held = sorted((_lock_files_open(pid) for pid in children if pid != guardian), key=len)
    assert held[-1] == {files["detector"]}  # the ingest process
    assert all(not others for others in held[:-1]), held


def test_a_second_daemon_or_sim_is_refused_and_the_recording_loses_nothing(
    tmp_path: Path,
) -> None:
    with (
        _station(tmp_path, time_scale=20.0) as station,
        _daemon(station, tmp_path / "daemon.log") as first,
    ):
        with ControlClient(station.control, timeout_s=10.0) as client:
            run = client.request("run", protocol_text=RECORDING, format="yaml", name="recording")
        recording = _wait_for(
            station, "recording", lambda s: s["ingest"]["frames_written_total"] > 20
        )
        _assert_who_holds_what(station, first, recording["guardian"]["pid"])

        message, took = _refused(station.daemon_command())
        ports = station.ports
        assert message == (
            f"insitu-daq: error: station already served by daemon PID {first.pid}"
            f" (control tcp://127.0.0.1:{ports['control']},"
            f" events tcp://127.0.0.1:{ports['events']},"
            f" metrics http://127.0.0.1:{ports['metrics']}/metrics,"
            f" detector tcp://127.0.0.1:{ports['camera']}; config {station.config.resolve()}):"
            f" detector tcp://localhost:{ports['camera']} is in use"
        )
        print(f"second daemon refused in {took:.2f} s")

        message, _ = _refused(station.sim_command())
        assert message.startswith(
            f"insitu-daq: error: simulated station already running as sim PID {station.sim.pid}"
            f" (source_meter TCPIP::127.0.0.1::{ports['source_meter']}::SOCKET,"
        ), message
        assert message.endswith(f": port {ports['source_meter']} is in use")

        # The recording went on through both, with every frame the camera sent.
        written = recording["ingest"]["frames_written_total"]
        _wait_for(station, "more frames", lambda s: s["ingest"]["frames_written_total"] > written)
        with ControlClient(station.control, timeout_s=10.0) as client:
            client.request("abort", reason="test done")
        status = _wait_for(
            station,
            "run closed",
            lambda s: s["last_run_id"] == run["run_id"] and s["protocol"]["state"] in FINAL,
        )
        assert status["ingest"]["frames_missing_total"] == 0
        assert status["ingest"]["frames_dropped_total"] == 0
        with h5py.File(run["run_file"], "r") as f:
            ids = f["/entry/instrument/detector/image_id"][:]
        assert len(ids) > written
        assert np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids)))  # none stolen

    # The refused daemon started no guardian (nor anything after it): one daemon watched.
    guardian_log = (station.data_dir / LOG_FILE_NAME).read_text()
    assert re.findall(r"watching daemon pid (\d+)", guardian_log) == [str(first.pid)]


def test_sims_on_free_ports_never_conflict(tmp_path: Path) -> None:
    command = [*EXE, "sim", "--source-meter-port", "0", "--holder-port", "0",
               "--microscope-port", "0", "--camera-port", "0", "--frame-size", "64"]  # fmt: skip
    sims = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=_env())]
    sims.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=_env()))
    try:
        for sim in sims:
            _wait_printed(sim, "Ctrl-C to stop.")
        assert all(sim.poll() is None for sim in sims)
    finally:
        for sim in sims:
            terminate(sim)
            sim.stdout.close()  # type: ignore[union-attr]


def test_a_killed_daemons_station_is_free_once_its_guardian_made_the_bias_safe(
    tmp_path: Path,
) -> None:
    limits = f"""
[limits]
max_ramp_rate_volts_per_s = {SLOW_RAMP_V_PER_S}
"""
    with _station(tmp_path, time_scale=1.0, limits=limits) as station:
        with _daemon(station, tmp_path / "killed.log") as killed:
            with ControlClient(station.control, timeout_s=10.0) as client:
                client.request("run", protocol_text=HOLDING, format="yaml", name="holding")
            status = _wait_for(
                station,
                "holding 1 V",
                lambda s: s["protocol"]["step_kind"] == "hold" and s["bias"]["setpoint"] == 1.0,
                timeout_s=90.0,
            )
            guardian = status["guardian"]["pid"]
            others = [pid for pid in _children(killed.pid) if pid != guardian]
            killed.send_signal(signal.SIGKILL)
            killed.wait()
            # Its ingest and analysis processes close and exit; its guardian ramps 1 V down
            # at 0.1 V/s (10 s) holding the source-meter's lock.
            _wait_gone(others, 30.0)
            assert not _gone(guardian)
            message, _ = _refused(station.daemon_command())
            assert not _gone(guardian), "the guardian finished before the check: ramp slower"
            source_meter = f"TCPIP0::localhost::{station.ports['source_meter']}::SOCKET"
            assert message == (
                f"insitu-daq: error: source-meter {source_meter}"
                f" still held after daemon PID {killed.pid} exited: its bias guardian is"
                f" making the bias safe (log: {station.data_dir / LOG_FILE_NAME}); start again"
                " once it has finished"
            )

        _wait_gone([guardian], 60.0)
        with _daemon(station, tmp_path / "restarted.log") as restarted:
            bias = _status(station)["bias"]
            assert not bias["output_on"] and abs(bias["voltage"]) < 1e-3
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(timeout=30) == 0
    log = (station.data_dir / LOG_FILE_NAME).read_text()
    assert f"daemon pid {killed.pid} is gone" in log
    assert "output OFF" in log
