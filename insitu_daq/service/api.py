"""The daemon's control API (ZeroMQ REP) and event stream (ZeroMQ PUB), as DESIGN.md fixes them.

Control: one JSON object in, one JSON object out: `{"cmd": ..., ...}` answered with
`{"ok": true, ...}` or `{"ok": false, "error": "<one line>"}`. Every request is validated by a
pydantic discriminated union on `cmd` (unknown fields refused) before the daemon sees it; the
server then calls the one `ControlHandler` method of that command. Whatever arrives (not JSON,
wrong fields, a handler that raises) gets an error reply, is counted and logged, and the
server keeps serving: a REP socket owes every request exactly one reply, so `_answer` never
raises.

Event stream: multipart `[topic, JSON]` on topics `status`, `bias`, `analysis`, `event`. It
is a live view, not a record (the run file is the record): a subscriber sees what is published
after its subscription has reached the publisher. PUB sockets are not thread-safe and
`publish` is called from the bias, status and runner threads, so a lock serialises the sends
(a PUB send never blocks; at the high-water mark ZeroMQ drops for that subscriber).

Both servers own their ZeroMQ context, socket and thread (created in `start`, closed in
`stop`). Loopback is the default; binding anywhere else needs CURVE keys (a secret key file
loaded with `zmq.auth`, and optionally a folder of the client public keys allowed in). The
server refuses a non-loopback endpoint without keys when it is constructed, before the daemon
touches any instrument, even if the config check was bypassed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Protocol, Union

import numpy as np
import zmq
import zmq.auth
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from zmq.auth.thread import ThreadAuthenticator

from insitu_daq.core.config import ApiConfig, ConfigError, one_line
from insitu_daq.core.uniquekeys import DuplicateKeyError, refuse_duplicate_pairs

log = logging.getLogger(__name__)

DEFAULT_CONTROL_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_EVENTS_ENDPOINT = "tcp://127.0.0.1:5556"
TOPICS = ("status", "bias", "analysis", "event")
MAX_REQUEST_BYTES = 1 << 20  # a protocol file is a few kB
POLL_INTERVAL_MS = 100  # how often the server thread looks at its stop flag
PUBLISH_HWM = 10_000  # messages queued per slow subscriber before ZeroMQ drops for it


# ----- errors --------------------------------------------------------------------------------
class ApiError(RuntimeError):
    """The control API or event stream could not do what was asked (one-line message)."""


class ControlError(ApiError):
    """The daemon answered `ok: false`; the message is its one-line reason."""


class ControlTimeoutError(ApiError, TimeoutError):
    """No reply within the client's timeout (daemon not running, busy, or unreachable)."""


class RequestError(ValueError):
    """A control request that does not validate; the message is one line."""


# ----- requests ------------------------------------------------------------------------------
Text = Annotated[str, Field(min_length=1, max_length=2000)]


class ControlHandler(Protocol):
    """What the control server calls; the daemon implements it. Each returns the reply fields.

    Raise ValueError or RuntimeError to refuse (the message becomes the reply's `error`).
    """

    def handle_ping(self) -> dict[str, Any]: ...

    def handle_status(self) -> dict[str, Any]: ...

    def handle_run(self, protocol_text: str, fmt: str, name: str | None) -> dict[str, Any]: ...

    def handle_pause(self, reason: str | None) -> dict[str, Any]: ...

    def handle_resume(self) -> dict[str, Any]: ...

    def handle_abort(self, reason: str | None) -> dict[str, Any]: ...

    def handle_mark(self, text: str) -> dict[str, Any]: ...


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

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_pause(reason=self.reason)


class ResumeRequest(_Request):
    cmd: Literal["resume"]

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_resume()


class AbortRequest(_Request):
    cmd: Literal["abort"]
    reason: Text | None = None

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_abort(reason=self.reason)


class MarkRequest(_Request):
    cmd: Literal["mark"]
    text: Text

    def apply(self, handler: ControlHandler) -> Mapping[str, Any]:
        return handler.handle_mark(text=self.text)


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


def _squash(text: str) -> str:
    """One line: newlines and runs of spaces become single spaces."""
    return " ".join(text.split())


def parse_request(raw: bytes) -> _Request:
    """Decode and validate one request; raises RequestError with a one-line reason."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise RequestError(f"request of {len(raw)} bytes exceeds {MAX_REQUEST_BYTES} bytes")
    try:
        data = json.loads(raw, object_pairs_hook=refuse_duplicate_pairs)
    except DuplicateKeyError as exc:  # json would keep the last one without a word
        raise RequestError(f"request refused: {exc}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RequestError(_squash(f"not JSON: {exc}")) from None
    expected = ", ".join(COMMANDS)
    if not isinstance(data, dict):
        raise RequestError(
            f'request must be a JSON object like {{"cmd": "ping"}}, not {data!r:.40}'
        )
    if "cmd" not in data:
        raise RequestError(f"missing 'cmd' (one of: {expected})")
    if data["cmd"] not in COMMANDS:
        raise RequestError(_squash(f"unknown cmd {data['cmd']!r:.40} (one of: {expected})"))
    try:
        return _REQUEST_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise RequestError(_squash(one_line(exc))) from None


# ----- JSON ----------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays unwrapped, paths as text, NaN/inf as null."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def encode_json(value: Any) -> bytes:
    """Compact, standard JSON (no NaN) of `value`; raises TypeError for what JSON cannot hold."""
    return json.dumps(_jsonable(value), separators=(",", ":"), allow_nan=False).encode()


def _error_reply(message: str) -> bytes:
    return encode_json({"ok": False, "error": message})


# ----- security ------------------------------------------------------------------------------
def is_loopback(endpoint: str) -> bool:
    """True for endpoints reachable only from this machine (ipc, inproc, 127/8, ::1, lo)."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name: not provably local
        return False


class CurveServerKeys:
    """The server's CURVE key pair, and optionally the folder of client public keys let in."""

    def __init__(self, public: bytes, secret: bytes, clients_dir: Path | None = None) -> None:
        self.public = public
        self.secret = secret
        self.clients_dir = clients_dir

    @classmethod
    def load(cls, secret_key_file: Path, clients_dir: Path | None = None) -> CurveServerKeys:
        """Read a `zmq.auth` secret certificate; raises ConfigError with a one-line reason."""
        try:
            public, secret = zmq.auth.load_certificate(secret_key_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(_squash(f"curve_secret_key_file {secret_key_file}: {exc}")) from None
        if not secret:
            raise ConfigError(
                f"curve_secret_key_file {secret_key_file}: holds no secret key (a .key_secret file)"
            )
        if clients_dir is not None and not Path(clients_dir).is_dir():
            raise ConfigError(f"curve_clients_dir {clients_dir}: not a directory")
        return cls(public, secret, None if clients_dir is None else Path(clients_dir))


def server_keys(
    name: str, endpoint: str, secret_key_file: Path | None, clients_dir: Path | None
) -> CurveServerKeys | None:
    """The CURVE keys a server on `endpoint` must use; refuses non-loopback without keys."""
    if secret_key_file is None:
        if not is_loopback(endpoint):
            raise ConfigError(
                f"{name} endpoint {endpoint!r} is not loopback: set curve_secret_key_file"
            )
        if clients_dir is not None:
            raise ConfigError("curve_clients_dir needs curve_secret_key_file")
        return None
    return CurveServerKeys.load(Path(secret_key_file), clients_dir)


def _curve_client(
    socket: zmq.Socket, server_public_key_file: Path | None, client_secret_key_file: Path | None
) -> None:
    """Make `socket` a CURVE client of the server whose public certificate is given."""
    if server_public_key_file is None:
        if client_secret_key_file is not None:
            raise ConfigError("a client key needs the server's public key file")
        return
    server_public, _ = zmq.auth.load_certificate(server_public_key_file)
    if client_secret_key_file is None:  # the server admits any client: an ephemeral pair does
        public, secret = zmq.curve_keypair()
    else:
        public, secret = zmq.auth.load_certificate(client_secret_key_file)
        if not secret:
            raise ConfigError(f"{client_secret_key_file}: holds no secret key")
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


class _BoundSocket:
    """A server socket bound with its own context (and ZAP authenticator if clients are listed)."""

    def __init__(self, kind: int, name: str, endpoint: str, keys: CurveServerKeys | None) -> None:
        self.context = zmq.Context()
        self.authenticator: ThreadAuthenticator | None = None
        self.socket: zmq.Socket | None = None
        try:
            if keys is not None and keys.clients_dir is not None:
                self.authenticator = ThreadAuthenticator(self.context, log=log)
                self.authenticator.start()
                self.authenticator.configure_curve(domain="*", location=str(keys.clients_dir))
            self.socket = self.context.socket(kind)
            self.socket.linger = 0
            if keys is not None:
                self.socket.curve_secretkey = keys.secret
                self.socket.curve_publickey = keys.public
                self.socket.curve_server = True
                if keys.clients_dir is None:
                    log.warning("%s: CURVE without curve_clients_dir admits any client", name)
            self.socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ApiError(f"cannot bind {name} endpoint {endpoint}: {exc}") from None
        except BaseException:
            self.close()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        self.context.term()


# ----- control server ------------------------------------------------------------------------
class ControlServer:
    """Serves the control API on a REP socket in its own thread; never dies on bad input.

    Counters: `requests_total` (every request), `refused_total` (did not validate: not JSON,
    unknown command, wrong fields), `failed_total` (the handler raised or returned garbage).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_CONTROL_ENDPOINT,
        handler: ControlHandler | None = None,
        *,
        curve_secret_key_file: Path | None = None,
        curve_clients_dir: Path | None = None,
    ) -> None:
        if handler is None:
            raise ValueError("ControlServer needs a handler")
        self.handler = handler
        self._requested_endpoint = endpoint
        self._keys = server_keys("control", endpoint, curve_secret_key_file, curve_clients_dir)
        self._bound: _BoundSocket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.requests_total = 0
        self.refused_total = 0
        self.failed_total = 0

    @classmethod
    def from_config(cls, api: ApiConfig, handler: ControlHandler) -> ControlServer:
        return cls(
            api.control,
            handler,
            curve_secret_key_file=api.curve_secret_key_file,
            curve_clients_dir=api.curve_clients_dir,
        )

    @property
    def endpoint(self) -> str:
        """The bound endpoint (ephemeral port resolved) once started, else the requested one."""
        return self._bound.endpoint if self._bound is not None else self._requested_endpoint

    def stats(self) -> dict[str, int]:
        """Requests by outcome (they add up to `requests_total`)."""
        refused, failed = self.refused_total, self.failed_total
        return {
            "ok": self.requests_total - refused - failed,
            "refused": refused,
            "failed": failed,
        }

    def start(self) -> None:
        """Bind (errors raise here, in the caller) and serve in a thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError("control server already started")
        self._bound = _BoundSocket(zmq.REP, "control", self._requested_endpoint, self._keys)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="control-api", daemon=True)
        self._thread.start()
        log.info("control API on %s", self.endpoint)

    def stop(self) -> None:
        """Stop serving, close the socket, join the thread. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._bound is not None:
            self._bound.close()  # the thread has exited: the socket is ours again
            self._bound = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._bound is not None and self._bound.socket is not None
        socket = self._bound.socket
        while not self._stop.is_set():
            try:
                if not socket.poll(POLL_INTERVAL_MS, zmq.POLLIN):
                    continue
                frames = socket.recv_multipart()
                socket.send(self._answer(frames))
            except zmq.ZMQError:
                # Only the socket itself failing gets here (bad input is answered): stop loudly.
                log.exception("control socket failed; the control API stops serving")
                return

    def _answer(self, frames: list[bytes]) -> bytes:
        """The reply to one request; never raises (a REP socket owes exactly one reply)."""
        self.requests_total += 1
        try:
            if len(frames) != 1:
                raise RequestError(f"a request is one message frame, got {len(frames)}")
            request = parse_request(frames[0])
        except RequestError as exc:
            self.refused_total += 1
            log.warning("refused control request: %s", exc)
            return _error_reply(str(exc))
        try:
            result = request.apply(self.handler)
            if not isinstance(result, Mapping):
                raise TypeError(f"handler returned {type(result).__name__}, not a dict")
            reply = {"ok": True, **{k: v for k, v in result.items() if k not in ("ok", "error")}}
            return encode_json(reply)
        except (ValueError, RuntimeError) as exc:  # the handler's way of refusing
            self.failed_total += 1
            message = _squash(str(exc)) or type(exc).__name__
            log.warning("%s refused: %s", request.cmd, message)
            return _error_reply(message)
        except Exception as exc:
            self.failed_total += 1
            log.exception("control handler failed on %s", request.cmd)
            return _error_reply(_squash(f"internal error: {type(exc).__name__}: {exc}"))


# ----- control client ------------------------------------------------------------------------
class ControlClient:
    """Talks to a running daemon: `request(cmd, **fields)` returns the reply or raises.

    Raises ControlTimeoutError when no reply comes within `timeout_s` (the REQ socket is then
    replaced, so the client stays usable), ControlError when the daemon answers `ok: false`.
    Safe to share between threads (one request at a time).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_CONTROL_ENDPOINT,
        timeout_s: float = 5.0,
        *,
        curve_server_public_key_file: Path | None = None,
        curve_client_secret_key_file: Path | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._server_key_file = curve_server_public_key_file
        self._client_key_file = curve_client_secret_key_file
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._lock = threading.Lock()
        self.timeouts_total = 0

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.REQ)
        socket.linger = 0
        try:
            _curve_client(socket, self._server_key_file, self._client_key_file)
            socket.connect(self.endpoint)
        except BaseException:
            socket.close(linger=0)
            raise
        return socket

    def request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        payload = encode_json({"cmd": cmd, **fields})
        with self._lock:
            if self._socket is None:
                self._socket = self._connect()
            socket = self._socket
            socket.send(payload)
            if not socket.poll(int(self.timeout_s * 1000), zmq.POLLIN):
                # A REQ socket waiting for a reply cannot send again: start afresh.
                socket.close(linger=0)
                self._socket = None
                self.timeouts_total += 1
                raise ControlTimeoutError(
                    f"no reply from {self.endpoint} within {self.timeout_s:g} s "
                    "(is the daemon running?)"
                )
            raw = socket.recv()
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ApiError(f"reply from {self.endpoint} is not JSON: {raw[:60]!r}") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ApiError(f"reply from {self.endpoint} has no 'ok': {raw[:60]!r}")
        if not reply["ok"]:
            raise ControlError(str(reply.get("error") or "request failed without a reason"))
        return reply

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None
        self._context.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----- event stream --------------------------------------------------------------------------
def _check_topic(topic: str) -> None:
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r} (one of: {', '.join(TOPICS)})")


class EventPublisher:
    """Publishes `[topic, JSON]` on a PUB socket; `publish` is safe from any thread.

    `publish` never raises for a payload it cannot send (the bias thread calls it): the
    message is dropped, counted in `dropped_total` and logged. Publishing before `start` or
    after `stop` is dropped the same way.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_EVENTS_ENDPOINT,
        *,
        curve_secret_key_file: Path | None = None,
        curve_clients_dir: Path | None = None,
    ) -> None:
        self._requested_endpoint = endpoint
        self._keys = server_keys("events", endpoint, curve_secret_key_file, curve_clients_dir)
        self._bound: _BoundSocket | None = None
        self._lock = threading.Lock()
        self.published_total = 0
        self.dropped_total = 0

    @classmethod
    def from_config(cls, api: ApiConfig) -> EventPublisher:
        return cls(
            api.events,
            curve_secret_key_file=api.curve_secret_key_file,
            curve_clients_dir=api.curve_clients_dir,
        )

    @property
    def endpoint(self) -> str:
        return self._bound.endpoint if self._bound is not None else self._requested_endpoint

    def start(self) -> None:
        with self._lock:
            if self._bound is not None:
                raise RuntimeError("event publisher already started")
            bound = _BoundSocket(zmq.PUB, "events", self._requested_endpoint, self._keys)
            assert bound.socket is not None
            bound.socket.sndhwm = PUBLISH_HWM
            self._bound = bound
        log.info("event stream on %s", self.endpoint)

    def stop(self) -> None:
        """Close the socket. Idempotent."""
        with self._lock:
            bound, self._bound = self._bound, None
        if bound is not None:
            bound.close()

    def publish(self, topic: str, payload: Mapping[str, Any]) -> bool:
        """Send `payload` on `topic`; False (and counted) when it was dropped."""
        _check_topic(topic)
        try:
            body = encode_json(payload)
        except (TypeError, ValueError) as exc:
            with self._lock:  # the counters too are shared between threads
                self._drop(topic, f"payload not JSON-serialisable: {exc}", logging.WARNING)
            return False
        with self._lock:
            if self._bound is None or self._bound.socket is None:
                self._drop(topic, "publisher not running", logging.DEBUG)
                return False
            try:
                self._bound.socket.send_multipart([topic.encode(), body], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self._drop(topic, str(exc), logging.WARNING)
                return False
            self.published_total += 1
        return True

    def _drop(self, topic: str, reason: str, level: int) -> None:
        """Count and log a message not sent (called with the lock held)."""
        self.dropped_total += 1
        log.log(level, "dropped %s message: %s", topic, reason)

    def __enter__(self) -> EventPublisher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class EventSubscriber:
    """Receives the event stream, optionally only some topics: `receive(timeout)`.

    Messages that are not `[known topic, JSON object]` are skipped, counted in
    `malformed_total` and logged.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_EVENTS_ENDPOINT,
        topics: Iterable[str] | None = None,
        *,
        curve_server_public_key_file: Path | None = None,
        curve_client_secret_key_file: Path | None = None,
    ) -> None:
        self.topics = tuple(TOPICS if topics is None else topics)
        for topic in self.topics:
            _check_topic(topic)
        self.endpoint = endpoint
        self.malformed_total = 0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.linger = 0
        try:
            _curve_client(self._socket, curve_server_public_key_file, curve_client_secret_key_file)
            for topic in self.topics:
                self._socket.subscribe(topic.encode())
            self._socket.connect(endpoint)
        except BaseException:
            self.close()
            raise

    def receive(self, timeout_s: float | None = None) -> tuple[str, dict[str, Any]] | None:
        """The next `(topic, payload)`, or None if nothing came within `timeout_s` (None: wait)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining_ms = None
            if deadline is not None:
                remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._socket.poll(remaining_ms, zmq.POLLIN):
                return None
            frames = self._socket.recv_multipart()
            message = self._decode(frames)
            if message is not None:
                return message

    def _decode(self, frames: list[bytes]) -> tuple[str, dict[str, Any]] | None:
        try:
            if len(frames) != 2:
                raise ValueError(f"{len(frames)} frames, expected [topic, JSON]")
            topic = frames[0].decode()
            payload = json.loads(frames[1])
            if not isinstance(payload, dict):
                raise ValueError("payload is not a JSON object")
        except ValueError as exc:
            self.malformed_total += 1
            log.warning("skipped malformed event message: %s", _squash(str(exc)))
            return None
        if topic not in self.topics:  # a topic that merely starts with a subscribed prefix
            return None
        return topic, payload

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
