"""`insitu-daq sim` as a user runs it: a real process, its printed endpoints, Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from insitu_daq.control.instruments.factory import open_source_meter
from insitu_daq.core.config import SourceMeterConfig
from insitu_daq.core.module_command import module_command
from insitu_daq.drivers.holder import OpenCellHolder
from insitu_daq.drivers.microscope import RemoteMicroscope
from insitu_daq.drivers.simplon import SimplonDetector
from insitu_daq.drivers.stream2 import ImageMessage, Stream2Receiver

ENDPOINT_LINE = re.compile(r"^\s+(\w+)\s+(\w+)\s+(\S+)$")


@pytest.fixture
def sim_process():
    command = module_command(
        "insitu_daq", "sim",
        "--source-meter-port", "0", "--holder-port", "0",
        "--microscope-port", "0", "--camera-port", "0", "--camera-api-port", "0",
        "--frame-size", "128", "--frame-rate", "20", "--time-scale", "50",
        "--source-meter", "keithley2450",  # the default, 2400, is every other test's
    )  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    endpoints: dict[tuple[str, str], str] = {}
    deadline = time.monotonic() + 30
    assert process.stdout is not None
    for line in process.stdout:
        match = ENDPOINT_LINE.match(line.rstrip("\n"))
        if match:
            endpoints[(match[1], match[2])] = match[3]
        if line.startswith("Ctrl-C") or time.monotonic() > deadline:
            break
    yield process, endpoints
    if process.poll() is None:
        process.kill()
        process.wait()


def test_sim_serves_every_instrument_and_stops_on_ctrl_c(sim_process) -> None:
    process, endpoints = sim_process
    assert set(endpoints) >= {
        ("source_meter", "visa"),
        ("holder", "serial"),
        ("holder", "url"),
        ("microscope", "tcp"),
        ("camera", "stream2"),
        ("camera_api", "simplon"),
    }, endpoints

    resource = endpoints[("source_meter", "visa")]
    source_meter = open_source_meter(SourceMeterConfig(model="keithley2450", resource=resource))
    try:
        assert source_meter.identify().model == "MODEL 2450"
    finally:
        source_meter.close()

    with OpenCellHolder(endpoints[("holder", "serial")]) as holder:
        assert not holder.in_contact()

    host, port = endpoints[("microscope", "tcp")].rsplit(":", 1)
    with RemoteMicroscope(host, int(port)) as microscope:
        assert microscope.identify()

    with Stream2Receiver(endpoints[("camera", "stream2")], timeout_ms=5000) as receiver:
        images = [m for m in (receiver.receive() for _ in range(4)) if isinstance(m, ImageMessage)]
    assert images, "no image from the simulated camera"
    assert images[0].channel().shape == (128, 128)
    assert SimplonDetector(endpoints[("camera_api", "simplon")]).state() == "na"  # not armed

    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "simulated station stopped" in out
