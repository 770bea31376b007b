"""The web view's app (web/server.py) over HTTP and WebSocket, against real ZeroMQ peers.

The daemon's side is a real control server (REP) and event publisher (PUB) on loopback TCP
ports, with a handler that records what it was asked: the app's forwarding, authentication and
live updates are what is under test here; the daemon's own handling is tested in
tests/service/. Starlette's TestClient drives the ASGI app in-process (no browser here: the
page itself is tested in tests/web/test_browser.py).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from insitu_daq.core.config import StationConfig, parse_config
from insitu_daq.service.api.events import EventPublisher
from insitu_daq.service.api.server import ControlServer
from insitu_daq.web.auth import hash_password, new_token
from insitu_daq.web.server import COOKIE, WebView

TOKEN, TOKEN_HASH = new_token()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """Answers every control and remembers it (the ControlHandler protocol)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _call(self, name: str, **fields: Any) -> dict[str, Any]:
        self.calls.append((name, fields))
        if fields.get("reason") == "refuse":
            raise RuntimeError("nothing is running")
        return {}

    def handle_ping(self) -> dict[str, Any]:
        return {}

    def handle_status(self) -> dict[str, Any]:
        return {}

    def handle_run(self, protocol_text: str, fmt: str, name: str | None) -> dict[str, Any]:
        return self._call("run")

    def handle_pause(self, reason: str | None, operator: str | None) -> dict[str, Any]:
        return self._call("pause", reason=reason, operator=operator)

    def handle_resume(self, operator: str | None) -> dict[str, Any]:
        return self._call("resume", operator=operator)

    def handle_abort(self, reason: str | None, operator: str | None) -> dict[str, Any]:
        return self._call("abort", reason=reason, operator=operator)

    def handle_mark(self, text: str, operator: str | None) -> dict[str, Any]:
        return self._call("mark", text=text, operator=operator)


def _config(tmp_path: Path, public_view: bool = True) -> StationConfig:
    return parse_config(
        {
            "name": "test station",
            "data_dir": str(tmp_path),
            "api": {
                "control": f"tcp://127.0.0.1:{_port()}",
                "events": f"tcp://127.0.0.1:{_port()}",
            },
            "web": {
                "preview_endpoint": f"tcp://127.0.0.1:{_port()}",
                "public_view": public_view,
                "users": [
                    {
                        "name": "alice",
                        "role": "operator",
                        "password": hash_password("op-pass", n=2**10),
                    },
                    {"name": "vic", "password": hash_password("view-pass", n=2**10)},
                    {"name": "script", "role": "operator", "token": TOKEN_HASH},
                ],
            },
        }
    )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[StationConfig, Daemon, EventPublisher]]:
    config = _config(tmp_path)
    handler = Daemon()
    server = ControlServer.from_config(config.api, handler)
    publisher = EventPublisher.from_config(config.api)
    server.start()
    publisher.start()
    yield config, handler, publisher
    publisher.stop()
    server.stop()


@pytest.fixture
def client(daemon: tuple[StationConfig, Daemon, EventPublisher]) -> Iterator[TestClient]:
    with TestClient(WebView(daemon[0]).app()) as client:
        yield client


def _login(client: TestClient, user: str, password: str) -> None:
    reply = client.post("/api/login", json={"user": user, "password": password})
    assert reply.status_code == 200, reply.text


def test_controls_need_an_operator_and_carry_their_name_to_the_daemon(
    client: TestClient, daemon: tuple[StationConfig, Daemon, EventPublisher]
) -> None:
    handler = daemon[1]
    refused = client.post("/api/control/abort", json={"reason": "drift"})
    assert refused.status_code == 401 and "log in" in refused.json()["error"]
    _login(client, "vic", "view-pass")
    assert client.post("/api/control/abort", json={}).status_code == 403
    assert handler.calls == []  # nothing reached the daemon
    _login(client, "alice", "op-pass")
    assert client.get("/api/session").json()["can_control"] is True
    assert client.post("/api/control/pause", json={"reason": "refocus"}).json()["ok"]
    assert client.post("/api/control/mark", json={"text": "spots"}).json()["ok"]
    assert client.post("/api/control/abort", json={"reason": "drift"}).json()["ok"]
    assert handler.calls == [
        ("pause", {"reason": "refocus", "operator": "alice"}),
        ("mark", {"text": "spots", "operator": "alice"}),
        ("abort", {"reason": "drift", "operator": "alice"}),
    ]
    # The daemon's refusal reaches the page as such.
    refusal = client.post("/api/control/pause", json={"reason": "refuse"})
    assert refusal.status_code == 409 and "nothing is running" in refusal.json()["error"]
    client.post("/api/logout")
    assert client.post("/api/control/resume", json={}).status_code == 401


def test_a_token_logs_a_script_in(client: TestClient) -> None:
    assert client.post("/api/login", json={"token": "wrong"}).status_code == 401
    reply = client.post("/api/login", json={"token": TOKEN})
    assert reply.json() == {"user": "script", "role": "operator", "can_control": True}


def test_the_session_cookie_is_http_only_and_same_site_strict(client: TestClient) -> None:
    assert client.post("/api/login", json={"user": "alice", "password": "x"}).status_code == 401
    reply = client.post("/api/login", json={"user": "alice", "password": "op-pass"})
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie


def test_controls_take_json_only(client: TestClient) -> None:
    """A form post from another site's page cannot carry a control (it cannot send JSON)."""
    _login(client, "alice", "op-pass")
    assert client.post("/api/control/abort", data={"reason": "x"}).status_code == 415
    assert client.post("/api/control/explode", json={}).status_code == 404


def test_pages_carry_a_strict_content_security_policy(client: TestClient) -> None:
    reply = client.get("/api/session")
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    assert reply.headers["x-content-type-options"] == "nosniff"


def test_the_page_gets_a_snapshot_then_the_stream_s_changes(
    client: TestClient, daemon: tuple[StationConfig, Daemon, EventPublisher]
) -> None:
    publisher = daemon[2]
    with client.websocket_connect("/ws") as ws:
        snapshot = ws.receive_json()
        assert snapshot["type"] == "snapshot" and snapshot["station"] == "test station"
        panels = {line["panel"] for line in snapshot["quantities"]}
        assert {"reflections", "phase_fractions", "d_spacings", "expansion"} <= panels
        # The subscription reaches the publisher asynchronously: publish until it shows.
        deadline = time.monotonic() + 10.0
        status = {"run_id": "r1", "run_offset_s": 50.0, "protocol": {"state": "running"}}
        while True:
            publisher.publish("status", status)
            publisher.publish("bias", {"time": 52.0, "voltage": 4.3, "setpoint": 4.3,
                                       "current": 2e-9, "samples": 4})  # fmt: skip
            message = ws.receive_json()
            if message.get("append", {}).get("bias") or message.get("series", {}).get(
                "bias", {}
            ).get("t"):
                break
            assert time.monotonic() < deadline, "no bias sample reached the page"
        bias = (message.get("append") or message["series"])["bias"]
        assert bias["t"][-1] == pytest.approx(2.0) and bias["voltage"][-1] == 4.3


def test_previews_are_served_by_version_and_full_size_on_demand(client: TestClient) -> None:
    import numpy as np

    from insitu_daq.web.images import frame_jpeg, frame_meta

    assert client.get("/api/preview/hrtem").status_code == 404  # none yet
    image = np.random.default_rng(0).poisson(5.0, (1024, 1024)).astype(np.float32)
    jpeg, shown = frame_jpeg(image)
    state = client.app.state.view.state  # type: ignore[attr-defined]
    state.set_preview("hrtem", frame_meta(image, 0.06, shown), jpeg, source=image)
    meta = client.get("/api/live").json()["previews"]["hrtem"]
    assert meta["shown_shape"] == [512, 512] and meta["url"].endswith("v=1")
    assert meta["scale_bar"]["length_nm"] in (10.0, 20.0)
    small = client.get(meta["url"])
    full = client.get(meta["url"] + "&full=1")
    assert small.headers["content-type"] == "image/jpeg"
    assert _image_size(small.content) == (512, 512) and _image_size(full.content) == (1024, 1024)


def test_without_public_view_watching_needs_a_login(tmp_path: Path) -> None:
    config = _config(tmp_path, public_view=False)
    with TestClient(WebView(config).app()) as client:
        assert client.get("/api/live").status_code == 401
        assert client.get("/api/runs").status_code == 401
        with pytest.raises(Exception), client.websocket_connect("/ws") as ws:  # noqa: B017
            ws.receive_json()
        _login(client, "vic", "view-pass")
        assert client.get("/api/live").status_code == 200


def _image_size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size
