"""The control server: one JSON request in, one JSON reply out, on a REP socket in its thread.

A request is answered `{"ok": true, ...}` or `{"ok": false, "error": "<one line>"}`. Whatever
arrives (not JSON, wrong fields, a handler that raises) gets an error reply, is counted and
logged, and the server keeps serving: a REP socket owes every request exactly one reply, so
`_answer` never raises. The server owns its ZeroMQ context, socket and thread (created in
`start`, closed in `stop`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import zmq

from insitu_daq.core.config import ApiConfig
from insitu_daq.service.api.curve import BoundSocket, server_keys
from insitu_daq.service.api.requests import ControlHandler, RequestError, parse_request
from insitu_daq.service.api.wire import DEFAULT_CONTROL_ENDPOINT, encode_json, squash

log = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100  # how often the server thread looks at its stop flag


def _error_reply(message: str) -> bytes:
    return encode_json({"ok": False, "error": message})


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
        self._bound: BoundSocket | None = None
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
        self._bound = BoundSocket(zmq.REP, "control", self._requested_endpoint, self._keys)
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
            message = squash(str(exc)) or type(exc).__name__
            log.warning("%s refused: %s", request.cmd, message)
            return _error_reply(message)
        except Exception as exc:
            self.failed_total += 1
            log.exception("control handler failed on %s", request.cmd)
            return _error_reply(squash(f"internal error: {type(exc).__name__}: {exc}"))
