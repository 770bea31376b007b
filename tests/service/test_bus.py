"""The daemon's record bus (service/bus.py) and its subscribers (sinks.py, live_values.py).

The end-to-end paths (samples, results and events into the run file, the event stream and the
metrics of a running daemon) are in test_daemon_e2e.py and test_daemon_analysis_e2e.py; here,
what only a failing subscriber shows, on the real event stream over ZeroMQ, and the live
values the runner's conditions read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from insitu_daq.core.records import BIAS_SAMPLE_DTYPE, STATUS_LEVEL_CHANGE
from insitu_daq.service.api import EventSubscriber
from insitu_daq.service.api.events import EventPublisher
from insitu_daq.service.bus import RecordBus
from insitu_daq.service.live_values import LiveValues
from insitu_daq.service.metrics import DaemonMetrics
from insitu_daq.service.sinks import EventStreamSink, MetricsSink


def samples(*rows: tuple[float, float, float, int]) -> np.ndarray:
    """A batch of (time, voltage, current, status) rows, setpoint = voltage."""
    batch = np.zeros(len(rows), BIAS_SAMPLE_DTYPE)
    for i, (t, volts, amperes, status) in enumerate(rows):
        batch[i] = (t, 1e-4, volts, volts, amperes, status)
    return batch


def test_subscribers_get_each_record_in_order_and_one_that_fails_costs_the_others_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = RecordBus()
    seen: list[tuple[str, str, Any]] = []

    def failing(kind: str, record: Any) -> None:
        raise RuntimeError("broken subscriber")

    bus.subscribe(["event"], lambda kind, record: seen.append(("first", kind, record)), "first")
    bus.subscribe(["event", "status"], failing, "broken")
    bus.subscribe(["event"], lambda kind, record: seen.append(("last", kind, record)), "last")
    with caplog.at_level(logging.ERROR, logger="insitu_daq.service.bus"):
        for n in range(3):
            bus.publish("event", n)
        bus.publish("status", {})
    assert seen == [(name, "event", n) for n in range(3) for name in ("first", "last")]
    assert bus.errors == {"first": 0, "broken": 4, "last": 0}
    failures = [r for r in caplog.records if "record subscriber broken failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None  # rate-limited, traceback
    assert bus.subscribers("event") == ["first", "broken", "last"]


def test_an_unknown_record_kind_is_refused_naming_the_kinds() -> None:
    bus = RecordBus()
    with pytest.raises(ValueError, match=r"unknown record kind 'sample' \(one of: samples, "):
        bus.subscribe(["sample"], lambda kind, record: None, "typo")
    with pytest.raises(ValueError, match="unknown record kind 'bias'"):
        bus.publish("bias", None)


class BrokenMetrics(DaemonMetrics):
    """Stands in for a metrics update that raises (no real input provokes one)."""

    def observe_samples(self, batch: np.ndarray) -> None:
        raise ValueError("metrics broke")


def test_a_failing_metrics_update_no_longer_costs_the_event_stream_its_bias_message() -> None:
    """Before the bus, an exception in the metrics update skipped the PUB of that batch."""
    bus = RecordBus()
    bus.attach(MetricsSink(BrokenMetrics("127.0.0.1", 0)))  # the daemon's order
    with EventPublisher("tcp://127.0.0.1:*") as publisher:
        bus.attach(EventStreamSink(publisher))
        with EventSubscriber(publisher.endpoint, topics=["bias"]) as subscriber:
            batch = samples((1.0, 0.5, 2e-9, 0), (1.1, 0.6, 3e-9, 0), (1.2, 0.7, 0.0, 0))
            batch[-1]["status"] = STATUS_LEVEL_CHANGE  # a commanded level: not a reading
            deadline = time.monotonic() + 10.0
            message = None
            while message is None and time.monotonic() < deadline:  # until subscribed
                bus.publish("samples", batch)
                message = subscriber.receive(timeout_s=0.2)
    assert message is not None, "no bias message on the event stream"
    topic, payload = message
    assert topic == "bias"
    assert payload == {"time": 1.1, "voltage": 0.6, "setpoint": 0.6, "current": 3e-9,
                       "samples": 2}  # fmt: skip
    assert bus.errors["metrics"] >= 1 and bus.errors["event stream"] == 0


@dataclass
class Run:
    offset_s: float


def test_live_values_carry_the_runs_current_and_charge_and_forget_the_last_run() -> None:
    run: Run | None = None
    connected = True
    live = LiveValues(lambda: run, lambda: connected)
    live.on_samples(samples((10.0, 1.0, 5.0, 0)))  # no run open: nothing kept
    assert live.updates(frozenset({"charge_coulombs"}), 0) == (0, [])
    run = Run(offset_s=10.0)
    live.new_run()
    live.on_samples(samples((10.0, 1.0, 2.0, 0), (11.0, 1.0, 4.0, 0)))
    live.on_samples(samples((12.0, 0.0, 0.0, int(STATUS_LEVEL_CHANGE))))  # no reading
    connected = False
    live.on_samples(samples((13.0, 1.0, 4.0, 0)))
    live.on_analysis({"time": 2.5, "values": {"expansion": 0.01, "mode": "hrtem"}})
    cursor, updates = live.updates(frozenset({"charge_coulombs", "current_amperes"}), 0)
    assert cursor == 3
    assert [(u.time, u.values) for u in updates] == [
        (1.0, {"current_amperes": 4.0, "charge_coulombs": 3.0}),  # (2 + 4) / 2 over 1 s
        (3.0, {"current_amperes": None, "charge_coulombs": 11.0}),  # + (4 + 4) / 2 over 2 s; lost
    ]
    _, analysed = live.updates(frozenset({"expansion"}), 0)
    assert [(u.time, u.values) for u in analysed] == [(2.5, {"expansion": 0.01, "mode": None})]
    live.new_run()
    assert live.charge_coulombs == 0.0
    assert live.updates(frozenset({"charge_coulombs"}), 0) == (3, [])
