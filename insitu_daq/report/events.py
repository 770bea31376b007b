"""What a run file's events say: when the microscope was in which imaging mode (the runner's
`microscope` events) and when the hold ran and what ended it (its `step` events).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import h5py

from insitu_daq.runfile.h5util import read_column
from insitu_daq.runfile.layout import EVENTS

# The runner's microscope events: "microscope: mode hrtem -> lm, dose rate 2 e/A^2/s (interleave)"
# or "microscope: mode lm, beam on, ... (step)"; a setting without a mode changes no mode.
_MODE_IN_MESSAGE = re.compile(r"^microscope: mode (?:\S+ -> )?(?P<mode>[a-z]+)\b")
_STEP_MESSAGE = re.compile(r"^step (?P<number>\d+)/\d+ (?P<kind>[a-z]+)(?P<done> done)?\b")
# The runner's last state event: "protocol <name> finished", "... aborted: <reason>".
_OUTCOME_MESSAGE = re.compile(r"^protocol .+? (?P<outcome>finished|aborted|failed)(?::|$)")
UNKNOWN_OUTCOME = "unknown"


def imaging_modes(
    events: list[tuple[float, str, str]], initial: str | None = None
) -> list[tuple[float, str]]:
    """(time, mode) at each imaging-mode change, in time order, from the microscope events.

    `initial` (the mode at the run's start, from /entry/instrument/microscope/mode) is the
    first entry at -inf when known.
    """
    changes: list[tuple[float, str]] = [(-math.inf, initial)] if initial else []
    for time, kind, message in events:
        if kind != "microscope":
            continue
        match = _MODE_IN_MESSAGE.match(message)
        if match:
            changes.append((time, match["mode"]))
    return changes


def mode_at(changes: list[tuple[float, str]], time_s: float) -> str | None:
    mode = None
    for time, changed_to in changes:
        if time > time_s:
            break
        mode = changed_to
    return mode


@dataclass(frozen=True)
class HoldSpan:
    """The protocol's (first) hold step as the events recorded it."""

    start_s: float
    end_s: float | None  # None: the run ended (aborted, or still running) inside it
    ended_by: str  # "duration", "condition", "timeout" or "not ended"
    message: str  # the step's end message (or start message if it has none)


def hold_span(events: list[tuple[float, str, str]]) -> HoldSpan | None:
    """When the first hold step ran and what ended it (its end message says it)."""
    start: tuple[float, str, str] | None = None
    for time, kind, message in events:
        if kind != "step":
            continue
        match = _STEP_MESSAGE.match(message)
        if not match or match["kind"] != "hold":
            continue
        if not match["done"]:
            if start is None:
                start = (time, match["number"], message)
            continue
        if start is None or match["number"] != start[1]:
            continue
        if " not met within " in message:
            ended_by = "timeout"
        elif " met after " in message:
            ended_by = "condition"
        else:
            ended_by = "duration"
        return HoldSpan(start[0], time, ended_by, message)
    if start is None:
        return None
    return HoldSpan(start[0], None, "not ended", start[2])


def outcome(events: list[tuple[float, str, str]]) -> str:
    """How the protocol ended, by the last state event: "finished", "aborted" or "failed";
    UNKNOWN_OUTCOME while it runs (or paused), or when no protocol ran."""
    states = [message for _, kind, message in events if kind == "state"]
    match = _OUTCOME_MESSAGE.match(states[-1]) if states else None
    return match["outcome"] if match else UNKNOWN_OUTCOME


def read_events(entry: h5py.Group) -> list[tuple[float, str, str]]:
    times = read_column(entry, EVENTS.time)
    kinds = [k.decode() for k in read_column(entry, EVENTS.column("kind"), "S1")]
    messages = [m.decode() for m in read_column(entry, EVENTS.column("message"), "S1")]
    n = min(len(times), len(kinds), len(messages))
    return list(zip(times[:n].tolist(), kinds[:n], messages[:n], strict=True))
