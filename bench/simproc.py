"""Simulated instruments in a child process, for the benchmarks.

On a microscope the source-meter and the camera are other machines: their work must not take
the daemon's GIL or be charged to it. `StationProcess` runs the chosen simulators (on one
SimStation, so the camera sees the bias the source-meter applies) in a spawned process and
talks to it over a pipe: start a replay or a rendered series, stop it, fetch the ground truth.

The truth of each rendered image (its `truth.bias_volts` and capture instant, which the camera
also puts in the image's user_data) is recorded by wrapping the camera's message builder, so a
benchmark can compare the run file against it without decoding the stream a second time.

Scripts that use it need the `if __name__ == "__main__":` guard (spawned processes re-import
the main module).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu_daq.sim import stream2_encode as s2
from insitu_daq.sim.camera import DEFAULT_CHANNEL, SimulatedCamera
from insitu_daq.sim.model import NanobatteryModel
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, Scene
from insitu_daq.sim.sourcemeter import SimulatedSourceMeter
from insitu_daq.sim.station import SimStation

SHAPE = (1024, 1024)
REPLAY_FRAMES = 8


@dataclass(frozen=True)
class ImageTruth:
    """What the simulator knew about one image it sent."""

    series_id: int
    image_id: int
    bias_volts: float  # applied bias at the capture instant (the exposure midpoint)
    capture_wall_ns: int  # time.time_ns() scale
    capture_monotonic: float  # time.monotonic() scale (shared by all processes of the host)


def render_frames(content: str, n: int = REPLAY_FRAMES, shape: tuple[int, int] = SHAPE) -> list:
    """Frames of a transforming cell as the camera renders them, for replay (LM: ~75 counts
    per pixel, ~2.6x with bslz4; HRTEM at the protocol's 35 e/A^2/s: ~0.2 counts/px, ~11x)."""
    model = NanobatteryModel()
    model.tip_position_nm = 0.0
    model.set_beam(True, 35.0)
    optics = Optics()
    optics.set_mode(content)
    renderer = FrameRenderer(shape, seed=1)
    frames = []
    for index in range(n):
        model.x = 0.3 + 0.02 * index
        frame, _ = renderer.render(Scene.capture(model, optics), 0.025, index)
        frames.append(np.ascontiguousarray(frame, dtype="<u2"))
    return frames


class _TruthCamera(SimulatedCamera):
    """The simulated camera, recording each rendered image's ground truth as it is built."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.truths: list[ImageTruth] = []

    def _image_message(  # type: ignore[override]
        self,
        series: Any,
        image_id: int,
        frame: np.ndarray,
        truth: Any,
        model_time: float,
        capture_mono: float,
        start_mono: float,
        fault: Any,
    ) -> bytes:
        self.truths.append(
            ImageTruth(
                series.series_id,
                image_id,
                float(truth.bias_volts),
                series.wall_ns(capture_mono),
                capture_mono,
            )
        )
        return super()._image_message(
            series, image_id, frame, truth, model_time, capture_mono, start_mono, fault
        )


def _serve(
    connection: Any,
    camera_mode: str | None,
    content: str,
    compression: str | None,
    frame_rate_hz: float,
    contact: bool,
    source_meter: bool,
) -> None:
    """Child process: start the instruments, then answer commands until "stop"."""
    logging.basicConfig(level=logging.WARNING)
    station = SimStation()
    with station.model() as model:
        if contact:
            model.tip_position_nm = 0.0  # the tip touches the particle: the cell sees the bias
        model.set_beam(True, 35.0)
    station.optics.set_mode(content)
    instruments: list[Any] = []
    endpoints: dict[str, str] = {}
    camera: _TruthCamera | None = None
    encoded: list[s2.EncodedChannels] = []
    if source_meter:
        meter = SimulatedSourceMeter(station, port=0)
        meter.start()
        instruments.append(meter)
        endpoints.update(meter.endpoints)
    if camera_mode is not None:
        camera = _TruthCamera(
            station, port=0, frame_rate_hz=frame_rate_hz, compression=compression, shape=SHAPE
        )
        camera.start()
        instruments.append(camera)
        endpoints.update(camera.endpoints)
        if camera_mode == "replay":
            encoded = [
                s2.encode_channels({DEFAULT_CHANNEL: frame}, compression)
                for frame in render_frames(content)
            ]
    clock = station.clock
    connection.send({"endpoints": endpoints, "model_t0_monotonic": time.monotonic() - clock.now()})
    try:
        while True:
            op, args = connection.recv()
            reply: Any = None
            if op == "stop":
                break
            assert camera is not None or op not in ("replay", "arm", "disarm", "truth")
            if op == "replay":
                reply = camera.replay(encoded, args["n_images"], rate_hz=args.get("rate_hz"))
            elif op == "arm":
                reply = camera.arm(args.get("n_images"))
            elif op == "disarm":
                reply = camera.disarm()
            elif op == "truth":
                reply = list(camera.truths)
            elif op == "counters":
                reply = {} if camera is None else {
                    "images_sent_total": camera.images_sent_total,
                    "frames_late_total": camera.frames_late_total,
                }  # fmt: skip
            elif op == "bias_history":
                with station.model() as model:
                    reply = list(model.bias_history)
            connection.send(reply)
    finally:
        for instrument in reversed(instruments):
            instrument.stop()
        connection.send("stopped")


class StationProcess:
    """The simulators in a spawned process. camera_mode: None, "replay" (pre-rendered frames
    as fast as taken or at rate_hz) or "render" (the live camera at frame_rate_hz)."""

    def __init__(
        self,
        camera_mode: str | None = None,
        content: str = "hrtem",
        compression: str | None = "bslz4",
        frame_rate_hz: float = 40.0,
        contact: bool = True,
        source_meter: bool = True,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self.process = context.Process(
            target=_serve,
            args=(child_end, camera_mode, content, compression, frame_rate_hz, contact,
                  source_meter),
            name="bench-station",
            daemon=True,
        )  # fmt: skip
        self.endpoints: dict[str, str] = {}
        self.model_t0_monotonic = 0.0  # time.monotonic() at model time 0 (time scale 1)

    def start(self) -> None:
        self.process.start()
        if not self._connection.poll(60):
            raise RuntimeError("the station process did not start")
        hello = self._connection.recv()
        self.endpoints = hello["endpoints"]
        self.model_t0_monotonic = hello["model_t0_monotonic"]

    def call(self, op: str, timeout_s: float = 30.0, **args: Any) -> Any:
        self._connection.send((op, args))
        if not self._connection.poll(timeout_s):
            raise RuntimeError(f"the station process did not answer {op}")
        return self._connection.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(RuntimeError, OSError, EOFError):
                self.call("stop")
            self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)

    def __enter__(self) -> StationProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
