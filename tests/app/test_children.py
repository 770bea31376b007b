"""A child process of the demo that dies is reported with its exit code, its log's path and the
log's last lines, and the log stays on disk.

Real processes throughout: a Python child that fails, `insitu-daq daemon` refusing its config,
`insitu-daq demo` whose simulated station refuses an option, and a demo whose daemon is
SIGKILLed mid-run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from insitu_daq import __version__
from insitu_daq.app.children import ChildExitedError, check_children, child_process, log_tail
from insitu_daq.app.demo import DEMO_FILES_DIR, free_ports, wait_for_daemon
from insitu_daq.core.module_command import module_command

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_a_dead_child_is_named_with_its_exit_code_log_path_and_last_20_lines(
    tmp_path: Path,
) -> None:
    log_path = tmp_path / "worker.log"
    lines = "import sys\nfor i in range(30): print(f'line {i}')\nsys.exit(3)"
    with child_process("worker", [sys.executable, "-c", lines], log_path) as worker:
        worker.process.wait(timeout=30)
        with pytest.raises(ChildExitedError) as raised:
            check_children([worker])
    message = str(raised.value)
    first, *tail = message.splitlines()
    assert first == f"the worker exited with code 3; last 20 lines of its log {log_path}:"
    assert tail == [f"    line {i}" for i in range(10, 30)]
    assert log_tail(log_path, 2) == ["line 28", "line 29"]  # the log is kept


def test_wait_for_daemon_shows_why_the_daemon_refused_its_config(tmp_path: Path) -> None:
    control, events, metrics = free_ports(3)
    config = tmp_path / "station.toml"
    config.write_text(
        f'name = "refused"\ndata_dir = "{tmp_path / "runs"}"\n'
        f'[api]\ncontrol = "tcp://127.0.0.1:{control}"\nevents = "tcp://127.0.0.1:{events}"\n'
        f"metrics_port = {metrics}\n[analysis]\nmax_rate_hz = -1\n"
    )
    command = module_command("insitu_daq", "daemon", "--config", str(config))
    with (
        child_process("daemon", command, tmp_path / "daemon.log") as daemon,
        pytest.raises(ChildExitedError) as raised,
    ):
        wait_for_daemon(f"tcp://127.0.0.1:{control}", daemon, timeout_s=60)
    message = str(raised.value)
    assert message.startswith(
        f"the daemon exited with code 1; last 1 lines of its log {tmp_path / 'daemon.log'}:"
    )
    assert "insitu-daq: error: analysis.max_rate_hz: Input should be greater than 0" in message


def test_the_demo_shows_the_log_of_a_simulated_station_that_dies_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        module_command("insitu_daq", "demo", "--frame-rate", "0", "--no-figure",
                       "--data-dir", str(tmp_path)),
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert result.returncode == 1
    sim_log = tmp_path / DEMO_FILES_DIR / "sim.log"
    assert result.stderr == (
        f"insitu-daq: error: the simulated station exited with code 1; last 1 lines of its log"
        f" {sim_log}:\n    insitu-daq: error: frame rate must be positive\n"
    )
    assert sim_log.read_text() == "insitu-daq: error: frame rate must be positive\n"
    # the daemon starts only once the station is up: none (and no bias guardian) was started
    assert not (tmp_path / DEMO_FILES_DIR / "daemon.log").exists()


def _children(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.name.isdigit():
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = _children(frontier.pop())
        found += children
        frontier += children
    return found


def _argv(pid: int) -> list[str]:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes()).decode().split("\0")
    except OSError:
        return []


@contextlib.contextmanager
def _killed_at_the_end() -> Iterator[list[int]]:
    """Teardown of processes this test started (directly or through the demo), by pid; one
    whose command line changed since it was listed is another process by now and left alone."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        seen = {pid: _argv(pid) for pid in pids}
        for pid, argv in seen.items():
            if argv and _argv(pid) == argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _demo_under_way(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """The no-bias control demo, once its first status line says the run is under way; killed
    on the way out if it is still running."""
    demo = subprocess.Popen(
        module_command("insitu_daq", "demo", "--protocol", "lno_control_0v.yaml",
                       "--time-scale", "10", "--frame-size", "256", "--no-figure",
                       "--data-dir", str(tmp_path)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        if not any(line.startswith("[") for line in demo.stdout):
            raise AssertionError(f"the demo did not start a run: {demo.communicate()}")
        yield demo
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_the_demo_shows_the_log_of_a_daemon_killed_mid_run(tmp_path: Path) -> None:
    with _demo_under_way(tmp_path) as demo, _killed_at_the_end() as leftovers:
        (daemon,) = (pid for pid in _children(demo.pid) if "daemon" in _argv(pid))
        leftovers += [*_descendants(daemon), *_children(demo.pid)]  # guardian, ingest, ...
        os.kill(daemon, signal.SIGKILL)
        out, err = demo.communicate(timeout=90)
    assert demo.returncode == 1, out + err
    assert "the daemon has stopped" in out  # seen at once, not after the status silence
    daemon_log = tmp_path / DEMO_FILES_DIR / "daemon.log"
    first, *tail = err.splitlines()
    assert first == (
        f"insitu-daq: error: the daemon exited with code -9; last {len(tail)} lines of its log"
        f" {daemon_log}:"
    )
    # The guardian (its stderr is the daemon's log) may still add lines after the demo read it.
    assert 1 <= len(tail) <= 20 and all(line.startswith("    ") for line in tail)
    log_text = daemon_log.read_text()
    assert "\n".join(line[4:] for line in tail) in log_text
    assert f"insitu-daq {__version__}: daemon running" in log_text
    assert list(tmp_path.glob("*_lno_control_0v.h5"))  # the interrupted run's file is kept


def test_a_terminated_demo_aborts_its_run_and_leaves_no_process_behind(tmp_path: Path) -> None:
    with _demo_under_way(tmp_path) as demo, _killed_at_the_end() as leftovers:
        children = _descendants(demo.pid)  # station, daemon, web view, guardian, workers
        leftovers += children
        assert len(children) >= 4, [_argv(pid) for pid in children]
        demo.terminate()
        out, err = demo.communicate(timeout=90)
        assert demo.returncode == 1, out + err
        assert "interrupted: aborting the run" in out
        alive = [pid for pid in children if _argv(pid) and Path(f"/proc/{pid}").exists()]
        alive = [pid for pid in alive if "(Z)" not in _state_of(pid)]
        assert alive == [], [_argv(pid) for pid in alive]
    (run_file,) = tmp_path.glob("*_lno_control_0v.h5")
    with h5py.File(run_file, "r") as f:
        messages = [m.decode() for m in f["/entry/events/message"][:]]
    assert any("aborted" in m for m in messages), messages[-5:]


def _state_of(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "(gone)"
    return f"({stat.rsplit(')', 1)[1].split()[0]})"
