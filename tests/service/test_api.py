"""The control API and event stream over real ZeroMQ sockets on ephemeral loopback ports.

A recording handler stands in for the daemon (the daemon's own behaviour is tested end to
end elsewhere); everything between the socket and the handler is the real server.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.auth

from insitu_daq.core.config import ConfigError, is_loopback, parse_config
from insitu_daq.service.api import (
    ControlClient,
    ControlError,
    ControlTimeoutError,
    EventSubscriber,
)
from insitu_daq.service.api.events import EventPublisher
from insitu_daq.service.api.requests import COMMANDS
from insitu_daq.service.api.server import ControlServer

ANY_PORT = "tcp://127.0.0.1:*"


class RecordingHandler:
    """Records each call; `fail_with` makes the next calls raise; `gate` blocks handle_status."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_with: BaseException | None = None
        self.gate: threading.Event | None = None

    def _call(self, method: str, /, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((method, kwargs))
        if self.fail_with is not None:
            raise self.fail_with
        return {"handled": method}

    def handle_ping(self) -> dict[str, Any]:
        return self._call("ping")

    def handle_status(self) -> dict[str, Any]:
        if self.gate is not None:
            self.gate.wait(5.0)
        self._call("status")
        # What a real status holds before the first reading: NaN, numpy scalars, paths.
        return {
            "voltage": float("nan"),
            "frames": np.int64(7),
            "run_file": Path("/data/run.h5"),
        }

    def handle_run(self, protocol_text: str, fmt: str, name: str | None) -> dict[str, Any]:
        return self._call("run", protocol_text=protocol_text, fmt=fmt, name=name)

    def handle_pause(self, reason: str | None, operator: str | None) -> dict[str, Any]:
        return self._call("pause", reason=reason, **_who(operator))

    def handle_resume(self, operator: str | None) -> dict[str, Any]:
        return self._call("resume", **_who(operator))

    def handle_abort(self, reason: str | None, operator: str | None) -> dict[str, Any]:
        return self._call("abort", reason=reason, **_who(operator))

    def handle_mark(self, text: str, operator: str | None) -> dict[str, Any]:
        return self._call("mark", text=text, **_who(operator))


def _who(operator: str | None) -> dict[str, str]:
    """The operator as a recorded call field, when a request named one."""
    return {} if operator is None else {"operator": operator}


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def server(handler: RecordingHandler) -> Iterator[ControlServer]:
    with ControlServer(ANY_PORT, handler) as server:
        yield server
    assert not any(t.name == "control-api" for t in threading.enumerate())


@pytest.fixture
def client(server: ControlServer) -> Iterator[ControlClient]:
    with ControlClient(server.endpoint, timeout_s=5.0) as client:
        yield client


def raw_request(endpoint: str, frames: list[bytes]) -> dict[str, Any]:
    """Send frames exactly as given (garbage included) and return the decoded reply."""
    context = zmq.Context()
    try:
        socket = context.socket(zmq.REQ)
        socket.linger = 0
        socket.connect(endpoint)
        socket.send_multipart(frames)
        assert socket.poll(5000), "the server did not reply"
        reply = json.loads(socket.recv())
        socket.close()
        return reply
    finally:
        context.term()


# ----- control -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cmd", "fields", "expected_call"),
    [
        ("ping", {}, ("ping", {})),
        (
            "run",
            {"protocol_text": "steps: []\n", "format": "yaml", "name": "lno_4v3"},
            ("run", {"protocol_text": "steps: []\n", "fmt": "yaml", "name": "lno_4v3"}),
        ),
        (
            "run",
            {"protocol_text": "[[steps]]\n", "format": "toml"},
            ("run", {"protocol_text": "[[steps]]\n", "fmt": "toml", "name": None}),
        ),
        ("pause", {"reason": "refocus"}, ("pause", {"reason": "refocus"})),
        ("pause", {}, ("pause", {"reason": None})),
        ("resume", {}, ("resume", {})),
        ("abort", {"reason": "particle drifted"}, ("abort", {"reason": "particle drifted"})),
        ("mark", {"text": "first rock-salt spots"}, ("mark", {"text": "first rock-salt spots"})),
        # Who asked reaches the handler (the daemon records it in the event).
        (
            "abort",
            {"reason": "drift", "operator": "alice"},
            ("abort", {"reason": "drift", "operator": "alice"}),
        ),
        ("resume", {"operator": "bob"}, ("resume", {"operator": "bob"})),
        (
            "mark",
            {"text": "spots", "operator": "alice"},
            ("mark", {"text": "spots", "operator": "alice"}),
        ),
    ],
)
def test_every_command_reaches_the_handler_validated(
    client: ControlClient,
    handler: RecordingHandler,
    cmd: str,
    fields: dict[str, Any],
    expected_call: tuple[str, dict[str, Any]],
) -> None:
    reply = client.request(cmd, **fields)
    assert reply == {"ok": True, "handled": cmd}
    assert handler.calls == [expected_call]


def test_status_reply_is_plain_json(client: ControlClient, handler: RecordingHandler) -> None:
    reply = client.request("status")
    # NaN (no reading yet) becomes null, numpy and paths become plain JSON values.
    assert reply == {"ok": True, "voltage": None, "frames": 7, "run_file": "/data/run.h5"}
    assert handler.calls == [("status", {})]


def test_commands_listed_are_the_design_commands() -> None:
    assert set(COMMANDS) == {"ping", "status", "run", "pause", "resume", "abort", "mark"}


@pytest.mark.parametrize(
    ("frames", "error_mentions"),
    [
        ([b"not json"], "not JSON"),
        ([b"\xff\xfe\x00"], "not JSON"),
        ([b"[1, 2]"], "JSON object"),
        ([b'{"command": "ping"}'], "missing 'cmd'"),
        ([b'{"cmd": "launch"}'], "unknown cmd 'launch'"),
        ([b'{"cmd": 5}'], "unknown cmd 5"),
        ([b'{"cmd": "ping", "extra": 1}'], "ping.extra"),
        ([b'{"cmd": "run", "protocol_text": "x", "format": "xml"}'], "run.format"),
        ([b'{"cmd": "run", "format": "yaml"}'], "run.protocol_text"),
        ([b'{"cmd": "run", "protocol_text": 42, "format": "yaml"}'], "run.protocol_text"),
        ([b'{"cmd": "mark"}'], "mark.text"),
        ([b'{"cmd": "mark", "text": ""}'], "mark.text"),
        ([b'{"cmd": "pause", "reason": ["a"]}'], "pause.reason"),
        ([b'{"cmd": "ping"}', b"second frame"], "one message frame"),
        # json keeps the last of two equal keys; a request naming one twice is refused
        ([b'{"cmd": "abort", "cmd": "ping"}'], "duplicate key 'cmd'"),
        ([b'{"cmd": "pause", "reason": "a", "reason": "b"}'], "duplicate key 'reason'"),
    ],
)
def test_bad_request_gets_a_one_line_error_and_the_server_keeps_serving(
    server: ControlServer,
    handler: RecordingHandler,
    frames: list[bytes],
    error_mentions: str,
) -> None:
    reply = raw_request(server.endpoint, frames)
    assert reply["ok"] is False
    assert error_mentions in reply["error"]
    assert "\n" not in reply["error"]
    assert handler.calls == []  # refused before the daemon sees it
    assert server.refused_total == 1
    assert raw_request(server.endpoint, [b'{"cmd": "ping"}']) == {"ok": True, "handled": "ping"}


def test_oversized_request_is_refused(server: ControlServer, handler: RecordingHandler) -> None:
    huge = json.dumps({"cmd": "mark", "text": "x" * (2 << 20)}).encode()
    reply = raw_request(server.endpoint, [huge])
    assert reply["ok"] is False
    assert "exceeds" in reply["error"]
    assert handler.calls == []


def test_handler_exception_becomes_ok_false_and_is_counted(
    server: ControlServer, client: ControlClient, handler: RecordingHandler
) -> None:
    handler.fail_with = RuntimeError("a protocol is already running")
    with pytest.raises(ControlError, match=r"^a protocol is already running$"):
        client.request("run", protocol_text="steps: []", format="yaml")
    handler.fail_with = KeyError("voltage")
    with pytest.raises(ControlError, match=r"^internal error: KeyError: 'voltage'$"):
        client.request("pause")
    handler.fail_with = ValueError("line one\nline two")
    with pytest.raises(ControlError) as excinfo:
        client.request("resume")
    assert str(excinfo.value) == "line one line two"
    assert server.failed_total == 3
    handler.fail_with = None
    assert client.request("ping")["ok"] is True
    assert server.stats() == {"ok": 1, "refused": 0, "failed": 3}


def test_client_timeout_raises_and_the_client_recovers(
    client: ControlClient, handler: RecordingHandler
) -> None:
    handler.gate = threading.Event()  # the daemon is busy: status does not answer yet
    client.timeout_s = 0.3
    with pytest.raises(ControlTimeoutError, match="no reply"):
        client.request("status")
    assert isinstance(ControlTimeoutError("x"), TimeoutError)
    handler.gate.set()  # the late reply goes to the discarded socket
    client.timeout_s = 5.0
    assert client.request("ping") == {"ok": True, "handled": "ping"}
    assert client.request("mark", text="after the timeout")["ok"] is True
    assert handler.calls[-1] == ("mark", {"text": "after the timeout"})


def test_client_times_out_when_no_daemon_listens() -> None:
    # Learn a port that was free, then close it: nothing listens there any more.
    with EventPublisher(ANY_PORT) as publisher:
        endpoint = publisher.endpoint
    with (
        ControlClient(endpoint, timeout_s=0.2) as client,
        pytest.raises(ControlTimeoutError, match="is the daemon running"),
    ):
        client.request("ping")


def test_server_stops_cleanly_and_frees_its_port(handler: RecordingHandler) -> None:
    server = ControlServer(ANY_PORT, handler)
    server.start()
    endpoint = server.endpoint
    assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")
    server.stop()
    server.stop()  # idempotent
    assert not any(t.name == "control-api" for t in threading.enumerate())
    with (
        ControlServer(endpoint, handler) as again,  # the port can be bound again
        ControlClient(again.endpoint, timeout_s=5.0) as client,
    ):
        assert client.request("ping")["ok"] is True


# ----- security ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.2:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///run/insitu-daq/control", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://192.168.1.20:5555", False),
        ("tcp://[::]:5555", False),
    ],
)
def test_loopback_is_recognised(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:*", "tcp://*:*", "tcp://eth0:*"])
def test_non_loopback_bind_without_keys_is_refused(
    endpoint: str, handler: RecordingHandler
) -> None:
    with pytest.raises(ConfigError, match="not loopback: set curve_secret_key_file"):
        ControlServer(endpoint, handler)
    with pytest.raises(ConfigError, match="not loopback: set curve_secret_key_file"):
        EventPublisher(endpoint)


def test_server_secret_key_file_must_hold_a_secret(tmp_path: Path) -> None:
    public_file, _ = zmq.auth.create_certificates(tmp_path, "server")
    with pytest.raises(ConfigError, match="no secret key"):
        EventPublisher(ANY_PORT, curve_secret_key_file=Path(public_file))
    with pytest.raises(ConfigError, match="curve_secret_key_file"):
        EventPublisher(ANY_PORT, curve_secret_key_file=tmp_path / "missing.key_secret")


@pytest.fixture
def curve_keys(tmp_path: Path) -> dict[str, Path]:
    """A server key pair, an allowed client and a stranger; the clients folder lists one."""
    keys = tmp_path / "keys"
    allowed = tmp_path / "clients"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    _, stranger_secret = zmq.auth.create_certificates(keys, "stranger")
    Path(client_public).rename(allowed / "client.key")
    return {
        "server_public": Path(server_public),
        "server_secret": Path(server_secret),
        "client_secret": Path(client_secret),
        "stranger_secret": Path(stranger_secret),
        "clients_dir": allowed,
    }


def test_curve_admits_only_listed_clients(
    curve_keys: dict[str, Path], handler: RecordingHandler
) -> None:
    with ControlServer(
        ANY_PORT,
        handler,
        curve_secret_key_file=curve_keys["server_secret"],
        curve_clients_dir=curve_keys["clients_dir"],
    ) as server:
        with ControlClient(
            server.endpoint,
            timeout_s=5.0,
            curve_server_public_key_file=curve_keys["server_public"],
            curve_client_secret_key_file=curve_keys["client_secret"],
        ) as allowed:
            assert allowed.request("ping") == {"ok": True, "handled": "ping"}
        for client in (
            ControlClient(  # a stranger's key: the handshake is refused
                server.endpoint,
                timeout_s=0.3,
                curve_server_public_key_file=curve_keys["server_public"],
                curve_client_secret_key_file=curve_keys["stranger_secret"],
            ),
            ControlClient(server.endpoint, timeout_s=0.3),  # plain text: no handshake at all
        ):
            with client, pytest.raises(ControlTimeoutError):
                client.request("ping")
    assert handler.calls == [("ping", {})]


def test_curve_event_stream_reaches_a_keyed_subscriber(curve_keys: dict[str, Path]) -> None:
    with (
        EventPublisher(
            ANY_PORT,
            curve_secret_key_file=curve_keys["server_secret"],
            curve_clients_dir=curve_keys["clients_dir"],
        ) as publisher,
        EventSubscriber(
            publisher.endpoint,
            ["event"],
            curve_server_public_key_file=curve_keys["server_public"],
            curve_client_secret_key_file=curve_keys["client_secret"],
        ) as subscriber,
    ):
        assert receive_after_join(publisher, subscriber, "event") is not None


def test_servers_from_config_use_its_endpoints_and_keys(
    curve_keys: dict[str, Path], handler: RecordingHandler
) -> None:
    api = parse_config(
        {
            "api": {
                "control": ANY_PORT,
                "events": ANY_PORT,
                "curve_secret_key_file": str(curve_keys["server_secret"]),
                "curve_clients_dir": str(curve_keys["clients_dir"]),
            }
        }
    ).api
    with ControlServer.from_config(api, handler) as server:
        with (
            ControlClient(server.endpoint, timeout_s=0.3) as plain,
            pytest.raises(ControlTimeoutError),  # keys from the config are enforced
        ):
            plain.request("ping")
        with ControlClient(
            server.endpoint,
            timeout_s=5.0,
            curve_server_public_key_file=curve_keys["server_public"],
            curve_client_secret_key_file=curve_keys["client_secret"],
        ) as keyed:
            assert keyed.request("ping")["ok"] is True


# ----- event stream --------------------------------------------------------------------------
def receive_after_join(
    publisher: EventPublisher, subscriber: EventSubscriber, topic: str
) -> tuple[str, dict[str, Any]] | None:
    """Publish `{"join": n}` until the subscriber has joined (ZeroMQ's slow joiner), then
    drain the joining messages; returns the first one received."""
    first = None
    for attempt in range(200):
        publisher.publish(topic, {"join": attempt})
        first = subscriber.receive(timeout_s=0.02)
        if first is not None:
            break
    while subscriber.receive(timeout_s=0.05) is not None:
        pass
    return first


def drain(subscriber: EventSubscriber) -> list[tuple[str, dict[str, Any]]]:
    received = []
    while (message := subscriber.receive(timeout_s=0.3)) is not None:
        received.append(message)
    return received


def test_subscribers_get_only_the_topics_they_asked_for() -> None:
    with (
        EventPublisher(ANY_PORT) as publisher,
        EventSubscriber(publisher.endpoint, ["bias"]) as bias_only,
        EventSubscriber(publisher.endpoint) as everything,
    ):
        assert receive_after_join(publisher, bias_only, "bias") is not None
        assert receive_after_join(publisher, everything, "event") is not None
        while bias_only.receive(timeout_s=0.05) is not None:
            pass  # the joining messages for `everything` reach nobody else
        sent = [
            ("status", {"protocol": {"state": "running"}}),
            ("bias", {"voltage": 4.3, "n": 1}),
            ("event", {"kind": "mark", "message": "spots"}),
            ("analysis", {"d_spacing": {"003": 4.8e-10}}),
            ("bias", {"voltage": 4.3, "n": 2}),
        ]
        for topic, payload in sent:
            assert publisher.publish(topic, payload) is True
        assert drain(bias_only) == [m for m in sent if m[0] == "bias"]
        assert drain(everything) == sent


def test_publish_is_safe_from_many_threads() -> None:
    threads_n, messages_n = 4, 250
    with (
        EventPublisher(ANY_PORT) as publisher,
        EventSubscriber(publisher.endpoint, ["bias"]) as subscriber,
    ):
        assert receive_after_join(publisher, subscriber, "bias") is not None

        def send(thread: int) -> None:
            for n in range(messages_n):
                publisher.publish("bias", {"thread": thread, "n": n, "pad": "x" * thread * 100})

        workers = [threading.Thread(target=send, args=(t,)) for t in range(threads_n)]
        for worker in workers:
            worker.start()
        received = drain(subscriber)
        for worker in workers:
            worker.join()
    seen = [(p["thread"], p["n"]) for _, p in received]
    assert sorted(seen) == [(t, n) for t in range(threads_n) for n in range(messages_n)]
    assert all(p["pad"] == "x" * p["thread"] * 100 for _, p in received)
    for thread in range(threads_n):  # each thread's messages stay in its order
        assert [n for t, n in seen if t == thread] == list(range(messages_n))


def test_unpublishable_payloads_are_dropped_and_counted() -> None:
    publisher = EventPublisher(ANY_PORT)
    assert publisher.publish("event", {"kind": "early"}) is False  # not started yet
    with publisher:
        assert publisher.publish("status", {"bad": object()}) is False
        assert publisher.publish("bias", {"voltage": math.nan}) is True  # NaN -> null
        with pytest.raises(ValueError, match="unknown topic"):
            publisher.publish("frames", {})
    assert publisher.publish("event", {"kind": "late"}) is False  # stopped
    assert publisher.dropped_total == 3
    assert publisher.published_total == 1


def test_subscriber_skips_and_counts_malformed_messages() -> None:
    context = zmq.Context()
    try:
        pub = context.socket(zmq.PUB)
        pub.linger = 0
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        with EventSubscriber(f"tcp://127.0.0.1:{port}", ["bias"]) as subscriber:
            for _ in range(200):  # wait for the subscription to arrive
                pub.send_multipart([b"bias", b'{"join": true}'])
                if subscriber.receive(timeout_s=0.02) is not None:
                    break
            while subscriber.receive(timeout_s=0.05) is not None:
                pass
            pub.send_multipart([b"bias", b"{not json"])
            pub.send_multipart([b"bias"])
            pub.send_multipart([b"bias", b"[1, 2]"])
            pub.send_multipart([b"bias", b'{"voltage": 1.5}'])
            assert subscriber.receive(timeout_s=5.0) == ("bias", {"voltage": 1.5})
            assert subscriber.malformed_total == 3
        pub.close()
    finally:
        context.term()


def test_subscriber_refuses_unknown_topics() -> None:
    with pytest.raises(ValueError, match="unknown topic 'bais'"):
        EventSubscriber("tcp://127.0.0.1:1", ["bais"])
