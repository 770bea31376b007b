"""Control requests: the schema of every command and the validation of what arrives.

One JSON object in: `{"cmd": ..., ...}`. Every request is validated by a pydantic
discriminated union on `cmd` (unknown fields refused) before the daemon sees it; each request
type then calls the one `ControlHandler` method of its command.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from insitu_daq.core.config import one_line
from insitu_daq.core.uniquekeys import DuplicateKeyError, refuse_duplicate_pairs
from insitu_daq.service.api.wire import squash

MAX_REQUEST_BYTES = 1 << 20  # a protocol file is a few kB


class RequestError(ValueError):
    """A control request that does not validate; the message is one line."""


Text = Annotated[str, Field(min_length=1, max_length=2000)]
# Who asked (a control that changes the run is recorded with it): the web view's logged-in
# user, the command line's login name. Optional: a script may not say.
Operator = Annotated[str, Field(min_length=1, max_length=200)]


class ControlHandler(Protocol):
    """What the control server calls; the daemon implements it. Each returns the reply fields.

    Raise ValueError or RuntimeError to refuse (the message becomes the reply's `error`).
    """

    def handle_ping(self) -> dict[str, Any]: ...

    def handle_status(self) -> dict[str, Any]: ...

    def handle_run(self, protocol_text: str, fmt: str, name: str | None) -> dict[str, Any]: ...

    def handle_pause(self, reason: str | None, operator: str | None) -> dict[str, Any]: ...

    def handle_resume(self, operator: str | None) -> dict[str, Any]: ...

    def handle_abort(self, reason: str | None, operator: str | None) -> dict[str, Any]: ...

    def handle_mark(self, text: str, operator: str | None) -> dict[str, Any]: ...


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cmd: str

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        raise NotImplementedError


class PingRequest(_Request):
    cmd: Literal["ping"]

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_ping()


class StatusRequest(_Request):
    cmd: Literal["status"]

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_status()


class RunRequest(_Request):
    cmd: Literal["run"]
    protocol_text: Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_BYTES)]
    format: Literal["yaml", "toml"]
    name: Text | None = None  # default: the protocol's own name

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_run(protocol_text=self.protocol_text, fmt=self.format, name=self.name)


class PauseRequest(_Request):
    cmd: Literal["pause"]
    reason: Text | None = None
    operator: Operator | None = None

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_pause(reason=self.reason, operator=self.operator)


class ResumeRequest(_Request):
    cmd: Literal["resume"]
    operator: Operator | None = None

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_resume(operator=self.operator)


class AbortRequest(_Request):
    cmd: Literal["abort"]
    reason: Text | None = None
    operator: Operator | None = None

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_abort(reason=self.reason, operator=self.operator)


class MarkRequest(_Request):
    cmd: Literal["mark"]
    text: Text
    operator: Operator | None = None

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_mark(text=self.text, operator=self.operator)


ControlRequest = Annotated[
    Union[  # noqa: UP007 - a discriminated union reads better spelled out
        PingRequest,
        StatusRequest,
        RunRequest,
        PauseRequest,
        ResumeRequest,
        AbortRequest,
        MarkRequest,
    ],
    Field(discriminator="cmd"),
]
_REQUEST_ADAPTER: TypeAdapter[Any] = TypeAdapter(ControlRequest)
COMMANDS = ("ping", "status", "run", "pause", "resume", "abort", "mark")


def parse_request(raw: bytes) -> _Request:
    """Decode and validate one request; raises RequestError with a one-line reason."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise RequestError(f"request of {len(raw)} bytes exceeds {MAX_REQUEST_BYTES} bytes")
    try:
        data = json.loads(raw, object_pairs_hook=refuse_duplicate_pairs)
    except DuplicateKeyError as exc:  # json would keep the last one without a word
        raise RequestError(f"request refused: {exc}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RequestError(squash(f"not JSON: {exc}")) from None
    expected = ", ".join(COMMANDS)
    if not isinstance(data, dict):
        raise RequestError(
            f'request must be a JSON object like {{"cmd": "ping"}}, not {data!r:.40}'
        )
    if "cmd" not in data:
        raise RequestError(f"missing 'cmd' (one of: {expected})")
    if data["cmd"] not in COMMANDS:
        raise RequestError(squash(f"unknown cmd {data['cmd']!r:.40} (one of: {expected})"))
    try:
        return _REQUEST_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise RequestError(squash(one_line(exc))) from None
