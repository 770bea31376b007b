"""Conditions a `hold` can end on: live quantities compared with numbers, joined by and/or.

    until: rock_salt_fraction >= 0.9
    until: rock_salt_fraction >= 0.9 for 5 s
    until: expansion >= 25% or (front_velocity_nm_s < 0.5 and rock_salt_fraction > 0.5)
    until: temperature_celsius >= 250

Persistence: a condition ends a hold only once it has held for `for N s` of event time (the
run-clock times the values were measured at, not when they arrived), over every update in
between; without `for`, for the longest default of its quantities (`persistence_s`: 2 s for
what live analysis measures, so no single result can end a hold; 0 for the source-meter's
and the heating holder's readings). `for 0 s` ends on the first update that meets it.
ConditionTracker does this.

The language is deliberately tiny and parsed by hand (no `eval`): a protocol file must never
run code, and every quantity name is checked at load against `live_quantities()`, so a typo is
refused before the experiment starts instead of silently never becoming true.

Grammar (`and` binds tighter than `or`):

    until      := condition ["for" NUMBER "s"]
    condition  := conjunction ("or" conjunction)*
    conjunction := primary ("and" primary)*
    primary    := "(" condition ")" | QUANTITY OP NUMBER
    OP         := ">=" | "<=" | ">" | "<"
    NUMBER     := a decimal or scientific literal, optionally followed by "%" (= /100)

A quantity that is not measurable right now (the station returns None or NaN) makes its
comparison false: a hold never ends on a number nobody measured.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from insitu_daq.analysis.quantities import find, members, registered

# What the station can report while a protocol runs (Station.live_value): exactly what is
# measured. The analysis quantities are those declared usable in a condition
# (analysis/quantities.py: HRTEM phase map, the fractions; LM frames, the rest); current and
# charge are the source-meter's readings, each a measurement of its own (no persistence).
SOURCE_METER_QUANTITIES: dict[str, str] = {
    "current_amperes": "sample current, newest reading (A)",
    "charge_coulombs": "charge passed since the run started (C)",
}
# A heating holder's chip (its temperature series, service/live_values.py), each reading stamped
# at the midpoint of its status query; on a station without a heater it is never measured, so a
# hold on it runs to its timeout (the temperature steps are refused there).
CHIP_TEMPERATURE = "temperature_celsius"
HOLDER_QUANTITIES: dict[str, str] = {
    CHIP_TEMPERATURE: "heating chip temperature, newest reading (C)",
}


def live_quantities() -> dict[str, str]:
    """Every name a condition may use -> what it is. Read from the declarations when a
    condition is parsed, so a quantity declared usable is known with no edit here."""
    analysis = {
        quantity.key_for(member): quantity.describe(member)
        for quantity in registered()
        if quantity.condition
        for member in members(quantity, ())
    }
    return {**analysis, **SOURCE_METER_QUANTITIES, **HOLDER_QUANTITIES}


def persistence_s(name: str) -> float:
    """How long (event-time s) a condition on `name` must hold before it ends a step, unless
    the condition says `for N s` (the quantity's declaration; 0 for the instruments' readings)."""
    found = find(name)
    return found[0].persistence_s if found is not None and found[0].condition else 0.0


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}

_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?%?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>>=|<=|>|<)"
    r"|(?P<paren>[()])"
    r")"
)
_KEYWORDS = ("and", "or", "for")


class ConditionError(ValueError):
    """A condition that cannot be parsed; the message says where and why, on one line."""


@dataclass(frozen=True)
class Comparison:
    quantity: str
    op: str
    threshold: float

    def evaluate(self, values: Mapping[str, float | None]) -> bool:
        value = values.get(self.quantity)
        if value is None or math.isnan(value):
            return False
        return _COMPARE[self.op](value, self.threshold)

    @property
    def quantities(self) -> frozenset[str]:
        return frozenset((self.quantity,))

    def __str__(self) -> str:
        return f"{self.quantity} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Condition, ...]

    def evaluate(self, values: Mapping[str, float | None]) -> bool:
        return all(part.evaluate(values) for part in self.parts)

    @property
    def quantities(self) -> frozenset[str]:
        return frozenset().union(*(part.quantities for part in self.parts))

    def __str__(self) -> str:
        return " and ".join(f"({p})" if isinstance(p, AnyOf) else str(p) for p in self.parts)


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Condition, ...]

    def evaluate(self, values: Mapping[str, float | None]) -> bool:
        return any(part.evaluate(values) for part in self.parts)

    @property
    def quantities(self) -> frozenset[str]:
        return frozenset().union(*(part.quantities for part in self.parts))

    def __str__(self) -> str:
        return " or ".join(str(p) for p in self.parts)


Condition = Comparison | AllOf | AnyOf


@dataclass(frozen=True)
class _Token:
    kind: str  # number, name, keyword, op, paren, end
    text: str
    column: int  # 1-based, for error messages


def _tokens(text: str) -> Iterator[_Token]:
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            rest = text[position:].lstrip()
            if not rest:
                break
            column = len(text) - len(rest) + 1
            raise ConditionError(f"unexpected {rest[0]!r} at column {column}")
        kind = match.lastgroup
        if kind is None:  # only whitespace left
            break
        token_text, column = match.group(kind), match.start(kind) + 1
        if kind == "name" and token_text in _KEYWORDS:
            kind = "keyword"
        yield _Token(kind, token_text, column)
        position = match.end()
    yield _Token("end", "", len(text) + 1)


class _Parser:
    def __init__(self, text: str, known: Mapping[str, str]) -> None:
        self._tokens = list(_tokens(text))
        self._index = 0
        self._known = known

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _take(self) -> _Token:
        token = self._tokens[self._index]
        self._index += 1
        return token

    def _fail(self, token: _Token, expected: str) -> ConditionError:
        found = "the end" if token.kind == "end" else repr(token.text)
        return ConditionError(f"expected {expected} at column {token.column}, found {found}")

    def parse(self) -> Condition:
        condition = self._disjunction()
        token = self._peek()
        if token.kind != "end":
            raise self._fail(token, "'and', 'or' or the end")
        return condition

    def parse_until(self) -> Until:
        condition = self._disjunction()
        token = self._peek()
        persistence: float | None = None
        if token.kind == "keyword" and token.text == "for":
            self._take()
            number = self._take()
            if number.kind != "number" or number.text.endswith("%"):
                raise self._fail(number, "a duration in seconds")
            unit = self._take()
            if unit.text != "s":
                raise self._fail(unit, "'s' (seconds)")
            persistence = float(number.text)
            if persistence < 0:
                raise ConditionError(f"negative duration at column {number.column}")
            token = self._peek()
        if token.kind != "end":
            raise self._fail(token, "'and', 'or', 'for N s' or the end")
        if persistence is None:
            persistence = max(persistence_s(name) for name in condition.quantities)
        return Until(condition, persistence)

    def _disjunction(self) -> Condition:
        parts = [self._conjunction()]
        while self._peek().text == "or" and self._peek().kind == "keyword":
            self._take()
            parts.append(self._conjunction())
        return parts[0] if len(parts) == 1 else AnyOf(tuple(parts))

    def _conjunction(self) -> Condition:
        parts = [self._primary()]
        while self._peek().text == "and" and self._peek().kind == "keyword":
            self._take()
            parts.append(self._primary())
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts))

    def _primary(self) -> Condition:
        token = self._take()
        if token.kind == "paren" and token.text == "(":
            inner = self._disjunction()
            closing = self._take()
            if closing.text != ")":
                raise self._fail(closing, "')'")
            return inner
        if token.kind != "name":
            raise self._fail(token, "a quantity such as rock_salt_fraction")
        self._check_known(token)
        op = self._take()
        if op.kind != "op":
            raise self._fail(op, "one of >= <= > <")
        number = self._take()
        if number.kind != "number":
            raise self._fail(number, "a number")
        return Comparison(token.text, op.text, _number(number.text))

    def _check_known(self, token: _Token) -> None:
        if token.text in self._known:
            return
        close = difflib.get_close_matches(token.text, list(self._known), n=1)
        hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(self._known)}"
        raise ConditionError(f"unknown quantity {token.text!r} at column {token.column}; {hint}")


def _number(text: str) -> float:
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    return float(text)


def parse_condition(text: str, known: Mapping[str, str] | None = None) -> Condition:
    """Parse `text`; raises ConditionError naming the column and what was expected."""
    if not text.strip():
        raise ConditionError("empty condition")
    return _Parser(text, live_quantities() if known is None else known).parse()


@dataclass(frozen=True)
class Until:
    """A step's end condition: `condition`, held for `persistence_s` of event time."""

    condition: Condition
    persistence_s: float

    @property
    def quantities(self) -> frozenset[str]:
        return self.condition.quantities

    def __str__(self) -> str:
        return f"{self.condition} for {self.persistence_s:g} s"


def parse_until(text: str, known: Mapping[str, str] | None = None) -> Until:
    """A `hold ... until:` text, with its persistence (explicit `for N s`, else the default
    of its quantities); ConditionError naming the column and what was expected."""
    if not text.strip():
        raise ConditionError("empty condition")
    return _Parser(text, live_quantities() if known is None else known).parse_until()


@dataclass(frozen=True)
class LiveUpdate:
    """Live values measured at one event time (run-clock s): an analysis result's quantities,
    or the source-meter's latest reading."""

    time: float
    values: Mapping[str, float | None]


class ConditionTracker:
    """Whether an Until has held for its persistence, fed every live update in turn.

    The latest value of each quantity is kept with its time; a value older than `max_age_s`
    (event time) no longer counts (a stalled analysis must not keep a condition true). The
    condition must be true at every update since the first one that made it true, and the
    updates must span `persistence_s`: one result cannot end a hold, nor a false one between
    true ones be missed (updates are not sampled, each is looked at).
    """

    def __init__(self, until: Until, max_age_s: float = math.inf) -> None:
        self.until = until
        self.max_age_s = max_age_s
        self._latest: dict[str, tuple[float, float | None]] = {}
        self._true_since: float | None = None
        self._now = -math.inf  # the newest event time seen

    def values(self) -> dict[str, float | None]:
        """The values as of the newest update (None: never measured, or too old)."""
        values: dict[str, float | None] = {}
        for name in sorted(self.until.quantities):
            stamp, value = self._latest.get(name, (-math.inf, None))
            fresh = self._now - stamp <= self.max_age_s
            values[name] = value if fresh and value is not None and not math.isnan(value) else None
        return values

    def reset(self) -> None:
        """Start the persistence anew (after a pause: what held before it does not count)."""
        self._true_since = None

    def update(self, update: LiveUpdate) -> bool:
        """Take one update; True once the condition has held for the persistence."""
        names = self.until.quantities
        relevant = {k: v for k, v in update.values.items() if k in names}
        if not relevant:
            return False
        for name, value in relevant.items():
            self._latest[name] = (update.time, value)
        self._now = max(self._now, update.time)
        if not self.until.condition.evaluate(self.values()):
            self._true_since = None
            return False
        if self._true_since is None:
            self._true_since = update.time
        return self._now - self._true_since >= self.until.persistence_s
