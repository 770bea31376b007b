"""The decoded Stream V2 messages (`start`, `image`, `end`), built and checked from the CBOR
map: `decode_message`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from fractions import Fraction
from typing import Any

import numpy as np

from .cbor import (
    SELF_DESCRIBED_CBOR,
    TYPED_ARRAY_DTYPES,
    Compressed,
    MultiDimArray,
    TypedArray,
    decode_cbor,
    decode_views,
    tag_hook,
)
from .compression import (
    HDF5_FILTER_BITSHUFFLE,
    HDF5_FILTER_LZ4,
    MalformedMessage,
    bslz4_decompress,
    check_bslz4_framing,
    check_lz4_framing,
    hdf5_filter_options,
    lz4_decompress,
)


@dataclass(frozen=True)
class ChannelData:
    """One channel of an image, its pixels still as received."""

    name: str
    shape: tuple[int, int]  # (rows, cols) = (image_size_y, image_size_x)
    dtype: np.dtype  # from the typed-array tag, with its byte order
    typed_array_tag: int
    compression: str | None  # "bslz4" | "lz4" | None
    element_size: int
    payload: bytes | memoryview  # compressed (HDF5 filter framing) or raw pixel bytes

    @property
    def nbytes(self) -> int:
        """Size of the decompressed pixels."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def to_array(self) -> np.ndarray:
        """The pixels as a (rows, cols) array, decompressing if needed (analysis only)."""
        count = self.shape[0] * self.shape[1]
        if self.compression == "bslz4":
            flat = bslz4_decompress(self.payload, self.dtype, count)
        elif self.compression == "lz4":
            flat = np.frombuffer(lz4_decompress(self.payload, self.nbytes), dtype=self.dtype)
        else:
            flat = np.frombuffer(self.payload, dtype=self.dtype)
        return flat.reshape(self.shape)

    def direct_chunk(self) -> bytes | memoryview:
        """The bytes of one HDF5 chunk (1, rows, cols) for `write_direct_chunk`, as received.

        The dataset must be created with `hdf5_filter()` and this channel's dtype; a bslz4
        or lz4 payload is already in that filter's chunk format.
        """
        return self.payload

    @property
    def hdf5_filter_id(self) -> int | None:
        """The HDF5 filter whose chunk format the payload has (None: raw pixels)."""
        return {"bslz4": HDF5_FILTER_BITSHUFFLE, "lz4": HDF5_FILTER_LZ4}.get(self.compression)

    def hdf5_filter(self) -> Mapping[str, Any]:
        """h5py create_dataset keywords of the filter that reads `direct_chunk()` back."""
        return hdf5_filter_options(self.compression)


@dataclass(frozen=True)
class StartMessage:
    """`start`: the series configuration. Known fields as attributes, all of them in `fields`."""

    series_id: int
    series_unique_id: str
    fields: Mapping[str, Any]
    received_ns: int | None = None
    type: str = field(default="start", init=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def channels(self) -> list[str]:
        return list(self.fields.get("channels", []))

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(rows, cols) from image_size_y, image_size_x."""
        rows, cols = self.fields.get("image_size_y"), self.fields.get("image_size_x")
        return None if rows is None or cols is None else (rows, cols)

    @property
    def arm_date(self) -> datetime | date | None:
        return self.fields.get("arm_date")

    @property
    def number_of_images(self) -> int | None:
        return self.fields.get("number_of_images")

    @property
    def count_time(self) -> float | None:
        return self.fields.get("count_time")

    @property
    def frame_time(self) -> float | None:
        return self.fields.get("frame_time")

    @property
    def pixel_size(self) -> tuple[float, float] | None:
        """(x, y) pixel size as sent."""
        x, y = self.fields.get("pixel_size_x"), self.fields.get("pixel_size_y")
        return None if x is None or y is None else (x, y)

    @property
    def detector_description(self) -> str | None:
        return self.fields.get("detector_description")

    @property
    def user_data(self) -> Any:
        return self.fields.get("user_data")


@dataclass(frozen=True)
class ImageMessage:
    """`image`: one exposure. Times are exact (`Fraction` s since `series_date`)."""

    series_id: int
    series_unique_id: str
    image_id: int
    start_time: Fraction
    stop_time: Fraction
    real_time: Fraction
    time_base_hz: int  # the rationals' denominator as sent: the detector clock's frequency
    series_date: datetime | date | None
    user_data: Any
    channels: Mapping[str, ChannelData]  # in the order sent
    received_ns: int | None = None
    type: str = field(default="image", init=False)

    @property
    def start_time_s(self) -> float:
        return float(self.start_time)

    @property
    def stop_time_s(self) -> float:
        return float(self.stop_time)

    @property
    def real_time_s(self) -> float:
        return float(self.real_time)

    @property
    def mid_time(self) -> Fraction:
        """Exposure midpoint on the detector clock."""
        return (self.start_time + self.stop_time) / 2

    def channel(self, name: str | None = None) -> ChannelData:
        """A channel by name, or the first one."""
        if name is None:
            return next(iter(self.channels.values()))
        return self.channels[name]

    def decompress(self) -> dict[str, np.ndarray]:
        """All channels as arrays (decompressing: analysis path only)."""
        return {name: ch.to_array() for name, ch in self.channels.items()}


@dataclass(frozen=True)
class EndMessage:
    """`end`: the series is over."""

    series_id: int
    series_unique_id: str
    received_ns: int | None = None
    type: str = field(default="end", init=False)


Message = StartMessage | ImageMessage | EndMessage


def _require(msg: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in msg:
        raise MalformedMessage(f"{what} message has no {key!r}")
    value = msg[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise MalformedMessage(f"{what} {key!r} is {type(value).__name__}, not {_names(kind)}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return "/".join(k.__name__ for k in _as_tuple(kind))


def _uint(msg: Mapping[str, Any], key: str, what: str) -> int:
    value = _require(msg, key, int, what)
    if value < 0:
        raise MalformedMessage(f"{what} {key!r} is negative")
    return value


def _rational(msg: Mapping[str, Any], key: str) -> tuple[Fraction, int]:
    """A Stream V2 Rational [numerator, denominator] (tag 30 Fractions accepted too)."""
    if key not in msg:
        raise MalformedMessage(f"image message has no {key!r}")
    value = msg[key]
    if isinstance(value, Fraction):
        return value, value.denominator
    if (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        and value[1] > 0
    ):
        return Fraction(value[0], value[1]), value[1]
    raise MalformedMessage(f"image {key!r} is not a rational [numerator, denominator > 0]")


def _channel(name: Any, value: Any) -> ChannelData:
    if not isinstance(name, str):
        raise MalformedMessage(f"image data key {name!r} is not a channel name")
    if not isinstance(value, MultiDimArray):
        raise MalformedMessage(f"channel {name!r} is not a MultiDimArray (tag 40)")
    dims = value.dims
    if (
        not isinstance(dims, Sequence)
        or isinstance(dims, (str, bytes))
        or len(dims) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
    ):
        raise MalformedMessage(f"channel {name!r} dimensions {dims!r} are not [rows, cols]")
    typed = value.array
    if not isinstance(typed, TypedArray):
        raise MalformedMessage(f"channel {name!r} is not an RFC 8746 typed array")
    dtype = TYPED_ARRAY_DTYPES.get(typed.tag)
    if dtype is None:
        raise MalformedMessage(f"channel {name!r} typed-array tag {typed.tag} is not supported")
    shape = (dims[0], dims[1])
    nbytes = shape[0] * shape[1] * dtype.itemsize
    body = typed.body
    if isinstance(body, (bytes, memoryview)):
        if len(body) != nbytes:
            raise MalformedMessage(
                f"channel {name!r} has {len(body)} bytes, {shape} {dtype.str} needs {nbytes}"
            )
        return ChannelData(name, shape, dtype, typed.tag, None, dtype.itemsize, body)
    if not isinstance(body, Compressed):
        raise MalformedMessage(f"channel {name!r} typed array holds {type(body).__name__}")
    algorithm, element_size, payload = body.algorithm, body.element_size, body.payload
    if algorithm not in ("bslz4", "lz4"):
        raise MalformedMessage(f"channel {name!r} compression {algorithm!r} is not supported")
    if not isinstance(element_size, int) or not isinstance(payload, (bytes, memoryview)):
        raise MalformedMessage(f"channel {name!r} tag 56500 is not [text, uint, bytes]")
    if algorithm == "bslz4" and element_size != dtype.itemsize:
        raise MalformedMessage(
            f"channel {name!r} bslz4 element size {element_size} != {dtype.str} item size"
        )
    try:
        if algorithm == "bslz4":
            check_bslz4_framing(payload, dtype, shape[0] * shape[1])
        else:
            check_lz4_framing(payload, nbytes)
    except MalformedMessage as exc:
        raise MalformedMessage(f"channel {name!r}: {exc}") from None
    return ChannelData(name, shape, dtype, typed.tag, algorithm, dtype.itemsize, payload)


def _image(msg: Mapping[str, Any], received_ns: int | None) -> ImageMessage:
    data = _require(msg, "data", Mapping, "image")
    if not data:
        raise MalformedMessage("image message has no channels")
    channels = {name: _channel(name, value) for name, value in data.items()}
    start_time, time_base = _rational(msg, "start_time")
    stop_time, _ = _rational(msg, "stop_time")
    real_time, _ = _rational(msg, "real_time")
    series_date = msg.get("series_date")
    if series_date is not None and not isinstance(series_date, (datetime, date, str)):
        raise MalformedMessage(f"image 'series_date' is {type(series_date).__name__}")
    return ImageMessage(
        series_id=_uint(msg, "series_id", "image"),
        series_unique_id=_require(msg, "series_unique_id", str, "image"),
        image_id=_uint(msg, "image_id", "image"),
        start_time=start_time,
        stop_time=stop_time,
        real_time=real_time,
        time_base_hz=time_base,
        series_date=series_date,
        user_data=_thaw(msg.get("user_data")),
        channels=channels,
        received_ns=received_ns,
    )


def _start(msg: Mapping[str, Any], received_ns: int | None) -> StartMessage:
    channels = msg.get("channels", [])
    if not isinstance(channels, Sequence) or not all(isinstance(c, str) for c in channels):
        raise MalformedMessage("start 'channels' is not an array of text")
    for key in ("image_size_x", "image_size_y", "number_of_images"):
        if key in msg:
            _uint(msg, key, "start")
    return StartMessage(
        series_id=_uint(msg, "series_id", "start"),
        series_unique_id=_require(msg, "series_unique_id", str, "start"),
        fields=_thaw(msg),
        received_ns=received_ns,
    )


def _thaw(value: Any, name: str = "") -> Any:
    """Plain dicts and lists (cbor2 6 may hand out frozendicts and tuples); arrays such as a
    start message's flatfield or pixel_mask become ChannelData."""
    if isinstance(value, Mapping):
        return {k: _thaw(v, str(k)) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, MultiDimArray):
        return _channel(name, value)
    if isinstance(value, memoryview):  # a large byte string outside an image: plain bytes
        return bytes(value)
    return value


def decode_message(buf: bytes | bytearray | memoryview, received_ns: int | None = None) -> Message:
    """Decode one Stream V2 message (one ZeroMQ message) without decompressing pixels.

    Image payloads are read-only views into `buf` (which they keep alive), not copies.
    """
    view = memoryview(buf).cast("B").toreadonly()
    if view[: len(SELF_DESCRIBED_CBOR)] != SELF_DESCRIBED_CBOR:
        raise MalformedMessage("not a Stream V2 message: no self-described CBOR tag 55799")
    msg = decode_views(view)
    if msg is None:
        msg = decode_cbor(bytes(view), tag_hook)
    if not isinstance(msg, Mapping):
        raise MalformedMessage(f"top level is {type(msg).__name__}, not a map")
    kind = msg.get("type")
    if kind == "image":
        return _image(msg, received_ns)
    if kind == "start":
        return _start(msg, received_ns)
    if kind == "end":
        return EndMessage(
            series_id=_uint(msg, "series_id", "end"),
            series_unique_id=_require(msg, "series_unique_id", str, "end"),
            received_ns=received_ns,
        )
    raise MalformedMessage(f"unknown message type {kind!r}")
