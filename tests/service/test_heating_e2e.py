"""End to end with a heating holder: the simulated station (here) with its MEMS heating holder,
`insitu-daq daemon` (a real process) over real sockets, the run file read back.

One daemon for both checks (its start is most of the cost): a short temperature staircase
whose run file holds the temperature log and every frame's temperature, with the heater off
when the run has ended; then a second run heating when the daemon is SIGKILLed, after which
its guardian switches the heater off. The first run also shows the temperature where people
look: the status and `insitu-daq run`'s progress line, a hold until the chip's temperature,
the event stream's `series` topic into the web view's state, and the run file's report
(levels, figure panel) and replay.
"""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_daemon_e2e import FINAL, LiveStation

from insitu_daq.analysis.reflections import DEFAULT_REFLECTIONS
from insitu_daq.app.progress import format_status
from insitu_daq.core.config import load_config
from insitu_daq.report.events import hold_span, read_events
from insitu_daq.report.figure import draw_report_figure
from insitu_daq.report.summary import format_summary, summarize
from insitu_daq.service.api import EventSubscriber
from insitu_daq.web.replay import replay_state
from insitu_daq.web.state import LiveState

STAIRCASE = """
name: short_staircase
steps:
  - microscope: {mode: hrtem, beam: on, dose_rate_e_per_a2_s: 35}
  - acquire: start
  - wait: 5
  - temperature_staircase: {to_celsius: 52, step_c: 15, rate_c_per_s: 5, settle_s: 10}
  - hold: {duration_s: 20, until: "temperature_celsius >= 50"}
  - acquire: stop
"""
HEAT_AND_HOLD = """
name: heat_and_hold
steps:
  - temperature: {celsius: 300, rate_c_per_s: 5}
  - hold: 600
"""


class HeatingStation(LiveStation):
    """The daemon's end-to-end station (test_daemon_e2e.py) with a MEMS heating holder."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(
            tmp_path,
            frame_shape=(64, 64),
            holder_model="mems_heating",
            holder_settings="poll_interval_s = 0.05\n",
            extra_config="[limits]\nmax_temperature_c = 400\nmax_temperature_rate_c_per_s = 10\n",
        )
        self.events = load_config(self.config_path).api.events

    def chip(self) -> tuple[float, bool]:
        with self.sims.station.model():
            return self.sims.station.chip.temperature_c, self.sims.station.chip.heater_on


@pytest.fixture
def heating(tmp_path: Path) -> Iterator[HeatingStation]:
    station = HeatingStation(tmp_path)
    yield station
    station.close()


def test_heating_run_logs_temperature_per_frame_and_the_guardian_switches_the_heater_off(
    heating: HeatingStation, tmp_path: Path
) -> None:
    statuses: list[dict] = []
    with EventSubscriber(heating.events, topics=["series"]) as stream:
        reply = heating.run(STAIRCASE, "short_staircase")
        status = heating.wait_for(
            lambda s: (
                statuses.append(s) is None
                and s["last_run_id"] == reply["run_id"]
                and s["run_id"] is None
                and s["protocol"]["state"] in FINAL
            )
        )
        # The web view's feed: the chip's readings on the stream, into the page's state.
        page = LiveState(DEFAULT_REFLECTIONS, "heating")
        while "holder_temperature" not in page.snapshot()["series"]:
            message = stream.receive(timeout_s=2.0)
            assert message is not None, "no chip readings on the event stream"
            page.on_series(message[1])
    assert status["protocol"]["state"] == "finished", status["protocol"]["reason"]
    # Every run ends with the heater off (control/heater.py), as with the bias at 0 V.
    assert heating.chip()[1] is False
    # The status, as `insitu-daq status` and the progress lines show it: the chip while heating,
    # then (its next reading) the heater off.
    heated = [s for s in statuses if s["temperature"]["heater_on"]]
    assert heated, statuses[-1]
    assert max(s["temperature"]["setpoint_c"] for s in heated) == pytest.approx(52.0)
    assert re.search(r"\d+\.\d C \(set \d+\.\d\)", format_status(heated[-1]))
    cold = heating.wait_for(lambda s: s["temperature"]["heater_on"] is False, timeout_s=5.0)
    assert "C (heater off)" in format_status(cold)
    live = page.snapshot()["series"]["holder_temperature"]
    assert set(live) == {"t", "value", "setpoint"} and live["t"] and not page.counters
    metrics = urllib.request.urlopen(heating.metrics, timeout=5).read().decode()
    assert 'insitu_daq_temperature_celsius{sensor="chip"}' in metrics

    with h5py.File(reply["run_file"], "r") as f:
        log = f["/entry/sample/temperature"]
        assert log.attrs["NX_class"] == "NXlog"
        assert log["value"].attrs["units"] == "degC"
        times, values, setpoints = log["time"][:], log["value"][:], log["setpoint"][:]
        assert len(times) > 20  # read every 0.05 s of wall time, 1 station s
        assert values.min() == pytest.approx(22.0, abs=0.5)  # room temperature, heater off
        assert values.max() == pytest.approx(52.0, abs=1.5)  # the last level, overshoot
        assert set(np.round(setpoints[setpoints > 30])) >= {37.0, 52.0}  # both levels held
        assert f["/entry/instrument/holder/heater/power"][:].max() > 0.0
        detector = f["/entry/instrument/detector"]
        frame_time = detector["frame_time"][:]
        per_frame = detector["temperature"][:]
        assert detector["temperature"].attrs["units"] == "degC"
        assert len(frame_time) > 40 and len(per_frame) == len(frame_time)
        # The log at each frame's time, as bias_voltage is the bias log's.
        np.testing.assert_allclose(per_frame, np.interp(frame_time, times, values), atol=1e-9)
        assert per_frame.min() < 30.0 and per_frame.max() > 50.0  # the movie saw the heating
        kinds = [k.decode() for k in f["/entry/events/kind"][:]]
        messages = [m.decode() for m in f["/entry/events/message"][:]]
    assert kinds.count("temperature") >= 3  # two levels, and the heater off at the end
    assert any(m.startswith("heater off") for m in messages)
    # The hold read the chip's readings (not its 20 s timeout).
    with h5py.File(reply["run_file"], "r") as f:
        assert hold_span(read_events(f["/entry"])).ended_by == "condition"  # type: ignore[union-attr]

    # The report: the range and the levels with their frames, the figure's panel, the replay.
    summary = summarize(reply["run_file"])
    assert summary.temperature is not None
    levels = {round(level.setpoint_c): level for level in summary.temperature.levels}
    assert {37, 52} <= set(levels) and levels[37].frames > 0 and levels[52].frames > 0
    assert levels[52].mean_c == pytest.approx(52.0, abs=0.5)
    assert re.search(r"^level +52\.0 C from", format_summary(summary), re.MULTILINE)
    assert draw_report_figure(reply["run_file"], tmp_path / "run.png").panels["temperature"]
    replayed = replay_state(Path(reply["run_file"]))["series"]["holder_temperature"]
    np.testing.assert_allclose(replayed["value"], values)

    # The daemon dies while the chip is hot: its guardian switches the heater off.
    heating.run(HEAT_AND_HOLD, "heat_and_hold")
    deadline = time.monotonic() + 20
    while heating.chip()[0] < 60.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    temperature, heater_on = heating.chip()
    assert heater_on and temperature >= 60.0, heating.daemon_log()
    killed = time.monotonic()
    heating.process.send_signal(signal.SIGKILL)
    heating.process.wait(timeout=10)
    deadline = time.monotonic() + 30
    while heating.chip()[1] and time.monotonic() < deadline:
        time.sleep(0.01)
    print(f"\nheater off {time.monotonic() - killed:.2f} s after the daemon's SIGKILL")
    temperature, heater_on = heating.chip()
    log = heating.data_dir / "guardian.log"
    assert not heater_on, log.read_text()
    assert temperature == pytest.approx(22.0, abs=0.5)
    while "heater OFF" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)  # it writes its log line once it has read the heater back off
    assert "heater OFF (it was on" in log.read_text()
    # Done with the instruments once the source-meter is seen safe too (its output was never
    # on): only then are the simulators stopped, or it would retry them for 10 minutes.
    while "nothing to do" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "output already off" in log.read_text()
