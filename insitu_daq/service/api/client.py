"""The control client: one request to a running daemon, its reply or a one-line error."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import zmq

from insitu_daq.service.api.curve import curve_client
from insitu_daq.service.api.errors import ApiError, ControlError, ControlTimeoutError
from insitu_daq.service.api.wire import DEFAULT_CONTROL_ENDPOINT, encode_json


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
            curve_client(socket, self._server_key_file, self._client_key_file)
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
