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
station's limits by `validate_against` before a run starts. The step kinds are the registry's
(insitu_daq/control/steps/: one module per kind); the union of steps follows it. A key given
twice (`hold: {duration_s: 600, duration_s: 6}`, or two `steps:`) is refused, naming the key
and its line (core/uniquekeys.py): a YAML reader would silently keep the last one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from insitu_daq.control.limits import LimitError, SafetyCheck
from insitu_daq.control.steps import STEPS, PlanState, Step, any_step, on_change, step_kind
from insitu_daq.control.steps.acquire import Acquire
from insitu_daq.control.steps.approach import Approach
from insitu_daq.control.steps.bias import Bias
from insitu_daq.control.steps.hold import Hold
from insitu_daq.control.steps.interleave import Interleave
from insitu_daq.control.steps.mark import Mark
from insitu_daq.control.steps.microscope import Microscope
from insitu_daq.control.steps.retract import Retract
from insitu_daq.control.steps.temperature import Temperature
from insitu_daq.control.steps.temperature_staircase import TemperatureStaircase
from insitu_daq.control.steps.wait import Wait
from insitu_daq.core.config import ConfigError, SafetyLimits
from insitu_daq.core.uniquekeys import load_yaml, toml_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The step classes are the protocol's vocabulary (`from insitu_daq.control.protocol import Bias`);
# each lives with its executor in control/steps/.
__all__ = [
    "Acquire",
    "Approach",
    "Bias",
    "Hold",
    "Interleave",
    "Mark",
    "Microscope",
    "Protocol",
    "ProtocolError",
    "Retract",
    "Step",
    "Temperature",
    "TemperatureStaircase",
    "Wait",
]


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


# ----- the protocol ----------------------------------------------------------------------------
class Protocol(BaseModel):
    """A named list of steps. Equal protocols have equal name, description and steps.

    Built from Python, a wrong value raises pydantic's ValidationError as any model does;
    `parse` and `load` turn it into a one-line ProtocolError naming the step and field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    steps: Annotated[tuple[Any, ...], Field(min_length=1)]  # _declare_steps: the kinds

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
        state = PlanState()  # state.mode: the imaging mode the steps so far leave it in
        for number, step in enumerate(self.steps, 1):
            state = STEPS[step.kind].after(step, state)
            interleave = getattr(step, "interleave", None)
            if interleave is None:
                continue
            mode = state.mode
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
        """Refuse a step beyond the station's limits (a bias, a ramp rate), naming the step;
        returns self."""
        check = SafetyCheck(limits)
        for number, step in enumerate(self.steps, 1):
            try:
                STEPS[step.kind].check_limits(step, check)
            except LimitError as exc:
                raise ProtocolError(
                    f"step {number} ({step.kind}): {exc}", number, step.kind, exc.field
                ) from None
        return self


def _declare_steps() -> None:
    """Type `Protocol.steps` as the union of the registered kinds, now and after each
    registration (a field's type is fixed when pydantic builds the model: rebuild it)."""
    Protocol.model_fields["steps"] = FieldInfo.from_annotation(
        Annotated[tuple[any_step(), ...], Field(min_length=1)]  # type: ignore[misc]
    )
    Protocol.model_rebuild(force=True)


_declare_steps()
on_change(_declare_steps)


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
        kind = step_kind(steps[index])
        if kind in STEPS:
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
    if len(loc) == 3 and loc[0] == "steps" and loc[2] in STEPS:
        return list(STEPS[loc[2]].model.model_fields)
    if len(loc) == 4 and loc[0] == "steps" and loc[3] == "interleave":
        return list(Interleave.model_fields)
    return []
