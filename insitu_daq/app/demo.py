"""`insitu-daq demo`: the reference experiment end to end on simulated hardware.

Starts the simulated station and the daemon as two real processes talking over their real
sockets (exactly as on a microscope PC, with the simulator in place of the instruments), runs
the +4.3 V experiment time-scaled so it completes in under a minute, follows it live, then
prints where the run file is, what was recorded, and what live analysis measured next to the
simulator's truth; it also draws the report figure next to the run file.

By default the closed-loop protocol (lno_4v3_until_rocksalt.yaml: the hold ends when live
analysis sees the HRTEM field 90 % rock salt, at most 120 s); `--protocol lno_4v3.yaml` runs the
fixed 120 s reference hold. The truth comes from the simulated microscope's simulator-only
`truth` request (drivers/MICROSCOPE_PROTOCOL.md), polled during the run by `TruthPoller` and
stamped with the run clock, so measured and true values are compared at the same run time;
the samples are saved next to the run file as RUN.truth.json (a JSON list of {"time": run-clock
s, ...the truth's fields}) so a run can be checked again later, and the demo ends with the
issue-4 accuracy verdicts of verify/accuracy.py (measured vs truth, within tolerance or not).
`--protocol lno_control_0v.yaml` runs the no-bias control, judged on "no phase change seen".

A protocol that heats (a `temperature` or `temperature_staircase` step, or a hold until the
chip's temperature: `ncm_heating_short.yaml`) runs on a station with the MEMS heating holder
(`insitu-daq sim --holder mems_heating`, `[holder] model = "mems_heating"` and limits that allow
it); the demo then prints the temperature levels reached and the frames recorded at each
(report/temperature.py) instead of the biasing experiment's accuracy verdicts.

Both processes run the installed package (core/module_command.py), whatever the current folder.
Their station config and logs stay in DATA_DIR/demo/; a process that dies is reported with
its exit code, its log's path and the log's last lines (app/children.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path

import h5py

from insitu_daq.app.children import (
    EXIT_GRACE_S,
    ChildExitedError,
    ChildProcess,
    check_children,
    child_process,
    reporting_child_deaths,
    wait_for_output,
)
from insitu_daq.core.config import DoseConfig
from insitu_daq.core.module_command import module_command
from insitu_daq.report.analysis import read_analysis
from insitu_daq.report.events import hold_span, read_events
from insitu_daq.report.summary import RunSummary, format_summary, summarize
from insitu_daq.runfile import layout
from insitu_daq.verify.accuracy import accuracy_verdicts, format_verdicts
from insitu_daq.verify.truth import TruthSample, format_comparison, save_truth, truth_path

log = logging.getLogger(__name__)

DEFAULT_TIME_SCALE = 5.0  # the ~170 s protocol in ~35 s
DEFAULT_PROTOCOL = "lno_4v3_until_rocksalt.yaml"  # closed loop: the hold ends on rock salt
REFERENCE_PROTOCOL = "lno_4v3.yaml"  # the fixed 120 s hold
DEFAULT_SOURCE_METER = "keithley2400"
HEATING_HOLDER = "mems_heating"
# The heating demo's station limits: its shipped protocols' temperatures and rates fit (the
# short one's 280 C and 5 C/s; the full staircase's 500 C and 1 C/s).
HEATING_LIMITS = """[limits]
max_temperature_c = 500
max_temperature_rate_c_per_s = 5
"""
# Truth requests every TRUTH_POLL_RUN_S of run time (so the truth resolves a rock-salt onset
# well within the 2 s it is checked to, whatever the time scale), but at most every
# MIN_TRUTH_POLL_S and at least every MAX_TRUTH_POLL_S of wall time.
TRUTH_POLL_RUN_S = 0.5
MIN_TRUTH_POLL_S, MAX_TRUTH_POLL_S = 0.02, 0.25
DEMO_FILES_DIR = "demo"  # in the data dir: station.toml and the two logs
SIM_LOG, DAEMON_LOG = "sim.log", "daemon.log"
SIM_READY_TEXT = "simulated station running"  # `insitu-daq sim` prints it once it serves
WEB_READY_TEXT = "insitu-daq web:"  # the web view prints its address once it serves
WEB_LOG = "web.log"
WEB_STOP_S = 5.0  # the web view stops in ~2 s; nothing of the station depends on it


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


def truth_poll_interval(time_scale: float) -> float:
    """Wall seconds between truth requests at `time_scale`."""
    return min(MAX_TRUTH_POLL_S, max(MIN_TRUTH_POLL_S, TRUTH_POLL_RUN_S / time_scale))


class TruthPoller:
    """Asks the simulated microscope for its `truth` every `interval_s` in a thread.

    Each answer is stamped with the wall clock (ns) at the request's midpoint; `samples()`
    turns the stamps into run-clock seconds once the run's start is known (its file says).
    Failures are counted and logged, never fatal: the demo runs without truth if it must.
    """

    def __init__(self, host: str, port: int, interval_s: float = MAX_TRUTH_POLL_S) -> None:
        self._address = (host, port)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._answers: list[tuple[int, dict]] = []
        self._thread = threading.Thread(target=self._poll, name="truth-poller", daemon=True)
        self.errors_total = 0

    def __enter__(self) -> TruthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _poll(self) -> None:
        connection: socket.socket | None = None
        reader = None
        while not self._stop.is_set():
            try:
                if connection is None:
                    connection = socket.create_connection(self._address, timeout=2.0)
                    reader = connection.makefile("rb")
                before = time.time_ns()
                connection.sendall(b'{"cmd": "truth"}\n')
                reply = json.loads(reader.readline())
                stamp = (before + time.time_ns()) // 2
                if reply.get("ok") and isinstance(reply.get("truth"), dict):
                    self._answers.append((stamp, reply["truth"]))
                else:
                    self.errors_total += 1
                    log.warning("truth request refused: %s", reply.get("error"))
            except (OSError, ValueError) as exc:
                self.errors_total += 1
                log.warning("truth request failed: %s", exc)
                if connection is not None:
                    connection.close()
                connection = None
            self._stop.wait(self._interval_s)
        if connection is not None:
            connection.close()

    def samples(self, run_start_ns: int, time_scale: float) -> list[TruthSample]:
        """The answers on the run clock (run seconds = wall seconds since start x time scale)."""
        return [
            TruthSample((stamp - run_start_ns) / 1e9 * time_scale, truth)
            for stamp, truth in list(self._answers)
            if stamp >= run_start_ns
        ]


def run_start_ns(run_file: Path) -> int:
    """The run clock's origin: /entry/start_time (ISO 8601, microseconds) in ns."""
    with h5py.File(run_file, "r", libver="latest", swmr=True) as f:
        raw = f[layout.START_TIME][()]
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    moment = datetime.fromisoformat(text)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def print_analysis(run_file: Path, truth: list[TruthSample]) -> None:
    """Measured next to truth, then the accuracy verdicts."""
    with h5py.File(run_file, "r", libver="latest", swmr=True) as f:
        entry = f[layout.ENTRY]
        analysis = read_analysis(entry)
        hold = hold_span(read_events(entry))
    print(format_comparison(analysis, truth, hold))
    print()
    print(format_verdicts(accuracy_verdicts(analysis, truth, hold)))


def reference_protocol(name: str = REFERENCE_PROTOCOL) -> str:
    return resources.files("insitu_daq.protocols").joinpath(name).read_text()


def protocol_heats(text: str, name: str) -> bool:
    """Whether a protocol needs a heating holder: a temperature step, or a hold until the
    chip's temperature."""
    from insitu_daq.control.conditions import HOLDER_QUANTITIES
    from insitu_daq.control.protocol import Protocol
    from insitu_daq.control.steps.hold import Hold
    from insitu_daq.control.steps.temperature import Temperature
    from insitu_daq.control.steps.temperature_staircase import TemperatureStaircase

    for step in Protocol.parse(text, "yaml", name=name).steps:
        if isinstance(step, (Temperature, TemperatureStaircase)):
            return True
        condition = step.condition if isinstance(step, Hold) else None
        if condition is not None and not condition.quantities.isdisjoint(HOLDER_QUANTITIES):
            return True
    return False


def print_heating(summary: RunSummary) -> None:
    """The temperature levels the run reached and the frames recorded at each."""
    temperature = summary.temperature
    if temperature is None:
        print("heating      no temperature log in the run file")
        return
    heated = [level for level in temperature.levels if level.setpoint_c > temperature.min_c + 1]
    span = f"{temperature.min_c:.1f} to {temperature.max_c:.1f} C"
    print(f"heating      chip {span}; {len(heated)} levels above room temperature reached:")
    for level in heated:
        print(
            f"  {level.setpoint_c:6.1f} C  chip mean {level.mean_c:6.1f} C "
            f"({level.min_c:.1f} to {level.max_c:.1f}) for {level.duration_s:5.1f} s: "
            f"{level.frames} frames"
        )


def station_toml(
    ports: dict[str, int],
    data_dir: Path,
    time_scale: float,
    source_meter_model: str = DEFAULT_SOURCE_METER,
    holder_model: str | None = None,
    dose_budget_e_per_a2: float | None = None,
) -> str:
    """The demo station's config. `holder_model` (e.g. mems_heating): that holder, and for a
    heating holder the limits its protocols need. `dose_budget_e_per_a2`: the [dose] budget;
    None: SCIENCE.md's 5000 e/A^2 x the time scale (below)."""
    # A heating holder read every 0.1 s of wall time: its ramps and levels resolved in the log
    # whatever the time scale (the default 0.5 s is 5 run s at a time scale of 10).
    holder = f'model = "{holder_model}"\npoll_interval_s = 0.1\n' if holder_model else ""
    limits = HEATING_LIMITS if holder_model == HEATING_HOLDER else ""
    # Ramp steps scale with the time scale so the staircase keeps its shape on the wall clock.
    budget = dose_budget_e_per_a2 or DoseConfig().budget_e_per_a2 * max(1.0, time_scale)
    return f"""name = "demo (simulated station, time scale {time_scale:g})"
data_dir = "{data_dir}"
[source_meter]
model = "{source_meter_model}"
resource = "TCPIP::127.0.0.1::{ports["source_meter"]}::SOCKET"
[holder]
{holder}port = "socket://127.0.0.1:{ports["holder"]}"
[detector]
endpoint = "tcp://127.0.0.1:{ports["camera"]}"
[microscope]
port = {ports["microscope"]}
[api]
control = "tcp://127.0.0.1:{ports["control"]}"
events = "tcp://127.0.0.1:{ports["events"]}"
metrics_port = {ports["metrics"]}
{web_section(ports)}[analysis]
# The simulated camera's 40 frames/s: at a time scale of {time_scale:g} a run second has
# {time_scale:g}x fewer frames, so analyse every one (a real station keeps the default cap).
max_rate_hz = 40
[dose]
# Faster than real time the simulated bias ramps take longer than their rate says (each
# staircase step is a SCPI round trip on the wall clock: at 20x the reference ramp to +4.3 V
# took 74 run s instead of 8.6), and the HRTEM field takes that much more dose than the
# protocol plans. Real time keeps SCIENCE.md's budget; at time scale s it is s times it.
budget_e_per_a2 = {budget:g}
{limits}"""


def web_section(ports: dict[str, int]) -> str:
    """The config's [web] section on the demo's ports ("" without a "web" port: the default
    [web], for a station whose tests need no page)."""
    if "web" not in ports:
        return ""
    return f"""[web]
port = {ports["web"]}
preview_endpoint = "tcp://127.0.0.1:{ports["preview"]}"
"""


def wait_for_daemon(
    control: str,
    daemon: ChildProcess,
    others: Sequence[ChildProcess] = (),
    timeout_s: float = 60.0,
) -> None:
    """Until the daemon answers a ping; ChildExitedError if it or one of `others` exits first,
    RuntimeError if it stays silent (both show the end of its log)."""
    from insitu_daq.service.api import ControlClient, ControlError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check_children([*others, daemon])
        with (
            contextlib.suppress(ControlError, TimeoutError),
            ControlClient(control, timeout_s=1.0) as client,
        ):
            client.request("ping")
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"the daemon did not answer on {control} within {timeout_s:.0f} s; {daemon.log_excerpt()}"
    )


def run_demo(
    time_scale: float = DEFAULT_TIME_SCALE,
    data_dir: Path = Path("runs"),
    frame_size: int = 1024,
    frame_rate: float = 40.0,
    protocol: str = DEFAULT_PROTOCOL,
    figure: bool = True,
    source_meter_model: str = DEFAULT_SOURCE_METER,
    web: bool = False,
) -> int:
    """The reference experiment on the simulated station, watched on the web view's page;
    with `web`, the page stays up after the run until Ctrl-C."""
    from insitu_daq.app.progress import follow_run
    from insitu_daq.service.api import ControlClient

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    names = [
        "source_meter", "holder", "microscope", "camera", "control", "events", "metrics", "web",
        "preview",
    ]  # fmt: skip
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    # The station config and the two processes' logs, kept for the user (replaced by the next
    # demo in this data dir): a child that dies is reported with the end of its log.
    files = data_dir / DEMO_FILES_DIR
    files.mkdir(exist_ok=True)
    for stale in (SIM_LOG, DAEMON_LOG, WEB_LOG):
        (files / stale).unlink(missing_ok=True)
    protocol_text = reference_protocol(protocol)
    holder = HEATING_HOLDER if protocol_heats(protocol_text, Path(protocol).stem) else None
    config = files / "station.toml"
    config.write_text(
        station_toml(ports, data_dir, time_scale, source_meter_model, holder_model=holder)
    )
    sim_command = module_command(
        "insitu_daq", "sim", "--time-scale", str(time_scale),
        "--source-meter", source_meter_model,
        "--source-meter-port", str(ports["source_meter"]),
        "--holder-port", str(ports["holder"]),
        "--microscope-port", str(ports["microscope"]),
        "--camera-port", str(ports["camera"]),
        "--frame-size", str(frame_size), "--frame-rate", str(frame_rate),
        *(("--holder", holder) if holder else ()),
    )  # fmt: skip
    daemon_command = module_command(
        "insitu_daq", "daemon", "--config", str(config), "--time-scale", str(time_scale)
    )
    web_command = module_command("insitu_daq", "web", "--config", str(config))
    with_holder = f", {holder} holder" if holder else ""
    print(f"insitu-daq demo: simulated station{with_holder} + daemon, time scale {time_scale:g}")
    with contextlib.ExitStack() as running:  # left in reverse: the daemon stops first
        sim = running.enter_context(
            child_process("simulated station", sim_command, files / SIM_LOG)
        )
        # The daemon only once the station is up: one that never comes up leaves no daemon
        # (and no bias guardian) to stop in the middle of its start.
        wait_for_output(sim, SIM_READY_TEXT, timeout_s=30.0)
        daemon = running.enter_context(child_process("daemon", daemon_command, files / DAEMON_LOG))
        running.enter_context(reporting_child_deaths([sim, daemon]))
        control = f"tcp://127.0.0.1:{ports['control']}"
        events = f"tcp://127.0.0.1:{ports['events']}"
        wait_for_daemon(control, daemon, [sim], timeout_s=60.0)
        # The page is for watching: a web view that fails to start is reported, and the
        # experiment goes on without it.
        page = running.enter_context(child_process("web view", web_command, files / WEB_LOG))
        try:
            wait_for_output(page, WEB_READY_TEXT, timeout_s=30.0)
            print(f"live view    http://127.0.0.1:{ports['web']}/")
        except (RuntimeError, ChildExitedError) as exc:
            print(f"no live view: {exc}")
        with ControlClient(control, timeout_s=10.0) as client:
            reply = client.request(
                "run", protocol_text=protocol_text, format="yaml",
                name=Path(protocol).stem,
            )  # fmt: skip
        run_file = Path(reply["run_file"])
        print(f"run {reply['run_id']}: protocol {protocol}")
        interval = truth_poll_interval(time_scale)
        with TruthPoller("127.0.0.1", ports["microscope"], interval) as truth:
            outcome = follow_run(
                control, events, reply["run_id"], timeout_s=10.0,
                daemon_alive=lambda: not (sim.exited or daemon.exited),
            )  # fmt: skip
        if outcome != 0:  # the run failed, or the daemon fell silent: a child may be dead
            check_children([sim, daemon], grace_s=EXIT_GRACE_S)
    print()
    if not run_file.exists():
        print(f"no run file at {run_file}; the daemon's {daemon.log_excerpt()}")
        return 1
    summary = summarize(run_file)
    print(format_summary(summary, events=40))
    if holder:  # the accuracy verdicts are the biasing experiment's (verify/accuracy.py)
        print()
        print_heating(summary)
    else:
        samples = truth.samples(run_start_ns(run_file), time_scale)
        save_truth(truth_path(run_file), samples)
        print(f"truth        {truth_path(run_file)} ({len(samples)} samples)")
        print_analysis(run_file, samples)
    if figure:
        from insitu_daq.report.figure import draw_report_figure

        drawn = draw_report_figure(run_file, run_file.with_suffix(".png"))
        print(f"\nfigure       {drawn.path}")
    if web:
        keep_page_up(web_command, files / WEB_LOG, ports["web"], run_file)
    return outcome


def keep_page_up(command: list[str], log_path: Path, port: int, run_file: Path) -> None:
    """The web view, serving the finished run (the station is down), until Ctrl-C. A Ctrl-C
    that comes while it starts ends it as well; a second one while it stops is ignored (it has
    nothing to make safe, and is killed if it takes more than WEB_STOP_S)."""
    page = None
    try:
        with child_process("web view", command, log_path, stop_timeout_s=WEB_STOP_S) as page:
            wait_for_output(page, WEB_READY_TEXT, timeout_s=30.0)
            address = f"http://127.0.0.1:{port}/"
            print(
                f"\nweb view     {address}?run={run_file.stem}  (runs: {address}runs);"
                " Ctrl-C ends it",
                flush=True,  # a pipe is block-buffered: whoever waits for the address gets it
            )
            try:
                while page.process.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # while the page stops
    except KeyboardInterrupt:  # while it started, or between the lines above
        if page is not None and page.process.poll() is None:
            page.process.kill()
