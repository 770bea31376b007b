"""`insitu-daq demo`: the reference experiment end to end on simulated hardware.

Starts the simulated station and the daemon as two real processes talking over their real
sockets (exactly as on a microscope PC, with the simulator in place of the instruments), runs
the +4.3 V reference protocol time-scaled so it completes in under a minute, follows it live,
then prints where the run file is and what was measured.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from .report import format_summary, summarize

DEFAULT_TIME_SCALE = 5.0  # the ~165 s reference protocol in ~33 s


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (bound and released; fine for a demo)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def reference_protocol(name: str = "lno_4v3.yaml") -> str:
    return resources.files("insitu_daq.protocols").joinpath(name).read_text()


def station_toml(ports: dict[str, int], data_dir: Path, time_scale: float) -> str:
    # Ramp steps scale with the time scale so the staircase keeps its shape on the wall clock.
    return f"""name = "demo (simulated station, time scale {time_scale:g})"
data_dir = "{data_dir}"
[source_meter]
resource = "TCPIP::127.0.0.1::{ports["source_meter"]}::SOCKET"
[holder]
port = "socket://127.0.0.1:{ports["holder"]}"
[detector]
endpoint = "tcp://127.0.0.1:{ports["camera"]}"
[microscope]
port = {ports["microscope"]}
[api]
control = "tcp://127.0.0.1:{ports["control"]}"
events = "tcp://127.0.0.1:{ports["events"]}"
metrics_port = {ports["metrics"]}
"""


@contextlib.contextmanager
def child_process(command: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """Run `command` with its output in `log_path`; SIGTERM it (then SIGKILL) on the way out."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def wait_for_daemon(control: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Until the daemon answers a ping; RuntimeError if it exits or stays silent."""
    from .api import ControlClient, ControlError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {process.returncode}")
        with (
            contextlib.suppress(ControlError, TimeoutError),
            ControlClient(control, timeout_s=1.0) as client,
        ):
            client.request("ping")
            return
        time.sleep(0.2)
    raise RuntimeError(f"the daemon did not answer on {control} within {timeout_s:.0f} s")


def run_demo(
    time_scale: float = DEFAULT_TIME_SCALE,
    data_dir: Path = Path("runs"),
    frame_size: int = 1024,
    frame_rate: float = 40.0,
    protocol: str = "lno_4v3.yaml",
) -> int:
    from .api import ControlClient
    from .progress import follow_run

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    names = ["source_meter", "holder", "microscope", "camera", "control", "events", "metrics"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    exe = [sys.executable, "-m", "insitu_daq"]
    with tempfile.TemporaryDirectory(prefix="insitu-daq-demo-") as tmp:
        workdir = Path(tmp)
        config = workdir / "station.toml"
        config.write_text(station_toml(ports, data_dir, time_scale))
        sim_command = [
            *exe, "sim", "--time-scale", str(time_scale),
            "--source-meter-port", str(ports["source_meter"]),
            "--holder-port", str(ports["holder"]),
            "--microscope-port", str(ports["microscope"]),
            "--camera-port", str(ports["camera"]),
            "--frame-size", str(frame_size), "--frame-rate", str(frame_rate),
        ]  # fmt: skip
        daemon_command = [*exe, "daemon", "--config", str(config), "--time-scale", str(time_scale)]
        print(f"insitu-daq demo: simulated station + daemon, time scale {time_scale:g}")
        with (
            child_process(sim_command, workdir / "sim.log"),
            child_process(daemon_command, workdir / "daemon.log") as daemon,
        ):
            control = f"tcp://127.0.0.1:{ports['control']}"
            events = f"tcp://127.0.0.1:{ports['events']}"
            wait_for_daemon(control, daemon, timeout_s=30.0)
            with ControlClient(control, timeout_s=10.0) as client:
                reply = client.request(
                    "run", protocol_text=reference_protocol(protocol), format="yaml",
                    name=Path(protocol).stem,
                )  # fmt: skip
            run_file = Path(reply["run_file"])
            print(f"run {reply['run_id']}: protocol {protocol}")
            outcome = follow_run(control, events, reply["run_id"], timeout_s=10.0)
        print()
        if not run_file.exists():
            print(f"no run file at {run_file}; daemon log:\n{(workdir / 'daemon.log').read_text()}")
            return 1
        summary = summarize(run_file)
        print(format_summary(summary, events=40))
        return outcome
