"""The simulated camera's DECTRIS SIMPLON REST API (1.8.0): configure, arm, trigger, disarm.

A state machine (`SimplonStateMachine`: the detector's states, its configuration with the
range of every parameter, and what each command does to the camera) plus an HTTP server
(`SimplonServer`, the standard library's ThreadingHTTPServer) speaking the API's URLs and
JSON bodies, as drivers/simplon.py and any SIMPLON client expect them.

States: `na` until `initialize`, then `idle`. `arm` (`configure` while it ends a free-running
series) -> `ready` with a new sequence id; `trigger` -> `acquire`: the camera (sim/camera.py)
sends a Stream V2 `start` whose series_id is that sequence id, then nimages x ntrigger images
at frame_time, each exposed count_time, then `end`, and the detector is `idle` again (the
trigger request lasts the series, as on a real DCU in "ints" mode). `disarm`, `cancel` and
`abort` end the series at once (`end` is sent: the camera has no pipeline to drop). A series
that fails inside the camera leaves the detector in `error` until `initialize`.

Where a real DCU differs: it sends `start` at `arm`; here it goes at `trigger`, when the
series' clock starts. Only the internal-series trigger mode "ints" is simulated, and one
trigger starts all nimages x ntrigger images.

A value outside a parameter's range, of the wrong type or not among its allowed values is
refused as a DCU does: HTTP 400 with the reason as text; a configuration change while armed
too. While nobody arms it through this API, the camera keeps streaming as it was started
(free-running, listen-only): `arm` ends that series first.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .camera import DEAD_TIME_S, SimulatedCamera

log = logging.getLogger(__name__)

API_VERSION = "1.8.0"
DEFAULT_PORT = 8000
_PREFIX = {
    "detector_config": f"/detector/api/{API_VERSION}/config/",
    "command": f"/detector/api/{API_VERSION}/command/",
    "status": f"/detector/api/{API_VERSION}/status/",
    "stream_config": f"/stream/api/{API_VERSION}/config/",
}
# Model choice: an EIGER2-class detector, 2 kHz at most, exposures up to an hour.
MIN_FRAME_TIME_S = 1 / 2000
MAX_TIME_S = 3600.0
MAX_COUNT = 2**31 - 1


class Refused(Exception):  # noqa: N818 - reads as the answer it carries
    """What a DCU answers with HTTP 400: the reason, one line."""


@dataclass(frozen=True)
class Parameter:
    """One configuration parameter: its type, default and what the detector accepts."""

    value_type: str  # "float", "uint" or "string", as the API names them
    default: Any
    unit: str = ""
    min: float | None = None
    max: float | None = None
    allowed: tuple[str, ...] = ()
    access_mode: str = "rw"

    def check(self, name: str, value: Any) -> Any:
        """`value` as this parameter holds it, or Refused naming `name` and the reason."""
        if self.access_mode == "r":
            raise Refused(f"{name} is read-only")
        if self.value_type == "string":
            if not isinstance(value, str) or value not in self.allowed:
                raise Refused(f"{name} {value!r} is not one of {', '.join(self.allowed)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Refused(f"{name} {value!r} is not a {self.value_type}")
        if not math.isfinite(value):
            raise Refused(f"{name} {value!r} is not a finite number")
        if self.value_type == "uint":
            if isinstance(value, float) and not value.is_integer():
                raise Refused(f"{name} {value!r} is not a whole number")
            value = int(value)
        else:
            value = float(value)
        if self.min is not None and value < self.min:
            raise Refused(f"{name} {value:g} is below its minimum {self.min:g} {self.unit}".strip())
        if self.max is not None and value > self.max:
            raise Refused(f"{name} {value:g} is above its maximum {self.max:g} {self.unit}".strip())
        return value

    def describe(self, value: Any) -> dict[str, Any]:
        """The GET answer: the value and what the detector accepts."""
        answer: dict[str, Any] = {
            "value": value,
            "value_type": self.value_type,
            "access_mode": self.access_mode,
        }
        if self.unit:
            answer["unit"] = self.unit
        if self.min is not None:
            answer["min"] = self.min
        if self.max is not None:
            answer["max"] = self.max
        if self.allowed:
            answer["allowed_values"] = list(self.allowed)
        return answer


def detector_parameters(frame_time_s: float) -> dict[str, Parameter]:
    """The detector configuration the simulator serves, defaults at the camera's frame rate."""
    return {
        "count_time": Parameter(
            "float", frame_time_s - DEAD_TIME_S, "s", MIN_FRAME_TIME_S - DEAD_TIME_S, MAX_TIME_S
        ),
        "frame_time": Parameter("float", frame_time_s, "s", MIN_FRAME_TIME_S, MAX_TIME_S),
        "nimages": Parameter("uint", 1, "", 1, MAX_COUNT),
        "ntrigger": Parameter("uint", 1, "", 1, MAX_COUNT),
        "compression": Parameter("string", "bslz4", allowed=("bslz4", "lz4", "none")),
        "trigger_mode": Parameter("string", "ints", allowed=("ints",)),
        "detector_readout_time": Parameter("float", DEAD_TIME_S, "s", access_mode="r"),
    }


STREAM_PARAMETERS = {"mode": Parameter("string", "enabled", allowed=("enabled", "disabled"))}
STATES = ("na", "idle", "configure", "ready", "acquire", "error")


class SimplonStateMachine:
    """The detector's state and configuration; its commands drive the simulated camera."""

    def __init__(self, camera: SimulatedCamera) -> None:
        self.camera = camera
        self.parameters = detector_parameters(camera.frame_time_s)
        self.values: dict[str, Any] = {k: p.default for k, p in self.parameters.items()}
        self.stream_values: dict[str, Any] = {k: p.default for k, p in STREAM_PARAMETERS.items()}
        self.state = "na"
        self.sequence_id: int | None = None  # of the armed (or last) series
        self._lock = threading.Lock()

    # ----- configuration ---------------------------------------------------------------------
    def get(self, name: str) -> dict[str, Any]:
        parameter = self._parameter(name)
        with self._lock:
            return parameter.describe(self.values[name])

    def put(self, name: str, value: Any) -> list[str]:
        """Set one parameter; the names of those that changed (frame/count time move
        together to keep frame_time >= count_time + readout)."""
        parameter = self._parameter(name)
        value = parameter.check(name, value)
        with self._lock:
            if self.state in ("ready", "acquire"):
                raise Refused(f"cannot set {name} while {self.state}: disarm first")
            changed = [name]
            self.values[name] = value
            readout = self.values["detector_readout_time"]
            if name == "count_time" and self.values["frame_time"] < value + readout:
                self.values["frame_time"] = value + readout
                changed.append("frame_time")
            elif name == "frame_time" and self.values["count_time"] > value - readout:
                self.values["count_time"] = value - readout
                changed.append("count_time")
            return changed

    def get_stream(self, name: str) -> dict[str, Any]:
        parameter = _lookup(STREAM_PARAMETERS, name)
        with self._lock:
            return parameter.describe(self.stream_values[name])

    def put_stream(self, name: str, value: Any) -> list[str]:
        value = _lookup(STREAM_PARAMETERS, name).check(name, value)
        with self._lock:
            self.stream_values[name] = value
            self.camera.stream_enabled = value == "enabled"
        return [name]

    def _parameter(self, name: str) -> Parameter:
        return _lookup(self.parameters, name)

    # ----- commands --------------------------------------------------------------------------
    def command(self, name: str) -> dict[str, Any] | None:
        handler: Callable[[], dict[str, Any] | None] | None = {
            "initialize": self.initialize,
            "arm": self.arm,
            "trigger": self.trigger,
            "disarm": self.disarm,
            "cancel": self.disarm,
            "abort": self.disarm,
        }.get(name)
        if handler is None:
            raise LookupError(f"no command {name!r}")
        return handler()

    def initialize(self) -> None:
        """From any state to `idle` (a series this API started is ended), the camera ready to
        render (as a DCU, this takes a while the first time)."""
        self.disarm()
        self.camera.prepare()
        with self._lock:
            if self.state != "configure":
                self.state = "idle"

    def arm(self) -> dict[str, Any]:
        with self._lock:
            if self.state != "idle":
                raise Refused(f"cannot arm while {self.state}")
            self.state = "configure"
        # A free-running series (started without this API) ends first: its `end` goes out.
        if not self.camera.disarm():
            with self._lock:
                self.state = "error"
            raise Refused("the camera did not end its running series")
        with self._lock:
            previous = self.sequence_id or 0
            self.sequence_id = max(previous + 1, self.camera.next_series_id)
            self.state = "ready"
            return {"sequence id": self.sequence_id}

    def trigger(self) -> None:
        """Acquire the armed series; returns once it is over (all images, or disarmed)."""
        with self._lock:
            if self.state != "ready":
                raise Refused(f"cannot trigger while {self.state}: arm first")
            values = self.values
            compression = values["compression"]
            self.camera.compression = None if compression == "none" else compression
            errors = self.camera.errors_total
            try:
                self.camera.arm(
                    n_images=values["nimages"] * values["ntrigger"],
                    series_id=self.sequence_id,
                    frame_time_s=values["frame_time"],
                    count_time_s=values["count_time"],
                )
            except RuntimeError as exc:  # armed again behind this API's back
                raise Refused(f"the camera cannot start the series: {exc}") from None
            self.state = "acquire"
        self.camera.wait()
        with self._lock:
            if self.state == "acquire":
                self.state = "error" if self.camera.errors_total > errors else "idle"

    def disarm(self) -> None:
        """End the series this API armed; a free-running one (not armed here) goes on."""
        with self._lock:
            acquiring = self.state == "acquire"
        if acquiring:
            self.camera.disarm()  # the camera sends the series' `end`
        with self._lock:
            if self.state in ("ready", "acquire"):
                self.state = "idle"

    def status(self, name: str) -> dict[str, Any]:
        if name != "state":
            raise LookupError(f"no status {name!r}")
        with self._lock:
            return {"value": self.state, "value_type": "string", "allowed_values": list(STATES)}


def _lookup(parameters: dict[str, Parameter], name: str) -> Parameter:
    parameter = parameters.get(name)
    if parameter is None:
        raise LookupError(f"no parameter {name!r}")
    return parameter


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_PUT(self) -> None:
        self._answer(self._put)

    def _get(self, kind: str, name: str) -> Any:
        detector = self.server.detector
        if kind == "detector_config":
            return detector.get(name)
        if kind == "stream_config":
            return detector.get_stream(name)
        if kind == "status":
            return detector.status(name)
        raise LookupError(f"GET {self.path}: not served")

    def _put(self, kind: str, name: str) -> Any:
        detector = self.server.detector
        if kind == "command":
            self._body()  # read and ignored: a command takes no value
            return detector.command(name)
        body = self._body()
        if not isinstance(body, dict) or "value" not in body:
            raise Refused('the body must be {"value": ...}')
        if kind == "detector_config":
            return detector.put(name, body["value"])
        if kind == "stream_config":
            return detector.put_stream(name, body["value"])
        raise LookupError(f"PUT {self.path}: not served")

    def _body(self) -> Any:
        """The request's JSON body (None if it has none)."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Refused('the body is not JSON: {"value": ...} expected') from None

    def _answer(self, action: Callable[[str, str], Any]) -> None:
        kind, name = "", ""
        for prefix_kind, prefix in _PREFIX.items():
            if self.path.startswith(prefix):
                kind, name = prefix_kind, self.path[len(prefix) :].strip("/")
                break
        try:
            result = action(kind, name)
        except Refused as exc:
            self._send(400, str(exc), "text/plain")
        except LookupError as exc:
            self._send(404, str(exc).strip("'\""), "text/plain")
        except Exception as exc:  # a bug in the simulator: a 500 a client can show, logged
            log.exception("SIMPLON %s %s failed", self.command, self.path)
            self._send(500, f"{type(exc).__name__}: {exc}", "text/plain")
        else:
            self._send(200, "" if result is None else json.dumps(result), "application/json")

    def _send(self, code: int, text: str, content_type: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("SIMPLON %s", format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a trigger request lasting a series never holds up stop()
    detector: SimplonStateMachine


class SimplonServer:
    """The camera's SIMPLON REST API on `host:port` (0: a free one), in a thread."""

    def __init__(
        self, camera: SimulatedCamera, host: str = "127.0.0.1", port: int = DEFAULT_PORT
    ) -> None:
        self.detector = SimplonStateMachine(camera)
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        server = _Server((self.host, self.port), _Handler)
        server.detector = self.detector
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="sim-simplon", kwargs={"poll_interval": 0.05}
        )
        self._thread.daemon = True
        self._thread.start()
        log.info("simulated camera serving SIMPLON %s on %s", API_VERSION, self.url)

    def stop(self) -> None:
        """End a series this API started (its trigger request returns), stop serving."""
        server, self._server = self._server, None
        if server is None:
            return
        self.detector.disarm()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def endpoints(self) -> dict[str, str]:
        return {"simplon": self.url}

    def __enter__(self) -> SimplonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
