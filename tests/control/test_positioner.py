"""The daemon's holder and microscope controls against the simulators over their real transports."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from insitu_daq.control.instruments.monitor import InstrumentMonitor
from insitu_daq.control.instruments.positioner import HolderControl, MicroscopeControl
from insitu_daq.control.station import StationError, Stopped
from insitu_daq.core.clock import RunClock
from insitu_daq.core.config import HolderConfig, MicroscopeConfig, RetryConfig
from insitu_daq.ingest.wire import series_dtype
from insitu_daq.service.sinks import series_logs
from insitu_daq.sim.holder import SimulatedHolder
from insitu_daq.sim.microscope import SimulatedMicroscope
from insitu_daq.sim.station import SimStation

FAST_RETRY = RetryConfig(attempts=3, first_delay_s=0.05, max_delay_s=0.1)


@pytest.fixture
def station() -> SimStation:
    return SimStation(time_scale=100.0)


@pytest.fixture
def holder(station: SimStation):
    sim = SimulatedHolder(station, port=0, pty=False)
    with sim:
        control = HolderControl(HolderConfig(port=sim.endpoints["url"]), FAST_RETRY)
        control.connect()
        yield control, sim
        control.close()


def test_approach_stops_at_contact_and_retract_leaves_it(holder, station: SimStation) -> None:
    control, _ = holder
    travel = control.approach(2000.0, 5000.0, threading.Event())
    with station.model() as m:
        assert m.contact
        assert travel == pytest.approx(m.params.initial_gap_nm, abs=1.0)
    control.retract(500.0, 200.0, threading.Event())
    with station.model() as m:
        assert not m.contact
        assert m.tip_position_nm == pytest.approx(-500.0, abs=60.0)


def test_approach_without_contact_fails_the_step(holder) -> None:
    control, _ = holder
    with pytest.raises(StationError, match="no contact"):
        control.approach(2000.0, 500.0, threading.Event())


def test_stop_event_interrupts_an_approach(holder, station: SimStation) -> None:
    control, _ = holder
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    with pytest.raises(Stopped) as stopped:
        control.approach(1.0, 5000.0, stop)  # 1 nm/s: would take ~30 s of wall time
    assert not control.status().moving
    with station.model() as m:
        travelled = m.tip_position_nm + m.params.initial_gap_nm
    assert stopped.value.moved_nm == pytest.approx(travelled, abs=0.2)


def test_a_holder_types_own_verb_goes_through_the_link_one_caller_at_a_time(
    holder, station: SimStation
) -> None:
    """`call` is how a step kind reaches a verb the station has none for (a heating holder's
    temperature): here the driver's own status query, over the real line, while another
    caller (the monitor's poll, from its thread) is kept off the line."""
    control, _ = holder
    others: list[bool] = []

    def look(driver):
        poller = threading.Thread(target=lambda: others.append(control.poll(threading.Event())))
        poller.start()
        poller.join(5.0)
        return driver.status()

    control.approach(2000.0, 5000.0, threading.Event())
    status = control.call(look)
    with station.model() as m:
        assert status.contact and m.contact
    assert status.position_nm == pytest.approx(control.status().position_nm)
    assert others == [False]  # the line was taken: the other caller read nothing
    assert control.poll(threading.Event()) is True  # and it is free again afterwards


def test_lost_holder_is_retried_then_fails_with_station_error(holder) -> None:
    _, sim = holder
    retries: list[str] = []
    control = HolderControl(
        HolderConfig(port=sim.endpoints["url"]), FAST_RETRY, on_retry=retries.append
    )
    control.connect()
    sim.stop()
    with pytest.raises(StationError, match="not answering"):
        control.status()
    assert len(retries) == FAST_RETRY.attempts - 1
    control.close()


def test_microscope_control_applies_mode_beam_and_dose(station: SimStation) -> None:
    with SimulatedMicroscope(station, port=0) as sim:
        host, port = sim.endpoints["tcp"].rsplit(":", 1)
        control = MicroscopeControl(MicroscopeConfig(host=host, port=int(port)), FAST_RETRY)
        assert control.connect()
        control.apply(mode="hrtem", beam=True, dose_rate_e_per_a2_s=50.0, pixel_size_nm=0.05)
        assert station.optics.mode.value == "hrtem"
        assert station.optics.pixel_size_nm == 0.05
        with station.model() as m:
            assert m.beam_on
            assert m.dose_rate_e_per_a2_s == 50.0
        control.close()


# ----- the holder monitor ------------------------------------------------------------------------
class _Recorder:
    """The daemon's side of a monitor: the rows it publishes and the states it reports."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple]] = {}
        self.states: list[tuple[bool, str]] = []

    def publish(self, name: str, rows: list[tuple]) -> None:
        self.rows.setdefault(name, []).extend(rows)

    def on_state(self, answering: bool, message: str) -> None:
        self.states.append((answering, message))


def _wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_monitor_records_the_position_on_the_run_clock_and_every_poll_of_a_move(
    holder, station: SimStation
) -> None:
    control, _ = holder
    recorder = _Recorder()
    clock = RunClock()
    run_clock: list[RunClock | None] = [None]  # no run open yet
    period_s = 0.05
    monitor = InstrumentMonitor(
        control, period_s, lambda: run_clock[0], recorder.publish, recorder.on_state
    )
    monitor.start()
    try:
        _wait_until(lambda: monitor.readings_total >= 3)
        assert recorder.rows == {}  # readings keep the watch; the run file gets them in a run
        run_clock[0] = clock
        _wait_until(lambda: len(recorder.rows.get("holder_position", [])) >= 3)
        idle = len(recorder.rows["holder_position"])
        began = clock.now()
        # The monitor keeps polling every 50 ms while the approach polls the same line: a
        # reply answering the wrong query would show as a wrong travel or a parse error.
        travel = control.approach(100.0, 5000.0, threading.Event())  # ~0.3 s of wall time
        ended = clock.now()
        _wait_until(lambda: len(recorder.rows["holder_position"]) >= idle + 2)
    finally:
        monitor.stop()
    rows = np.array(recorder.rows["holder_position"], series_dtype("holder_position"))
    assert np.all(np.diff(rows["time"]) > 0)
    assert np.all((rows["time_errors"] > 0) & (rows["time_errors"] < 0.5))
    assert np.all(np.diff(rows["time"][:idle]) >= period_s * 0.9)  # idle: once a period
    assert np.all(rows["value"][:idle] == 0.0)  # POS? counts from the power-on position
    moving = rows[(rows["time"] > began) & (rows["time"] < ended)]
    assert len(moving) > 3  # the approach's own polls, taken as they came
    assert np.all(np.diff(moving["value"]) >= 0)
    assert np.any((moving["value"] > 1.0) & (moving["value"] < travel - 1.0))
    assert rows["value"][-1] == pytest.approx(travel, abs=1.0)
    assert recorder.states == []  # it answered throughout


def test_monitor_reports_a_holder_that_stops_answering_once_and_when_it_is_back(
    holder, station: SimStation
) -> None:
    _, sim = holder
    url = sim.endpoints["url"]
    retries: list[str] = []
    control = HolderControl(HolderConfig(port=url), FAST_RETRY, on_retry=retries.append)
    control.connect()
    recorder = _Recorder()
    monitor = InstrumentMonitor(control, 0.05, RunClock, recorder.publish, recorder.on_state)
    monitor.start()
    back: SimulatedHolder | None = None
    try:
        _wait_until(lambda: monitor.readings_total >= 2)
        sim.stop()  # the controller stops answering, nobody moving the holder
        _wait_until(lambda: len(recorder.states) == 1)
        answering, message = recorder.states[0]
        assert not answering and message.startswith("holder not answering")
        assert len(retries) == FAST_RETRY.attempts - 1  # the link's retries, as for a move
        _wait_until(lambda: monitor.polls_failed_total >= 5)  # probing, once a period
        assert len(recorder.states) == 1 and len(retries) == FAST_RETRY.attempts - 1  # quietly
        with pytest.raises(StationError, match="not answering"):  # a move fails as before
            control.status()
        readings = monitor.readings_total
        back = SimulatedHolder(station, port=int(url.rsplit(":", 1)[1]), pty=False)
        back.start()
        _wait_until(lambda: len(recorder.states) == 2)
        assert recorder.states[1] == (True, "holder answering again")
        _wait_until(lambda: monitor.readings_total > readings + 2)
    finally:
        monitor.stop()
        control.close()
        if back is not None:
            back.stop()
    assert monitor.answering and not monitor.running


def test_stopping_the_monitor_of_a_lost_holder_does_not_wait_for_its_retries(holder) -> None:
    _, sim = holder
    slow_retry = RetryConfig(attempts=5, first_delay_s=30.0, max_delay_s=30.0)
    control = HolderControl(HolderConfig(port=sim.endpoints["url"]), slow_retry)
    control.connect()
    recorder = _Recorder()
    monitor = InstrumentMonitor(control, 0.05, lambda: None, recorder.publish, recorder.on_state)
    monitor.start()
    _wait_until(lambda: monitor.readings_total >= 1)
    sim.stop()
    time.sleep(0.3)  # its poll has failed and it is in the link's 30 s back-off
    assert monitor.running
    began = time.monotonic()
    monitor.stop(timeout_s=10.0)  # a bound, not the assertion: the thread must be gone
    print(f"\nmonitor of a lost holder stopped in {time.monotonic() - began:.3f} s")
    assert not monitor.running and recorder.states == []  # it never gave up: still retrying
    control.close()


def test_a_series_no_run_file_log_declares_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="holder series 'holder_humidity': no run-file log"):
        series_logs("holder", {"holder_humidity": ("humidity",)})
    with pytest.raises(ValueError, match=r"2 attributes .* for the columns of /entry/instrument"):
        series_logs("holder", {"holder_position": ("position_nm", "fine_extension_nm")})
