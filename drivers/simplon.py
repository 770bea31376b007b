"""DECTRIS SIMPLON REST API client: configure, arm, trigger and disarm a detector.

The detector control unit (DCU) of a DECTRIS detector (EIGER2, QUADRO, ARINA) serves its
configuration and commands over HTTP (SIMPLON API 1.8.0); the frames themselves come over
Stream V2 (drivers/stream2). Every request is one small JSON body:

- `GET  /detector/api/1.8.0/config/<param>` -> `{"value": ..., "min": ..., "max": ...}`;
- `PUT  /detector/api/1.8.0/config/<param>` with `{"value": ...}` -> the list of parameters
  the change touched;
- `PUT  /detector/api/1.8.0/command/<command>`; `arm` answers `{"sequence id": N}`, and the
  series it starts carries N as its Stream V2 `series_id`;
- `GET  /detector/api/1.8.0/status/state` -> `{"value": "na" | "idle" | "ready" | ...}`;
- `PUT  /stream/api/1.8.0/config/mode` with `{"value": "enabled"}` for the Stream V2 output.

A value the detector refuses comes back as HTTP 400 with the reason as text; this driver
turns it into `SimplonRefused`, one line naming the parameter. In the internal-series trigger
mode ("ints") `trigger` is a long request: it returns once the series has been acquired (or
disarmed), so it takes its own timeout. Plain `urllib.request`: the API is a handful of JSON
requests and needs no HTTP library beyond the standard one.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

API_VERSION = "1.8.0"
DEFAULT_PORT = 80  # the DCU's web server

# The protocol's strings, in one place.
CONFIG = "/detector/api/{version}/config/{name}"
COMMAND = "/detector/api/{version}/command/{name}"
STATUS = "/detector/api/{version}/status/{name}"
STREAM_CONFIG = "/stream/api/{version}/config/{name}"
SEQUENCE_ID = "sequence id"  # arm's answer (with the space, as the DCU sends it)
STATES = ("na", "idle", "configure", "ready", "acquire", "error")
TRIGGER_MODES = ("ints", "inte", "exts", "exte")
COMPRESSIONS = ("bslz4", "lz4", "none")


class SimplonError(RuntimeError):
    """The detector refused a request or did not answer it; the message is one line."""


class SimplonRefused(SimplonError):  # noqa: N818 - reads as the answer it carries
    """The detector refused a value or a command (HTTP 4xx): `name` is what it refused."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"detector refused {name}: {reason}")
        self.name = name
        self.reason = reason


class SimplonDetector:
    """One detector control unit at `base_url` (e.g. "http://10.0.0.20"), SIMPLON 1.8.0.

    `timeout_s` bounds every request but `trigger`, which lasts the series it acquires.
    """

    def __init__(self, base_url: str, timeout_s: float = 2.0) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)

    # ----- configuration ---------------------------------------------------------------------
    def set_count_time(self, seconds: float) -> list[str]:
        """Exposure of each image (s); returns the parameters the change touched."""
        return self.set_config("count_time", float(seconds))

    def set_frame_time(self, seconds: float) -> list[str]:
        """Period of the images (s): at least count_time plus the readout time."""
        return self.set_config("frame_time", float(seconds))

    def set_nimages(self, count: int) -> list[str]:
        """Images per trigger."""
        return self.set_config("nimages", int(count))

    def set_ntrigger(self, count: int) -> list[str]:
        """Triggers per armed series."""
        return self.set_config("ntrigger", int(count))

    def set_compression(self, compression: str) -> list[str]:
        """Stream V2 image compression: "bslz4", "lz4" (or "none" where supported)."""
        return self.set_config("compression", compression)

    def set_trigger_mode(self, mode: str) -> list[str]:
        """The trigger mode; "ints": a `trigger` command starts each series of `nimages`."""
        return self.set_config("trigger_mode", mode)

    def readout_time(self) -> float:
        """Dead time between two exposures (s): frame_time - count_time at least this."""
        return float(self.config("detector_readout_time"))

    def configure(
        self,
        count_time: float,
        frame_time: float,
        nimages: int,
        ntrigger: int = 1,
        compression: str | None = None,
        trigger_mode: str = "ints",
    ) -> None:
        """Set a series up and check the detector kept it.

        frame_time goes first and count_time after it, so the exposure has the last word when
        the detector moves one of them to keep frame_time >= count_time + readout. Both are
        read back: a value the detector adjusted is refused here rather than recorded wrongly.
        """
        self.set_trigger_mode(trigger_mode)
        self.set_frame_time(frame_time)
        self.set_count_time(count_time)
        self.set_nimages(nimages)
        self.set_ntrigger(ntrigger)
        if compression is not None:
            self.set_compression(compression)
        for name, wanted in (("frame_time", frame_time), ("count_time", count_time)):
            kept = float(self.config(name))
            if abs(kept - wanted) > 1e-9 * max(1.0, abs(wanted)):
                raise SimplonRefused(name, f"set to {wanted:g} s, the detector kept {kept:g} s")

    def config(self, name: str) -> Any:
        """A configuration parameter's value."""
        return self._value(self._request("GET", CONFIG, name))

    def set_config(self, name: str, value: Any) -> list[str]:
        """Set a configuration parameter; returns the parameters the change touched."""
        changed = self._request("PUT", CONFIG, name, {"value": value})
        return [str(item) for item in changed] if isinstance(changed, list) else [name]

    def enable_stream(self) -> None:
        """Switch the Stream V2 output on (the frames this daemon records)."""
        self._request("PUT", STREAM_CONFIG, "mode", {"value": "enabled"})

    # ----- commands --------------------------------------------------------------------------
    def initialize(self) -> None:
        """Bring the detector from `na` (or `error`) to `idle`; takes a while on a real DCU."""
        self._request("PUT", COMMAND, "initialize", timeout_s=max(self.timeout_s, 60.0))

    def arm(self) -> int:
        """Arm for a series: `ready`; returns its sequence id (the stream's series_id)."""
        answer = self._request("PUT", COMMAND, "arm")
        try:
            return int(answer[SEQUENCE_ID])
        except (TypeError, KeyError, ValueError):
            raise SimplonError(f"arm answered {answer!r}, without a {SEQUENCE_ID!r}") from None

    def trigger(self, timeout_s: float | None = None) -> None:
        """Start the armed series; in "ints" mode returns once it has been acquired.

        `timeout_s`: how long the series may take (default: the request timeout).
        """
        self._request("PUT", COMMAND, "trigger", timeout_s=timeout_s)

    def disarm(self) -> None:
        """End the series (the stream's `end` follows): `idle`."""
        self._request("PUT", COMMAND, "disarm")

    def cancel(self) -> None:
        """Stop after the image being acquired; the series ends."""
        self._request("PUT", COMMAND, "cancel")

    def abort(self) -> None:
        """Stop at once, dropping what is in the pipeline."""
        self._request("PUT", COMMAND, "abort")

    # ----- status ----------------------------------------------------------------------------
    def state(self) -> str:
        """One of STATES."""
        return str(self._value(self._request("GET", STATUS, "state")))

    # ----- transport -------------------------------------------------------------------------
    @staticmethod
    def _value(answer: Any) -> Any:
        if not isinstance(answer, dict) or "value" not in answer:
            raise SimplonError(f"answer without a value: {answer!r}")
        return answer["value"]

    def _request(
        self,
        method: str,
        path: str,
        name: str,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        url = self.base_url + path.format(version=API_VERSION, name=name)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        what = f"{method} {url}"
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            reason = _one_line(exc.read().decode("utf-8", "replace")) or exc.reason
            if 400 <= exc.code < 500:
                shown = name if body is None else f"{name} = {body['value']!r}"
                raise SimplonRefused(shown, f"{reason} (HTTP {exc.code})") from None
            raise SimplonError(f"{what}: HTTP {exc.code} {reason}") from None
        except TimeoutError:
            raise SimplonError(f"{what}: no answer within {timeout:g} s") from None
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            if isinstance(why, TimeoutError):
                raise SimplonError(f"{what}: no answer within {timeout:g} s") from None
            raise SimplonError(f"{what}: {_one_line(str(why))}") from None
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise SimplonError(f"{what}: not JSON: {_one_line(text)[:80]!r}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())
