"""Arming the detector (control/detector.py) against the simulated camera's SIMPLON API over
real HTTP: a refusal or a detector that does not answer is one line naming why."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from insitu_daq.control.detector import DetectorControl
from insitu_daq.control.station import StationError
from insitu_daq.core.config import DetectorConfig
from insitu_daq.drivers.stream2 import Stream2Receiver
from insitu_daq.sim.camera import SimulatedCamera
from insitu_daq.sim.simplon import SimplonServer
from insitu_daq.sim.station import SimStation


@pytest.fixture
def api() -> Iterator[SimplonServer]:
    camera = SimulatedCamera(SimStation(seed=0), port=0, shape=(64, 64), frame_rate_hz=50.0)
    # Someone takes the stream, as the daemon's ingest does: a PUSH socket nobody reads holds
    # the series (sim/camera.py), and a disarm with it.
    with (
        camera,
        SimplonServer(camera, port=0) as server,
        Stream2Receiver(camera.endpoints["stream2"]),
    ):
        yield server


def _control(url: str, **settings: object) -> DetectorControl:
    return DetectorControl(DetectorConfig(control="simplon", api_url=url, **settings))


def test_arm_trigger_disarm_from_the_station_config(api: SimplonServer) -> None:
    control = _control(api.url, default_frame_rate_hz=50.0, default_compression="lz4")
    series = control.arm()  # from `na`: initialized first
    assert (series.frame_time_s, series.count_time_s) == (0.02, pytest.approx(0.02 - 100e-9))
    assert api.detector.state == "ready" and api.detector.sequence_id == series.series_id
    assert api.detector.values["compression"] == "lz4"
    control.trigger()
    assert api.detector.state == "acquire"
    assert control.disarm() == series
    assert api.detector.state == "idle"
    assert control.disarm() is None  # nothing armed: nothing to do


def test_a_refusal_or_no_answer_is_one_line_naming_why(api: SimplonServer) -> None:
    too_fast = _control(api.url, default_frame_rate_hz=5000.0)  # the sim's EIGER2 tops at 2 kHz
    with pytest.raises(StationError) as refused:
        too_fast.arm()
    assert str(refused.value) == (
        "arming the detector: detector refused frame_time = 0.0002: frame_time 0.0002 is below"
        " its minimum 0.0005 s (HTTP 400)"
    )
    assert api.detector.state == "idle"  # not armed

    with pytest.raises(StationError, match=r"^triggering the detector: it was not armed$"):
        too_fast.trigger()

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(StationError, match=r"^arming the detector: GET http://\S+ [^\n]+$"):
        _control(url, api_timeout_s=1.0).arm()
