"""What flows into the live state: the daemon's event stream, and the analysis' previews.

Each feed is one thread with its own ZeroMQ socket. Both reconnect by themselves (ZeroMQ
does), so the web process may start before the daemon, and outlive or outwait a restart.

The preview feed subscribes only while a page is connected, so with nobody watching the
analysis process copies no sum and this process encodes nothing (live/preview.py hears the
subscription come and go). Holding the newest preview for a late page instead (subscribed
throughout, ~32 MB/s of sums over loopback) was tried: in that CI run the no-bias control's
analysis made 43 results where its test asks for more than 50 (the cause not proven). Watching
must cost nothing when nobody watches. It takes only the newest preview of
each mode: it drains its socket before encoding, and a preview older than one already waiting
is dropped (counted). Encoding runs here, once a preview, not once a viewer.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import zmq

from insitu_daq.core.config import StationConfig
from insitu_daq.live.preview import TOPIC
from insitu_daq.service.api.events import EventSubscriber
from insitu_daq.web.images import (
    PHASE_LEGEND,
    encode_png,
    frame_jpeg,
    frame_meta,
    phase_overlay,
    smoothing_of,
    spectrum_jpeg,
)
from insitu_daq.web.state import LiveState

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a feed thread looks at its stop flag
OVERLAY_REDUCTION = 4  # the phase overlay is made at 1/4 of the shown image's size


class EventFeed(threading.Thread):
    """The daemon's event stream into the live state."""

    def __init__(self, config: StationConfig, state: LiveState) -> None:
        super().__init__(name="event feed", daemon=True)
        self._config, self._state = config, state
        self._stop_flag = threading.Event()

    def run(self) -> None:
        handlers = {
            "status": self._state.on_status,
            "bias": self._state.on_bias,
            "analysis": self._state.on_analysis,
            "event": self._state.on_event,
            "series": self._state.on_series,
        }
        # On the daemon's PC, over loopback: the stream needs no CURVE keys there (core/config.py
        # requires them only off loopback, where the web process is not meant to run).
        with EventSubscriber(self._config.api.events) as subscriber:
            while not self._stop_flag.is_set():
                message = subscriber.receive(POLL_S)
                if message is None:
                    continue
                topic, payload = message
                try:
                    handlers[topic](payload)
                except Exception:  # one odd message must not end the page's feed
                    self._state.counters["feed_errors"] += 1
                    log.exception("event %s not shown", topic)

    def stop(self) -> None:
        self._stop_flag.set()


class PreviewFeed(threading.Thread):
    """The analysis process's previews (live/preview.py) into the live state, as PNGs."""

    def __init__(self, config: StationConfig, state: LiveState) -> None:
        super().__init__(name="preview feed", daemon=True)
        self._endpoint = config.web.preview_endpoint
        self._table = config.analysis.table()
        self._state = state
        self._stop_flag = threading.Event()
        self._phase_map_time: float | None = None
        self.received = 0
        self.dropped = 0  # older previews skipped for a newer one of the same mode
        self.malformed = 0

    def run(self) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, 4)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self._endpoint)
        subscribed = False
        try:
            while not self._stop_flag.is_set():
                watched = self._state.viewers > 0
                if watched != subscribed:
                    socket.setsockopt(zmq.SUBSCRIBE if watched else zmq.UNSUBSCRIBE, TOPIC)
                    subscribed = watched
                if not socket.poll(int(POLL_S * 1000)):
                    continue
                newest: dict[str, tuple[list[zmq.Frame], int]] = {}
                while socket.poll(0):  # drain: only the newest of each mode is shown
                    parts = socket.recv_multipart(copy=False)
                    arrived_ns = time.time_ns()
                    self.received += 1
                    mode = self._mode_of(parts)
                    if mode is None:
                        continue
                    if mode in newest:
                        self.dropped += 1
                    newest[mode] = (parts, arrived_ns)
                for parts, arrived_ns in newest.values():
                    self._show(parts, arrived_ns)
        finally:
            socket.close(linger=0)
            context.term()

    def stop(self) -> None:
        self._stop_flag.set()

    def _mode_of(self, parts: list[zmq.Frame]) -> str | None:
        try:
            meta = json.loads(parts[1].bytes)
            mode = meta["mode"]
            if mode not in ("hrtem", "lm"):
                raise ValueError(f"mode {mode!r}")
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            self.malformed += 1
            log.warning("preview skipped: %s", exc)
            return None
        return str(mode)

    def _show(self, parts: list[zmq.Frame], arrived_ns: int) -> None:
        try:
            meta = json.loads(parts[1].bytes)
            image = np.frombuffer(parts[2].buffer, dtype=meta["dtype"]).reshape(meta["shape"])
            image = image.copy()  # the frame's buffer goes back to ZeroMQ
            pixel_nm = float(meta["pixel_nm"])
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            self.malformed += 1
            log.warning("preview skipped: %s", exc)
            return
        mode = meta["mode"]
        common = {
            key: meta.get(key) for key in ("time", "image_id", "received_ns", "integrated_frames")
        }
        # When the preview reached this process: splits the page's frame-to-screen latency
        # into the analysis' part and the page's.
        common["arrived_ns"] = arrived_ns
        jpeg, shown = frame_jpeg(image, smoothing_px=smoothing_of(mode))
        self._state.set_preview(
            mode, {**common, **frame_meta(image, pixel_nm, shown)}, jpeg, source=image
        )
        if mode != "hrtem":
            return
        spectrum, rings = spectrum_jpeg(image, pixel_nm, self._table)
        self._state.set_preview("fft", {**common, **rings}, spectrum)
        mapped = meta.get("phase_map")
        # A map is made every phase_map_interval_s: the same one comes with several sums.
        if mapped and len(parts) > 3 and mapped.get("time") != self._phase_map_time:
            self._phase_map_time = mapped.get("time")
            labels = np.frombuffer(parts[3].buffer, np.uint8).reshape(mapped["shape"])
            # A quarter of the shown size, scaled up by the page (pixelated): ~1 ms to make
            # and encode where the full shown size took ~13 ms (bench/README.md).
            quarter = (max(1, shown[0] // OVERLAY_REDUCTION), max(1, shown[1] // OVERLAY_REDUCTION))
            overlay = phase_overlay(
                labels, int(mapped["tile_px"]), tuple(mapped["origin"]), image.shape, quarter
            )
            self._state.set_preview(
                "phase",
                {**common, "time": mapped.get("time"), "legend": PHASE_LEGEND},
                encode_png(overlay),
                media_type="image/png",
            )
