"""Declarative protocols: what an experiment does, step by step, validated before anything moves.

A protocol says *what* to do; `insitu_daq.control.runner.ProtocolRunner` does it against a
station (as Bluesky separates plans from its RunEngine). The same steps come from a file or
from Python:

    name: lno_4v3                       Protocol(name="lno_4v3", steps=[
    steps:                                  Approach(max_travel_nm=5000),
      - approach: {max_travel_nm: 5000}     Acquire(action="start"),
      - acquire: start                      Bias(volts=4.3, rate_volts_per_s=0.5),
      - bias: {volts: 4.3, rate_volts_per_s: 0.5}
      - hold: {duration_s: 120}             Hold(duration_s=120), ...])

Each step is one mapping `kind: {settings}`; steps with one main setting also take it bare
(`acquire: start`, `hold: 120`, `mark: contact`, `bias: 0`). TOML files use the same shape
(`[[steps]]` tables). A hold or wait may interleave short bursts in another imaging mode
(`hold: {duration_s: 120, interleave: {mode: lm, every_s: 5, dwell_s: 1}}`): one camera gives
both the lattice (HRTEM) and the particle's size and front (LM).

Every error is one line naming the step (1-based, as an operator counts) and the field:
`step 3 (bias): volts: Input should be a valid number`. Safety limits are checked against the
station's limits by `validate_against` before a run starts. A key given twice (`hold:
{duration_s: 600, duration_s: 6}`, or two `steps:`) is refused, naming the key and its line
(uniquekeys.py): a YAML reader would silently keep the last one.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from insitu_daq.control.conditions import ConditionError, Until, parse_until
from insitu_daq.control.limits import LimitError, SafetyCheck
from insitu_daq.core.config import ConfigError, SafetyLimits
from insitu_daq.core.uniquekeys import load_yaml, toml_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class ProtocolError(ConfigError):
    """A protocol that cannot run; one line naming the step (1-based) and the field."""

    def __init__(
        self,
        message: str,
        step: int | None = None,
        kind: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.kind = kind
        self.field = field


# ----- steps -----------------------------------------------------------------------------------
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


class Approach(Step):
    """Drive the tip toward the particle until contact, never further than `max_travel_nm`."""

    kind: ClassVar[str] = "approach"
    speed_nm_s: Positive = 100.0
    max_travel_nm: Positive

    def describe(self) -> str:
        return (
            f"approach at {self.speed_nm_s:g} nm/s until contact"
            f" (at most {self.max_travel_nm:g} nm)"
        )


class Retract(Step):
    """Back the tip off the particle."""

    kind: ClassVar[str] = "retract"
    distance_nm: Positive
    speed_nm_s: Positive = 200.0

    def describe(self) -> str:
        return f"retract {self.distance_nm:g} nm at {self.speed_nm_s:g} nm/s"


class Bias(Step):
    """Ramp (never step) the bias to `volts`; rate None means the station's maximum ramp rate."""

    kind: ClassVar[str] = "bias"
    shorthand: ClassVar[str | None] = "volts"
    volts: Finite
    rate_volts_per_s: Positive | None = None

    def describe(self) -> str:
        rate = (
            "the maximum rate"
            if self.rate_volts_per_s is None
            else f"{self.rate_volts_per_s:g} V/s"
        )
        return f"ramp bias to {self.volts:+.3f} V at {rate}"


class Interleave(BaseModel):
    """Short bursts in another imaging mode during a hold or wait (one camera, two views).

    Every `every_s` seconds of the step's clock (pauses excluded) the runner switches the
    microscope to `mode` for `dwell_s`, then back to the mode the protocol had set before the
    step; each switch is a `microscope` event. The dose rate in `mode` is the one that mode
    last had in this protocol, or `dose_rate_e_per_a2_s`. Bursts start at k * every_s
    (k >= 1) and last dwell_s from the completed switch (runner._Bursts); a burst still running
    when the step ends is cut short there.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["lm", "hrtem"]
    every_s: Positive
    dwell_s: Positive
    dose_rate_e_per_a2_s: Positive | None = None

    @model_validator(mode="after")
    def _dwell_shorter_than_period(self) -> Interleave:
        if self.dwell_s >= self.every_s:
            raise ValueError(
                f"dwell_s ({self.dwell_s:g} s) must be shorter than every_s ({self.every_s:g} s)"
            )
        return self

    def describe(self) -> str:
        return f"{self.mode.upper()} bursts of {self.dwell_s:g} s every {self.every_s:g} s"


class Hold(Step):
    """Keep everything as it is for `duration_s` run-clock seconds (pauses excluded).

    With `until`, the hold ends once the condition over live values has held for its
    persistence (`... for N s`, by default 2 s for analysis quantities: condition.py), and
    `duration_s` is its timeout (mandatory: a condition that never comes true must not hold
    a biased particle forever).
    """

    kind: ClassVar[str] = "hold"
    shorthand: ClassVar[str | None] = "duration_s"
    duration_s: Positive
    until: str | None = None
    interleave: Interleave | None = None

    @field_validator("until")
    @classmethod
    def _parse_until(cls, text: str | None) -> str | None:
        if text is None:
            return None
        try:
            return str(parse_until(text))  # normalised spelling, persistence included
        except ConditionError as exc:
            raise ValueError(str(exc)) from None

    @property
    def condition(self) -> Until | None:
        return None if self.until is None else parse_until(self.until)

    def describe(self) -> str:
        if self.until is None:
            text = f"hold {self.duration_s:g} s"
        else:
            text = f"hold until {self.until} (at most {self.duration_s:g} s)"
        return text if self.interleave is None else f"{text}, {self.interleave.describe()}"


class Acquire(Step):
    """Start or stop recording frames into the run file."""

    kind: ClassVar[str] = "acquire"
    shorthand: ClassVar[str | None] = "action"
    action: Literal["start", "stop"]

    def describe(self) -> str:
        return f"{self.action} recording"


class Microscope(Step):
    """Set the microscope: imaging mode, beam on/off (unblanked/blanked), dose rate, pixel size."""

    kind: ClassVar[str] = "microscope"
    mode: Literal["lm", "hrtem"] | None = None
    beam: bool | None = None
    dose_rate_e_per_a2_s: Positive | None = None
    pixel_size_nm: Positive | None = None

    @model_validator(mode="after")
    def _something_to_set(self) -> Microscope:
        if not self.settings():
            raise ValueError("set at least one of mode, beam, dose_rate_e_per_a2_s, pixel_size_nm")
        return self

    def describe(self) -> str:
        parts = []
        if self.mode is not None:
            parts.append(f"mode {self.mode}")
        if self.beam is not None:
            parts.append("beam on" if self.beam else "beam off")
        if self.dose_rate_e_per_a2_s is not None:
            parts.append(f"dose rate {self.dose_rate_e_per_a2_s:g} e/A^2/s")
        if self.pixel_size_nm is not None:
            parts.append(f"pixel size {self.pixel_size_nm:g} nm")
        return "microscope: " + ", ".join(parts)


class Wait(Step):
    """Let time pass (settling, drift) for `duration_s` run-clock seconds (pauses excluded)."""

    kind: ClassVar[str] = "wait"
    shorthand: ClassVar[str | None] = "duration_s"
    duration_s: Positive
    interleave: Interleave | None = None

    def describe(self) -> str:
        text = f"wait {self.duration_s:g} s"
        return text if self.interleave is None else f"{text}, {self.interleave.describe()}"


class Mark(Step):
    """Write an annotation into the run's events."""

    kind: ClassVar[str] = "mark"
    shorthand: ClassVar[str | None] = "text"
    text: Annotated[str, Field(min_length=1)]

    def describe(self) -> str:
        return f"mark: {self.text}"


STEP_TYPES: dict[str, type[Step]] = {
    cls.kind: cls for cls in (Approach, Retract, Bias, Hold, Acquire, Microscope, Wait, Mark)
}


def _step_kind(value: Any) -> str | None:
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
        if kind not in STEP_TYPES:
            close = difflib.get_close_matches(str(kind), list(STEP_TYPES), n=1)
            hint = (
                f"did you mean {close[0]}?" if close else f"expected one of {', '.join(STEP_TYPES)}"
            )
            raise PydanticCustomError(
                "step_kind", "unknown step '{kind}'; {hint}", {"kind": kind, "hint": hint}
            )
    return handler(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


AnyStep = Annotated[
    Annotated[Approach, Tag("approach")]
    | Annotated[Retract, Tag("retract")]
    | Annotated[Bias, Tag("bias")]
    | Annotated[Hold, Tag("hold")]
    | Annotated[Acquire, Tag("acquire")]
    | Annotated[Microscope, Tag("microscope")]
    | Annotated[Wait, Tag("wait")]
    | Annotated[Mark, Tag("mark")],
    Discriminator(_step_kind),
    WrapValidator(_check_step_shape),
]


# ----- the protocol ----------------------------------------------------------------------------
class Protocol(BaseModel):
    """A named list of steps. Equal protocols have equal name, description and steps.

    Built from Python, a wrong value raises pydantic's ValidationError as any model does;
    `parse` and `load` turn it into a one-line ProtocolError naming the step and field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    steps: Annotated[tuple[AnyStep, ...], Field(min_length=1)]

    _text: str | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        # The source text (comments, layout) is not part of what the protocol does.
        if not isinstance(other, Protocol):
            return NotImplemented
        return (self.name, self.description, self.steps) == (
            other.name,
            other.description,
            other.steps,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.description, self.steps))

    @model_validator(mode="after")
    def _interleave_has_a_mode_to_return_to(self) -> Protocol:
        mode: str | None = None  # the imaging mode the steps so far leave the microscope in
        for number, step in enumerate(self.steps, 1):
            if isinstance(step, Microscope) and step.mode is not None:
                mode = step.mode
            interleave = getattr(step, "interleave", None)
            if interleave is None:
                continue
            if mode is None:
                problem = "no earlier microscope step sets the mode to return to after a burst"
            elif mode == interleave.mode:
                problem = f"the microscope is already in {mode} here; nothing to interleave"
            else:
                continue
            raise PydanticCustomError(
                "step_sequence",
                "step {step} ({kind}): interleave: {problem}",
                {"step": number, "kind": step.kind, "field": "interleave", "problem": problem},
            )
        return self

    # ----- reading -----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, fmt: str | None = None, name: str | None = None) -> Protocol:
        """Parse YAML or TOML text (`fmt` "yaml", "toml", or None to tell from the content).

        `name` is where the text came from (a file name): it prefixes error messages, and its
        stem names the protocol when the text has no `name`.
        """
        label = f"{name}: " if name else ""
        data = _decode(text, fmt, label)
        if name and "name" not in data:
            data = {"name": Path(name).stem, **data}
        try:
            protocol = cls.model_validate(data)
        except ValidationError as exc:
            raise _protocol_error(exc, data, label) from None
        protocol._text = text
        return protocol

    @classmethod
    def load(cls, path: str | Path) -> Protocol:
        """Read a protocol file; the format follows the extension (.yaml/.yml/.toml) or content."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProtocolError(f"{path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ProtocolError(f"{path}: not a text file (UTF-8)") from None
        fmt = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}.get(path.suffix.lower())
        return cls.parse(text, fmt, name=path.name)

    # ----- writing -----------------------------------------------------------------------
    def to_data(self) -> dict[str, Any]:
        """The protocol in the file shape: name, description, steps as `{kind: settings}`."""
        data: dict[str, Any] = {"name": self.name}
        if self.description:
            data["description"] = self.description
        data["steps"] = [{step.kind: step.settings()} for step in self.steps]
        return data

    @property
    def text(self) -> str:
        """The source text as loaded (written into the run file), or YAML for Python-built ones."""
        if self._text is None:
            return yaml.safe_dump(
                self.to_data(), sort_keys=False, default_flow_style=None, allow_unicode=True
            )
        return self._text

    # ----- checks ------------------------------------------------------------------------
    def validate_against(self, limits: SafetyLimits) -> Protocol:
        """Refuse a bias or ramp rate beyond the station's limits, naming the step; returns self."""
        check = SafetyCheck(limits)
        for number, step in enumerate(self.steps, 1):
            if not isinstance(step, Bias):
                continue
            try:
                check.bias(step.volts, step.rate_volts_per_s)
            except LimitError as exc:
                raise ProtocolError(
                    f"step {number} (bias): {exc}", number, "bias", exc.field
                ) from None
        return self


def _decode(text: str, fmt: str | None, label: str) -> dict[str, Any]:
    fmt = (fmt or "auto").lower()
    if fmt not in ("auto", "yaml", "yml", "toml"):
        raise ProtocolError(f"{label}unknown protocol format {fmt!r}; expected yaml or toml")
    data: Any
    if fmt in ("toml", "auto"):
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            if fmt == "toml":
                raise ProtocolError(f"{label}not valid TOML: {toml_error(exc, text)}") from None
            fmt = "yaml"  # not TOML: try YAML
    if fmt in ("yaml", "yml"):
        try:
            data = load_yaml(text)  # a key given twice is refused, naming it and its line
        except yaml.YAMLError as exc:
            raise ProtocolError(f"{label}not valid YAML: {_yaml_reason(exc)}") from None
    if not isinstance(data, dict):
        raise ProtocolError(
            f"{label}a protocol is a mapping with name, description and steps; "
            f"got {type(data).__name__}"
        )
    return data


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())


def _protocol_error(exc: ValidationError, data: dict[str, Any], label: str = "") -> ProtocolError:
    """The first error as `step N (kind): field: message`, or `field: message` at the top."""
    # A bad step also fails the tuple's min_length (0 items validated): only report the step.
    errors = [
        e for e in exc.errors() if not (e["type"] == "too_short" and e["input"])
    ] or exc.errors()
    # Earliest step first; within it a misspelt field before the "missing" it causes.
    errors.sort(key=lambda e: (_step_index(e["loc"]), e["type"] != "extra_forbidden"))
    first = errors[0]
    loc = first["loc"]
    message = _message(first)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "step_sequence":  # a check across steps, already naming its step
        ctx = first["ctx"]
        return ProtocolError(f"{label}{message}{more}", ctx["step"], ctx["kind"], ctx["field"])
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        number = loc[1] + 1
        kind = str(loc[2]) if len(loc) > 2 else _raw_kind(data, loc[1])
        field = ".".join(str(part) for part in loc[3:]) or None
        where = f"step {number} ({kind})" if kind else f"step {number}"
        if field:
            where += f": {field}"
        return ProtocolError(f"{label}{where}: {message}{more}", number, kind, field)
    field = ".".join(str(part) for part in loc) or None
    where = f"{field}: " if field else ""
    return ProtocolError(f"{label}{where}{message}{more}", None, None, field)


def _step_index(loc: tuple[Any, ...]) -> int:
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        return loc[1]
    return -1


def _raw_kind(data: dict[str, Any], index: int) -> str | None:
    steps = data.get("steps")
    if isinstance(steps, (list, tuple)) and index < len(steps):
        kind = _step_kind(steps[index])
        if kind in STEP_TYPES:
            return kind
    return None


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        loc = error["loc"]
        fields = _fields_at(loc[:-1])
        return f"unknown field; expected {', '.join(fields)}" if fields else "unknown field"
    if error["type"] == "missing":
        return "required but missing"
    if error["type"] == "too_short" and tuple(error["loc"]) == ("steps",):
        return "a protocol needs at least one step"
    return " ".join(error["msg"].replace("Value error, ", "").split())


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    if not loc:
        return list(Protocol.model_fields)
    if len(loc) == 3 and loc[0] == "steps" and loc[2] in STEP_TYPES:
        return list(STEP_TYPES[loc[2]].model_fields)
    if len(loc) == 4 and loc[0] == "steps" and loc[3] == "interleave":
        return list(Interleave.model_fields)
    return []
