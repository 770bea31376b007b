"""The step registry: what a protocol step is, and what each kind declares about itself.

As Bluesky's RunEngine keeps a command registry, a step kind is one `StepSpec` registered
here: its pydantic model (what a protocol file says), its executor (what the runner does, with
the runner's verbs in a `StepContext`), and what the checks and the plan need to know about
it (the limits it must keep, what the station must offer, its longest duration, how it leaves
the bias, recording and imaging mode). The protocol's step union, the runner's preflight and
execution and the recording plan iterate `STEPS`; none of them names a kind.

A kind lives in its own module (steps/<kind>.py) that registers it on import; the package
imports them all.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, Protocol, TypeVar, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from insitu_daq.control.conditions import Until
from insitu_daq.control.limits import SafetyCheck
from insitu_daq.control.station import Station, Stopped
from insitu_daq.core.config import SafetyLimits

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
T = TypeVar("T")


class Step(BaseModel):
    """One step of a protocol. Subclasses name their `kind` and describe themselves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[str]
    # The field a bare value sets (`hold: 120` is `hold: {duration_s: 120}`), if any.
    shorthand: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) == 1 and cls.kind in data:
            data = data[cls.kind]
        if cls.shorthand is not None and not isinstance(data, (dict, BaseModel)):
            data = {cls.shorthand: data}
        return data

    def describe(self) -> str:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The step's settings as written in a protocol file (unset options left out)."""
        return self.model_dump(exclude_none=True)


S = TypeVar("S", bound=Step)


class StepRefused(Exception):  # noqa: N818 - reads as the verdict it carries
    """The station cannot do this step (found before the run starts); names the field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class PlanState:
    """What the steps so far leave behind, as the checks and the plan follow a protocol."""

    bias_volts: float = 0.0  # the bias level (V)
    recording: bool = False  # frames written to the run file
    mode: str | None = None  # the microscope's imaging mode, if a step has set it
    temperature_c: float | None = None  # a heating holder's target, once a step has set one
    beam: bool | None = None  # the beam unblanked, if a step has set it (control/dose.py)
    dose_rates: tuple[tuple[str, float], ...] = ()  # (mode, e/A^2/s) the steps have set


class StepContext(Protocol):
    """What an executor may do: the runner's verbs, on its worker thread (control/runner.py).

    Every executor either moves through `move` / `checkpoint` (so a pause stops it and a
    resume re-issues it) or calls `checkpoint()` first (an instant step: wait out a pause,
    honour an abort).
    """

    station: Station

    def checkpoint(self) -> threading.Event:
        """Wait out a pause, raise on abort; the stop event for the next station call."""
        ...

    def check_stopped(self, exc: Stopped, stop: threading.Event) -> None:
        """A verb raised Stopped: return if a pause or abort explains it, else StationError."""
        ...

    def move(self, verb: Callable[[threading.Event], T]) -> T:
        """Call a station verb that moves something; re-issued after a pause."""
        ...

    def ramp_bias(self, volts: float, rate_volts_per_s: float | None) -> None:
        """Ramp to `volts`, the setpoint a resumed run returns to from now on."""
        ...

    def timed(
        self, duration_s: float, condition: Until | None, interleave: Any | None
    ) -> dict[str, Any]:
        """Let `duration_s` of step time pass (or until `condition`), with interleave bursts."""
        ...

    def step_time(self) -> float:
        """The step's clock now (run-clock s, pauses excluded): `timed` lasts until it reads
        `duration_s`, so a step that waits more than once waits until step_time() + its wait."""
        ...

    def set_recording(self, on: bool) -> None:
        """Start or stop recording (the runner stops a recording left on at the end)."""
        ...

    def set_microscope(self, cause: str, **settings: Any) -> None:
        """Set the microscope and record it as a `microscope` event."""
        ...

    def emit(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Record an event on the run clock."""
        ...


def rate_text(rate: float | None, unit: str) -> str:
    """How a ramping step describes its rate: None is the station's maximum (its limits)."""
    return "the maximum rate" if rate is None else f"{rate:g} {unit}"


def _no_time(step: Any, state: PlanState, limits: SafetyLimits) -> float:
    return 0.0  # instant next to moves and holds


def _no_check(step: Any, check: Any) -> None:
    return None


def _unchanged(step: Any, state: PlanState) -> PlanState:
    return state


@dataclass(frozen=True)
class StepSpec(Generic[S]):
    """One step kind: its model, its executor, and what the checks and the plan need."""

    model: type[S]
    # The runner's work for it; returns what the step-end event records (`summary` shown).
    execute: Callable[[StepContext, S], dict[str, Any]]
    # The longest it can take (run-clock s), from the state the steps before leave.
    max_seconds: Callable[[S, PlanState, SafetyLimits], float] = _no_time
    # Against the station's limits at protocol load (LimitError).
    check_limits: Callable[[S, SafetyCheck], None] = _no_check
    # Against the station before the run starts (LimitError, StepRefused).
    preflight: Callable[[S, Station], None] = _no_check
    # What it leaves behind for the steps after it.
    after: Callable[[S, PlanState], PlanState] = _unchanged
    # Lasts `duration_s` of step time (hold, wait): progress shows the time remaining.
    timed: bool = False
    # Of its longest duration, how long it records (run-clock s) when it switches recording
    # itself (a temperature staircase acquiring at each level); None: all of it while the
    # steps before left recording on, none otherwise.
    recorded_seconds: Callable[[S, PlanState, SafetyLimits], float] | None = None

    @property
    def kind(self) -> str:
        return self.model.kind


# Every registered kind, in the order an operator reads them (steps/__init__ imports them).
STEPS: dict[str, StepSpec[Any]] = {}
_listeners: list[Callable[[], None]] = []


def register(spec: StepSpec[S]) -> StepSpec[S]:
    """Add a step kind; everything that iterates STEPS (the protocol's union) follows."""
    if spec.kind in STEPS:
        raise ValueError(f"step kind {spec.kind!r} is already registered")
    STEPS[spec.kind] = spec
    _changed()
    return spec


def unregister(kind: str) -> None:
    del STEPS[kind]
    _changed()


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener` after each register/unregister (the protocol rebuilds its union)."""
    _listeners.append(listener)


def _changed() -> None:
    for listener in _listeners:
        listener()


def step_kind(value: Any) -> str | None:
    """The kind a step (or its `{kind: settings}` mapping) claims to be."""
    if isinstance(value, Step):
        return value.kind
    if isinstance(value, dict) and len(value) == 1:
        return next(iter(value))
    return None


def _check_step_shape(value: Any, handler: ValidatorFunctionWrapHandler) -> Step:
    """Friendly errors for what the tagged union would report cryptically."""
    if not isinstance(value, Step):
        if not isinstance(value, dict) or len(value) != 1:
            raise PydanticCustomError(
                "step_shape",
                "a step is one kind with its settings, like `- hold: 120`; got {got}",
                {"got": _short(value)},
            )
        kind = next(iter(value))
        if kind not in STEPS:
            close = difflib.get_close_matches(str(kind), list(STEPS), n=1)
            hint = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(STEPS)}"
            raise PydanticCustomError(
                "step_kind", "unknown step '{kind}'; {hint}", {"kind": kind, "hint": hint}
            )
    return handler(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def any_step() -> Any:
    """The pydantic type of one step: a union of the registered kinds, tagged by kind."""
    tagged = tuple(Annotated[spec.model, Tag(kind)] for kind, spec in STEPS.items())
    return Annotated[
        Union[tagged],  # noqa: UP007 - a union built from a tuple has no `|` spelling
        Discriminator(step_kind),
        WrapValidator(_check_step_shape),
    ]
