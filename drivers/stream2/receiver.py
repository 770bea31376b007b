"""The ZeroMQ PULL side of a detector's Stream V2 PUSH socket: `Stream2Receiver`."""

from __future__ import annotations

import logging
import time

import zmq

from ..closing import ClosedOnExit
from .compression import MalformedMessage
from .messages import Message, decode_message

log = logging.getLogger(__name__)

DEFAULT_PORT = 31001


class Stream2Receiver(ClosedOnExit):
    """PULL socket connected to a detector's Stream V2 PUSH socket.

    `receive()` returns the next decoded message, or None when nothing arrived in time.
    Malformed messages are counted in `malformed_total`, logged and skipped (or raised with
    raise_malformed=True). Every message gets `received_ns` (time.time_ns() at arrival).
    """

    def __init__(
        self,
        endpoint: str = f"tcp://127.0.0.1:{DEFAULT_PORT}",
        rcvhwm: int = 256,
        timeout_ms: int = 1000,
        raise_malformed: bool = False,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.raise_malformed = raise_malformed
        self.received_total = 0
        self.malformed_total = 0
        self.last_error: str | None = None
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._closed = False

    @property
    def socket(self) -> zmq.Socket:
        """The PULL socket, to wait on it in a zmq.Poller together with other sockets."""
        return self._socket

    def receive_raw(
        self, timeout_ms: int | None = None, copy: bool = True
    ) -> tuple[bytes | memoryview, int] | None:
        """Next raw message and its arrival time (ns), or None on timeout.

        copy=False: a read-only view of the ZeroMQ frame itself (no copy of a 2 MB image;
        decode_message's payloads then point into it and keep it alive).
        """
        wait = self.timeout_ms if timeout_ms is None else timeout_ms
        if not self._socket.poll(wait, zmq.POLLIN):
            return None
        buf = self._socket.recv() if copy else self._socket.recv(copy=False).buffer
        self.received_total += 1
        return buf, time.time_ns()

    def receive(self, timeout_ms: int | None = None) -> Message | None:
        """Next well-formed message, or None when none arrived within the timeout."""
        wait = self.timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + wait / 1000.0
        while True:
            remaining_ms = max(0, round((deadline - time.monotonic()) * 1000))
            raw = self.receive_raw(remaining_ms)
            if raw is None:
                return None
            buf, received_ns = raw
            try:
                return decode_message(buf, received_ns)
            except MalformedMessage as exc:
                self.malformed_total += 1
                self.last_error = str(exc)
                log.warning("dropped malformed Stream V2 message (%d bytes): %s", len(buf), exc)
                if self.raise_malformed:
                    raise

    def close(self) -> None:
        """Close the socket (and the context if it is ours); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()
