"""The simulated microscope, driven through RemoteMicroscope over a real TCP socket."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from insitu_daq.control.instruments import Microscope
from insitu_daq.drivers.microscope import (
    ImagingMode,
    MicroscopeError,
    MicroscopeTimeout,
    RemoteMicroscope,
)
from insitu_daq.sim.microscope import SimulatedMicroscope
from insitu_daq.sim.optics import ImagingMode as OpticsMode
from insitu_daq.sim.station import SimStation


@pytest.fixture
def station() -> SimStation:
    return SimStation(seed=1, time_scale=100.0)


@pytest.fixture
def sim(station: SimStation) -> Iterator[SimulatedMicroscope]:
    with SimulatedMicroscope(station, port=0) as sim:
        yield sim


def _address(sim: SimulatedMicroscope) -> tuple[str, int]:
    host, _, port = sim.endpoints["tcp"].rpartition(":")
    return host, int(port)


@pytest.fixture
def scope(sim: SimulatedMicroscope) -> Iterator[RemoteMicroscope]:
    with RemoteMicroscope(*_address(sim)) as scope:
        yield scope


def _model_time(station: SimStation) -> float:
    with station.model() as m:
        return m.time_s


def test_identifies_and_implements_the_interface(scope: RemoteMicroscope) -> None:
    assert isinstance(scope, Microscope)
    assert "TEM-200" in scope.identify()
    state = scope.state()
    assert not state.beam_on
    assert state.dose_rate_e_per_a2_s == pytest.approx(2.0)  # low magnification: low dose
    assert state.mode is ImagingMode.LOW_MAG


def test_dose_accumulates_only_while_the_beam_is_unblanked(
    scope: RemoteMicroscope, station: SimStation
) -> None:
    assert scope.cumulative_dose() == 0.0
    time.sleep(0.02)
    assert scope.cumulative_dose() == 0.0  # blanked at power-on

    on_before = _model_time(station)
    scope.unblank_beam()
    on_after = _model_time(station)
    with station.model() as m:
        assert m.beam_on
    time.sleep(0.05)
    off_before = _model_time(station)
    scope.blank_beam()
    off_after = _model_time(station)

    dose = scope.cumulative_dose()
    rate = scope.dose_rate()
    assert rate * (off_before - on_after) <= dose <= rate * (off_after - on_before)
    assert scope.state().cumulative_dose_e_per_a2 == dose
    time.sleep(0.05)
    assert scope.cumulative_dose() == dose  # blanked again: nothing more
    with station.model() as m:
        assert not m.beam_on
        assert m.cumulative_dose_e_per_a2 == dose


def test_dose_rate_is_set_in_the_model_and_validated(
    scope: RemoteMicroscope, station: SimStation
) -> None:
    scope.set_dose_rate(10.0)
    with station.model() as m:
        assert m.dose_rate_e_per_a2_s == 10.0
        assert not m.beam_on  # setting the rate does not unblank
    scope.unblank_beam(70.0)
    with station.model() as m:
        assert m.beam_on and m.dose_rate_e_per_a2_s == 70.0
    assert scope.dose_rate() == 70.0

    with pytest.raises(MicroscopeError, match="dose rate"):
        scope.set_dose_rate(-1.0)
    with station.model() as m:
        assert m.dose_rate_e_per_a2_s == 70.0


def test_dose_rate_follows_the_mode_and_the_beam_current_reads_zero_blanked(
    scope: RemoteMicroscope, station: SimStation
) -> None:
    """Each mode recalls its own illumination (SCIENCE.md: ~35 e/A^2/s in HRTEM, LM lower);
    get_illumination reads the beam current at the specimen, none while blanked."""
    scope.set_mode("hrtem")
    assert scope.dose_rate() == pytest.approx(35.0)
    assert scope.illumination().beam_current_amperes == 0.0  # blanked at power-on
    assert scope.illumination().dose_rate_e_per_a2_s == 0.0
    scope.unblank_beam()
    lit = scope.illumination()
    assert lit.dose_rate_e_per_a2_s == pytest.approx(35.0)
    assert 1e-12 < lit.beam_current_amperes < 1e-9  # pA, as low-dose HRTEM
    scope.set_mode("lm")
    assert scope.illumination().dose_rate_e_per_a2_s == pytest.approx(2.0)
    with station.model() as m:  # what the model accrues (and the camera renders)
        assert m.dose_rate_e_per_a2_s == pytest.approx(2.0)
    scope.set_dose_rate(10.0)  # LM's own: HRTEM keeps 35
    scope.set_mode("hrtem")
    assert scope.illumination().dose_rate_e_per_a2_s == pytest.approx(35.0)
    scope.set_mode("lm")
    assert scope.illumination().dose_rate_e_per_a2_s == pytest.approx(10.0)


def test_mode_pixel_size_and_field_change_the_station_optics(
    scope: RemoteMicroscope, station: SimStation
) -> None:
    lm_pixel = station.optics.pixel_size_nm

    scope.set_mode("hrtem")
    scope.set_pixel_size(0.05)
    scope.set_field_center(100.0, -20.0)
    with station.lock:
        assert station.optics.mode is OpticsMode.HRTEM
        assert station.optics.pixel_size_nm == 0.05
        assert station.optics.field_center_nm == (100.0, -20.0)
    state = scope.state()
    assert state.mode is ImagingMode.HRTEM
    assert state.pixel_size_nm == 0.05
    assert state.field_center_nm == (100.0, -20.0)

    scope.set_mode(ImagingMode.LOW_MAG)  # each mode keeps its own magnification
    assert station.optics.mode is OpticsMode.LOW_MAG
    assert station.optics.pixel_size_nm == lm_pixel

    with pytest.raises(MicroscopeError, match="pixel size"):
        scope.set_pixel_size(100.0)
    assert station.optics.pixel_size_nm == lm_pixel


MALFORMED = [b"not json", b"[1, 2]", b'{"mode": "lm"}', b"\xff\xfe{}", b"{" + b" " * 5000 + b"}"]
REFUSED = [
    b'{"cmd": "warp"}',
    b'{"cmd": "set_mode", "mode": "stem"}',
    b'{"cmd": "set_pixel_size", "pixel_size_nm": "big"}',
    b'{"cmd": "blank_beam", "extra": 1}',
    b'{"cmd": "set_field_center", "x_nm": 1.0}',
]


def test_bad_requests_get_error_replies_and_are_counted(
    sim: SimulatedMicroscope, station: SimStation
) -> None:
    optics_before = (station.optics.mode, station.optics.pixel_size_nm)
    with socket.create_connection(_address(sim), timeout=2.0) as conn:
        reader = conn.makefile("rb")
        for line in MALFORMED + REFUSED:
            conn.sendall(line + b"\n")
            reply = json.loads(reader.readline())
            assert reply["ok"] is False, line
            assert reply["error"]
        conn.sendall(b'{"cmd": "warp", "id": 7}\n')
        assert json.loads(reader.readline()) == {
            "ok": False,
            "error": "unknown command 'warp'",
            "id": 7,
        }
        conn.sendall(b'{"cmd": "identify", "id": "still-alive"}\n')
        reply = json.loads(reader.readline())
        assert reply["ok"] is True and reply["id"] == "still-alive"
    assert sim.malformed_total == len(MALFORMED)
    assert sim.errors_total == len(MALFORMED) + len(REFUSED) + 1
    assert (station.optics.mode, station.optics.pixel_size_nm) == optics_before


def test_unknown_mode_is_refused_before_sending(scope: RemoteMicroscope) -> None:
    with pytest.raises(ValueError):
        scope.set_mode("stem")
    assert scope.state().mode is ImagingMode.LOW_MAG


def test_silent_microscope_raises_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never answers
        host, port = listener.getsockname()[:2]
        with RemoteMicroscope(host, port, timeout=0.2) as scope, pytest.raises(MicroscopeTimeout):
            scope.identify()


def _request(sim: SimulatedMicroscope, request: dict) -> dict:
    with socket.create_connection(_address(sim), timeout=5.0) as conn:
        conn.sendall(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(65536)
            assert chunk, "connection closed before the reply"
            reply += chunk
    return json.loads(reply)


def test_truth_request_reports_the_model_and_the_hrtem_field(
    station: SimStation, sim: SimulatedMicroscope
) -> None:
    with station.model() as m:
        m.tip_position_nm = 0.0
        m.x = 0.95  # the front (444 nm) crosses the HRTEM field (409-471 nm): both phases
        expected = m.snapshot()
    reply = _request(sim, {"cmd": "truth", "id": 3})
    assert reply["ok"] and reply["id"] == 3
    truth = reply["truth"]
    assert truth["x"] == pytest.approx(0.95)  # no bias: x does not move with time
    assert truth["time_s"] >= expected.time_s
    assert truth["expansion"] == pytest.approx(expected.expansion)
    assert truth["front_position_nm"] == pytest.approx(expected.front_position_nm)
    assert truth["front_velocity_nm_s"] == 0.0  # unbiased
    assert truth["particle_phase_fractions"] == pytest.approx(expected.phase_fractions)
    field = truth["field_phase_fractions"]
    assert sum(field.values()) == pytest.approx(1.0)
    assert truth["field_particle_coverage"] == pytest.approx(1.0)  # the field is inside it
    assert field["rock_salt"] > 0 and field["layered"] > 0
    # Both phases' spacings are drawn: 4.8 A (003) of the layered core, 2.1 A (200) of NiO.
    spacings = {round(entry["d_m"] * 1e10, 2): entry for entry in truth["field_d_spacings"]}
    assert {4.8, 2.1} <= set(spacings)
    assert "rock_salt" in spacings[2.1]["phases"] and spacings[4.8]["names"] == ["(003)"]

    with station.model() as m:
        m.x = 1.0
    converted = _request(sim, {"cmd": "truth"})["truth"]
    assert converted["field_phase_fractions"]["rock_salt"] == pytest.approx(1.0)
    d_values = [round(entry["d_m"] * 1e10, 2) for entry in converted["field_d_spacings"]]
    assert 4.8 not in d_values and 2.1 in d_values


def test_truth_is_a_simulator_request_not_part_of_the_driver(sim: SimulatedMicroscope) -> None:
    assert not hasattr(Microscope, "truth") and not hasattr(RemoteMicroscope, "truth")
    refused = _request(sim, {"cmd": "truth", "at": 5})
    assert not refused["ok"] and "unexpected parameter" in refused["error"]
