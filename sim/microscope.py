"""Simulated TEM remote interface: beam blanking, dose rate, imaging mode, pixel size, field.

Real microscopes expose such controls through a vendor scripting API; the simulated one
speaks the small JSON-lines protocol of drivers/MICROSCOPE_PROTOCOL.md over TCP, so the
driver's `RemoteMicroscope` is exercised over a real socket. `MicroscopeController` turns one
request object into one reply object (the state machine); `SimulatedMicroscope` serves it.
The beam and dose live in the shared model (what the camera's frames record); the imaging
mode, pixel size, field centre and each mode's illumination (beam current and lit area, so
the dose rate follows the mode) live in `station.optics` (what the camera renders). A mode
switch or a new dose rate sets the model's rate from the optics; a blanked beam gives none.

One request exists only here, not on a real microscope nor in the driver: `truth`, the
model's ground truth now (extraction, expansion, phase fractions, front, the lattice spacings
the HRTEM field shows, the field's drift offset `drift_x_nm`/`drift_y_nm`), so a demo or test
can put live analysis next to what it should find.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .lineserver import ServedInstrument, TcpLineServer
from .model import NanobatteryModel, Phase
from .optics import ImagingMode
from .render import (
    DEFAULT_TRANSFER_LIMIT_PX,
    DISORDERED_REFLECTIONS,
    LAYERED_REFLECTIONS,
    ROCK_SALT_REFLECTIONS,
    drawn_reflections,
)
from .station import SimStation

log = logging.getLogger(__name__)

DEFAULT_PORT = 5027
MAX_LINE = 4096  # bytes of one request, terminator excluded
IDENTITY = "INSITU-SIM,TEM-200 simulated microscope,SN0001,1.0"
DOSE_RATE_RANGE_E_PER_A2_S = (0.01, 10_000.0)
# Sampling of the HRTEM field for the `truth` request's field phase fractions (points per side).
TRUTH_FIELD_GRID = 256
_PARTICLE_PHASES = (Phase.LAYERED, Phase.DISORDERED, Phase.ROCK_SALT)
_REFLECTIONS_OF = {
    Phase.LAYERED: LAYERED_REFLECTIONS,
    Phase.DISORDERED: DISORDERED_REFLECTIONS,
    Phase.ROCK_SALT: ROCK_SALT_REFLECTIONS,
}

Reply = dict[str, Any]


class RequestError(Exception):
    """A request the microscope refuses; becomes `{"ok": false, "error": ...}`."""


def _number(params: dict[str, Any], name: str) -> float:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number")
    if not math.isfinite(value):
        raise RequestError(f"{name} must be finite")
    return float(value)


class MicroscopeController:
    """Executes validated requests against the station's model and optics."""

    def __init__(self, station: SimStation, frame_shape: tuple[int, int] = (1024, 1024)) -> None:
        self._station = station
        self._frame_shape = (int(frame_shape[0]), int(frame_shape[1]))  # the camera's, for truth
        self._lock = threading.Lock()  # one request at a time, whichever client sent it
        self.requests_total = 0
        self.errors_total = 0  # requests answered with ok=false (malformed ones included)
        self.malformed_total = 0  # lines that were not a JSON request object at all
        with station.model() as m:  # the power-on mode's illumination
            m.set_beam(m.beam_on, station.optics.illumination.dose_rate_e_per_a2_s)
        # cmd -> (allowed parameters, required parameters, action)
        self._commands: dict[str, tuple[set[str], set[str], Callable[[dict[str, Any]], Reply]]] = {
            "identify": (set(), set(), self._identify),
            "get_state": (set(), set(), self._get_state),
            "blank_beam": (set(), set(), self._blank_beam),
            "unblank_beam": ({"dose_rate_e_per_a2_s"}, set(), self._unblank_beam),
            "get_dose_rate": (set(), set(), self._get_dose_rate),
            "set_dose_rate": ({"dose_rate_e_per_a2_s"}, {"dose_rate_e_per_a2_s"}, self._set_dose),
            "get_cumulative_dose": (set(), set(), self._get_cumulative_dose),
            "get_illumination": (set(), set(), self._get_illumination),
            "set_mode": ({"mode"}, {"mode"}, self._set_mode),
            "set_pixel_size": ({"pixel_size_nm"}, {"pixel_size_nm"}, self._set_pixel_size),
            "set_field_center": ({"x_nm", "y_nm"}, {"x_nm", "y_nm"}, self._set_field_center),
            "truth": (set(), set(), self._truth),  # simulator only
        }

    # ----- protocol ----------------------------------------------------------------------------
    def handle_line(self, raw: bytes, too_long: bool) -> bytes | None:
        if not raw.strip():
            return None
        with self._lock:
            reply = self._handle(raw, too_long)
        return json.dumps(reply, separators=(",", ":")).encode() + b"\n"

    def _handle(self, raw: bytes, too_long: bool) -> Reply:
        self.requests_total += 1
        request_id: Any = None
        try:
            request = self._parse(raw, too_long)
            request_id = request.pop("id", None)
            reply = self.execute(request)
        except RequestError as exc:
            reply = self._refuse(str(exc), raw)
        except Exception:
            log.exception("microscope: internal error on %r", raw[:80])
            reply = self._refuse("internal error", raw)
        if request_id is not None:
            reply["id"] = request_id
        return reply

    def _parse(self, raw: bytes, too_long: bool) -> dict[str, Any]:
        try:
            if too_long:
                raise RequestError(f"request longer than {MAX_LINE} bytes")
            try:
                request = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise RequestError(f"malformed request, not JSON: {exc}") from None
            if not isinstance(request, dict):
                raise RequestError("malformed request, expected a JSON object")
            if not isinstance(request.get("cmd"), str):
                raise RequestError('malformed request, "cmd" (a string) is missing')
        except RequestError:
            self.malformed_total += 1
            raise
        return request

    def execute(self, request: dict[str, Any]) -> Reply:
        """Run one request object `{"cmd": ..., params...}`; raises RequestError if refused."""
        params = dict(request)
        cmd = params.pop("cmd")
        entry = self._commands.get(cmd)
        if entry is None:
            raise RequestError(f"unknown command {cmd!r}")
        allowed, required, action = entry
        unexpected = sorted(set(params) - allowed)
        if unexpected:
            raise RequestError(f"{cmd}: unexpected parameter(s) {', '.join(unexpected)}")
        missing = sorted(required - set(params))
        if missing:
            raise RequestError(f"{cmd}: missing parameter(s) {', '.join(missing)}")
        return {"ok": True, **action(params)}

    def _refuse(self, message: str, raw: bytes) -> Reply:
        self.errors_total += 1
        log.warning("microscope: %s (request %r)", message, raw[:80])
        return {"ok": False, "error": message}

    # ----- commands ----------------------------------------------------------------------------
    def _identify(self, params: dict[str, Any]) -> Reply:
        return {"identity": IDENTITY}

    def _get_state(self, params: dict[str, Any]) -> Reply:
        with self._station.model() as m:
            optics = self._station.optics
            return {
                "state": {
                    "beam_on": m.beam_on,
                    "dose_rate_e_per_a2_s": m.dose_rate_e_per_a2_s,
                    "cumulative_dose_e_per_a2": m.cumulative_dose_e_per_a2,
                    "mode": optics.mode.value,
                    "pixel_size_nm": optics.pixel_size_nm,
                    "field_center_nm": list(optics.field_center_nm),
                }
            }

    def _blank_beam(self, params: dict[str, Any]) -> Reply:
        with self._station.model() as m:
            m.set_beam(False)
        return {}

    def _unblank_beam(self, params: dict[str, Any]) -> Reply:
        rate = self._dose_rate(params) if params else None
        with self._station.model() as m:
            if rate is not None:
                self._station.optics.set_dose_rate(rate)
            m.set_beam(True, rate)
        return {}

    def _get_dose_rate(self, params: dict[str, Any]) -> Reply:
        with self._station.model() as m:
            return {"dose_rate_e_per_a2_s": m.dose_rate_e_per_a2_s}

    def _set_dose(self, params: dict[str, Any]) -> Reply:
        rate = self._dose_rate(params)
        with self._station.model() as m:
            self._station.optics.set_dose_rate(rate)  # the present mode's, as a TEM keeps it
            m.set_beam(m.beam_on, rate)  # the model accumulates the old rate up to now first
        return {}

    @staticmethod
    def _dose_rate(params: dict[str, Any]) -> float:
        rate = _number(params, "dose_rate_e_per_a2_s")
        low, high = DOSE_RATE_RANGE_E_PER_A2_S
        if not low <= rate <= high:
            raise RequestError(f"dose rate must be {low:g}..{high:g} e/A^2/s")
        return rate

    def _get_cumulative_dose(self, params: dict[str, Any]) -> Reply:
        with self._station.model() as m:
            return {"cumulative_dose_e_per_a2": m.cumulative_dose_e_per_a2}

    def _get_illumination(self, params: dict[str, Any]) -> Reply:
        """The beam current at the specimen (the screen current a TEM reads: 0 blanked) and
        the area it lights."""
        with self._station.model() as m:
            illumination = self._station.optics.illumination
            return {
                "beam_current_amperes": illumination.beam_current_amperes if m.beam_on else 0.0,
                "illuminated_area_nm2": illumination.area_nm2,
            }

    def _set_mode(self, params: dict[str, Any]) -> Reply:
        names = [mode.value for mode in ImagingMode]
        if params["mode"] not in names:
            raise RequestError(f"mode must be one of {', '.join(names)}")
        with self._station.model() as m:  # the dose so far at the old mode's rate, then the new
            self._station.optics.set_mode(params["mode"])
            m.set_beam(m.beam_on, self._station.optics.illumination.dose_rate_e_per_a2_s)
        return {}

    def _set_pixel_size(self, params: dict[str, Any]) -> Reply:
        size = _number(params, "pixel_size_nm")
        with self._station.lock:
            try:
                self._station.optics.set_pixel_size(size)
            except ValueError as exc:
                raise RequestError(str(exc)) from None
        return {}

    def _set_field_center(self, params: dict[str, Any]) -> Reply:
        x_nm, y_nm = _number(params, "x_nm"), _number(params, "y_nm")
        with self._station.lock:
            self._station.optics.set_field_center(x_nm, y_nm)
        return {}

    def _truth(self, params: dict[str, Any]) -> Reply:
        """The model's ground truth now; the field part is the HRTEM field whatever the mode."""
        with self._station.model() as m:
            state = {
                "time_s": m.time_s,
                "bias_volts": m.applied_bias(),
                "x": m.x,
                "expansion": m.expansion,
                "particle_radius_nm": m.particle_radius_nm,
                "front_position_nm": m.front_position_nm,
                "front_velocity_nm_s": m.front_velocity_nm_s(),
                "contact": m.contact,
            }
            # The field's true offset (model.py DriftLaw): the HRTEM field below is where the
            # camera sees it, the microscope's centre less the drift (render.py Scene).
            offset = m.field_offset_nm()
            state["drift_x_nm"], state["drift_y_nm"] = offset
            structure = NanobatteryModel(params=m.params, x=m.x, tip_position_nm=m.tip_position_nm)
            hrtem = self._station.optics.modes[ImagingMode.HRTEM]
        # Outside the lock: the structure is a detached copy (phase sampling takes ~1-2 ms).
        state["particle_phase_fractions"] = structure.phase_fractions()
        center = (hrtem.field_center_nm[0] - offset[0], hrtem.field_center_nm[1] - offset[1])
        field = self._hrtem_field_labels(structure, hrtem.pixel_size_nm, center)
        counts = np.bincount(field.ravel(), minlength=len(Phase))
        particle = sum(int(counts[phase]) for phase in _PARTICLE_PHASES)
        state["field_particle_coverage"] = particle / field.size
        state["field_phase_fractions"] = {
            phase.name.lower(): (counts[phase] / particle if particle else 0.0)
            for phase in _PARTICLE_PHASES
        }
        state["field_d_spacings"] = self._spacings_present(counts, hrtem.pixel_size_nm)
        return {"truth": state}

    def _hrtem_field_labels(
        self, structure: NanobatteryModel, pixel_nm: float, center_nm: tuple[float, float]
    ) -> np.ndarray:
        rows, cols = self._frame_shape
        n = TRUTH_FIELD_GRID
        xs = center_nm[0] + ((np.arange(n) + 0.5) / n - 0.5) * cols * pixel_nm
        ys = center_nm[1] + ((np.arange(n) + 0.5) / n - 0.5) * rows * pixel_nm
        return structure.phase_at(xs[None, :], ys[:, None])

    @staticmethod
    def _spacings_present(counts: np.ndarray, pixel_nm: float) -> list[dict[str, Any]]:
        """The lattice spacings drawn in the HRTEM field now: reflections of phases present."""
        present: dict[float, dict[str, Any]] = {}
        for phase in _PARTICLE_PHASES:
            if not counts[phase]:
                continue
            for reflection in drawn_reflections(
                _REFLECTIONS_OF[phase], pixel_nm, DEFAULT_TRANSFER_LIMIT_PX
            ):
                entry = present.setdefault(
                    reflection.d_nm,
                    {"d_m": reflection.d_nm * 1e-9, "names": [], "phases": []},
                )
                if reflection.name not in entry["names"]:
                    entry["names"].append(reflection.name)
                entry["phases"].append(phase.name.lower())
        return [present[d] for d in sorted(present, reverse=True)]


class SimulatedMicroscope(ServedInstrument):
    """The microscope's remote interface served as JSON lines on TCP."""

    def __init__(
        self,
        station: SimStation,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        frame_shape: tuple[int, int] = (1024, 1024),
    ) -> None:
        self.controller = MicroscopeController(station, frame_shape)
        super().__init__(
            TcpLineServer("microscope", host, port, self.controller.handle_line, MAX_LINE)
        )

    @property
    def errors_total(self) -> int:
        return self.controller.errors_total

    @property
    def malformed_total(self) -> int:
        return self.controller.malformed_total

    @property
    def endpoints(self) -> dict[str, str]:
        host, port = self.tcp_address()
        return {"tcp": f"{host}:{port}"}
