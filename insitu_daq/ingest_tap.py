"""The frame tap: each image of an open run offered to the live-analysis process, never waited on.

The ingest process BINDS a ZeroMQ PUSH socket at the configured analysis endpoint (the
analysis process connects a PULL). For every image taken while a run is open it offers the
image's first channel as two frames:

- a JSON header: {"image_id", "series_id", "frame_time" (run-clock s, exposure midpoint),
  "shape": [rows, cols], "dtype" (numpy str, e.g. "<u2"), "compression" ("bslz4" | "lz4" |
  null), "received_ns" (time.time_ns() at arrival)};
- the payload exactly as received: bslz4/lz4 bytes in HDF5 filter framing (the bytes the run
  file's chunk holds) or raw pixels. It is sent zero-copy out of the received ZeroMQ frame.

Why so: ingest must never slow down for analysis. SNDHWM=2 and a non-blocking send mean a
slow or absent analysis only misses frames; each miss is counted (`offers_skipped`), sent
frames in `offers_sent`. LINGER=0: nothing queued for a dead peer holds up shutdown.
"""

from __future__ import annotations

import json
import logging

import zmq

from .drivers.stream2 import ImageMessage

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

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self.offers_sent = 0
        self.offers_skipped = 0
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, TAP_HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError:
            self._socket.close(linger=0)
            raise
        self.bound_endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def offer(self, image: ImageMessage, frame_time: float) -> bool:
        """Send the image's first channel if the analysis can take it now; else count a skip."""
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
        self._socket.close(linger=0)
