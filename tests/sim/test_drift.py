"""The simulated field drift (sim/model.py DriftLaw): the model's offset, the truth the
microscope reports over its real TCP socket, and the frame the camera's renderer draws."""

from __future__ import annotations

import json
import math
import socket

import pytest

from insitu_daq.sim.microscope import SimulatedMicroscope
from insitu_daq.sim.model import LinearDrift, NanobatteryModel
from insitu_daq.sim.station import SimStation


def test_linear_drift_moves_at_its_speed_along_its_direction_and_refuses_nonsense() -> None:
    model = NanobatteryModel(drift=LinearDrift(0.5, 90.0))
    assert model.field_offset_nm() == (0.0, 0.0)
    model.advance_to(4.0)
    x_nm, y_nm = model.field_offset_nm()
    assert x_nm == pytest.approx(0.0, abs=1e-12) and y_nm == pytest.approx(2.0)
    assert NanobatteryModel().drift(100.0) == (0.0, 0.0)  # still by default
    for speed in (-0.1, math.nan):
        with pytest.raises(ValueError, match="drift speed"):
            LinearDrift(speed)


def test_the_truth_reports_the_offset_and_the_field_where_it_drifted() -> None:
    """A law that has moved the specimen 300 nm toward -x: the HRTEM field (inside the
    particle's far side when still) now looks at vacuum beyond it, and the truth says so."""
    station = SimStation(drift=lambda t: (-300.0, 0.0))
    with SimulatedMicroscope(station, port=0) as sim:
        host, _, port = sim.endpoints["tcp"].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5.0) as conn:
            conn.sendall(b'{"cmd": "truth"}\n')
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(65536)
                assert chunk
                reply += chunk
    truth = json.loads(reply)["truth"]
    assert (truth["drift_x_nm"], truth["drift_y_nm"]) == (-300.0, 0.0)
    assert truth["field_particle_coverage"] == 0.0
    still = SimulatedMicroscope(SimStation(), port=0).controller.execute({"cmd": "truth"})
    assert still["truth"]["field_particle_coverage"] == 1.0
    assert (still["truth"]["drift_x_nm"], still["truth"]["drift_y_nm"]) == (0.0, 0.0)
