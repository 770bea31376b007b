"""The `hold ... until` condition language: parsed by hand, names checked, never eval'd."""

from __future__ import annotations

import math
import re

import pytest

from insitu_daq.control.conditions import (
    AllOf,
    AnyOf,
    Comparison,
    ConditionError,
    ConditionTracker,
    LiveUpdate,
    parse_condition,
    parse_until,
)
from insitu_daq.control.steps import STEPS, StepRefused
from insitu_daq.control.steps.hold import Hold


def test_comparison_with_percent_and_scientific_numbers() -> None:
    assert parse_condition("expansion >= 25%") == Comparison("expansion", ">=", 0.25)
    assert parse_condition("current_amperes<1e-9") == Comparison("current_amperes", "<", 1e-9)


def test_and_binds_tighter_than_or_and_parentheses_override() -> None:
    loose = parse_condition("expansion > 0.2 or rock_salt_fraction > 0.5 and expansion > 0.1")
    assert isinstance(loose, AnyOf) and isinstance(loose.parts[1], AllOf)
    grouped = parse_condition("(expansion > 0.2 or rock_salt_fraction > 0.5) and expansion > 0.1")
    assert isinstance(grouped, AllOf) and isinstance(grouped.parts[0], AnyOf)
    # the normalised text parses back to the same condition
    assert parse_condition(str(grouped)) == grouped
    assert str(grouped).startswith("(")


@pytest.mark.parametrize(
    ("values", "met"),
    [
        ({"rock_salt_fraction": 0.95, "expansion": 0.1}, True),
        ({"rock_salt_fraction": 0.5, "expansion": 0.3}, True),
        ({"rock_salt_fraction": 0.5, "expansion": 0.1}, False),
        # not measurable (None / NaN) is never "met"
        ({"rock_salt_fraction": None, "expansion": None}, False),
        ({"rock_salt_fraction": math.nan, "expansion": 0.1}, False),
        ({}, False),
    ],
)
def test_evaluate_over_live_values(values: dict[str, float | None], met: bool) -> None:
    condition = parse_condition("rock_salt_fraction >= 0.9 or expansion >= 0.25")
    assert condition.evaluate(values) is met


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty condition"),
        ("rocksalt_fraction > 1", "unknown quantity 'rocksalt_fraction' at column 1; did you"),
        ("expansion >", "expected a number at column 12, found the end"),
        ("expansion = 1", "unexpected '=' at column 11"),
        ("expansion > 1 nand expansion < 2", "expected 'and', 'or' or the end at column 15"),
        ("(expansion > 1", "expected ')' at column 15"),
        ("0.5 < expansion", "expected a quantity such as rock_salt_fraction at column 1"),
        ("__import__('os').system('true')", 'unexpected "\'" at column 12'),
        # Logged and published, but one map's presence can be a noise tile (control/conditions.py).
        ("rock_salt_presence > 0", "unknown quantity 'rock_salt_presence' at column 1"),
    ],
)
def test_errors_say_where_and_what_was_expected(text: str, expected: str) -> None:
    with pytest.raises(ConditionError) as excinfo:
        parse_condition(text)
    assert str(excinfo.value).startswith(expected), str(excinfo.value)


# ----- persistence: `... for N s`, by event time -----------------------------------------------
def test_persistence_defaults_to_2_s_for_analysis_quantities_and_0_for_readings() -> None:
    assert parse_until("rock_salt_fraction >= 0.9").persistence_s == 2.0
    assert parse_until("current_amperes < 1e-9").persistence_s == 0.0
    assert parse_until("current_amperes < 1e-9 or expansion > 0.2").persistence_s == 2.0
    explicit = parse_until("rock_salt_fraction >= 0.9 for 5 s")
    assert explicit.persistence_s == 5.0 and str(explicit) == "rock_salt_fraction >= 0.9 for 5 s"
    assert parse_until(str(explicit)) == explicit
    assert parse_until("expansion > 0.2 for 0 s").persistence_s == 0.0


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("expansion > 0.2 for 2", "expected 's' (seconds) at column"),
        ("expansion > 0.2 for s", "expected a duration in seconds at column 21"),
        ("expansion > 0.2 for 20% s", "expected a duration in seconds"),
        ("expansion > 0.2 for -1 s", "negative duration"),
        ("expansion > 0.2 for 2 s and expansion < 1", "expected 'and', 'or', 'for N s' or the end"),
    ],
)
def test_bad_persistence_is_refused_naming_the_column(text: str, error: str) -> None:
    with pytest.raises(ConditionError, match=re.escape(error)):
        parse_until(text)


def _feed(tracker: ConditionTracker, updates: list[tuple[float, float | None]]) -> float | None:
    """Feed (event time, rock_salt_fraction) updates; the event time it was met at."""
    for time_s, value in updates:
        if tracker.update(LiveUpdate(time_s, {"rock_salt_fraction": value})):
            return time_s
    return None


def test_one_result_cannot_end_a_hold() -> None:
    """The loaded-PC fault of issue 9: one phase map said rock salt 1.00 among 0.0s."""
    tracker = ConditionTracker(parse_until("rock_salt_fraction >= 0.9"))
    spike = [(t * 0.05, 1.0 if t == 20 else 0.0) for t in range(200)]
    assert _feed(tracker, spike) is None


def test_met_after_the_persistence_of_event_time_with_every_update_true() -> None:
    tracker = ConditionTracker(parse_until("rock_salt_fraction >= 0.9"))
    updates = [(10 + t * 0.05, 0.95) for t in range(100)]
    assert _feed(tracker, updates) == pytest.approx(12.0)


def test_a_false_update_in_between_starts_the_persistence_again() -> None:
    tracker = ConditionTracker(parse_until("rock_salt_fraction >= 0.9"))
    updates = [(10 + t * 0.05, 0.95) for t in range(30)]  # 10.0 .. 11.45 s true
    updates += [(11.5, 0.5)]  # one false
    updates += [(11.55 + t * 0.05, 0.95) for t in range(100)]
    assert _feed(tracker, updates) == pytest.approx(13.55)


def test_late_updates_count_by_their_event_time_not_their_arrival() -> None:
    """Two results measured 0.05 s apart that arrive 3 s apart (a stalled analysis) span
    0.05 s of event time, not 3 s: not met."""
    tracker = ConditionTracker(parse_until("rock_salt_fraction >= 0.9"))
    assert _feed(tracker, [(20.0, 0.95), (20.05, 0.95)]) is None


def test_a_value_older_than_max_age_no_longer_counts() -> None:
    tracker = ConditionTracker(parse_until("rock_salt_fraction > 0.5 and current_amperes < 1"), 5.0)
    tracker.update(LiveUpdate(0.0, {"rock_salt_fraction": 0.9}))
    for t in range(1, 40):  # readings go on, the analysis has stalled since 0 s
        met = tracker.update(LiveUpdate(t * 0.25, {"current_amperes": 1e-9}))
        assert not met or t * 0.25 <= 5.0
    assert tracker.values()["rock_salt_fraction"] is None


def test_the_chip_temperature_is_a_reading_judged_on_its_own_event_time() -> None:
    """`until: temperature_celsius >= 250`: a heating holder's reading, no default persistence
    (as the source-meter's); `for N s` counts event time, and a reading below resets it."""
    assert parse_until("temperature_celsius >= 250").persistence_s == 0.0
    with pytest.raises(ConditionError, match="did you mean temperature_celsius"):
        parse_until("temperature_celcius >= 250")
    tracker = ConditionTracker(parse_until("temperature_celsius >= 250 for 5 s"))
    readings = [(100.0, 248.0), (101.0, 250.5), (103.0, 251.0), (104.0, 249.9)]  # dips at 104
    readings += [(105.0, 250.2), (108.0, 250.1), (110.0, 250.0), (110.5, 250.3)]
    met = [t for t, c in readings if tracker.update(LiveUpdate(t, {"temperature_celsius": c}))]
    assert met[0] == 110.0  # 5 s after 105.0, not after 101.0


class _OpenCellStation:
    """What service/daemon.py's check_temperature answers for a holder without a heater."""

    def live_updates(self) -> None: ...

    def check_temperature(self, celsius: float, rate_c_per_s: float | None) -> float:
        raise StepRefused("the station's holder (open_cell) has no heater", "celsius")


def test_a_hold_on_the_chip_temperature_is_refused_without_a_heater_naming_until() -> None:
    hold = Hold(duration_s=60, until="temperature_celsius >= 250")
    with pytest.raises(StepRefused, match=r"has no heater: nothing measures") as refused:
        STEPS["hold"].preflight(hold, _OpenCellStation())  # type: ignore[arg-type]
    assert refused.value.field == "until"
    elsewhere = Hold(duration_s=60, until="current_amperes < 1e-9")  # the source-meter's: fine
    STEPS["hold"].preflight(elsewhere, _OpenCellStation())  # type: ignore[arg-type]
