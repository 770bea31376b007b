"""Frame-tap messages, the ingest's contract with the analysis process: parse and decode.

A message is [header JSON, payload]; header {"image_id", "series_id", "frame_time" (run-clock
s), "shape": [h, w], "dtype": "<u2", "compression": "bslz4" | "lz4" | null, "received_ns"};
payload = the chunk as written to the file (HDF5 filter framing) or the raw pixels. Only the
analysed frame is decompressed (live/process.py decides which).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from insitu_daq.drivers.stream2 import MalformedMessage, bslz4_decompress, lz4_decompress

DTYPES = ("<u1", "<u2", "<u4", "|u1", "uint8", "uint16", "uint32")


class FrameHeaderError(ValueError):
    """A frame-tap header that does not follow the contract (one-line reason)."""


def parse_header(raw: bytes) -> dict[str, Any]:
    """The checked header of a tap message (FrameHeaderError if it breaks the contract)."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameHeaderError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameHeaderError("header is not an object")
    try:
        shape = tuple(int(n) for n in header["shape"])
        frame_time = float(header["frame_time"])
        dtype = str(header.get("dtype", "<u2"))
    except (KeyError, TypeError, ValueError) as exc:
        raise FrameHeaderError(f"header field missing or wrong: {exc}") from None
    if len(shape) != 2 or min(shape) <= 0 or not math.isfinite(frame_time):
        raise FrameHeaderError(f"bad shape {shape} or frame_time {frame_time}")
    if dtype not in DTYPES:
        raise FrameHeaderError(f"dtype {dtype!r} not one of {DTYPES}")
    compression = header.get("compression")
    if compression not in ("bslz4", "lz4", None):
        raise FrameHeaderError(f"compression {compression!r} unknown")
    header.update(shape=shape, frame_time=frame_time, dtype=dtype)
    return header


def decode_frame(header: dict[str, Any], payload: bytes | memoryview) -> np.ndarray:
    """The 2-D pixel array of a tap message (MalformedMessage if the payload is wrong)."""
    shape, dtype = header["shape"], np.dtype(header["dtype"])
    count = shape[0] * shape[1]
    compression = header.get("compression")
    if compression == "bslz4":
        pixels = bslz4_decompress(bytes(payload), dtype, count)
    elif compression == "lz4":
        pixels = np.frombuffer(lz4_decompress(bytes(payload), count * dtype.itemsize), dtype)
    else:
        if len(payload) != count * dtype.itemsize:
            raise MalformedMessage(f"raw payload of {len(payload)} bytes for {shape} {dtype}")
        pixels = np.frombuffer(payload, dtype)
    return pixels.reshape(shape)
