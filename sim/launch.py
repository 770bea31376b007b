"""Start the whole simulated station (source-meter, holder, microscope, camera) on one model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .camera import SimulatedCamera
from .heating_holder import SimulatedHeatingHolder
from .holder import SimulatedHolder
from .microscope import SimulatedMicroscope
from .model import DriftLaw
from .simplon import SimplonServer
from .sourcemeter import SimulatedSourceMeter
from .station import SimStation

log = logging.getLogger(__name__)


# The holder models a simulated station offers (the station config's holder.model).
HOLDERS: dict[str, type[SimulatedHolder] | type[SimulatedHeatingHolder]] = {
    "open_cell": SimulatedHolder,
    "mems_heating": SimulatedHeatingHolder,
}


@dataclass(frozen=True)
class StationPorts:
    """TCP ports of the simulated instruments; 0 picks a free one."""

    source_meter: int = 5025
    holder: int = 5026
    microscope: int = 5027
    camera: int = 31001
    # The camera's SIMPLON REST API (sim/simplon.py); None: not served, the camera free-runs
    # as a listen-only station expects (`insitu-daq sim --camera-api-port 8000` serves it).
    camera_api: int | None = None


@dataclass
class SimulatedInstruments:
    """The four simulated instruments of one station, started and stopped together."""

    station: SimStation
    source_meter: SimulatedSourceMeter
    holder: SimulatedHolder | SimulatedHeatingHolder
    microscope: SimulatedMicroscope
    camera: SimulatedCamera
    camera_api: SimplonServer | None = None
    _started: list = field(default_factory=list)

    @classmethod
    def create(
        cls,
        host: str = "127.0.0.1",
        ports: StationPorts | None = None,
        time_scale: float = 1.0,
        seed: int = 0,
        frame_shape: tuple[int, int] = (1024, 1024),
        frame_rate_hz: float = 40.0,
        compression: str | None = "bslz4",
        source_meter_model: str = "keithley2400",
        holder_model: str = "open_cell",
        drift: DriftLaw | None = None,  # the field's drift (model.py); None: still
    ) -> SimulatedInstruments:
        ports = ports or StationPorts()
        station = SimStation(seed=seed, time_scale=time_scale, drift=drift)
        sims = cls(
            station=station,
            source_meter=SimulatedSourceMeter(
                station, host=host, port=ports.source_meter, model=source_meter_model
            ),
            holder=HOLDERS[holder_model](station, host=host, port=ports.holder),
            microscope=SimulatedMicroscope(
                station, host=host, port=ports.microscope, frame_shape=frame_shape
            ),
            camera=SimulatedCamera(
                station,
                host=host,
                port=ports.camera,
                shape=frame_shape,
                frame_rate_hz=frame_rate_hz,
                compression=compression,
                seed=seed,
            ),
        )
        if ports.camera_api is not None:
            sims.camera_api = SimplonServer(sims.camera, host=host, port=ports.camera_api)
        return sims

    @property
    def instruments(self) -> dict[str, object]:
        """Each instrument by name, in the order they start (the camera before its API)."""
        instruments: dict[str, object] = {
            "source_meter": self.source_meter,
            "holder": self.holder,
            "microscope": self.microscope,
            "camera": self.camera,
        }
        if self.camera_api is not None:
            instruments["camera_api"] = self.camera_api
        return instruments

    def start(self) -> None:
        try:
            for instrument in self.instruments.values():
                instrument.start()
                self._started.append(instrument)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        while self._started:
            instrument = self._started.pop()
            try:
                instrument.stop()
            except Exception:  # stopping the others matters more than this one's error
                log.exception("stopping %s failed", type(instrument).__name__)

    def endpoints(self) -> dict[str, dict[str, str]]:
        return {name: inst.endpoints for name, inst in self.instruments.items()}

    def __enter__(self) -> SimulatedInstruments:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
