"""Simulated SourceMeters: one SCPI state machine per model, served on a raw TCP socket.

`common.py` holds what the models share (ranges, the noise model, the link to the station
model, the program-message entry point); `keithley2400.py` and `keithley2450.py` are the
dialects.
`SimulatedSourceMeter` serves the chosen model on a TCP socket (newline-terminated SCPI,
`TCPIP::host::port::SOCKET` for VISA), one thread per client, all clients sharing the one
instrument, as on a real instrument behind a GPIB-LAN bridge or on its own LAN port.
"""

from __future__ import annotations

import logging

from ..lineserver import ServedInstrument, TcpLineServer
from ..station import SimStation
from .common import DEFAULT_PORT, MAX_LINE, SourceMeterSimulator
from .keithley2400 import Keithley2400Simulator
from .keithley2450 import Keithley2450Simulator

log = logging.getLogger(__name__)

# The models the simulator speaks, named as the station config's source_meter.model.
SIMULATORS: dict[str, type[SourceMeterSimulator]] = {
    "keithley2400": Keithley2400Simulator,
    "keithley2450": Keithley2450Simulator,
}

__all__ = ["DEFAULT_PORT", "MAX_LINE", "SIMULATORS", "SimulatedSourceMeter"]


class SimulatedSourceMeter(ServedInstrument):
    """A simulated source-meter served on a raw TCP socket (VISA `TCPIP::host::port::SOCKET`)."""

    def __init__(
        self,
        station: SimStation,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        serial_number: str | None = None,
        model: str = "keithley2400",
    ) -> None:
        if model not in SIMULATORS:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(SIMULATORS))}")
        self._station = station
        self.model = model
        self.instrument = SIMULATORS[model](station, serial_number)
        super().__init__(
            TcpLineServer("sourcemeter", host, port, self.instrument.handle_line, MAX_LINE)
        )

    @property
    def errors_total(self) -> int:
        return self.instrument.errors_total

    @property
    def malformed_total(self) -> int:
        return self.instrument.malformed_total

    def inject_short(self, shorted: bool) -> None:
        """Fault injection: the tip touches the grid, so the source runs into compliance."""
        log.warning("sourcemeter: short circuit %s", "injected" if shorted else "removed")
        with self._station.model() as m:
            m.set_short_circuit(shorted)

    @property
    def endpoints(self) -> dict[str, str]:
        host, port = self.tcp_address()
        return {"visa": f"TCPIP::{host}::{port}::SOCKET"}
