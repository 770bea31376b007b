"""End to end: the simulated station (in this process) and `insitu-daq daemon` (a real process)
over their real sockets, read back from the real run file.

The simulators run in the test process so the tests can read the model's ground truth and
inject faults; the daemon runs exactly as in production, from a station TOML.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest

from insitu_daq.app.children import ChildProcess
from insitu_daq.app.demo import free_ports, reference_protocol, station_toml, wait_for_daemon
from insitu_daq.control.protocol import Protocol
from insitu_daq.core.module_command import module_command
from insitu_daq.service.api import ControlClient, ControlError
from insitu_daq.sim.launch import SimulatedInstruments, StationPorts

TIME_SCALE = 20.0
FINAL = ("finished", "aborted", "failed")

LONG_HOLD = """
name: long_hold
description: contact, record, hold +2 V for long enough to interrupt
steps:
  - approach: {speed_nm_s: 500, max_travel_nm: 5000}
  - acquire: start
  - bias: {volts: 2.0, rate_volts_per_s: 1.0}
  - hold: {duration_s: 3000}
  - bias: 0
  - acquire: stop
"""


class LiveStation:
    """Simulated instruments here, the daemon as a subprocess, a control client."""

    def __init__(
        self,
        tmp_path: Path,
        time_scale: float = TIME_SCALE,
        frame_shape: tuple[int, int] = (128, 128),
        data_dir: Path | None = None,
        extra_config: str = "",
        detector_api: bool = False,
        analysis: bool = True,
        dose_budget_e_per_a2: float | None = None,
        holder_model: str = "open_cell",
        holder_settings: str = "",
    ) -> None:
        """`data_dir`: where run files go (default tmp_path/runs); `extra_config`: TOML
        appended to the station config (sections the demo's config does not have);
        `detector_api`: the camera serves its SIMPLON API and the daemon arms it
        ([detector] control = "simplon"); `analysis`: False runs no live analysis;
        `dose_budget_e_per_a2`: its [dose] budget (None: the demo's); `holder_model`: the
        simulated holder and the config's [holder] model, with `holder_settings` (TOML lines)
        added to that section."""
        self.time_scale = time_scale
        self.sims = SimulatedInstruments.create(
            ports=StationPorts(0, 0, 0, 0, camera_api=0 if detector_api else None),
            time_scale=time_scale,
            frame_shape=frame_shape,
            frame_rate_hz=40.0,
            holder_model=holder_model,
        )
        self.sims.start()
        self.sims.camera.arm()
        control, events, metrics = free_ports(3)
        ports = {
            "source_meter": int(self.sims.source_meter.endpoints["visa"].split("::")[2]),
            "holder": int(self.sims.holder.endpoints["url"].rsplit(":", 1)[1]),
            "microscope": int(self.sims.microscope.endpoints["tcp"].rsplit(":", 1)[1]),
            "camera": int(self.sims.camera.endpoints["stream2"].rsplit(":", 1)[1]),
            "control": control,
            "events": events,
            "metrics": metrics,
        }
        self.data_dir = data_dir or tmp_path / "runs"
        self.metrics = f"http://127.0.0.1:{metrics}/metrics"
        config = self.config_path = tmp_path / "station.toml"
        budget = dose_budget_e_per_a2
        text = station_toml(ports, self.data_dir, time_scale, dose_budget_e_per_a2=budget)
        if holder_model != "open_cell" or holder_settings:
            holder = f'model = "{holder_model}"\n{holder_settings}'
            text = text.replace("[holder]\n", f"[holder]\n{holder}", 1)
        if self.sims.camera_api is not None:
            arming = f'control = "simplon"\napi_url = "{self.sims.camera_api.url}"\n'
            text = text.replace("[detector]\n", f"[detector]\n{arming}", 1)
        if not analysis:  # no analysis process: the daemon is up in about half the time
            text = text.replace("[analysis]\n", "[analysis]\nenabled = false\n", 1)
        config.write_text(text + extra_config)
        self.control = f"tcp://127.0.0.1:{control}"
        self.log = (tmp_path / "daemon.log").open("w")
        self.process = subprocess.Popen(
            module_command("insitu_daq", "daemon", "--config", str(config),
                           "--time-scale", str(time_scale)),
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self._wait_until_up()

    def _wait_until_up(self, timeout_s: float = 30.0) -> None:
        try:
            daemon = ChildProcess("daemon", self.process, Path(self.log.name))
            wait_for_daemon(self.control, daemon, timeout_s=timeout_s)
        except RuntimeError as exc:
            log = self.daemon_log()
            self.close()  # a daemon that did not come up leaves no simulator behind either
            raise AssertionError(f"{exc}\n{log}") from None

    def daemon_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def request(self, cmd: str, timeout_s: float = 10.0, **fields: object) -> dict:
        with ControlClient(self.control, timeout_s=timeout_s) as client:
            return client.request(cmd, **fields)

    def run(self, protocol_text: str, name: str) -> dict:
        return self.request("run", protocol_text=protocol_text, format="yaml", name=name)

    def wait_for(self, predicate, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.request("status")
            if predicate(status):
                return status
            time.sleep(0.1)
        raise AssertionError(f"timed out; last status {status}\n{self.daemon_log()}")

    def wait_closed(self, run_id: str, timeout_s: float = 90.0) -> dict:
        return self.wait_for(
            lambda s: (
                s["last_run_id"] == run_id
                and s["run_id"] is None
                and s["protocol"]["state"] in FINAL
            ),
            timeout_s,
        )

    def wait_in_hold(self) -> dict:
        return self.wait_for(lambda s: s["protocol"]["step_kind"] == "hold")

    def model_state(self):
        with self.sims.station.model() as model:
            return model.snapshot(), list(model.bias_history), model.terminal()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.sims.stop()
        self.log.close()


@pytest.fixture
def live(tmp_path: Path):
    # No live analysis: nothing here reads it, and without its process the daemon is up in
    # about half the time (tests/service/test_daemon_analysis_e2e.py and tests/verify run it).
    station = LiveStation(tmp_path, analysis=False)
    yield station
    station.close()


def _frame_truth_bias(live: LiveStation, f: h5py.File, bias_history) -> np.ndarray:
    """The simulator's applied bias at each frame's exposure midpoint.

    Run-clock seconds -> wall time (the run's start_time) -> monotonic time (one offset for
    the whole machine) -> model time (the station clock) -> the model's bias history.
    """
    start = datetime.fromisoformat(f["/entry/start_time"][()].decode())
    start_wall_s = start.timestamp()
    wall_minus_monotonic = time.time() - time.monotonic()
    clock = live.sims.station.clock
    frame_time = f["/entry/instrument/detector/frame_time"][:]
    monotonic = start_wall_s + frame_time / live.time_scale - wall_minus_monotonic
    model_time = (monotonic - clock._t0) * clock.time_scale
    times = np.array([t for t, _ in bias_history])
    volts = np.array([v for _, v in bias_history])
    index = np.searchsorted(times, model_time, side="right") - 1
    return volts[np.clip(index, 0, None)]


def test_reference_protocol_yields_a_complete_run_file(live: LiveStation) -> None:
    reply = live.run(reference_protocol("lno_4v3.yaml"), "lno_4v3")
    status = live.wait_closed(reply["run_id"])
    assert status["protocol"]["state"] == "finished", live.daemon_log()
    model, history, (volts, _, _) = live.model_state()
    assert volts == 0.0  # output off at the end
    assert model.x == pytest.approx(1.0)  # 120 s at +4.3 V converts the particle
    assert status["ingest"]["frames_dropped_total"] == 0

    with h5py.File(reply["run_file"], "r") as f:
        detector = f["/entry/instrument/detector"]
        ids = detector["image_id"][:]
        frame_time = detector["frame_time"][:]
        assert len(ids) > 100
        assert np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids)))  # every frame
        assert np.all(np.diff(frame_time) > 0)
        assert detector["data"].shape[0] == len(ids)

        bias = f["/entry/sample/bias_voltage"]
        setpoint, value = bias["setpoint"][:], bias["value"][:]
        holding = setpoint == 4.3
        assert holding.sum() > 50
        assert np.max(np.abs(value[holding] - 4.3)) < 1e-3  # within 1 mV during the hold

        truth = _frame_truth_bias(live, f, history)
        measured = detector["bias_voltage"][:]
        assert not np.isnan(measured).any()
        error = np.abs(measured - truth)
        # Frames of the hold, not next to its ends: there a frame's neighbouring bias samples
        # straddle the first ramp step, and interpolation between them is not the staircase.
        at_level = np.abs(truth - 4.3) < 1e-9
        at_hold = at_level & np.roll(at_level, 1) & np.roll(at_level, -1)
        assert at_hold.sum() > 50
        assert np.max(error[at_hold]) < 1e-3
        assert np.median(error) < 0.01  # ramps included: staircase steps of 10 mV

        event_time = f["/entry/events/time"][:]
        messages = [m.decode() for m in f["/entry/events/message"][:]]
        assert np.all(np.diff(event_time) >= 0)
        steps = len(Protocol.parse(reference_protocol("lno_4v3.yaml")).steps)
        started = [re.match(rf"step (\d+)/{steps} \w+:", m) for m in messages]
        assert [int(m[1]) for m in started if m] == list(range(1, steps + 1))
        assert f["/entry/end_time"][()].decode()

        # The holder's position on the run clock, polled by the daemon's holder monitor: at
        # rest until the approach starts, rising through it (its own polls) to the contact,
        # held there through the hold, backed off by the final retract's 1000 nm.
        position = f["/entry/instrument/holder/position"]
        p_time, p_value = position["time"][:], position["value"][:]
        assert np.all(np.diff(p_time) > 0) and np.all(position["time_errors"][:] >= 0)
        assert p_time[-1] < event_time[-1]  # within the run (its last event: the run's end)
        step_start = {int(m[1]): event_time[i] for i, m in enumerate(started) if m}
        approach, contact, retract = step_start[2], step_start[3], step_start[steps]
        with live.sims.station.model() as m:
            gap = m.params.initial_gap_nm
        # POS? counts from the power-on position; the approach starts within a poll of the
        # run's start, so its first read may be the first row.
        assert p_value[0] == 0.0 and np.all(p_value[p_time < approach] == 0.0)
        moving = p_value[(p_time > approach) & (p_time < contact)]
        assert np.all(np.diff(moving) >= 0)
        assert np.count_nonzero((moving > 10.0) & (moving < gap - 10.0)) > 3
        held = p_value[(p_time > contact) & (p_time < retract)]
        assert len(held) > 10
        np.testing.assert_allclose(held, gap, atol=1.0)
        assert p_value[-1] == pytest.approx(gap - 1000.0, abs=60.0)
        # Finished at close: no empty dataset anywhere (NeXus readers fail on them).
        sizes: dict[str, int] = {}
        f.visititems(
            lambda name, item: (
                sizes.update({name: item.size}) if isinstance(item, h5py.Dataset) else None
            )
        )
        assert [name for name, size in sizes.items() if size == 0] == []


def test_control_protocol_changes_nothing(live: LiveStation) -> None:
    reply = live.run(reference_protocol("lno_control_0v.yaml"), "lno_control_0v")
    status = live.wait_closed(reply["run_id"])
    assert status["protocol"]["state"] == "finished", live.daemon_log()
    model, history, _ = live.model_state()
    assert model.x == 0.0
    assert model.expansion == 0.0
    assert all(v == 0.0 for _, v in history)
    with h5py.File(reply["run_file"], "r") as f:
        assert f["/entry/instrument/detector/frame_time"].shape[0] > 20
        assert np.all(f["/entry/sample/bias_voltage/setpoint"][:] == 0.0)


def _assert_safe_and_closed(live: LiveStation, run_file: str) -> None:
    _, _, (volts, amps, _) = live.model_state()
    assert volts == 0.0 and amps == 0.0  # output off
    with h5py.File(run_file, "r") as f:
        assert f["/entry/end_time"][()].decode()  # closed properly
        assert f["/entry/instrument/detector/frame_time"].shape[0] > 0


def test_abort_mid_hold_makes_the_bias_safe_and_closes_the_run(live: LiveStation) -> None:
    reply = live.run(LONG_HOLD, "long_hold")
    live.wait_in_hold()
    live.request("abort", reason="test abort")
    status = live.wait_closed(reply["run_id"])
    assert status["protocol"]["state"] == "aborted"
    _assert_safe_and_closed(live, reply["run_file"])
    _, history, _ = live.model_state()
    steps = np.abs(np.diff([v for _, v in history]))
    assert steps.max() <= 0.01 + 1e-9  # ramped down, never stepped


def test_sigterm_mid_hold_makes_the_bias_safe_and_closes_the_run(live: LiveStation) -> None:
    reply = live.run(LONG_HOLD, "long_hold")
    live.wait_in_hold()
    live.process.send_signal(signal.SIGTERM)
    assert live.process.wait(timeout=60) == 0, live.daemon_log()
    _assert_safe_and_closed(live, reply["run_file"])


def test_sigkill_mid_hold_leaves_a_readable_file_up_to_the_last_flush(
    live: LiveStation,
) -> None:
    reply = live.run(LONG_HOLD, "long_hold")
    status = live.wait_in_hold()
    frames_before = status["ingest"]["frames_written_total"]
    time.sleep(1.5)  # > one flush interval
    live.process.send_signal(signal.SIGKILL)
    live.process.wait(timeout=10)
    time.sleep(1.0)  # the ingest process notices and closes what it can
    with h5py.File(reply["run_file"], "r", libver="latest", swmr=True) as f:
        assert f["/entry/instrument/detector/frame_time"].shape[0] >= frames_before
        assert f["/entry/sample/bias_voltage/value"].shape[0] > 0
        assert (f["/entry/sample/bias_voltage/setpoint"][:] == 2.0).any()


def test_short_trips_ramps_down_records_and_pauses(live: LiveStation) -> None:
    reply = live.run(LONG_HOLD, "long_hold")
    live.wait_in_hold()
    live.sims.source_meter.inject_short(True)
    status = live.wait_for(lambda s: s["protocol"]["state"] == "paused", timeout_s=20)
    assert "compliance" in (status["protocol"]["reason"] or "")
    deadline = time.monotonic() + 10
    while live.model_state()[2][0] != 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the ramp-down runs after the trip is reported
    _, _, (volts, _, _) = live.model_state()
    assert volts == 0.0  # output off
    assert status["bias"]["tripped"]
    live.sims.source_meter.inject_short(False)
    live.request("abort")
    live.wait_closed(reply["run_id"])
    with h5py.File(reply["run_file"], "r") as f:
        kinds = [k.decode() for k in f["/entry/events/kind"][:]]
    assert "compliance_trip" in kinds


def test_over_limit_and_invalid_protocols_are_refused_untouched(live: LiveStation) -> None:
    _, history_before, _ = live.model_state()
    over = LONG_HOLD.replace("volts: 2.0", "volts: 6.0")
    with pytest.raises(ControlError, match=r"step 3 \(bias\)"):
        live.run(over, "over_limit")
    with pytest.raises(ControlError, match="step 2"):
        live.run(LONG_HOLD.replace("acquire: start", "acquire: sideways"), "invalid")
    _, history_after, _ = live.model_state()
    assert history_after == history_before
    assert not list(live.data_dir.glob("*.h5"))


def test_malformed_duplicate_and_out_of_order_frames_are_counted(live: LiveStation) -> None:
    reply = live.run(LONG_HOLD, "long_hold")
    live.wait_in_hold()
    camera = live.sims.camera
    for fault in ("duplicate", "swap", "gap", "malformed"):
        camera.inject_fault(fault)
        time.sleep(0.2)
    camera.send_raw(b"not a stream v2 message")
    time.sleep(1.0)
    status = live.request("status")
    live.request("abort")
    live.wait_closed(reply["run_id"])
    ingest = status["ingest"]
    assert ingest["frames_dropped_by_reason"]["duplicate"] >= 1
    assert ingest["out_of_order_total"] >= 1
    assert ingest["malformed_total"] >= 2
    assert ingest["frames_missing_total"] >= 1
    with h5py.File(reply["run_file"], "r") as f:
        frame_time = f["/entry/instrument/detector/frame_time"][:]
        kinds = {k.decode() for k in f["/entry/events/kind"][:]}
    assert np.all(np.diff(frame_time) > 0)
    assert {"frame_gap", "frame_duplicate"} <= kinds


SHORT = """
name: short_hold
steps:
  - approach: {speed_nm_s: 500, max_travel_nm: 5000}
  - acquire: start
  - bias: {volts: 1.0, rate_volts_per_s: 1.0}
  - hold: {duration_s: 20}
  - bias: 0
  - acquire: stop
"""


def test_cli_runs_a_protocol_with_live_progress_then_reports(
    live: LiveStation, tmp_path: Path
) -> None:
    protocol = tmp_path / "short_hold.yaml"
    protocol.write_text(SHORT)
    config = tmp_path / "station.toml"  # the daemon's: the CLI finds its endpoints there
    run = subprocess.run(
        module_command("insitu_daq", "run", str(protocol), "--config", str(config)),
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    run_file = lines[0].split(" -> ")[1]
    assert any(" hold " in line and "+1.0000 V" in line for line in lines), run.stdout
    assert lines[-1].endswith(": finished")

    status = subprocess.run(
        module_command("insitu_daq", "status", "--config", str(config)),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert status.returncode == 0 and '"state": "finished"' in status.stdout

    report = subprocess.run(
        module_command("insitu_daq", "report", run_file),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "hold         +1.000 V" in report.stdout
    assert "lost (missing image ids) 0" in report.stdout


def test_cli_refuses_an_invalid_protocol_with_one_line(live: LiveStation, tmp_path: Path) -> None:
    protocol = tmp_path / "bad.yaml"
    protocol.write_text(SHORT.replace("volts: 1.0", "volts: 9.0"))
    result = subprocess.run(
        module_command("insitu_daq", "run", str(protocol),
                       "--config", str(tmp_path / "station.toml")),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "step 3 (bias)" in result.stderr


def test_cli_refuses_a_protocol_with_a_key_given_twice_naming_it_and_its_line(
    live: LiveStation, tmp_path: Path
) -> None:
    # YAML readers keep the last of two equal keys: this would have been a 6 s hold.
    protocol = tmp_path / "dup.yaml"
    protocol.write_text(SHORT.replace("{duration_s: 20}", "{duration_s: 600, duration_s: 6}"))
    _, history_before, _ = live.model_state()
    result = subprocess.run(
        [*module_command("insitu_daq"), "run", str(protocol),
         "--config", str(tmp_path / "station.toml")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "insitu-daq: error: dup: not valid YAML: line 7, column 29: duplicate key 'duration_s'"
        " (first on line 7)\n"
    )
    assert live.model_state()[1] == history_before  # nothing moved
    assert not list(live.data_dir.glob("*.h5"))  # no run file


def test_python_scripted_protocol_runs_on_the_daemon(live: LiveStation) -> None:
    from insitu_daq.control.protocol import Acquire, Approach, Bias, Hold, Mark, Protocol
    from insitu_daq.service.client import DaemonClient

    staircase = Protocol(
        name="staircase",
        steps=[
            Approach(speed_nm_s=500, max_travel_nm=5000),
            Acquire(action="start"),
            *[s for volts in (0.5, 1.0) for s in (Bias(volts=volts), Hold(duration_s=10))],
            Mark(text="top of the staircase"),
            Bias(volts=0),
            Acquire(action="stop"),
        ],
    )
    with DaemonClient(live.control) as daemon:
        final = daemon.run(staircase, timeout_s=90)
        run_file = daemon.last_run_file
    assert final["protocol"]["state"] == "finished"
    with h5py.File(run_file, "r") as f:
        setpoints = set(np.round(f["/entry/sample/bias_voltage/setpoint"][:], 3))
        messages = [m.decode() for m in f["/entry/events/message"][:]]
        protocol_text = f["/entry/protocol/data"][()].decode()
    assert {0.5, 1.0} <= setpoints
    assert "top of the staircase" in messages
    assert Protocol.parse(protocol_text, "yaml") == staircase


def test_lost_source_meter_aborts_and_is_made_safe_once_back(live: LiveStation) -> None:
    from insitu_daq.sim.lineserver import TcpLineServer
    from insitu_daq.sim.sourcemeter import MAX_LINE

    reply = live.run(LONG_HOLD, "long_hold")
    live.wait_in_hold()
    sim = live.sims.source_meter
    port = sim.tcp_address()[1]
    sim.stop()  # the instrument stops answering (its output stays on at 2 V)
    status = live.wait_for(lambda s: s["protocol"]["state"] in FINAL, timeout_s=60)
    assert status["protocol"]["state"] == "aborted"
    assert live.model_state()[2][0] == 2.0  # nobody could switch it off yet
    # The same instrument answers again on its address: the daemon ramps it down.
    back = TcpLineServer("sourcemeter", "127.0.0.1", port, sim.instrument.handle_line, MAX_LINE)
    back.start()
    try:
        deadline = time.monotonic() + 60
        while live.model_state()[2][0] != 0.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        _, history, (volts, _, _) = live.model_state()
        assert volts == 0.0
        assert np.abs(np.diff([v for _, v in history])).max() <= 0.01 + 1e-9  # ramped
        live.wait_closed(reply["run_id"])
    finally:
        # The daemon stops while the instrument answers: otherwise it cannot confirm the bias
        # safe, and its guardian keeps trying to reach a closed port for 10 minutes.
        live.close()
        back.stop()
    with h5py.File(reply["run_file"], "r") as f:
        kinds = [k.decode() for k in f["/entry/events/kind"][:]]
    assert "instrument" in kinds


class StartingStation(LiveStation):
    """A LiveStation whose daemon is not waited for: the test acts while it starts."""

    def _wait_until_up(self, timeout_s: float = 30.0) -> None:
        return


def test_sigterm_while_the_daemon_starts_stops_it_cleanly_and_the_guardian_stands_down(
    tmp_path: Path,
) -> None:
    """SIGTERM during start-up (after the guardian is up, before the API answers): the daemon
    unwinds what it started, exits with one line, and its guardian stands down instead of
    taking over the source-meter (it would retry an absent one for minutes)."""
    station = StartingStation(tmp_path)
    try:
        guardian_log = station.data_dir / "guardian.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if guardian_log.exists() and "watching daemon pid" in guardian_log.read_text():
                break
            time.sleep(0.01)
        assert station.process.poll() is None, station.daemon_log()
        station.process.send_signal(signal.SIGTERM)
        code = station.process.wait(timeout=30)
        log = station.daemon_log()
        assert "Traceback" not in log, log
        if code == 1:  # caught while starting (the usual case)
            assert "daemon stopped while starting; bias output off" in log
        else:  # it had just come up: stopped as a running daemon
            assert code == 0 and "daemon stopped; bias output off" in log, log
        deadline = time.monotonic() + 10
        while "standing down" not in guardian_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        guarded = guardian_log.read_text()
        assert "standing down" in guarded and "making the source-meter safe" not in guarded
        _, _, (volts, _, _) = station.model_state()
        assert volts == 0.0
    finally:
        station.close()
