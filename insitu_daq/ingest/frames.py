"""From a decoded Stream V2 image to what the run file stores: geometry and chunks.

Pure functions, no I/O: which `FrameGeometry` a `start` or an image announces (or the config
falls back to), and each channel's chunk for `write_direct_chunk` (the payload as received
when its compression is the file's, else decompressed or handed to the file's filter).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from insitu_daq.core.config import DetectorConfig
from insitu_daq.drivers.stream2 import ImageMessage, StartMessage
from insitu_daq.runfile.writer import FrameGeometry

_STREAM_DTYPES = {"uint8": "|u1", "uint16": "<u2", "uint32": "<u4"}


def _dtype_of_name(name: Any) -> str | None:
    """numpy dtype string of a Stream V2 `image_dtype` such as "uint16le" (None if unknown)."""
    if not isinstance(name, str):
        return None
    match = re.fullmatch(r"(u?int|float)(8|16|32|64)(le|be)?", name.strip().lower())
    if match is None:
        return None
    kind = {"uint": "u", "int": "i", "float": "f"}[match.group(1)]
    size = int(match.group(2)) // 8
    order = "|" if size == 1 else ">" if match.group(3) == "be" else "<"
    return f"{order}{kind}{size}"


def _stored(compression: str | None, detector: DetectorConfig) -> str | None:
    if detector.archive_compression == "none" or compression in (None, "none"):
        return None
    return compression


def geometry_of_image(image: ImageMessage, detector: DetectorConfig) -> FrameGeometry:
    """The file geometry that stores `image` (and the images like it)."""
    first = image.channel()
    return FrameGeometry(
        tuple(image.channels), first.shape, first.dtype.str, _stored(first.compression, detector)
    )


def geometry_of_start(start: StartMessage, detector: DetectorConfig) -> FrameGeometry | None:
    """The geometry a `start` announces, if it says everything (dtype and compression are
    extensions some detectors do not send: then the first image decides)."""
    dtype = _dtype_of_name(start.get("image_dtype"))
    compression = start.get("compression")
    if not start.channels or start.image_shape is None or dtype is None:
        return None
    if compression not in ("bslz4", "lz4", "none", None):
        return None
    return FrameGeometry(
        tuple(start.channels), start.image_shape, dtype, _stored(compression, detector)
    )


def default_geometry(detector: DetectorConfig, start: StartMessage | None = None) -> FrameGeometry:
    """The configured geometry, with channels and shape from a `start` when it has them."""
    channels = tuple(start.channels) if start is not None and start.channels else None
    shape = start.image_shape if start is not None else None
    return FrameGeometry(
        channels or tuple(detector.default_channels),
        shape or (detector.default_shape[0], detector.default_shape[1]),
        _STREAM_DTYPES[detector.default_dtype],
        _stored(detector.default_compression, detector),
    )


def iso_date(value: Any) -> str:
    """A series_date as ISO 8601 text (the decoder hands out datetime, date or str)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else value.isoformat()


class GeometryMismatchError(ValueError):
    """An image that does not fit the open file's geometry."""


def chunks_for_file(
    image: ImageMessage, geometry: FrameGeometry
) -> tuple[dict[str, bytes | memoryview | np.ndarray], bool]:
    """Each channel's chunk for the file, and whether one had to go through the filter.

    A payload already in the file's chunk format is passed on untouched; a compressed one
    for a raw file is decompressed to raw bytes; any other compression becomes an array that
    h5py writes through the file's filter. Raises GeometryMismatchError or MalformedMessage.
    """
    if set(image.channels) != set(geometry.channels):
        raise GeometryMismatchError(
            f"channels {sorted(image.channels)} != {sorted(geometry.channels)}"
        )
    dtype = np.dtype(geometry.dtype)
    chunks: dict[str, bytes | memoryview | np.ndarray] = {}
    refiltered = False
    for name in geometry.channels:
        channel = image.channels[name]
        if channel.shape != geometry.shape or channel.dtype != dtype:
            raise GeometryMismatchError(
                f"channel {name!r} is {channel.shape} {channel.dtype.str}, "
                f"the file holds {geometry.shape} {dtype.str}"
            )
        if channel.compression == geometry.compression:
            chunks[name] = channel.direct_chunk()
        elif geometry.compression is None:
            chunks[name] = channel.to_array().tobytes()
        else:
            chunks[name] = channel.to_array()
            refiltered = True
    return chunks, refiltered
