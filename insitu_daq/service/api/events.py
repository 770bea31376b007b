"""The event stream: multipart `[topic, JSON]` on a PUB socket, and its subscriber.

Topics `status`, `bias`, `analysis`, `event`. It is a live view, not a record (the run file is
the record): a subscriber sees what is published after its subscription has reached the
publisher. PUB sockets are not thread-safe and `publish` is called from the bias, status and
runner threads, so a lock serialises the sends (a PUB send never blocks; at the high-water
mark ZeroMQ drops for that subscriber).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import zmq

from insitu_daq.core.config import ApiConfig
from insitu_daq.service.api.curve import BoundSocket, curve_client, server_keys
from insitu_daq.service.api.wire import DEFAULT_EVENTS_ENDPOINT, encode_json, squash

log = logging.getLogger(__name__)

TOPICS = ("status", "bias", "analysis", "event", "series")
PUBLISH_HWM = 10_000  # messages queued per slow subscriber before ZeroMQ drops for it


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
        self._bound: BoundSocket | None = None
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
            bound = BoundSocket(zmq.PUB, "events", self._requested_endpoint, self._keys)
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
            curve_client(self._socket, curve_server_public_key_file, curve_client_secret_key_file)
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
            log.warning("skipped malformed event message: %s", squash(str(exc)))
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
