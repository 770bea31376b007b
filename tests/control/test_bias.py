"""BiasController against the simulated source-meters over real TCP and real PyVISA (pyvisa-py).

Every test that takes the `sim` fixture runs against each model the simulator speaks (the
Keithley 2400 and the 2450 in its native SCPI), each driven by the driver the factory picks
for the config's `model`: the same safety behaviour whatever the model.

The simulated instrument shares the station model, whose `bias_history` is the ground truth of
what reached the sample: ramps, trips and make-safe are checked there, not in the controller's
own view. Lost-instrument tests stop the simulator's TCP server (connections drop, the
instrument keeps its state, as when a LAN-GPIB bridge goes away) and serve the same
instrument again on the same port.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from insitu_daq.control.bias import BiasController
from insitu_daq.control.instruments import SourceMeter
from insitu_daq.control.instruments.factory import open_source_meter
from insitu_daq.control.limits import LimitError
from insitu_daq.control.station import StationError, Stopped
from insitu_daq.core.clock import RunClock
from insitu_daq.core.config import SourceMeterConfig, StationConfig, parse_config
from insitu_daq.core.records import Event, EventKind, bias_samples, level_change_mask
from insitu_daq.sim.lineserver import TcpLineServer
from insitu_daq.sim.sourcemeter import MAX_LINE, SimulatedSourceMeter
from insitu_daq.sim.station import SimStation

COMPLIANCE_A = 100e-9
STEP_V = 0.02
MAX_RATE = 2.0  # V/s
RATE_HZ = 50.0


class Recorder:
    """Collects what the controller delivers; `wait` polls a condition with a deadline."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.events: list[Event] = []
        self.calls: list[tuple[str, str]] = []  # ("trip" | "lost", reason)
        self.on_trip: Callable[[str], None] | None = None  # extra action, like the runner's
        self.on_lost: Callable[[str], None] | None = None

    def rows(self) -> np.ndarray:
        return np.concatenate(self.batches) if self.batches else bias_samples()

    def samples(self) -> np.ndarray:
        """The readings (the batches also carry the commanded level changes)."""
        rows = self.rows()
        return rows[~level_change_mask(rows)]

    def level_changes(self) -> np.ndarray:
        rows = self.rows()
        return rows[level_change_mask(rows)]

    def trip(self, reason: str) -> None:
        self.calls.append(("trip", reason))
        if self.on_trip is not None:
            self.on_trip(reason)

    def lost(self, reason: str) -> None:
        self.calls.append(("lost", reason))
        if self.on_lost is not None:
            self.on_lost(reason)

    def messages(self, kind: str | None = None) -> list[str]:
        return [e.message for e in self.events if kind is None or e.kind == kind]


def wait(condition: Callable[[], Any], timeout_s: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


def make_config(sim: SimulatedSourceMeter, **retry: float) -> StationConfig:
    return parse_config(
        {
            "source_meter": {
                "model": sim.model,
                "resource": sim.endpoints["visa"],
                "timeout_s": 0.2,
            },
            "limits": {
                "max_bias_volts": 5.0,
                "compliance_amperes": COMPLIANCE_A,
                "max_ramp_rate_volts_per_s": MAX_RATE,
                "ramp_step_volts": STEP_V,
            },
            "sampling": {"bias_rate_hz": RATE_HZ},
            "retry": {"attempts": 6, "first_delay_s": 0.05, "max_delay_s": 0.3} | retry,
        }
    )


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    yield
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("bias-")]
    assert not leftover, f"threads left running: {leftover}"


@pytest.fixture
def station() -> SimStation:
    return SimStation(seed=5)


@pytest.fixture(params=["keithley2400", "keithley2450"])
def sim(station: SimStation, request: pytest.FixtureRequest) -> Iterator[SimulatedSourceMeter]:
    with SimulatedSourceMeter(station, port=0, model=request.param) as server:
        yield server


def front_panel(sim: SimulatedSourceMeter) -> SourceMeter:
    """Another session on the instrument (its front panel, another program), of its model."""
    return open_source_meter(SourceMeterConfig(model=sim.model, resource=sim.endpoints["visa"]))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def make_controller(
    config: StationConfig, recorder: Recorder, clock: RunClock | None = None, **kwargs: Any
) -> BiasController:
    return BiasController(
        config,
        clock or RunClock(),
        on_samples=recorder.batches.append,
        on_event=recorder.events.append,
        on_trip=recorder.trip,
        on_lost=recorder.lost,
        **kwargs,
    )


@pytest.fixture
def controller(sim: SimulatedSourceMeter, recorder: Recorder) -> Iterator[BiasController]:
    bias = make_controller(make_config(sim), recorder)
    bias.start()
    yield bias
    bias.stop()


def history(station: SimStation, since: int = 0) -> list[tuple[float, float]]:
    with station.model() as m:
        return list(m.bias_history)[since:]


def history_length(station: SimStation) -> int:
    with station.model() as m:
        return len(m.bias_history)


def in_contact(station: SimStation) -> bool:
    with station.model() as m:
        return m.contact


def applied_bias(station: SimStation) -> float:
    with station.model() as m:
        return m.applied_bias()


def assert_staircase(levels: list[tuple[float, float]], rate: float) -> None:
    """Every change at most one step; mean rate (model time) at most `rate` (+5 % for the
    transport jitter of the first and last step)."""
    steps = [abs(b - a) for (_, a), (_, b) in itertools.pairwise(levels)]
    assert steps, "no level change recorded"
    assert max(steps) <= STEP_V + 1e-9
    span = sum(steps)
    duration = levels[-1][0] - levels[1][0]  # from the first change to the last
    if len(steps) > 1:
        assert (span - steps[0]) / duration <= rate * 1.05


def serve_again(sim: SimulatedSourceMeter, port: int) -> TcpLineServer:
    """The same instrument (state kept) served again on its old port."""
    server = TcpLineServer("sourcemeter", "127.0.0.1", port, sim.instrument.handle_line, MAX_LINE)
    server.start()
    return server


# ----- start ---------------------------------------------------------------------------------
def test_start_sets_compliance_before_any_output_on_and_leaves_output_off(
    sim: SimulatedSourceMeter, station: SimStation, recorder: Recorder
) -> None:
    source_settings: list[tuple[bool, float]] = []  # (output on, compliance) the model saw
    with station.model() as m:
        set_source = m.set_source

        def spy(output_on: bool, level_volts: float, compliance_amperes: float) -> None:
            source_settings.append((output_on, compliance_amperes))
            set_source(output_on, level_volts, compliance_amperes)

        m.set_source = spy  # type: ignore[method-assign]
    bias = make_controller(make_config(sim), recorder)
    bias.start()
    try:
        settings = sim.instrument.settings
        assert settings.current_compliance == COMPLIANCE_A
        assert settings.nplc == pytest.approx(0.1)
        assert not settings.output
        assert not bias.state.output_on
        assert bias.identity is not None and bias.identity.model == sim.instrument.MODEL

        bias.ramp_to(0.1)
        first_on = next(compliance for on, compliance in source_settings if on)
        assert first_on == COMPLIANCE_A
    finally:
        bias.stop()
    assert not sim.instrument.settings.output


# 5.1 V: beyond the station's 5 V limit (set from the front panel); the limits check every
# level written, and a ramp down from beyond them must still go through.
@pytest.mark.parametrize("left_on_volts", [0.3, 5.1])
def test_start_ramps_down_an_output_left_on(
    sim: SimulatedSourceMeter, station: SimStation, recorder: Recorder, left_on_volts: float
) -> None:
    with contextlib.closing(front_panel(sim)) as earlier_session:
        earlier_session.set_voltage(left_on_volts)
        earlier_session.output_on()
    since = history_length(station) - 1

    bias = make_controller(make_config(sim), recorder)
    bias.start()
    bias.stop()

    assert not sim.instrument.settings.output
    levels = history(station, since)
    assert levels[0][1] == pytest.approx(left_on_volts) and levels[-1][1] == 0.0
    assert_staircase(levels, MAX_RATE)


# ----- sampling ------------------------------------------------------------------------------
def test_samples_flow_at_the_configured_rate_stamped_on_the_run_clock(
    sim: SimulatedSourceMeter, recorder: Recorder
) -> None:
    clock = RunClock(time_scale=3.0)  # run-clock seconds, not wall seconds
    bias = make_controller(make_config(sim), recorder, clock)
    bias.start()
    try:
        bias.ramp_to(0.2)
        time.sleep(0.1)  # let the samples of the ramp be delivered
        window_s = 1.0
        begin, window_start = len(recorder.samples()), clock.now()
        time.sleep(window_s)
        window_end = clock.now()
        samples = recorder.samples()[begin:]
    finally:
        bias.stop()

    assert len(samples) >= 0.6 * RATE_HZ * window_s  # a wall-clock rate
    assert np.all(np.diff(recorder.samples()["time"]) > 0)
    assert np.all(samples["time_error"] > 0)
    inside = samples[samples["time"] > window_start]
    assert len(inside) >= 0.6 * RATE_HZ * window_s * 0.9
    assert inside["time"].max() <= window_end
    assert inside["time"].max() - inside["time"].min() > 2.0 * window_s  # scaled by 3
    assert samples["voltage"] == pytest.approx(0.2, abs=1e-3)
    assert np.all(samples["setpoint"] == 0.2)
    assert np.all(np.abs(samples["current"]) < 1e-9)  # open circuit: noise floor
    assert np.all(samples["status"] != 0)


def test_samples_with_the_output_off_say_not_measured(
    controller: BiasController, recorder: Recorder
) -> None:
    wait(lambda: len(recorder.samples()) >= 5, what="samples with the output off")
    off = recorder.samples()
    assert np.all(off["voltage"] == 0.0)
    assert np.all(np.isnan(off["current"]))
    assert np.all(off["time_error"] > 0)


# ----- ramps ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("time_scale", "rate"), [(1.0, 1.5), (10.0, 0.3)])
def test_ramp_is_a_staircase_within_the_rate_limit_in_run_clock_seconds(
    recorder: Recorder, time_scale: float, rate: float
) -> None:
    # A time-scaled station: rates are per station second, as the run clock counts them.
    station = SimStation(seed=5, time_scale=time_scale)
    scaled = SimulatedSourceMeter(station, port=0)
    scaled.start()
    bias = make_controller(make_config(scaled), recorder, RunClock(time_scale))
    try:
        bias.start()
        since = history_length(station) - 1
        bias.ramp_to(0.8, rate_volts_per_s=rate)
        up = history(station, since)
        assert up[-1][1] == pytest.approx(0.8)
        assert_staircase(up, rate)

        since = history_length(station) - 1
        bias.ramp_to(-0.4, rate_volts_per_s=rate * 1.3)  # through zero
        down = history(station, since)
        assert down[-1][1] == pytest.approx(-0.4)
        assert_staircase(down, rate * 1.3)
    finally:
        bias.stop()
        scaled.stop()

    samples = recorder.samples()
    during_ramp = samples[(samples["setpoint"] > 0.05) & (samples["setpoint"] < 0.75)]
    assert len(during_ramp) >= 3  # the log shows the ramp, not just its ends
    assert during_ramp["voltage"] == pytest.approx(during_ramp["setpoint"], abs=1e-3)


def test_level_changes_are_stamped_when_the_source_changed(
    sim: SimulatedSourceMeter, station: SimStation, recorder: Recorder
) -> None:
    # The per-frame bias relies on these stamps (runfile/framebias.py): each change of the commanded
    # level is logged, in order, with the run-clock time of the write that made it.
    clock = RunClock()
    bias = make_controller(make_config(sim), recorder, clock)
    bias.start()
    try:
        since = history_length(station) - 1
        bias.ramp_to(0.3, rate_volts_per_s=1.0)
        model = history(station, since)
        bias.ramp_to(0.0, rate_volts_per_s=1.0)
        bias.output_off()
        time.sleep(0.1)  # delivery
    finally:
        bias.stop()
    changes = recorder.level_changes()
    assert np.all(np.isnan(changes["voltage"])) and np.all(np.isnan(changes["current"]))
    assert np.all(np.diff(changes["time"]) > 0)
    assert np.all(changes["time_error"] > 0)
    # The ramp up, as the model saw it: same levels, same spacing in time (model and run
    # clock both count wall seconds here; their origins differ, so compare intervals).
    model_times = np.array([t for t, _ in model[1:]])
    model_levels = np.array([v for _, v in model[1:]])
    up = changes[(changes["setpoint"] > 0) & (changes["time"] <= changes["time"][
        np.argmax(changes["setpoint"])])]  # fmt: skip
    assert up["setpoint"][-len(model_levels) :] == pytest.approx(model_levels)
    stamps = up["time"][-len(model_levels) :]
    jitter = np.abs(np.diff(stamps) - np.diff(model_times))
    assert np.median(jitter) < 0.5e-3
    assert changes["setpoint"][-1] == 0.0  # output off: the terminals see 0 V
    # and the readings log is only readings
    assert not np.any(level_change_mask(recorder.samples()))


def test_stop_event_holds_the_level_where_the_ramp_was(controller: BiasController) -> None:
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(Stopped):
        controller.ramp_to(2.0, rate_volts_per_s=1.0, stop=stop)
    held = controller.state.setpoint
    assert 0.0 < held < 2.0
    time.sleep(0.1)
    assert controller.state.setpoint == held
    assert controller.state.output_on


# ----- limits --------------------------------------------------------------------------------
class CountingSourceMeter:
    """The configured model's real driver, counting the calls that change what the terminals
    see; every other call goes straight to the driver."""

    level_changes = 0

    def __init__(self, driver: SourceMeter) -> None:
        self._driver = driver

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)

    def set_voltage(self, volts: float) -> None:
        CountingSourceMeter.level_changes += 1
        self._driver.set_voltage(volts)

    def output_on(self) -> None:
        CountingSourceMeter.level_changes += 1
        self._driver.output_on()


@pytest.mark.parametrize(
    ("volts", "rate", "named"),
    [
        (5.5, None, "max_bias_volts"),
        (-5.01, None, "max_bias_volts"),
        (1.0, 2.5, "max_ramp_rate_volts_per_s"),
        (1.0, 0.0, "positive"),
        (math.nan, None, "finite"),
        (1.0, math.inf, "positive"),
    ],
)
def test_limits_are_refused_before_the_instrument_is_touched(
    sim: SimulatedSourceMeter,
    station: SimStation,
    recorder: Recorder,
    volts: float,
    rate: float | None,
    named: str,
) -> None:
    config = make_config(sim)
    CountingSourceMeter.level_changes = 0
    bias = make_controller(
        config,
        recorder,
        driver_factory=lambda: CountingSourceMeter(open_source_meter(config.source_meter)),
    )
    with pytest.raises(LimitError, match=named):
        bias.ramp_to(volts, rate)  # not started: the limit is checked before anything else

    bias.start()
    try:
        changes, since = CountingSourceMeter.level_changes, history_length(station)
        with pytest.raises(LimitError, match=named):
            bias.check(volts, rate)
        with pytest.raises(LimitError, match=named):
            bias.ramp_to(volts, rate)
        time.sleep(0.05)  # a wrongly queued goal would act within this
        assert CountingSourceMeter.level_changes == changes
        assert history_length(station) == since
        assert not sim.instrument.settings.output
        assert sim.instrument.settings.voltage_level == 0.0
        assert bias.state.target == 0.0
    finally:
        bias.stop()


# ----- compliance trip -----------------------------------------------------------------------
def test_compliance_trip_ramps_down_switches_off_and_pauses(
    controller: BiasController, sim: SimulatedSourceMeter, station: SimStation, recorder: Recorder
) -> None:
    with station.model() as m:
        m.move_tip_to(5.0, 1e6)
    wait(lambda: in_contact(station), what="contact")
    outcome: list[str] = []

    def ramp() -> None:
        try:
            controller.ramp_to(1.5, rate_volts_per_s=1.0)
            outcome.append("reached")
        except Stopped as exc:
            outcome.append(f"stopped: {exc}")

    ramping = threading.Thread(target=ramp)
    ramping.start()
    wait(lambda: controller.state.setpoint >= 0.3, what="ramp under way")
    sim.inject_short(True)
    ramping.join(timeout=5.0)

    assert [kind for kind, _ in recorder.calls] == ["trip"]
    assert outcome and outcome[0].startswith("stopped: compliance trip")
    wait(lambda: not controller.state.output_on, what="output off")
    assert not sim.instrument.settings.output
    assert sim.instrument.settings.voltage_level == 0.0
    assert applied_bias(station) == 0.0
    state = controller.state
    assert state.tripped and state.trips_total == 1 and not state.output_on
    wait(lambda: "output off" in recorder.messages(), what="output-off event")
    trip = next(e for e in recorder.events if e.kind == EventKind.TRIP)
    assert trip.data is not None
    assert trip.data["current"] == pytest.approx(COMPLIANCE_A, rel=0.05)
    assert recorder.messages().index(trip.message) < recorder.messages().index("output off")


# ----- someone else at the instrument (front panel, another program) ------------------------
def test_output_switched_off_elsewhere_is_not_switched_back_on(
    controller: BiasController, sim: SimulatedSourceMeter, recorder: Recorder
) -> None:
    controller.ramp_to(0.3)
    with contextlib.closing(front_panel(sim)) as other:
        other.output_off()
    wait(lambda: recorder.calls, what="on_lost")
    assert recorder.calls[0][0] == "lost" and "output went off" in recorder.calls[0][1]
    time.sleep(0.1)  # time enough to (wrongly) switch it back on
    assert not sim.instrument.settings.output
    assert not controller.state.output_on


def test_output_switched_on_elsewhere_is_ramped_down(
    controller: BiasController, sim: SimulatedSourceMeter, station: SimStation
) -> None:
    with contextlib.closing(front_panel(sim)) as other:
        other.set_voltage(0.2)
        other.output_on()
    since = history_length(station) - 1
    wait(lambda: not sim.instrument.settings.output, what="output off again")
    assert applied_bias(station) == 0.0
    assert_staircase(history(station, since), MAX_RATE)


# ----- lost instrument -----------------------------------------------------------------------
def test_short_outage_reconnects_and_records_the_gap(
    controller: BiasController, sim: SimulatedSourceMeter, station: SimStation, recorder: Recorder
) -> None:
    controller.ramp_to(0.5)
    port = sim.tcp_address()[1]
    sim.stop()  # the link drops; the instrument keeps sourcing 0.5 V
    wait(lambda: not controller.state.connected, what="loss detected")
    time.sleep(0.2)
    server = serve_again(sim, port)
    try:
        wait(lambda: controller.state.reconnects_total == 1, what="reconnect")
        wait(lambda: any("gap" in m for m in recorder.messages()), what="gap event")
        time.sleep(0.1)  # samples after the gap
    finally:
        controller.stop()
        server.stop()

    assert recorder.calls == []  # retries sufficed: the protocol goes on
    messages = recorder.messages(EventKind.INSTRUMENT)
    assert messages[0].startswith("source-meter lost")
    assert any(m.startswith("source-meter back") for m in messages)
    gap = next(e for e in recorder.events if e.data and "gap_end" in e.data)
    assert gap.data is not None
    start, end = gap.data["gap_start"], gap.data["gap_end"]
    times = recorder.samples()["time"]
    assert not np.any((times > start) & (times < end))  # nothing inside the recorded gap
    assert np.any(times > end) and np.any(times == start)
    assert end - start >= 0.2


def test_long_outage_calls_on_lost_and_makes_safe_once_reachable(
    sim: SimulatedSourceMeter, station: SimStation, recorder: Recorder
) -> None:
    bias = make_controller(make_config(sim, attempts=3), recorder)
    recorder.on_lost = lambda reason: bias.make_safe()  # as the runner's abort does
    bias.start()
    server: TcpLineServer | None = None
    try:
        bias.ramp_to(0.5)
        port = sim.tcp_address()[1]
        sim.stop()
        wait(lambda: recorder.calls, what="on_lost")
        assert recorder.calls[0][0] == "lost"
        assert bias.state.lost
        with pytest.raises(StationError):
            bias.ramp_to(0.1)
        assert applied_bias(station) == pytest.approx(0.5)  # still on: nobody can reach it

        since = history_length(station) - 1
        server = serve_again(sim, port)
        wait(lambda: not sim.instrument.settings.output, what="output made safe")
        wait(lambda: not bias.state.lost, what="back")
    finally:
        bias.stop()
        if server is not None:
            server.stop()

    assert applied_bias(station) == 0.0
    assert_staircase(history(station, since), MAX_RATE)
    messages = recorder.messages()
    assert messages.index("output off") < next(
        i for i, m in enumerate(messages) if m.startswith("source-meter back")
    )
    assert any("gap" in m for m in messages)


# ----- make safe and stop --------------------------------------------------------------------
def test_make_safe_from_another_thread_during_a_ramp(
    controller: BiasController, sim: SimulatedSourceMeter, station: SimStation
) -> None:
    outcome: list[BaseException] = []

    def ramp() -> None:
        try:
            controller.ramp_to(3.0, rate_volts_per_s=1.0)
        except BaseException as exc:
            outcome.append(exc)

    ramping = threading.Thread(target=ramp)
    ramping.start()
    wait(lambda: controller.state.setpoint >= 0.2, what="ramp under way")
    controller.make_safe()
    ramping.join(timeout=5.0)

    assert not sim.instrument.settings.output
    assert applied_bias(station) == 0.0
    assert len(outcome) == 1 and isinstance(outcome[0], Stopped)
    controller.make_safe()  # again: nothing to do, no error


def test_stop_during_a_ramp_from_two_threads_leaves_the_output_off(
    controller: BiasController, sim: SimulatedSourceMeter, station: SimStation
) -> None:
    outcome: list[BaseException] = []

    def ramp() -> None:
        try:
            controller.ramp_to(3.0)
        except BaseException as exc:
            outcome.append(exc)

    ramping = threading.Thread(target=ramp)
    ramping.start()
    wait(lambda: controller.state.setpoint >= 0.2, what="ramp under way")
    stoppers = [threading.Thread(target=controller.stop) for _ in range(2)]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join(timeout=5.0)
    ramping.join(timeout=5.0)
    controller.stop()

    assert len(outcome) == 1 and isinstance(outcome[0], Stopped)
    assert not sim.instrument.settings.output
    assert applied_bias(station) == 0.0
    assert not controller.state.connected
    with pytest.raises(StationError):
        controller.ramp_to(0.1)


def test_stop_racing_another_make_safe_still_ends_with_the_output_off(
    controller: BiasController, sim: SimulatedSourceMeter, station: SimStation
) -> None:
    # The daemon's stop: stop() starts the ramp-down, then the runner (told to abort) calls
    # make_safe from its own thread. Neither may abandon the ramp-down: SIGTERM once left
    # 2 V on this way.
    controller.ramp_to(2.0, rate_volts_per_s=1.0)
    stopping = threading.Thread(target=controller.stop)
    stopping.start()
    wait(lambda: controller.state.setpoint < 1.9, what="ramp-down under way")
    controller.make_safe()
    stopping.join(timeout=15.0)
    assert not stopping.is_alive()
    assert not sim.instrument.settings.output
    assert applied_bias(station) == 0.0
