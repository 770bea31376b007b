"""Microscope interface: beam blanking, dose rate, imaging mode, pixel size, field of view.

The service codes against the `Microscope` protocol (insitu_daq/control/instruments): every
microscope vendor has its own scripting API, and a real microscope is supported by wrapping it
in a class with those methods. `RemoteMicroscope` implements it over the JSON-lines TCP
protocol of drivers/MICROSCOPE_PROTOCOL.md (spoken by the simulated microscope, or by a small
bridge running next to a real one).
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from .closing import ClosedOnExit

log = logging.getLogger(__name__)

DEFAULT_PORT = 5027


class ImagingMode(str, Enum):
    LOW_MAG = "lm"  # whole particle and needle
    HRTEM = "hrtem"  # lattice fringes of a region of the particle


@dataclass(frozen=True)
class MicroscopeState:
    beam_on: bool
    dose_rate_e_per_a2_s: float
    cumulative_dose_e_per_a2: float
    mode: ImagingMode
    pixel_size_nm: float
    field_center_nm: tuple[float, float]


ELEMENTARY_CHARGE_C = 1.602176634e-19
A2_PER_NM2 = 100.0


@dataclass(frozen=True)
class Illumination:
    """The beam at the specimen as a TEM reports it: its current (the screen current, 0 with
    the beam blanked) and the area it lights. The dose rate is the one over the other."""

    beam_current_amperes: float
    illuminated_area_nm2: float

    @property
    def dose_rate_e_per_a2_s(self) -> float:
        """Electrons per square angstrom per second at the specimen (NaN: no area known)."""
        area_a2 = self.illuminated_area_nm2 * A2_PER_NM2
        if not area_a2 > 0:
            return float("nan")
        return self.beam_current_amperes / ELEMENTARY_CHARGE_C / area_a2


class MicroscopeError(Exception):
    """The microscope refused a request or the link to it failed."""


# Named as the other drivers' timeouts are (HolderTimeout), hence the noqa.
class MicroscopeTimeout(MicroscopeError, TimeoutError):  # noqa: N818
    """No reply within the timeout."""


class _Command:
    """Request names of MICROSCOPE_PROTOCOL.md."""

    IDENTIFY = "identify"
    GET_STATE = "get_state"
    BLANK_BEAM = "blank_beam"
    UNBLANK_BEAM = "unblank_beam"
    SET_DOSE_RATE = "set_dose_rate"
    GET_DOSE_RATE = "get_dose_rate"
    GET_CUMULATIVE_DOSE = "get_cumulative_dose"
    GET_ILLUMINATION = "get_illumination"
    SET_MODE = "set_mode"
    SET_PIXEL_SIZE = "set_pixel_size"
    SET_FIELD_CENTER = "set_field_center"


class RemoteMicroscope(ClosedOnExit):
    """A microscope reached over the JSON-lines remote protocol."""

    ERRORS: ClassVar[tuple[type[Exception], ...]] = (MicroscopeError,)

    @staticmethod
    def lost(exc: BaseException) -> bool:
        """Every failure, a refusal included, is retried after a reconnect: the remote
        protocol's replies carry no code that would tell a refusal from a failing bridge."""
        return isinstance(exc, MicroscopeError)

    def __init__(self, host: str, port: int = DEFAULT_PORT, timeout: float = 2.0) -> None:
        self.address = (host, port)
        self.timeout = timeout
        try:
            self._sock = socket.create_connection(self.address, timeout=timeout)
        except OSError as exc:
            raise MicroscopeError(f"cannot connect to microscope at {host}:{port}: {exc}") from exc
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # ----- transport ---------------------------------------------------------------------------
    def _request(self, cmd: str, **params: Any) -> dict[str, Any]:
        """Send one request; return its reply, raising MicroscopeError if it was refused."""
        with self._lock:
            request_id = next(self._ids)
            line = json.dumps({"cmd": cmd, "id": request_id, **params}).encode() + b"\n"
            try:
                self._sock.sendall(line)
            except OSError as exc:
                raise MicroscopeError(f"{cmd}: send failed: {exc}") from exc
            deadline = time.monotonic() + self.timeout
            while True:
                reply = self._read_reply(cmd, deadline)
                if reply.get("id") == request_id:
                    break
                # The late answer to an earlier, timed-out request: not ours.
                log.warning("microscope: discarding stale reply %r", reply)
        if not reply.get("ok"):
            raise MicroscopeError(f"{cmd}: {reply.get('error', 'refused')}")
        return reply

    def _read_reply(self, cmd: str, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MicroscopeTimeout(f"{cmd}: no reply within {self.timeout} s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise MicroscopeError(f"{cmd}: receive failed: {exc}") from exc
            if not chunk:
                raise MicroscopeError(f"{cmd}: microscope closed the connection")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise MicroscopeError(f"{cmd}: reply is not JSON: {line[:80]!r}") from exc
        if not isinstance(reply, dict):
            raise MicroscopeError(f"{cmd}: reply is not a JSON object: {line[:80]!r}")
        return reply

    def close(self) -> None:
        self._sock.close()

    # ----- the Microscope protocol -------------------------------------------------------------
    def identify(self) -> str:
        return str(self._request(_Command.IDENTIFY)["identity"])

    def state(self) -> MicroscopeState:
        state = self._request(_Command.GET_STATE)["state"]
        x_nm, y_nm = state["field_center_nm"]
        return MicroscopeState(
            beam_on=bool(state["beam_on"]),
            dose_rate_e_per_a2_s=float(state["dose_rate_e_per_a2_s"]),
            cumulative_dose_e_per_a2=float(state["cumulative_dose_e_per_a2"]),
            mode=ImagingMode(state["mode"]),
            pixel_size_nm=float(state["pixel_size_nm"]),
            field_center_nm=(float(x_nm), float(y_nm)),
        )

    def blank_beam(self) -> None:
        self._request(_Command.BLANK_BEAM)

    def unblank_beam(self, dose_rate_e_per_a2_s: float | None = None) -> None:
        if dose_rate_e_per_a2_s is None:
            self._request(_Command.UNBLANK_BEAM)
        else:
            self._request(_Command.UNBLANK_BEAM, dose_rate_e_per_a2_s=dose_rate_e_per_a2_s)

    def set_dose_rate(self, dose_rate_e_per_a2_s: float) -> None:
        self._request(_Command.SET_DOSE_RATE, dose_rate_e_per_a2_s=dose_rate_e_per_a2_s)

    def dose_rate(self) -> float:
        return float(self._request(_Command.GET_DOSE_RATE)["dose_rate_e_per_a2_s"])

    def set_mode(self, mode: ImagingMode | str) -> None:
        self._request(_Command.SET_MODE, mode=ImagingMode(mode).value)

    def set_pixel_size(self, pixel_size_nm: float) -> None:
        self._request(_Command.SET_PIXEL_SIZE, pixel_size_nm=pixel_size_nm)

    def set_field_center(self, x_nm: float, y_nm: float) -> None:
        self._request(_Command.SET_FIELD_CENTER, x_nm=x_nm, y_nm=y_nm)

    def cumulative_dose(self) -> float:
        """Electron dose delivered since the microscope started, e/A^2."""
        return float(self._request(_Command.GET_CUMULATIVE_DOSE)["cumulative_dose_e_per_a2"])

    def illumination(self) -> Illumination:
        """The beam current at the specimen (0 blanked) and the illuminated area."""
        reply = self._request(_Command.GET_ILLUMINATION)
        return Illumination(
            beam_current_amperes=float(reply["beam_current_amperes"]),
            illuminated_area_nm2=float(reply["illuminated_area_nm2"]),
        )
