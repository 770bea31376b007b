"""Conditions a `hold` can end on: live quantities compared with numbers, joined by and/or.

    until: rock_salt_fraction >= 0.9
    until: expansion >= 25% or (front_velocity_nm_s < 0.5 and rock_salt_fraction > 0.5)

The language is deliberately tiny and parsed by hand (no `eval`): a protocol file must never
run code, and every quantity name is checked at load against `LIVE_QUANTITIES`, so a typo is
refused before the experiment starts instead of silently never becoming true.

Grammar (`and` binds tighter than `or`):

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

# What the station can report while a protocol runs (Station.live_value): exactly what is
# measured. The analysis quantities are the live analysis's (analysis/pipeline.py; HRTEM phase
# map: the fractions; LM frames: the rest), current and charge the source-meter's readings.
# Not the phase maps' `<phase>_presence`: 0.2-1.6 % of the maps of a field without rock salt
# see a false rock-salt tile (phasemap.py), so `rock_salt_presence > 0` would end a hold on
# noise within a minute or two; its onset wants 3 maps in a row (accuracy.py), which a
# condition on one value cannot say.
LIVE_QUANTITIES: dict[str, str] = {
    "rock_salt_fraction": "fraction of the particle in the HRTEM field classified rock salt (0-1)",
    "layered_fraction": "fraction of the particle in the HRTEM field classified layered (0-1)",
    "disordered_fraction": "fraction of the particle in the HRTEM field, Ni/Li disordered (0-1)",
    "expansion": "projected size growth relative to the pre-bias reference (0.25 = +25 %)",
    "projected_area_m2": "projected area of the particle (m^2, low magnification)",
    "front_position_nm": "reaction front distance from the contact surface (nm)",
    "front_velocity_nm_s": "reaction front speed (nm/s)",
    "current_amperes": "sample current, newest reading (A)",
    "charge_coulombs": "charge passed since the run started (C)",
}

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
_KEYWORDS = ("and", "or")


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


def parse_condition(text: str, known: Mapping[str, str] = LIVE_QUANTITIES) -> Condition:
    """Parse `text`; raises ConditionError naming the column and what was expected."""
    if not text.strip():
        raise ConditionError("empty condition")
    return _Parser(text, known).parse()
