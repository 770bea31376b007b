"""A small SCPI parser and dispatcher for simulated instruments (IEEE 488.2 + SCPI-99 rules).

An instrument declares its command tree as header patterns in the manual's notation,
`":SOURce:VOLTage[:LEVel][:IMMediate][:AMPLitude]"`, with a setter and/or a getter.
Upper-case letters of a mnemonic are its short form; bracketed nodes are optional; a header
matches in either form, any case, with an optional numeric suffix 1 (`SENS1`). The dispatcher
executes one program message (one line) the way instruments do:

- units are separated by `;`; a unit whose header starts with `:` is resolved from the root,
  one without is resolved relative to the previous unit's path (its header minus the last
  node); common commands (`*IDN?`) neither use nor change that path;
- parameters are separated by commas; quoted strings ('...' or "...") may hold `,` and `;`;
- the first error stops the message: the rest is discarded (as the 2400 manual describes for
  error -420), the error goes to the error queue and replies produced before it are kept;
- replies of several queries in one message are joined by `;` into one line.

The error queue and the IEEE 488.2 status bytes (*ESR, *STB) live here too because every
SCPI instrument has them; instruments add their own commands and device-specific errors.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

# SCPI-99 / IEEE 488.2 standard error numbers and texts (negative numbers).
STANDARD_ERRORS: dict[int, str] = {
    0: "No error",
    -100: "Command error",
    -101: "Invalid character",
    -102: "Syntax error",
    -103: "Invalid separator",
    -104: "Data type error",
    -108: "Parameter not allowed",
    -109: "Missing parameter",
    -112: "Program mnemonic too long",
    -113: "Undefined header",
    -151: "Invalid string data",
    -200: "Execution error",
    -221: "Settings conflict",
    -222: "Data out of range",
    -224: "Illegal parameter value",
    -230: "Data corrupt or stale",
    -350: "Queue overflow",
    -363: "Input buffer overrun",
    -410: "Query INTERRUPTED",
    -420: "Query UNTERMINATED",
}

# Standard Event Status Register bits (IEEE 488.2).
ESR_OPERATION_COMPLETE = 1 << 0
ESR_QUERY_ERROR = 1 << 2
ESR_DEVICE_ERROR = 1 << 3
ESR_EXECUTION_ERROR = 1 << 4
ESR_COMMAND_ERROR = 1 << 5
ESR_POWER_ON = 1 << 7

# Status Byte bits (IEEE 488.2 / SCPI).
STB_ERROR_AVAILABLE = 1 << 2
STB_MESSAGE_AVAILABLE = 1 << 4
STB_EVENT_SUMMARY = 1 << 5
STB_MASTER_SUMMARY = 1 << 6

MAX_MNEMONIC = 12  # characters of one header node (SCPI-99)


class ScpiError(Exception):
    """A command the instrument refuses: an error number for the queue, and detail for the log."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else str(code))
        self.code = code
        self.detail = detail


# ----- status: error queue and event registers -----------------------------------------------
class StatusSystem:
    """Error queue plus Standard Event Status and Status Byte registers of one instrument."""

    def __init__(self, messages: Mapping[int, str], capacity: int = 10) -> None:
        self._messages = {**STANDARD_ERRORS, **messages}
        self._capacity = capacity
        self._queue: deque[tuple[int, str]] = deque()
        self.event_status = ESR_POWER_ON
        self.event_enable = 0
        self.service_request_enable = 0
        self.errors_total = 0  # every error reported, including those lost to an overflow

    def message(self, code: int) -> str:
        return self._messages.get(code, "Unknown error")

    def push(self, code: int) -> None:
        """Queue an error; a full queue keeps its oldest entries and ends with -350."""
        self.errors_total += 1
        self.event_status |= _event_bit(code)
        if len(self._queue) < self._capacity:
            self._queue.append((code, self.message(code)))
        elif self._queue[-1][0] != -350:
            self._queue[-1] = (-350, self.message(-350))

    def pop(self) -> tuple[int, str]:
        return self._queue.popleft() if self._queue else (0, self.message(0))

    def pop_all(self) -> list[tuple[int, str]]:
        items = list(self._queue) or [(0, self.message(0))]
        self._queue.clear()
        return items

    @property
    def count(self) -> int:
        return len(self._queue)

    def clear(self) -> None:
        """*CLS: empty the error queue and the event register."""
        self._queue.clear()
        self.event_status = 0

    def read_event_status(self) -> int:
        """*ESR?: the register's value; reading clears it."""
        value, self.event_status = self.event_status, 0
        return value

    def status_byte(self) -> int:
        stb = 0
        if self._queue:
            stb |= STB_ERROR_AVAILABLE
        if self.event_status & self.event_enable:
            stb |= STB_EVENT_SUMMARY
        if stb & self.service_request_enable & ~STB_MASTER_SUMMARY:
            stb |= STB_MASTER_SUMMARY
        return stb


def _event_bit(code: int) -> int:
    if -199 <= code <= -100:
        return ESR_COMMAND_ERROR
    if -299 <= code <= -200:
        return ESR_EXECUTION_ERROR
    if -399 <= code <= -300:
        return ESR_DEVICE_ERROR
    if -499 <= code <= -400:
        return ESR_QUERY_ERROR
    return ESR_EXECUTION_ERROR if code > 0 else 0


def format_error(code: int, message: str) -> str:
    """`-113,"Undefined header"` as :SYST:ERR? answers."""
    return f'{code:+d},"{message}"' if code else f'0,"{message}"'


# ----- parameters ----------------------------------------------------------------------------
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_TOKEN = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


def parse_number(
    text: str,
    minimum: float,
    maximum: float,
    default: float | None = None,
    *,
    minimum_value: float | None = None,
    maximum_value: float | None = None,
) -> float:
    """An <NRf> parameter (exponent notation allowed) or MINimum / MAXimum / DEFault.

    minimum_value / maximum_value: what MIN / MAX stand for, when not the limits themselves.
    Values outside [minimum, maximum] raise -222 Data out of range.
    """
    word = text.upper()
    if word in ("MIN", "MINIMUM"):
        return minimum if minimum_value is None else minimum_value
    if word in ("MAX", "MAXIMUM"):
        return maximum if maximum_value is None else maximum_value
    if word in ("DEF", "DEFAULT") and default is not None:
        return default
    if not _NUMBER.match(text):
        raise ScpiError(-104, f"not a number: {text!r}")
    value = float(text)
    if not minimum <= value <= maximum:
        raise ScpiError(-222, f"{value:g} outside {minimum:g}..{maximum:g}")
    return value


def parse_bool(text: str) -> bool:
    """<b>: ON / OFF, or a number (non-zero after rounding is ON)."""
    word = text.upper()
    if word == "ON":
        return True
    if word == "OFF":
        return False
    if _NUMBER.match(text):
        return round(float(text)) != 0
    raise ScpiError(-224, f"not a boolean: {text!r}")


def matches_mnemonic(text: str, mnemonic: str) -> bool:
    """Whether `text` is the short or long form of `mnemonic` ("VOLTage"), in any case."""
    word = text.upper()
    return word in (mnemonic.upper(), _short_form(mnemonic))


def parse_choice(text: str, choices: Iterable[str]) -> str:
    """Character data: one of `choices` (manual notation, "HIMPedance") in short or long form.

    Returns the choice as declared, so callers compare against their own constants.
    """
    for choice in choices:
        if matches_mnemonic(text, choice):
            return choice
    raise ScpiError(-224, f"{text!r} is not one of {', '.join(choices)}")


def parse_string(text: str) -> str:
    """<string>: a quoted string ('...' or "..."), doubled quotes standing for one."""
    if len(text) >= 2 and text[0] in "'\"" and text[-1] == text[0]:
        quote = text[0]
        return text[1:-1].replace(quote * 2, quote)
    raise ScpiError(-104, f"expected a quoted string, got {text!r}")


def format_number(value: float) -> str:
    """NR3 as Keithley instruments send it: sign, 7 significant digits, exponent."""
    return f"{value:+.6E}"


def format_bool(value: bool) -> str:
    return "1" if value else "0"


def _short_form(mnemonic: str) -> str:
    short = "".join(c for c in mnemonic if c.isupper() or c.isdigit() or c in "*?")
    return short or mnemonic.upper()


# ----- command tree --------------------------------------------------------------------------
Setter = Callable[[list[str]], None]
Getter = Callable[[list[str]], str]


@dataclass(frozen=True)
class _Node:
    short: str
    long: str
    optional: bool

    def matches(self, token: str) -> bool:
        word = token.upper()
        if word in (self.short, self.long):
            return True
        # A numeric suffix 1 names the first (and here only) instance: SENS1, SOUR1, OUTP1.
        return word.endswith("1") and word[:-1] in (self.short, self.long)


@dataclass(frozen=True)
class Command:
    pattern: str
    nodes: tuple[_Node, ...]
    setter: Setter | None
    getter: Getter | None
    set_arguments: tuple[int, int]
    query_arguments: tuple[int, int]


_PATTERN_NODE = re.compile(r"\[:([A-Za-z*]+)\]|:?([A-Za-z*]+)")


def _compile(pattern: str) -> tuple[_Node, ...]:
    nodes: list[_Node] = []
    position = 0
    while position < len(pattern):
        found = _PATTERN_NODE.match(pattern, position)
        if found is None:
            raise ValueError(f"bad header pattern {pattern!r} at {position}")
        optional = found.group(1) is not None
        mnemonic = found.group(1) or found.group(2)
        nodes.append(_Node(_short_form(mnemonic), mnemonic.upper(), optional))
        position = found.end()
    return tuple(nodes)


def _match(nodes: tuple[_Node, ...], tokens: list[str]) -> bool:
    """Whether the typed header `tokens` spell `nodes` (optional nodes may be left out)."""
    if not nodes:
        return not tokens
    node, rest = nodes[0], nodes[1:]
    if tokens and node.matches(tokens[0]) and _match(rest, tokens[1:]):
        return True
    return node.optional and _match(rest, tokens)


class CommandTree:
    """The instrument's headers with what to do on a set and on a query."""

    def __init__(self) -> None:
        self._commands: list[Command] = []

    def add(
        self,
        pattern: str,
        setter: Setter | None = None,
        getter: Getter | None = None,
        set_arguments: tuple[int, int] = (1, 1),
        query_arguments: tuple[int, int] = (0, 0),
    ) -> None:
        """Register a header; argument counts are (least, most) parameters accepted."""
        self._commands.append(
            Command(pattern, _compile(pattern), setter, getter, set_arguments, query_arguments)
        )

    def find(self, tokens: list[str]) -> Command | None:
        for command in self._commands:
            if _match(command.nodes, tokens):
                return command
        return None


# ----- message execution ---------------------------------------------------------------------
def split_outside_quotes(text: str, separator: str) -> list[str]:
    """Split at `separator` where it is not inside a quoted string; -151 if a quote is open."""
    parts: list[str] = []
    current: list[str] = []
    quote = ""
    for char in text:
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == separator:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quote:
        raise ScpiError(-151, "unterminated string")
    parts.append("".join(current))
    return parts


_UNIT = re.compile(r"^\s*(?P<header>[^\s]+)(?:\s+(?P<params>.*?))?\s*$", re.DOTALL)


@dataclass(frozen=True)
class _Unit:
    tokens: list[str]  # header nodes as typed
    absolute: bool  # started with ':'
    common: bool  # a *XXX common command
    query: bool
    parameters: list[str]


def _parse_unit(text: str) -> _Unit:
    found = _UNIT.match(text)
    if found is None:
        raise ScpiError(-102, "empty command")
    header = found.group("header")
    params_text = found.group("params") or ""
    query = header.endswith("?")
    if query:
        header = header[:-1]
    absolute = header.startswith(":")
    common = header.startswith("*")
    body = header[1:] if absolute or common else header
    tokens = body.split(":") if not common else [header]
    for token in tokens:
        check = token[1:] if common else token
        if not _TOKEN.match(check) or "?" in token:
            raise ScpiError(-102, f"bad header {header!r}")
        if len(check) > MAX_MNEMONIC:
            raise ScpiError(-112, f"mnemonic {token!r} longer than {MAX_MNEMONIC}")
    parameters: list[str] = []
    if params_text:
        parameters = [p.strip() for p in split_outside_quotes(params_text, ",")]
        if any(not p for p in parameters):
            raise ScpiError(-109, f"empty parameter in {params_text!r}")
    return _Unit(tokens, absolute, common, query, parameters)


class Dispatcher:
    """Executes program messages against a command tree, errors into a status system."""

    def __init__(self, tree: CommandTree, status: StatusSystem, name: str = "scpi") -> None:
        self._tree = tree
        self._status = status
        self._name = name
        self.command_errors_total = 0  # -100..-199: the message itself was malformed

    def execute(self, message: str) -> list[str]:
        """Run one program message; returns the replies of its queries, in order."""
        replies: list[str] = []
        path: list[str] = []
        try:
            for text in split_outside_quotes(message, ";"):
                unit = _parse_unit(text)
                if unit.common:
                    tokens = unit.tokens
                elif unit.absolute:
                    tokens = unit.tokens
                    path = tokens[:-1]
                else:
                    tokens = path + unit.tokens
                    path = tokens[:-1]
                reply = self._run(unit, tokens)
                if reply is not None:
                    replies.append(reply)
        except ScpiError as exc:
            log.warning(
                "%s: error %d %s (%s) in %r",
                self._name,
                exc.code,
                self._status.message(exc.code),
                exc.detail,
                message[:120],
            )
            self._status.push(exc.code)
            if -199 <= exc.code <= -100:
                self.command_errors_total += 1
        return replies

    def _run(self, unit: _Unit, tokens: list[str]) -> str | None:
        command = self._tree.find(tokens)
        action = None
        if command is not None:
            action = command.getter if unit.query else command.setter
        if command is None or action is None:
            header = ":".join(tokens) + ("?" if unit.query else "")
            raise ScpiError(-113, f"undefined header {header}")
        least, most = command.query_arguments if unit.query else command.set_arguments
        count = len(unit.parameters)
        if count < least:
            raise ScpiError(-109, f"{command.pattern} needs {least} parameter(s)")
        if count > most:
            raise ScpiError(-108, f"{command.pattern} takes at most {most} parameter(s)")
        return action(unit.parameters)
