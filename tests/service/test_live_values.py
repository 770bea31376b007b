"""The live values a `hold ... until` reads (service/live_values.py): a heating holder's chip."""

from __future__ import annotations

from dataclasses import dataclass

from insitu_daq.control.conditions import ConditionTracker, parse_until
from insitu_daq.runfile.layout import HOLDER_POSITION, TEMPERATURE
from insitu_daq.service.live_values import LiveValues


@dataclass
class _Run:
    offset_s: float = 1000.0


def test_each_chip_reading_is_an_update_at_its_own_time_and_ends_a_hold_on_it() -> None:
    """The holder monitor's rows (run time, half-width, value, setpoint) reach the runner's
    conditions one update each, at the time each was read, not when the batch arrived."""
    run: _Run | None = None
    live = LiveValues(lambda: run, lambda: True)
    names = frozenset({"temperature_celsius"})
    live.on_series((TEMPERATURE.record, [(1.0, 0.01, 240.0, 250.0)]))  # no run open: dropped
    run = _Run()
    cursor, _ = live.updates(names, 0)
    # A batch of three readings (a move's polls handed over at once), and the holder position,
    # which no condition reads.
    rows = [(10.0, 0.01, 249.0, 250.0), (10.5, 0.01, 250.2, 250.0), (13.0, 0.01, 250.1, 250.0)]
    live.on_series((TEMPERATURE.record, rows))
    live.on_series((HOLDER_POSITION.record, [(13.1, 0.01, 5.0)]))
    _, updates = live.updates(names, cursor)
    assert [(u.time, u.values) for u in updates] == [
        (10.0, {"temperature_celsius": 249.0}),
        (10.5, {"temperature_celsius": 250.2}),
        (13.0, {"temperature_celsius": 250.1}),
    ]
    tracker = ConditionTracker(parse_until("temperature_celsius >= 250 for 2 s"))
    assert [tracker.update(u) for u in updates] == [False, False, True]  # 2.5 s after 10.5
