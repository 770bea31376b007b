"""The `hold ... until` condition language: parsed by hand, names checked, never eval'd."""

from __future__ import annotations

import math

import pytest

from insitu_daq.condition import AllOf, AnyOf, Comparison, ConditionError, parse_condition


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
        # Logged and published, but one map's presence can be a noise tile (condition.py).
        ("rock_salt_presence > 0", "unknown quantity 'rock_salt_presence' at column 1"),
    ],
)
def test_errors_say_where_and_what_was_expected(text: str, expected: str) -> None:
    with pytest.raises(ConditionError) as excinfo:
        parse_condition(text)
    assert str(excinfo.value).startswith(expected), str(excinfo.value)
