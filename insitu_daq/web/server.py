"""The web view's ASGI app and its server: the routes of docs/WEB.md.

`build_app` wires the parts: the live state fed by web/feeds.py, the users of web/auth.py, the
run files of web/replay.py and the page in web/static/. `serve` runs it under uvicorn, with
TLS when the config gives a certificate. The app holds no experiment logic. A control is
forwarded to the daemon with the user's name, and the daemon decides and records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from insitu_daq.core.config import StationConfig
from insitu_daq.service.api import ApiError, ControlClient, ControlError
from insitu_daq.web import replay
from insitu_daq.web.auth import SESSION_LIFETIME_S, Session, Users
from insitu_daq.web.feeds import EventFeed, PreviewFeed
from insitu_daq.web.state import LiveState

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "insitu_session"
CONTROLS = {"pause": ("reason",), "resume": (), "abort": ("reason",), "mark": ("text",)}
PREVIEW_KINDS = ("hrtem", "lm", "fft", "phase")
WEB_NICENESS = 15
CONTROL_TIMEOUT_S = 10.0  # an abort waits for nothing but the daemon's reply
SECURITY_HEADERS = {
    # Everything the page uses comes from here: no inline script or style, no CDN.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


class WebView:
    """The app's parts and its route handlers."""

    def __init__(self, config: StationConfig, data_dir: Path | None = None) -> None:
        self.config = config
        self.web = config.web
        self.data_dir = data_dir or config.data_dir
        self.users = Users(config.web.users)
        self.state = LiveState(config.analysis.table(), config.name)
        self.event_feed = EventFeed(config, self.state)
        self.preview_feed = PreviewFeed(config, self.state)
        self.controls_total = 0
        self.logins_failed_total = 0

    # ----- sessions --------------------------------------------------------------------------
    def session(self, request: Request | WebSocket) -> Session | None:
        return self.users.session(request.cookies.get(COOKIE))

    def may_view(self, request: Request | WebSocket) -> bool:
        return self.web.public_view or self.session(request) is not None

    async def session_info(self, request: Request) -> Response:
        session = self.session(request)
        return JSONResponse(
            {
                "user": session.user if session else None,
                "role": session.role if session else None,
                "can_control": bool(session and session.can_control),
                "public_view": self.web.public_view,
                "station": self.config.name,
            }
        )

    async def login(self, request: Request) -> Response:
        body = await _json_body(request)
        if body is None:
            return _error(415, 'send JSON: {"user", "password"} or {"token"}')
        user, password, token = (_text(body.get(key)) for key in ("user", "password", "token"))
        # scrypt takes ~50 ms of CPU: off the event loop.
        session_id = await run_in_threadpool(self.users.login, user, password, token)
        if session_id is None:
            self.logins_failed_total += 1
            client = request.client.host if request.client else "?"
            log.warning("failed login for %r from %s", user or "(token)", client)
            return _error(401, "wrong user or password")
        session = self.users.session(session_id)
        assert session is not None
        log.info("%s logged in (%s)", session.user, session.role)
        response = JSONResponse({"user": session.user, "role": session.role,
                                 "can_control": session.can_control})  # fmt: skip
        response.set_cookie(
            COOKIE, session_id, max_age=int(SESSION_LIFETIME_S), httponly=True,
            samesite="strict", secure=self.web.tls_cert is not None or self.web.behind_proxy,
        )  # fmt: skip
        return response

    async def logout(self, request: Request) -> Response:
        self.users.logout(request.cookies.get(COOKIE))
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE)
        return response

    # ----- controls --------------------------------------------------------------------------
    async def control(self, request: Request) -> Response:
        verb = request.path_params["verb"]
        if verb not in CONTROLS:
            return _error(404, f"no control {verb!r} (one of: {', '.join(CONTROLS)})")
        session = self.session(request)
        if session is None:
            return _error(401, "log in to control the run")
        if not session.can_control:
            return _error(403, f"{session.user} may watch, not control (role {session.role})")
        body = await _json_body(request)
        if body is None:  # JSON only: a cross-site form cannot send it without CORS
            return _error(415, "send JSON")
        fields = {key: _text(body.get(key)) for key in CONTROLS[verb]}
        fields = {key: value for key, value in fields.items() if value}
        self.controls_total += 1
        log.info("%s asks to %s %s", session.user, verb, fields or "")
        try:
            reply = await run_in_threadpool(self._forward, verb, session.user, fields)
        except ControlError as exc:
            return _error(409, f"the daemon refused: {exc}")
        except (ApiError, TimeoutError) as exc:
            return _error(502, f"the daemon did not answer: {exc}")
        return JSONResponse(reply)

    def _forward(self, verb: str, user: str, fields: dict[str, str]) -> dict[str, Any]:
        with ControlClient(self.config.api.control, timeout_s=CONTROL_TIMEOUT_S) as client:
            return client.request(verb, operator=user, **fields)

    # ----- the live view ---------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        if not self.may_view(request):
            return _error(401, "log in to watch")
        return JSONResponse(self.state.snapshot())

    async def preview(self, request: Request) -> Response:
        if not self.may_view(request):
            return _error(401, "log in to watch")
        kind = request.path_params["kind"]
        if kind not in PREVIEW_KINDS:
            return _error(404, f"no preview {kind!r}")
        full = request.query_params.get("full") == "1"
        found = await run_in_threadpool(self.state.preview_image, kind, full)
        if found is None:
            return _error(404, f"no {kind} preview yet")
        data, media_type = found
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-store"})

    async def websocket(self, websocket: WebSocket) -> None:
        if not self.may_view(websocket):
            await websocket.close(code=4401)
            return
        await websocket.accept()
        viewer = self.state.add_viewer(asyncio.get_running_loop())
        try:
            while True:
                await viewer.wake.wait()
                viewer.wake.clear()
                update = self.state.take(viewer)
                if update is not None:
                    await websocket.send_text(json.dumps(update, allow_nan=False))
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            pass
        finally:
            self.state.remove_viewer(viewer)

    # ----- runs ------------------------------------------------------------------------------
    async def runs(self, request: Request) -> Response:
        if not self.may_view(request):
            return _error(401, "log in to watch")
        listed = await run_in_threadpool(replay.list_runs, self.data_dir)
        return JSONResponse({"runs": listed})

    def _run_path(self, request: Request) -> Path:
        return replay.resolve_run(self.data_dir, request.path_params["name"])

    async def run_replay(self, request: Request) -> Response:
        if not self.may_view(request):
            return _error(401, "log in to watch")
        try:
            path = self._run_path(request)
            state = await run_in_threadpool(replay.replay_state, path)
        except (ValueError, KeyError, OSError) as exc:
            return _error(404, str(exc))
        return JSONResponse(state)

    async def run_figure(self, request: Request) -> Response:
        if not self.may_view(request):
            return _error(401, "log in to watch")
        try:
            path = self._run_path(request)
            figure = await run_in_threadpool(_figure_of, path)
        except (ValueError, KeyError, OSError) as exc:
            return _error(404, str(exc))
        return FileResponse(figure, media_type="image/png")

    async def run_preview(self, request: Request) -> Response:
        if not self.may_view(request):
            return _error(401, "log in to watch")
        try:
            path = self._run_path(request)
            time_s = float(request.query_params.get("t", "0"))
            full = request.query_params.get("full") == "1"
            data, meta = await run_in_threadpool(
                replay.preview_at, path, request.path_params["kind"], time_s, full
            )
        except (ValueError, KeyError, OSError) as exc:
            return _error(404, str(exc))
        return Response(data, media_type=meta.get("media_type", "image/jpeg"))

    async def metrics(self, request: Request) -> Response:
        counters = {
            "insitu_daq_web_viewers": self.state.viewers,
            "insitu_daq_web_previews_received_total": self.preview_feed.received,
            "insitu_daq_web_previews_dropped_total": self.preview_feed.dropped,
            "insitu_daq_web_previews_malformed_total": self.preview_feed.malformed,
            "insitu_daq_web_controls_total": self.controls_total,
            "insitu_daq_web_logins_failed_total": self.logins_failed_total,
        }
        lines = [f"{name} {value}" for name, value in counters.items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    # ----- the app ---------------------------------------------------------------------------
    def app(self) -> Starlette:
        async def page(request: Request) -> Response:
            if not self.may_view(request) and request.url.path != "/":
                return _error(401, "log in to watch")
            name = "runs.html" if request.url.path == "/runs" else "index.html"
            return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.event_feed.start()
            self.preview_feed.start()
            try:
                yield
            finally:
                self.event_feed.stop()
                self.preview_feed.stop()

        routes = [
            Route("/", page),
            Route("/runs", page),
            Route("/api/session", self.session_info),
            Route("/api/login", self.login, methods=["POST"]),
            Route("/api/logout", self.logout, methods=["POST"]),
            Route("/api/control/{verb}", self.control, methods=["POST"]),
            Route("/api/live", self.live),
            Route("/api/preview/{kind}", self.preview),
            Route("/api/runs", self.runs),
            Route("/api/runs/{name}/replay", self.run_replay),
            Route("/api/runs/{name}/figure.png", self.run_figure),
            Route("/api/runs/{name}/preview/{kind}", self.run_preview),
            Route("/metrics", self.metrics),
            WebSocketRoute("/ws", self.websocket),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(_SecurityHeaders)])
        app.state.view = self  # for tests and tools that hold the app
        return app


def _figure_of(path: Path) -> Path:
    """The run's report figure: the one next to the run file if it is up to date (the demo and
    `insitu-daq report` draw it there), else one drawn into the web view's own cache the first
    time it is asked for. The web view may only read the data folder
    (deploy/insitu-daq-web.service)."""
    beside = path.with_suffix(".png")
    if _up_to_date(beside, path):
        return beside
    cached = figure_cache() / f"{path.stem}.png"
    if not _up_to_date(cached, path):
        from insitu_daq.report.figure import draw_report_figure

        draw_report_figure(path, cached)
    return cached


def _up_to_date(figure: Path, run_file: Path) -> bool:
    return figure.exists() and figure.stat().st_mtime >= run_file.stat().st_mtime


def figure_cache() -> Path:
    """systemd's CacheDirectory ($CACHE_DIRECTORY), else ~/.cache/insitu-daq/figures."""
    root = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    folder = Path(root) if root else Path.home() / ".cache" / "insitu-daq" / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def _json_body(request: Request) -> dict[str, Any] | None:
    if not request.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status_code=status)


def _lower_priority() -> None:
    """Yield the CPU to everything that records or decides (nice +WEB_NICENESS, before any
    thread starts): the ingest and daemon run at 0 and the analysis at +10, because a hold's
    `until:` waits for its results. A page that lags on a busy PC is the right loss."""
    try:
        os.nice(WEB_NICENESS)
    except OSError as exc:
        log.warning("could not lower the web view's priority: %s", exc)


def serve(config: StationConfig, announce: Callable[[str], None] = print) -> None:
    """Serve the web view until interrupted (uvicorn handles SIGINT and SIGTERM)."""
    import uvicorn

    web = config.web
    _lower_priority()
    view = WebView(config)
    scheme = "https" if web.tls_cert else "http"
    server = uvicorn.Server(
        uvicorn.Config(
            view.app(), host=web.bind, port=web.port, log_level="warning",
            ssl_certfile=str(web.tls_cert) if web.tls_cert else None,
            ssl_keyfile=str(web.tls_key) if web.tls_key else None,
            proxy_headers=web.behind_proxy, ws_ping_interval=20.0,
        )
    )  # fmt: skip
    # Bound and listening before the address is announced: whoever waits for the line (the
    # demo, a test) may connect at once (uvicorn binds only inside run()).
    family = socket.AF_INET6 if ":" in web.bind else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind((web.bind, web.port))
    listening.listen(128)
    port = listening.getsockname()[1]
    host = f"[{web.bind}]" if ":" in web.bind else web.bind
    announce(f"insitu-daq web: {scheme}://{host}:{port}/")
    server.run(sockets=[listening])
