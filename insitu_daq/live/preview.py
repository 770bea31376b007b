"""Previews for the web view: the analysis' newest dose sum of each mode, never waited on.

The analysis process has the sums the page should show (a dose sum of the newest frames, as
measured). After a result, `PreviewPublisher.offer` sends a copy of that result's sum to the web
process (docs/WEB.md) if one is due for its mode: at most `rate_hz` a mode. An HRTEM sum also
carries the newest phase map. The socket is an XPUB bound at `[web] preview_endpoint`, which
the web process connects to, for three reasons:
- With no page subscribed (no web process, or none yet), the XPUB has heard no subscription, so
  nothing is copied or sent. Watching costs nothing when nobody watches. (It binds because a
  connecting XPUB hears subscriptions late and stale: seen with libzmq 4.3.5.)
- SNDHWM=1 and a non-blocking send: a slow web process misses previews (counted in `dropped`).
  A preview is never queued behind another.
- Either side may start, stop and restart at any time: the web process reconnects by itself.
An endpoint that cannot be bound (taken) turns previews off with a warning; the analysis goes
on.

A message is multipart: `[b"preview", JSON header, sum bytes]`, or with a phase map
`[..., labels bytes]`. The header has `mode`, `time` (run s of the newest frame), `image_id`,
`received_ns` (ingest arrival of that frame, wall ns), `shape`, `dtype` ("<f4"), `pixel_nm`,
`integrated_frames`, and `phase_map`: null, or `{"shape", "tile_px", "origin", "time"}` of the
uint8 labels (analysis/phasemap.py TileClass) that follow.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from insitu_daq.analysis.measurement import HrtemSum, SumContext
from insitu_daq.analysis.phasemap import PhaseMap

log = logging.getLogger(__name__)

TOPIC = b"preview"


@dataclass(frozen=True)
class PreviewTarget:
    """Where previews go (`[web] preview_endpoint`) and how often per mode."""

    endpoint: str
    rate_hz: float


class PreviewPublisher:
    """Offers the analysis' sums to the web view (module docstring). One thread only."""

    def __init__(self, context: zmq.Context, target: PreviewTarget) -> None:
        self._interval_s = 1.0 / target.rate_hz
        self._socket = context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.SNDHWM, 1)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._bound = True
        try:
            self._socket.bind(target.endpoint)
        except zmq.ZMQError as exc:
            self._bound = False
            log.warning("no previews for the web view: %s: %s", target.endpoint, exc)
        self._watched = False
        self._next_due: dict[str, float] = {}  # mode -> monotonic s
        self._phase_map: tuple[PhaseMap, float] | None = None  # the newest, and its run time
        self.sent = 0
        self.dropped = 0

    @property
    def watched(self) -> bool:
        """A web process is subscribed (as far as the subscriptions heard so far say)."""
        if self._bound:
            self._hear_subscriptions()
        return self._watched

    def offer(self, sum_: SumContext, header: dict[str, Any], integrated_frames: int) -> bool:
        """Send `sum_` if a preview of its mode is due and someone watches; True if sent.
        `header` is the newest frame's tap header (image_id, received_ns)."""
        if isinstance(sum_, HrtemSum) and sum_.phase_map is not None:
            self._phase_map = (sum_.phase_map, sum_.time_s)  # kept even when nobody watches
        mode = "hrtem" if isinstance(sum_, HrtemSum) else "lm"
        now = time.monotonic()
        if now < self._next_due.get(mode, 0.0) or not self.watched:
            return False
        self._next_due[mode] = now + self._interval_s
        image = np.array(sum_.summed, dtype="<f4", order="C")  # a copy: the sum runs on
        meta: dict[str, Any] = {
            "mode": mode,
            "time": sum_.time_s,
            "image_id": header.get("image_id"),
            "received_ns": header.get("received_ns"),
            "shape": list(image.shape),
            "dtype": image.dtype.str,
            "pixel_nm": sum_.pixel_nm,
            "integrated_frames": integrated_frames,
            "phase_map": None,
        }
        parts: list[Any] = [TOPIC, b"", image]
        if mode == "hrtem" and self._phase_map is not None:
            mapped, mapped_at = self._phase_map
            labels = np.ascontiguousarray(mapped.labels, dtype=np.uint8)
            meta["phase_map"] = {
                "shape": list(labels.shape),
                "tile_px": mapped.tile_px,
                "origin": list(mapped.origin),
                "time": mapped_at,
            }
            parts.append(labels)
        parts[1] = json.dumps(meta).encode()
        try:
            self._socket.send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def _hear_subscriptions(self) -> None:
        """XPUB hands up subscribe (b"\\x01...") and unsubscribe (b"\\x00...") messages."""
        while True:
            try:
                message = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] in (b"\x00", b"\x01"):
                self._watched = message[:1] == b"\x01"

    def close(self) -> None:
        self._socket.close(linger=0)
