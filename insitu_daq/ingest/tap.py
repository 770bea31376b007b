"""The frame tap: images of an open run offered to the live-analysis process, never waited on.

The ingest process BINDS a ZeroMQ PUSH socket at the configured analysis endpoint (the
analysis process connects a PULL). An image taken while a run is open is offered as its first
channel in two frames:

- a JSON header: {"image_id", "series_id", "frame_time" (run-clock s, exposure midpoint),
  "shape": [rows, cols], "dtype" (numpy str, e.g. "<u2"), "compression" ("bslz4" | "lz4" |
  null), "received_ns" (time.time_ns() at arrival)};
- the payload exactly as received: bslz4/lz4 bytes in HDF5 filter framing (the bytes the run
  file's chunk holds) or raw pixels. It is sent zero-copy out of the received ZeroMQ frame.

Why so: ingest must never slow down for analysis, in two ways.
- It never waits: SNDHWM=2 and a non-blocking send mean a slow or absent analysis only
  misses frames; each miss is counted (`offers_skipped`), sent frames in `offers_sent`.
  LINGER=0: nothing queued for a dead peer holds up shutdown.
- It has priority. The ingest tells each offer whether it is behind (more detector messages
  already waiting once this image was handled: ingest/process.py). An image offered while
  behind is held back instead of sent; a newer one replaces it (the older one is then
  withheld for good, counted in `offers_withheld`), and the one held when the ingest has
  caught up (`caught_up()`) is sent then: the newest image, once the ingest has time for it.
  Why: on two cores, the analysis's FFTs (a 1024 x 1024 float32 FFT streams ~12 MB through
  the cache and memory bandwidth the cores share) raised the ingest's own CPU per bslz4 frame
  from 0.32 to 0.41-0.49 ms whenever they ran during a backlog. With offers withheld, a 2 s
  backlog sends the analysis 4-8 frames instead of 120-250, and the ingest's CPU per frame is
  that of an ingest without analysis (bench/README.md, live analysis).
- The analysis never starves: even while the ingest is behind, an image is offered once
  `1 / min_rate_hz` s have passed since the last offer (`[analysis] min_rate_hz`). An offer
  the full queue refused counts too: the analysis has frames waiting then, and trying again
  on every frame of a backlog would cost ~8 us a frame for nothing.
At a camera's steady rate the ingest is caught up after every frame, so every frame is sent
at once, as before; only a backlog (a burst, a slow disk, a loaded PC) withholds frames.
"""

from __future__ import annotations

import json
import logging
import time

import zmq

from insitu_daq.drivers.stream2 import ImageMessage

log = logging.getLogger(__name__)

TAP_HWM = 2


def tap_header(image: ImageMessage, frame_time: float) -> bytes:
    """The JSON header of one offered image (its first channel)."""
    channel = image.channel()
    return json.dumps(
        {
            "image_id": image.image_id,
            "series_id": image.series_id,
            "frame_time": frame_time,
            "shape": list(channel.shape),
            "dtype": channel.dtype.str,
            "compression": channel.compression,
            "received_ns": image.received_ns,
        }
    ).encode()


class AnalysisTap:
    """A bound PUSH socket offering frames without ever blocking (see the module docstring)."""

    def __init__(self, context: zmq.Context, endpoint: str, min_rate_hz: float) -> None:
        if not min_rate_hz > 0:
            raise ValueError(f"min_rate_hz must be > 0, not {min_rate_hz}")
        self.endpoint = endpoint
        self.offers_sent = 0
        self.offers_skipped = 0  # the analysis's queue was full
        self.offers_withheld = 0  # held back while behind, then replaced or its run closed
        self.last_offered_id: int | None = None  # image_id of the last send tried
        self._floor_interval_s = 1.0 / min_rate_hz
        self._last_offer = float("-inf")  # monotonic s of the last send tried
        self._held: tuple[ImageMessage, float] | None = None  # (image, frame_time)
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, TAP_HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError:
            self._socket.close(linger=0)
            raise
        self.bound_endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def offer(self, image: ImageMessage, frame_time: float, behind: bool = False) -> bool:
        """Send the image's first channel now, or hold it back while the ingest is behind.

        behind: more detector messages are waiting. The image is then held (replacing, and
        withholding, an older held one) unless `1 / min_rate_hz` s have passed since the last
        offer. True if it was sent; a full analysis queue is a skip (counted).
        """
        now = time.monotonic()
        if behind and now - self._last_offer < self._floor_interval_s:
            if self._held is not None:
                self.offers_withheld += 1
            self._held = (image, frame_time)
            return False
        self.discard_held()  # this newer one goes instead
        return self._send(image, frame_time, now)

    @property
    def holding(self) -> bool:
        """An image is held back, waiting for the ingest to catch up."""
        return self._held is not None

    def caught_up(self) -> bool:
        """The ingest has caught up: send the image held back, if any (True if sent)."""
        held, self._held = self._held, None
        return held is not None and self._send(*held, time.monotonic())

    def discard_held(self) -> None:
        """Withhold the held image for good (a newer one is sent, or its run closed)."""
        if self._held is not None:
            self.offers_withheld += 1
            self._held = None

    def _send(self, image: ImageMessage, frame_time: float, now: float) -> bool:
        self._last_offer = now
        self.last_offered_id = image.image_id
        header = tap_header(image, frame_time)
        try:
            self._socket.send_multipart(
                [header, image.channel().payload], copy=False, flags=zmq.NOBLOCK
            )
        except zmq.Again:
            self.offers_skipped += 1
            return False
        self.offers_sent += 1
        return True

    def close(self) -> None:
        self._held = None
        self._socket.close(linger=0)
