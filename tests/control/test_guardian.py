"""The bias guardian: the source-meter is made safe even when the daemon is killed with SIGKILL.

Everything is real: the simulated Keithley 2400 served over TCP in this process (its model's
`bias_history` is the ground truth of what reached the sample), the guardian as a real process
started through `Guardian` by a real parent process, and in the last test the real daemon
(`insitu-daq daemon`) driven through its real control API. Parents are killed with SIGKILL,
which no handler in them can catch: whatever makes the bias safe afterwards is the guardian.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from insitu_daq.control import staircase
from insitu_daq.control.guardian import LOG_FILE_NAME
from insitu_daq.control.instruments import SourceMeter
from insitu_daq.control.instruments.factory import open_source_meter
from insitu_daq.core.config import SourceMeterConfig, StationConfig, parse_config
from insitu_daq.core.module_command import module_command
from insitu_daq.service.api import ControlClient
from insitu_daq.sim.launch import SimulatedInstruments, StationPorts
from insitu_daq.sim.sourcemeter import SimulatedSourceMeter
from insitu_daq.sim.station import SimStation

STEP_V = 0.05
MAX_RATE = 1.0  # V per station second
TIME_SCALE = 10.0
START_V = 3.0
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

# The daemon's part in the guardian's life, and nothing else: start it, wait until it watches,
# report its pid, stand it down on "clean" (from the test, on stdin), otherwise just live.
STAND_IN_PARENT = """
import sys, time
from insitu_daq.core.config import StationConfig
from insitu_daq.control.guardian import Guardian

guardian = Guardian(StationConfig.model_validate_json(sys.argv[1]), float(sys.argv[2]))
guardian.start()
guardian.wait_ready()
print("ready", guardian.pid, flush=True)
for line in sys.stdin:
    if line.strip() == "clean":
        guardian.stand_down()
        print("stood down", guardian.exit_code, flush=True)
    elif line.strip() == "pid":
        print("pid", guardian.pid, guardian.restarts_total, flush=True)
time.sleep(600)
"""


# ----- processes -------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name; None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped has exited too: our orphans' reaper is not ours)."""
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (read from /proc, before `pid` dies and they are orphaned)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _kill_if_alive(pids: list[int]) -> None:
    """Teardown of processes this test started (directly or through the daemon), by pid."""
    for pid in pids:
        if not _gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ----- the simulated source-meter --------------------------------------------------------------
@pytest.fixture
def station() -> SimStation:
    return SimStation(time_scale=TIME_SCALE)


@pytest.fixture
def source_meter(
    station: SimStation, request: pytest.FixtureRequest
) -> Iterator[SimulatedSourceMeter]:
    model = getattr(request, "param", "keithley2400")  # a test may ask for another model
    with SimulatedSourceMeter(station, port=0, model=model) as served:
        yield served


def _config(resource: str, data_dir: Path, model: str = "keithley2400") -> StationConfig:
    return parse_config(
        {
            "data_dir": str(data_dir),
            "source_meter": {"model": model, "resource": resource, "timeout_s": 2.0},
            "limits": {"max_ramp_rate_volts_per_s": MAX_RATE, "ramp_step_volts": STEP_V},
            "retry": {"attempts": 4, "first_delay_s": 0.1, "max_delay_s": 0.5},
        }
    )


def _meter(resource: str, model: str) -> contextlib.closing[SourceMeter]:
    return contextlib.closing(open_source_meter(SourceMeterConfig(model=model, resource=resource)))


def _switch_on(resource: str, volts: float, model: str = "keithley2400") -> None:
    """Output on at `volts`, as a daemon would have left it (through the driver, then closed)."""
    with _meter(resource, model) as meter:
        meter.configure_voltage_source(compliance_amperes=100e-9)
        meter.output_on()
        staircase.ramp(meter.set_voltage, 0.0, volts, 0.5, MAX_RATE * TIME_SCALE * 10)


def _output(resource: str, model: str = "keithley2400") -> tuple[bool, float]:
    with _meter(resource, model) as meter:
        return meter.output_enabled(), meter.voltage_setpoint()


def _history_since(station: SimStation, index: int) -> list[tuple[float, float]]:
    with station.model() as m:
        return list(m.bias_history)[index:]


def _history_length(station: SimStation) -> int:
    with station.model() as m:
        return len(m.bias_history)


def _assert_ramped_down(history: list[tuple[float, float]], from_volts: float) -> None:
    """A staircase from `from_volts` to 0 V: steps of at most STEP_V, never faster than MAX_RATE.

    history[0] is the last entry before the ramp (the level it started from).
    """
    times = [t for t, _ in history]
    volts = [v for _, v in history]
    assert volts[0] == pytest.approx(from_volts, abs=1e-6)
    assert volts[-1] == 0.0
    assert len(volts) - 1 >= from_volts / STEP_V - 1e-9, f"too few steps: {volts}"
    for (_, v0), (t1, v1) in itertools.pairwise(history):
        assert v1 < v0, f"not a ramp down at {t1:.3f} s: {v0} -> {v1}"
        assert v0 - v1 <= STEP_V + 1e-9, f"a step of {v0 - v1:.4f} V at {t1:.3f} s"
    # Model (station) seconds: each step after the previous by at least step / rate.
    for (t0, v0), (t1, v1) in itertools.pairwise(history[1:]):
        assert t1 - t0 >= 0.99 * (v0 - v1) / MAX_RATE, f"ramp too fast at {t1:.3f} s"
    assert times[-1] - times[1] >= 0.99 * (from_volts - STEP_V) / MAX_RATE


def _connections(caplog: pytest.LogCaptureFixture) -> int:
    """Clients the simulated source-meter accepted (its server logs each one)."""
    return sum(
        "client" in r.getMessage() and r.getMessage().endswith("connected")
        and "disconnected" not in r.getMessage()
        for r in caplog.records
        if r.name == "insitu_daq.sim.lineserver"
    )  # fmt: skip


@contextlib.contextmanager
def _stand_in_parent(config: StationConfig) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """A process that starts a guardian and then just lives; yields it and the guardian pids.

    Tests append the pid of any replacement guardian, so that teardown waits for it too.
    """
    parent = subprocess.Popen(
        [sys.executable, "-c", STAND_IN_PARENT, config.model_dump_json(), str(TIME_SCALE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    guardians: list[int] = []
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.startswith("ready"), f"stand-in parent failed: {line!r}"
        guardians.append(int(line.split()[1]))
        yield parent, guardians
    finally:
        parent.kill()
        parent.wait()
        parent.stdin.close()  # type: ignore[union-attr]
        parent.stdout.close()  # type: ignore[union-attr]
        for pid in guardians:
            _wait_gone(pid, 10.0)
        _kill_if_alive(guardians)


# ----- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("source_meter", ["keithley2400", "keithley2450"], indirect=True)
def test_sigkilled_parent_leaves_the_output_ramped_down_and_off(
    station: SimStation,
    source_meter: SimulatedSourceMeter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Also against the 2450: the guardian drives whichever model the config names.
    caplog.set_level(logging.INFO, logger="insitu_daq.sim.lineserver")
    resource, model = source_meter.endpoints["visa"], source_meter.model
    _switch_on(resource, START_V, model)
    config = _config(resource, tmp_path, model)

    with _stand_in_parent(config) as (parent, [guardian_pid]):
        connections = _connections(caplog)
        time.sleep(0.3)  # the guardian watches; it must not touch the instrument meanwhile
        assert _connections(caplog) == connections, "the guardian connected while its parent ran"
        assert _output(resource, model) == (True, START_V)
        before = _history_length(station)

        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(guardian_pid, 10.0), "the guardian did not finish"

    assert _output(resource, model) == (False, 0.0)
    _assert_ramped_down(_history_since(station, before - 1), START_V)
    log_text = (tmp_path / LOG_FILE_NAME).read_text()
    assert "output ON at +3 V" in log_text
    assert "output OFF" in log_text


def test_clean_shutdown_message_leaves_the_instrument_untouched(
    station: SimStation,
    source_meter: SimulatedSourceMeter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="insitu_daq.sim.lineserver")
    resource = source_meter.endpoints["visa"]
    _switch_on(resource, START_V)  # on, so that touching it at all would show
    config = _config(resource, tmp_path)

    with _stand_in_parent(config) as (parent, [guardian_pid]):
        connections = _connections(caplog)
        before = _history_since(station, 0)
        assert parent.stdin is not None and parent.stdout is not None
        parent.stdin.write("clean\n")
        parent.stdin.flush()
        assert parent.stdout.readline().split() == ["stood", "down", "0"]
        assert _gone(guardian_pid)
        assert _connections(caplog) == connections, "the guardian connected after 'clean'"
        assert _history_since(station, 0) == before

    assert _output(resource) == (True, START_V)
    assert "standing down" in (tmp_path / LOG_FILE_NAME).read_text()


def test_a_guardian_killed_while_its_parent_lives_is_replaced(
    station: SimStation, source_meter: SimulatedSourceMeter, tmp_path: Path
) -> None:
    resource = source_meter.endpoints["visa"]
    _switch_on(resource, START_V)
    config = _config(resource, tmp_path)
    log_file = tmp_path / LOG_FILE_NAME

    with _stand_in_parent(config) as (parent, guardians):
        assert parent.stdin is not None and parent.stdout is not None
        # The guardian says "ready" before it logs that it watches; a SIGKILL in between
        # (once seen under CI load) would leave its line out of the file counted below.
        deadline = time.monotonic() + 15.0
        while "watching daemon pid" not in log_file.read_text():
            assert time.monotonic() < deadline, "the first guardian never logged"
            time.sleep(0.02)
        os.kill(guardians[0], signal.SIGKILL)
        assert _wait_gone(guardians[0], 5.0)
        deadline = time.monotonic() + 15.0
        while log_file.read_text().count("watching daemon pid") < 2:  # the replacement's
            assert time.monotonic() < deadline, "no replacement guardian"
            time.sleep(0.05)
        parent.stdin.write("pid\n")
        parent.stdin.flush()
        _, pid, restarts = parent.stdout.readline().split()
        guardians.append(int(pid))
        assert (guardians[1] != guardians[0], restarts) == (True, "1")
        assert _output(resource) == (True, START_V)  # a killed guardian does nothing
        before = _history_length(station)

        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(guardians[1], 10.0), "the replacement guardian did not finish"

    assert _output(resource) == (False, 0.0)
    _assert_ramped_down(_history_since(station, before - 1), START_V)


PROTOCOL = """
name: guardian_kill
steps:
  - approach: {speed_nm_s: 1000, max_travel_nm: 5000}
  - bias: {volts: 2.0}
  - hold: {duration_s: 60}
"""
DAEMON_TIME_SCALE = 20.0  # the 60 s hold lasts 3 s: the test kills the daemon in it


def _station_toml(sims: SimulatedInstruments, data_dir: Path) -> str:
    holder_url = sims.holder.endpoints["url"]
    _, microscope_port = sims.microscope.endpoints["tcp"].rsplit(":", 1)
    return f"""
data_dir = "{data_dir}"
[source_meter]
resource = "{sims.source_meter.endpoints["visa"]}"
[holder]
port = "{holder_url}"
[detector]
endpoint = "{sims.camera.endpoints["stream2"]}"
default_shape = [64, 64]
geometry_timeout_s = 0.5
[microscope]
port = {microscope_port}
[limits]
max_ramp_rate_volts_per_s = {MAX_RATE}
ramp_step_volts = {STEP_V}
[retry]
attempts = 3
first_delay_s = 0.1
max_delay_s = 0.5
[api]
control = "tcp://127.0.0.1:*"
events = "tcp://127.0.0.1:*"
metrics_port = 0
"""


def _wait_for(client: ControlClient, what: str, condition, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.request("status")
        if condition(status):
            return status
        assert time.monotonic() < deadline, f"{what}: last status {status}"
        time.sleep(0.02)


@dataclass
class HoldingDaemon:
    process: subprocess.Popen[str]
    sims: SimulatedInstruments
    children: list[int]  # the guardian and the ingest process
    history_index: int  # of the model's bias history at the 2 V hold, just before the signal
    control: str  # the daemon's control endpoint


@contextlib.contextmanager
def _daemon_holding_2v(tmp_path: Path) -> Iterator[HoldingDaemon]:
    """`insitu-daq daemon` on a time-scaled simulated station, holding 2 V in a protocol."""
    sims = SimulatedInstruments.create(
        ports=StationPorts(0, 0, 0, 0),
        time_scale=DAEMON_TIME_SCALE,
        frame_shape=(64, 64),
        frame_rate_hz=5.0,
    )
    config_path = tmp_path / "station.toml"
    with sims:
        config_path.write_text(_station_toml(sims, tmp_path / "runs"))
        daemon = subprocess.Popen(
            module_command("insitu_daq", "daemon", "--config", str(config_path),
                           "--time-scale", str(DAEMON_TIME_SCALE)),
            stdout=subprocess.PIPE,
            stderr=(tmp_path / "daemon.log").open("w"),
            text=True,
            env=ENV,
        )  # fmt: skip
        children: list[int] = []
        try:
            assert daemon.stdout is not None
            control = None
            for line in daemon.stdout:
                if line.split()[:1] == ["control"]:
                    control = line.split()[1]
                    break
            assert control, f"daemon did not start: {(tmp_path / 'daemon.log').read_text()}"
            children = _descendants(daemon.pid)
            with ControlClient(control, timeout_s=5.0) as client:
                client.request("run", protocol_text=PROTOCOL, format="yaml", name="kill")
                _wait_for(
                    client,
                    "hold at 2 V",
                    lambda s: s["protocol"]["step_kind"] == "hold" and s["bias"]["setpoint"] == 2.0,
                    timeout_s=20.0,
                )
            with sims.station.model() as m:
                assert m.applied_bias() == pytest.approx(2.0)  # holding: nothing ramped down yet
                index = len(m.bias_history)
            yield HoldingDaemon(daemon, sims, children, index, control)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            daemon.stdout.close()  # type: ignore[union-attr]
            _kill_if_alive(children)


def test_sigkill_of_the_daemon_mid_hold_ramps_the_bias_down(tmp_path: Path) -> None:
    with _daemon_holding_2v(tmp_path) as daemon:
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        for pid in daemon.children:
            assert _wait_gone(pid, 15.0), f"pid {pid} outlived the daemon"

        assert _output(daemon.sims.source_meter.endpoints["visa"]) == (False, 0.0)
        _assert_ramped_down(_history_since(daemon.sims.station, daemon.history_index - 1), 2.0)
    log_text = (tmp_path / "runs" / LOG_FILE_NAME).read_text()
    assert "making the source-meter safe" in log_text
    assert "output OFF" in log_text


def test_status_says_whether_a_guardian_covers_the_bias(tmp_path: Path) -> None:
    # An operator (and, through the metrics, the InsituDaqGuardianDown alert) must see it.
    with _daemon_holding_2v(tmp_path) as daemon, ControlClient(daemon.control, 5.0) as client:
        guardian = client.request("status")["guardian"]
        assert guardian["alive"] and guardian["pid"] in daemon.children
        assert guardian["restarts_total"] == 0
        os.kill(guardian["pid"], signal.SIGKILL)
        replaced = _wait_for(
            client,
            "a replacement guardian",
            lambda s: s["guardian"]["restarts_total"] == 1 and s["guardian"]["alive"],
            timeout_s=15.0,
        )["guardian"]
        assert replaced["pid"] != guardian["pid"]
        daemon.children.append(replaced["pid"])
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=20) == 0
        assert _output(daemon.sims.source_meter.endpoints["visa"]) == (False, 0.0)


def test_sigterm_of_the_daemon_mid_hold_stands_the_guardian_down(tmp_path: Path) -> None:
    with _daemon_holding_2v(tmp_path) as daemon:
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=20) == 0
        for pid in daemon.children:
            assert _wait_gone(pid, 5.0), f"pid {pid} outlived the daemon"

        assert _output(daemon.sims.source_meter.endpoints["visa"]) == (False, 0.0)
        _assert_ramped_down(_history_since(daemon.sims.station, daemon.history_index - 1), 2.0)
    log_text = (tmp_path / "runs" / LOG_FILE_NAME).read_text()
    assert "stopped with the bias safe; standing down" in log_text
    assert "making the source-meter safe" not in log_text  # the daemon did it, not the guardian
