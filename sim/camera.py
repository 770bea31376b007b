"""Simulated fast camera: renders the shared model and streams it as DECTRIS Stream V2.

A ZeroMQ PUSH socket bound on port 31001 (as a DECTRIS DCU), so any Stream V2 client can
read it. `arm()` starts a series: a `start` message, then one `image` per frame, then `end`
on `disarm()` or after `n_images`.

Timing. Frames are produced at `frame_rate_hz` in WALL time, like a real camera: the time
scale of the station speeds up the physics, not the detector. Frame i is due at
arm + i * frame_time (wall). Its exposure lasts `count_time` (frame_time minus 100 ns dead
time, as an EIGER2); the scene is captured once, at the exposure midpoint, from the model at
that instant (`station.clock.now()` model time), so a frame shows the model state at its
midpoint, and its detector `start_time`/`stop_time` are centred on the capture instant. At
time scale s the model moves s * count_time during one exposure; the snapshot does not blur
that. The renderer gets the exposure in model time, s * count_time, so the dose a frame holds
is what that much of the experiment would give: dose per model second (and so what an
analysis summing frames to a dose sees per model second, and the model's cumulative dose
bookkeeping) does not depend on the time scale, while counts per frame grow with it.
Detector times are rationals over a 50 MHz time base
since `series_date` (= `arm_date`, the arm instant), as an EIGER2 sends them.

The station lock is held only to capture the scene (and the station parameters at arm);
rendering, compression and sending happen outside it, so the simulated source-meter is never
kept waiting. When rendering, compressing or a slow receiver makes a frame miss its slot,
nothing is dropped: `frames_late_total` counts it, the schedule restarts from that frame,
and image_id stays consecutive (a real detector keeps its frame numbers). A PUSH socket
without a receiver holds the series (like a full DCU buffer) until one connects or stop().

Each image's `user_data` carries the ground truth of its frame (`truth`, from the renderer),
the model time and run-clock time (ns) of the capture, so alignment can be checked. The start
message uses the spec's field names; `number_of_images` is 0 for a series open until disarm,
`pixel_size_x/y` is the calibrated pixel at the specimen (m, from the microscope's optics),
and `image_dtype`/`compression` are extensions the stored spec revision lacks (clients skip
unknown keys); `user_data` holds the station's parameters.

Fault injection for ingest tests: `arm(faults={image_id: Fault...})`, `inject_fault()` for
the next image, and `send_raw()` for arbitrary bytes. Replay mode (`replay()`) streams a
fixed set of pre-encoded frames as fast as asked, for throughput benchmarks.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import zmq

from . import stream2_encode as s2
from .station import SimStation

log = logging.getLogger(__name__)

DEFAULT_PORT = 31001
DETECTOR_DESCRIPTION = "SIMULATED insitu-daq camera"
DETECTOR_SERIAL_NUMBER = "SIM-0001"
DEFAULT_CHANNEL = "threshold_1"
TIME_BASE_HZ = 50_000_000  # the EIGER2's detector clock
DEAD_TIME_S = 100e-9  # between exposures, as an EIGER2 (real_time = frame_time - 100 ns)
INCIDENT_ENERGY_EV = 200e3  # 200 kV TEM (SCIENCE.md)
SEND_HWM = 8  # messages the PUSH socket queues before the series waits (a finite DCU buffer)
_POLL_MS = 20  # how often a blocked send checks for stop()


def electron_wavelength_angstrom(energy_ev: float) -> float:
    """Relativistic de Broglie wavelength of electrons of kinetic energy `energy_ev`."""
    h, m0, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    ev = e * energy_ev
    return h / math.sqrt(2 * m0 * ev * (1 + ev / (2 * m0 * c * c))) * 1e10


def _count_time(frame_time_s: float) -> float:
    """Exposure per frame: the frame time less the detector's dead time."""
    return max(frame_time_s - DEAD_TIME_S, frame_time_s / 2)


class Fault(str, enum.Enum):
    """Stream faults the camera can inject at an image (for the daemon's ingest tests)."""

    MALFORMED = "malformed"  # a truncated copy of the image message goes out before it
    DUPLICATE = "duplicate"  # the image is sent twice
    GAP = "gap"  # the image is never sent: its image_id is missing from the stream
    SWAP = "swap"  # the image is sent after the next one (out-of-order image_id)
    STALE_SERIES = "stale_series"  # the image carries the previous series' ids


@dataclass
class _Series:
    series_id: int
    unique_id: str
    n_images: int | None
    arm_mono: float  # time.monotonic() at arm
    arm_wall_ns: int  # time.time_ns() at arm
    faults: dict[int, Fault]
    frame_time_s: float | None  # None: replay as fast as possible
    count_time_s: float
    shape: tuple[int, int]  # (rows, cols) of the images
    replay: list[s2.EncodedChannels] | None = None
    finish: threading.Event = field(default_factory=threading.Event)

    @property
    def series_date(self) -> datetime:
        return datetime.fromtimestamp(self.arm_wall_ns / 1e9, tz=timezone.utc)

    def ticks(self, mono: float) -> int:
        """Detector clock ticks since arm at monotonic time `mono`."""
        return max(0, round((mono - self.arm_mono) * TIME_BASE_HZ))

    def wall_ns(self, mono: float) -> int:
        return self.arm_wall_ns + round((mono - self.arm_mono) * 1e9)


class SimulatedCamera:
    """Stream V2 detector over ZeroMQ PUSH, rendering frames from the station's model."""

    def __init__(
        self,
        station: SimStation,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        shape: tuple[int, int] = (1024, 1024),
        frame_rate_hz: float = 40.0,
        compression: str | None = "bslz4",
        seed: int = 0,
        channel: str = DEFAULT_CHANNEL,
    ) -> None:
        if frame_rate_hz <= 0:
            raise ValueError("frame rate must be positive")
        if compression not in s2.COMPRESSIONS:
            raise ValueError(f"compression must be one of {s2.COMPRESSIONS}, not {compression!r}")
        self.station = station
        self.host = host
        self.port = port
        self.shape = (int(shape[0]), int(shape[1]))
        self.frame_rate_hz = float(frame_rate_hz)
        self.compression = compression
        self.seed = seed
        self.channel = channel
        # counters
        self.series_total = 0
        self.images_sent_total = 0
        self.messages_sent_total = 0
        self.frames_late_total = 0
        self.faults_injected_total = 0
        self.errors_total = 0  # series that ended on an internal error (logged)
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._send_lock = threading.Lock()
        self._closing = threading.Event()
        self._series: _Series | None = None
        self._thread: threading.Thread | None = None
        self._next_series_id = 1
        self._pending_faults: collections.deque[Fault] = collections.deque()
        self._renderer: Any = None
        # The SIMPLON API's /stream/api/.../config/mode (sim/simplon.py): "disabled" sends nothing.
        self.stream_enabled = True

    # ----- server shape ---------------------------------------------------------------------
    @property
    def frame_time_s(self) -> float:
        return 1.0 / self.frame_rate_hz

    @property
    def count_time_s(self) -> float:
        return _count_time(self.frame_time_s)

    def start(self) -> None:
        """Bind the PUSH socket; return at once (series run in a thread after arm())."""
        if self._socket is not None:
            return
        self._closing.clear()
        self._context = zmq.Context()
        sock = self._context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        try:
            if self.port == 0:
                sock.bind(f"tcp://{self.host}:*")
                self.port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
            else:
                sock.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError:
            sock.close(linger=0)
            self._context.term()
            self._context = None
            raise
        self._socket = sock
        log.info("simulated camera streaming Stream V2 on %s", self.endpoints["stream2"])

    def stop(self) -> None:
        """Abort any series (no `end` is sent), close the socket, join the thread; idempotent."""
        self._closing.set()
        series = self._series
        if series is not None:
            series.finish.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=10.0)
            if thread.is_alive():
                log.error("camera series thread did not stop within 10 s")
        self._thread = None
        self._series = None
        with self._send_lock:
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None
            if self._context is not None:
                self._context.term()
                self._context = None

    @property
    def endpoints(self) -> dict[str, str]:
        return {"stream2": f"tcp://{self.host}:{self.port}"}

    def __enter__(self) -> SimulatedCamera:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- detector commands ----------------------------------------------------------------
    @property
    def armed(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def prepare(self) -> None:
        """Load the renderer now rather than at the first series (seconds on a cold start:
        its scipy imports); what the SIMPLON API's `initialize` does (sim/simplon.py)."""
        if self._renderer is None:
            from .render import FrameRenderer

            self._renderer = FrameRenderer(self.shape, self.seed)

    @property
    def next_series_id(self) -> int:
        """The series_id the next arm() without one takes."""
        return self._next_series_id

    def arm(
        self,
        n_images: int | None = None,
        series_id: int | None = None,
        faults: Mapping[int, Fault | str] | None = None,
        frame_time_s: float | None = None,
        count_time_s: float | None = None,
    ) -> int:
        """Start a series of `n_images` (None: until disarm); returns its series_id.

        `frame_time_s`, `count_time_s`: this series' timing (the SIMPLON API's configuration,
        sim/simplon.py); default the camera's frame rate, exposing all but the dead time.
        """
        if n_images is not None and n_images < 0:
            raise ValueError("n_images must be >= 0")
        frame_time = self.frame_time_s if frame_time_s is None else frame_time_s
        series = self._new_series(n_images, series_id, faults, frame_time, self.shape)
        if count_time_s is not None:
            series.count_time_s = count_time_s
        self._launch(series)
        return series.series_id

    def replay(
        self,
        frames: Sequence[np.ndarray | s2.EncodedChannels],
        n_images: int,
        rate_hz: float | None = None,
        series_id: int | None = None,
    ) -> int:
        """Stream `n_images` images cycling through fixed frames, encoded once up front.

        `frames` are 2-D arrays (encoded here with the camera's compression) or pre-encoded
        `EncodedChannels`; rate_hz=None sends as fast as the receiver takes them.
        """
        if not frames:
            raise ValueError("replay needs at least one frame")
        if rate_hz is not None and rate_hz <= 0:
            raise ValueError("rate must be positive")
        encoded = [
            f
            if isinstance(f, s2.EncodedChannels)
            else s2.encode_channels({self.channel: np.asarray(f)}, self.compression)
            for f in frames
        ]
        if len({f.shape for f in encoded}) != 1:
            raise ValueError("replay frames differ in shape")
        frame_time = None if rate_hz is None else 1.0 / rate_hz
        series = self._new_series(n_images, series_id, None, frame_time, encoded[0].shape)
        series.replay = encoded
        self._launch(series)
        return series.series_id

    def disarm(self, timeout_s: float = 5.0) -> bool:
        """End the series and send `end`; True once it is out within `timeout_s`.

        A frame already captured is still sent; one waiting for its exposure is not.
        """
        series, thread = self._series, self._thread
        if series is None or thread is None:
            return True
        series.finish.set()
        thread.join(timeout=timeout_s)
        return not thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the current series to end (e.g. after n_images); True if it has."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout=timeout_s)
        return not thread.is_alive()

    def inject_fault(self, kind: Fault | str) -> None:
        """Apply `kind` to the next image the running (or next) series produces."""
        self._pending_faults.append(Fault(kind))

    def send_raw(self, data: bytes, timeout_s: float = 5.0) -> bool:
        """Send arbitrary bytes as one ZeroMQ message (e.g. garbage); True if sent."""
        return self._send(data, deadline=time.monotonic() + timeout_s)

    # ----- series thread --------------------------------------------------------------------
    def _new_series(
        self,
        n_images: int | None,
        series_id: int | None,
        faults: Mapping[int, Fault | str] | None,
        frame_time_s: float | None,
        shape: tuple[int, int],
    ) -> _Series:
        if self._socket is None:
            raise RuntimeError("camera not started")
        if self.armed:
            raise RuntimeError("camera already armed; disarm first")
        if series_id is None:
            series_id = self._next_series_id
        self._next_series_id = series_id + 1
        return _Series(
            series_id=series_id,
            unique_id=uuid.uuid4().hex.upper(),
            n_images=n_images,
            arm_mono=time.monotonic(),
            arm_wall_ns=time.time_ns(),
            faults={int(k): Fault(v) for k, v in (faults or {}).items()},
            frame_time_s=frame_time_s,
            count_time_s=0.0 if frame_time_s is None else _count_time(frame_time_s),
            shape=(int(shape[0]), int(shape[1])),
        )

    def _launch(self, series: _Series) -> None:
        self._series = series
        self.series_total += 1
        self._thread = threading.Thread(
            target=self._run_series, args=(series,), name="sim-camera-series", daemon=True
        )
        self._thread.start()

    def _run_series(self, series: _Series) -> None:
        try:
            if series.replay is None:
                self.prepare()
            # Armed once ready to expose, as a DCU: the series clock starts here.
            series.arm_mono, series.arm_wall_ns = time.monotonic(), time.time_ns()
            if not self._send(self._start_message(series)):
                return
            if series.replay is None:
                self._stream_rendered(series)
            else:
                self._stream_replay(series)
            if not self._closing.is_set():
                self._send(s2.end_message(series.series_id, series.unique_id))
        except Exception:  # the thread must not die silently: log, count, end the series
            self.errors_total += 1
            log.exception("camera series %d failed", series.series_id)
            if not self._closing.is_set():
                self._send(s2.end_message(series.series_id, series.unique_id))

    def _start_message(self, series: _Series) -> bytes:
        with self.station.model() as model:
            params = dataclasses.asdict(model.params)
            optics = self.station.optics
            pixel_size_nm = optics.pixel_size_nm
            optics_state = {
                "mode": optics.mode.value,
                "pixel_size_nm": pixel_size_nm,
                "field_center_nm": list(optics.field_center_nm),
            }
            model_seed = model.seed
        rows, cols = series.shape
        frame_time = series.frame_time_s or 0.0
        return s2.start_message(
            series.series_id,
            series.unique_id,
            series.series_date,
            beam_center_x=cols / 2,
            beam_center_y=rows / 2,
            channels=[self.channel],
            count_time=series.count_time_s,
            countrate_correction_enabled=False,
            detector_description=DETECTOR_DESCRIPTION,
            detector_serial_number=DETECTOR_SERIAL_NUMBER,
            detector_translation=[0.0, 0.0, 0.0],
            flatfield_enabled=False,
            frame_time=frame_time,
            image_size_x=cols,
            image_size_y=rows,
            incident_energy=INCIDENT_ENERGY_EV,
            incident_wavelength=electron_wavelength_angstrom(INCIDENT_ENERGY_EV),
            number_of_images=series.n_images or 0,
            pixel_mask_enabled=False,
            # The calibrated pixel size at the specimen, in metres (what analysis needs).
            pixel_size_x=pixel_size_nm * 1e-9,
            pixel_size_y=pixel_size_nm * 1e-9,
            saturation_value=np.iinfo(np.uint16).max,
            sensor_material="Si",
            sensor_thickness=450e-6,
            threshold_energy={self.channel: INCIDENT_ENERGY_EV / 2},
            virtual_pixel_interpolation_enabled=False,
            # Extensions beyond the stored spec revision (clients skip unknown keys).
            image_dtype="uint16le",
            compression=self.compression or "none",
            user_data={
                "simulated": True,
                "seed": self.seed,
                "model_seed": model_seed,
                "time_scale": self.station.clock.time_scale,
                "replay": series.replay is not None,
                "cell_parameters": params,
                "optics": optics_state,
            },
        )

    def _stream_rendered(self, series: _Series) -> None:
        frame_time = series.frame_time_s or self.frame_time_s
        half = series.count_time_s / 2
        clock = self.station.clock
        # monotonic time of model time 0, to turn a model time into a wall instant
        origin = time.monotonic() - clock.now() / clock.time_scale
        slot = series.arm_mono
        image_id = 0
        held: bytes | None = None  # an image waiting to go out after the next (SWAP)
        while series.n_images is None or image_id < series.n_images:
            if series.finish.is_set():
                break
            now = time.monotonic()
            if now > slot + frame_time:  # missed this frame's slot: count it, restart there
                self.frames_late_total += 1
                slot = now
            fault = self._fault_for(series, image_id)
            if fault is Fault.GAP:
                self.faults_injected_total += 1
                image_id += 1
                slot += frame_time
                continue
            if series.finish.wait(max(0.0, slot + half - time.monotonic())):
                break
            with self.station.model() as model:
                scene = self._capture(model)
                model_time = model.time_s
            capture_mono = origin + model_time / clock.time_scale
            start_mono = capture_mono - half
            exposure_model_s = series.count_time_s * clock.time_scale
            frame, truth = self._render(scene, exposure_model_s, image_id)
            message = self._image_message(
                series, image_id, frame, truth, model_time, capture_mono, start_mono, fault
            )
            exposure_left = start_mono + series.count_time_s - time.monotonic()
            if series.finish.wait(max(0.0, exposure_left)) and self._closing.is_set():
                break  # stop(); a disarm still sends the frame being exposed
            if not self._send_with_fault(series, image_id, message, fault, held):
                return
            held = message if fault is Fault.SWAP else None
            image_id += 1
            slot = max(slot, start_mono) + frame_time
        if held is not None and self._send(held):  # a SWAP on the last image
            self.images_sent_total += 1

    def _send_with_fault(
        self,
        series: _Series,
        image_id: int,
        message: bytes,
        fault: Fault | None,
        held: bytes | None,
    ) -> bool:
        """Send one image as its fault (if any) says; the held SWAP image follows it."""
        if fault is not None:
            self.faults_injected_total += 1
            log.info("camera injects %s at image %d", fault.value, image_id)
        if fault is Fault.SWAP:
            return True  # goes out after the next image
        if fault is Fault.MALFORMED and not self._send(message[: len(message) // 2]):
            return False
        if not self._send(message):
            return False
        self.images_sent_total += 1
        if fault is Fault.DUPLICATE and not self._send(message):
            return False
        if held is not None:
            if not self._send(held):
                return False
            self.images_sent_total += 1
        return True

    def _stream_replay(self, series: _Series) -> None:
        frames = series.replay or []
        frame_time = series.frame_time_s
        slot = series.arm_mono
        previous_stop = 0
        for image_id in range(series.n_images or 0):
            if series.finish.is_set():
                break
            if frame_time is not None:
                if time.monotonic() > slot + frame_time:  # the receiver held us up
                    self.frames_late_total += 1
                    slot = time.monotonic()
                if series.finish.wait(max(0.0, slot - time.monotonic())):
                    break
                start = series.ticks(slot)
                stop = start + round(series.count_time_s * TIME_BASE_HZ)
                slot += frame_time
            else:  # back to back: each image covers the time since the previous one
                start, stop = previous_stop, max(previous_stop, series.ticks(time.monotonic()))
            previous_stop = stop
            message = s2.image_message(
                series.series_id,
                series.unique_id,
                image_id,
                series.series_date,
                (start, TIME_BASE_HZ),
                (stop, TIME_BASE_HZ),
                (stop - start, TIME_BASE_HZ),
                frames[image_id % len(frames)],
                user_data={"replay_index": image_id % len(frames)},
            )
            if not self._send(message):
                return
            self.images_sent_total += 1

    def _fault_for(self, series: _Series, image_id: int) -> Fault | None:
        fault = series.faults.get(image_id)
        if fault is None and self._pending_faults:
            try:
                fault = self._pending_faults.popleft()
            except IndexError:
                fault = None
        return fault

    def _capture(self, model: Any) -> Any:
        from .render import Scene

        return Scene.capture(model, self.station.optics)

    def _render(self, scene: Any, exposure_s: float, image_id: int) -> tuple[np.ndarray, Any]:
        frame, truth = self._renderer.render(scene, exposure_s, image_id)
        frame = np.asarray(frame)
        if frame.dtype != np.dtype("<u2"):
            frame = np.clip(np.rint(frame), 0, np.iinfo(np.uint16).max).astype("<u2")
        return frame, truth

    def _image_message(
        self,
        series: _Series,
        image_id: int,
        frame: np.ndarray,
        truth: Any,
        model_time: float,
        capture_mono: float,
        start_mono: float,
        fault: Fault | None,
    ) -> bytes:
        start = series.ticks(start_mono)
        real = round(series.count_time_s * TIME_BASE_HZ)
        series_id, unique_id = series.series_id, series.unique_id
        if fault is Fault.STALE_SERIES:
            series_id, unique_id = max(0, series_id - 1), "STALE-" + unique_id
        truth_dict = truth.to_dict() if hasattr(truth, "to_dict") else dict(truth)
        return s2.image_message(
            series_id,
            unique_id,
            image_id,
            series.series_date,
            (start, TIME_BASE_HZ),
            (start + real, TIME_BASE_HZ),
            (real, TIME_BASE_HZ),
            {self.channel: frame},
            user_data={
                "truth": truth_dict,
                "model_time_s": model_time,
                "capture_time_ns": series.wall_ns(capture_mono),
            },
            compression=self.compression,
        )

    # ----- transport ------------------------------------------------------------------------
    def _send(self, data: bytes, deadline: float | None = None) -> bool:
        """Send one message; wait (polling for stop()) while no receiver takes it."""
        if not self.stream_enabled:  # the DCU's stream output is off: nothing leaves
            return True
        while not self._closing.is_set():
            with self._send_lock:
                sock = self._socket
                if sock is None:
                    return False
                if sock.poll(_POLL_MS, zmq.POLLOUT):
                    try:
                        # copied (the default): zero-copy sends start pyzmq's garbage
                        # collector thread, which would outlive the camera
                        sock.send(data, zmq.NOBLOCK)
                    except zmq.Again:  # the peer went away between poll and send
                        pass
                    else:
                        self.messages_sent_total += 1
                        return True
            if deadline is not None and time.monotonic() > deadline:
                return False
        return False
