"""The SIMPLON driver against the simulated camera's REST API, over real HTTP, with the frames
read from its Stream V2 output by the real receiver over real ZeroMQ (loopback, free ports)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from insitu_daq.drivers.simplon import SimplonDetector, SimplonError, SimplonRefused
from insitu_daq.drivers.stream2 import (
    EndMessage,
    ImageMessage,
    Message,
    StartMessage,
    Stream2Receiver,
)
from insitu_daq.sim.camera import SimulatedCamera
from insitu_daq.sim.simplon import SimplonServer
from insitu_daq.sim.station import SimStation

SHAPE = (32, 32)


@pytest.fixture
def camera() -> Iterator[SimulatedCamera]:
    camera = SimulatedCamera(SimStation(seed=0), port=0, shape=SHAPE, frame_rate_hz=100.0)
    with camera:
        yield camera


@pytest.fixture
def api(camera: SimulatedCamera) -> Iterator[SimplonServer]:
    with SimplonServer(camera, port=0) as server:
        yield server


@pytest.fixture
def receiver(camera: SimulatedCamera) -> Iterator[Stream2Receiver]:
    with Stream2Receiver(camera.endpoints["stream2"], timeout_ms=5000) as receiver:
        yield receiver


def _until_end(receiver: Stream2Receiver, series_id: int) -> list[Message]:
    """Messages up to the `end` of series `series_id` (fails on a 5 s silence)."""
    messages: list[Message] = []
    while True:
        message = receiver.receive()
        assert message is not None, f"stream stalled after {messages[-3:]}"
        messages.append(message)
        if isinstance(message, EndMessage) and message.series_id == series_id:
            return messages


def test_armed_series_streams_under_its_sequence_id_and_disarm_ends_it(
    camera: SimulatedCamera, api: SimplonServer, receiver: Stream2Receiver
) -> None:
    detector = SimplonDetector(api.url, timeout_s=5.0)
    free_running = camera.arm()  # as `insitu-daq sim` starts it: listen-only until armed
    assert isinstance(receiver.receive(), StartMessage)
    assert detector.state() == "na"
    detector.initialize()
    assert detector.state() == "idle"
    assert detector.readout_time() == pytest.approx(100e-9)

    detector.configure(count_time=0.009, frame_time=0.01, nimages=3, ntrigger=2, compression="lz4")
    sequence_id = detector.arm()
    assert sequence_id > free_running
    assert detector.state() == "ready"
    _until_end(receiver, free_running)  # arming ended the free-running series

    detector.trigger(timeout_s=10.0)  # "ints": returns once the series is acquired
    assert detector.state() == "idle"
    messages = _until_end(receiver, sequence_id)
    start, images = messages[0], [m for m in messages if isinstance(m, ImageMessage)]
    assert isinstance(start, StartMessage) and start.series_id == sequence_id
    assert (start.number_of_images, start.frame_time, start.count_time) == (6, 0.01, 0.009)
    assert [(m.series_id, m.image_id) for m in images] == [(sequence_id, i) for i in range(6)]
    assert {m.channel().compression for m in images} == {"lz4"}
    assert all(m.real_time_s == pytest.approx(0.009) for m in images)

    # Open-ended (nimages large): disarm ends it, with the stream's `end`.
    detector.set_nimages(1_000_000)
    second = detector.arm()
    assert second == sequence_id + 1
    trigger = threading.Thread(target=detector.trigger, kwargs={"timeout_s": 30.0})
    trigger.start()
    first = receiver.receive()
    assert isinstance(first, StartMessage) and first.series_id == second
    assert isinstance(receiver.receive(), ImageMessage)
    assert detector.state() == "acquire"
    detector.disarm()
    trigger.join(5.0)
    assert not trigger.is_alive()  # the trigger request returned at the disarm
    assert isinstance(_until_end(receiver, second)[-1], EndMessage)
    assert detector.state() == "idle"


def test_refusals_name_the_parameter_and_an_absent_detector_is_one_line(
    api: SimplonServer,
) -> None:
    detector = SimplonDetector(api.url)
    detector.initialize()
    with pytest.raises(SimplonRefused) as refused:
        detector.set_count_time(5000.0)
    assert str(refused.value) == (
        "detector refused count_time = 5000.0: count_time 5000 is above its maximum 3600 s"
        " (HTTP 400)"
    )
    assert refused.value.name == "count_time = 5000.0"
    for set_value, name in (
        (lambda: detector.set_nimages(0), "nimages"),
        (lambda: detector.set_frame_time(1e-5), "frame_time"),
        (lambda: detector.set_compression("gzip"), "compression"),
        (lambda: detector.set_trigger_mode("exte"), "trigger_mode"),
        (detector.trigger, "trigger"),  # not armed
    ):
        with pytest.raises(SimplonRefused, match=rf"^detector refused {name}\b[^\n]*$"):
            set_value()
    assert detector.config("nimages") == 1  # nothing refused was kept
    detector.arm()
    with pytest.raises(SimplonRefused, match="cannot set nimages while ready"):
        detector.set_nimages(5)
    detector.disarm()

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(SimplonError, match=r"^GET http://[^\n]*/status/state: [^\n]+$"):
        SimplonDetector(url, timeout_s=1.0).state()
