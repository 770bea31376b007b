"""Receiver for DECTRIS Stream V2: a ZeroMQ PULL socket and a decoder of its CBOR messages.

Stream V2 (github.com/dectris/documentation, stream_v2/README.md): the detector's PUSH socket
(port 31001) sends one self-described CBOR map per ZeroMQ message, `type` first:
`start` (series configuration), `image` (one exposure, all channels), `end`.

The decoder is shaped for the archive path: it checks a message's structure and sizes but does
NOT decompress pixels. Each channel keeps its payload exactly as received (bslz4 or lz4 bytes
in HDF5 filter framing, or raw bytes), so the writer can hand it to h5py's
`write_direct_chunk` unchanged (`ChannelData.direct_chunk`, `ChannelData.hdf5_filter`);
only analysis calls `to_array()`, which decompresses with the maintained `bitshuffle` and
`lz4` packages.

Payloads are never copied: each image payload (any byte string of 1 KiB or more) is a
read-only memoryview into the message buffer, e.g. the received ZeroMQ frame
(`receive_raw(copy=False)`). cbor2 has no zero-copy mode, so `decode_message` walks the CBOR
item heads first (`_large_byte_strings`), hands cbor2 the message with each large byte string
replaced by a small private tag holding its index, and the tag hook puts the slice back. The
rest is decoded, and checked, by cbor2 exactly as before; a message the walk does not follow
plainly (indefinite lengths, string references, the private tag, trailing bytes, truncation)
goes the old way, copied whole, so its errors stay cbor2's.
The compressed framing (block table) IS checked at decode: bitshuffle's decoder, and the HDF5
filter reading the file later, trust the block lengths and crash the process on a corrupt
one, so a payload whose blocks do not add up must never reach a file.

Types as the spec and the recorded EIGER2 messages have them: DateTime = tag 0 string
(decoded to `datetime`), Rational = untagged [numerator, denominator] (tag 30 accepted too),
kept exact as `Fraction` with the denominator (the detector's time base) in `time_base_hz`.

Everything wrong with a message (not CBOR, wrong types, missing fields, sizes that do not
match) raises `MalformedMessage` with a one-line reason; `Stream2Receiver.receive` counts,
logs and skips such messages instead of raising, unless asked to raise.
"""

from __future__ import annotations

import io
import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from fractions import Fraction
from typing import Any

import cbor2
import numpy as np
import zmq

from .closing import ClosedOnExit

log = logging.getLogger(__name__)

DEFAULT_PORT = 31001
SELF_DESCRIBED_CBOR = b"\xd9\xd9\xf7"  # tag 55799 (RFC 8949 section 3.4.6)
TAG_MULTI_DIM_ARRAY = 40  # RFC 8746 section 3.1.1, row-major
TAG_DECTRIS_COMPRESSION = 56500  # dectris/documentation cbor/dectris-compression-tag.md

# RFC 8746 section 2.1 typed arrays numpy can hold (76 is reserved, 83/87 are binary128).
TYPED_ARRAY_DTYPES: dict[int, np.dtype] = {
    64: np.dtype("u1"),
    65: np.dtype(">u2"),
    66: np.dtype(">u4"),
    67: np.dtype(">u8"),
    68: np.dtype("u1"),  # uint8, clamped arithmetic
    69: np.dtype("<u2"),
    70: np.dtype("<u4"),
    71: np.dtype("<u8"),
    72: np.dtype("i1"),
    73: np.dtype(">i2"),
    74: np.dtype(">i4"),
    75: np.dtype(">i8"),
    77: np.dtype("<i2"),
    78: np.dtype("<i4"),
    79: np.dtype("<i8"),
    80: np.dtype(">f2"),
    81: np.dtype(">f4"),
    82: np.dtype(">f8"),
    84: np.dtype("<f2"),
    85: np.dtype("<f4"),
    86: np.dtype("<f8"),
}

# HDF5 filter ids whose chunk format the compressed payloads already have.
HDF5_FILTER_BITSHUFFLE = 32008
HDF5_FILTER_LZ4 = 32004
_HDF5_HEADER = struct.Struct(">QI")  # uncompressed bytes, block size in bytes
_BLOCK_LENGTH = struct.Struct(">I")


class MalformedMessage(ValueError):  # noqa: N818 (the name other modules rely on)
    """A ZeroMQ message that is not a valid Stream V2 message; str() is a one-line reason."""


# ----- HDF5 filter framing: check, then decompress ---------------------------------------------
_BITSHUFFLE_BLOCK_MULTIPLE = 8  # bitshuffle works on multiples of 8 elements


def _header(algorithm: str, payload: bytes, nbytes: int) -> int:
    """Check the 12-byte HDF5 filter header against the image size; the block size in bytes."""
    if len(payload) < _HDF5_HEADER.size:
        raise MalformedMessage(f"{algorithm} payload shorter than its 12-byte header")
    total, block_bytes = _HDF5_HEADER.unpack_from(payload)
    if total != nbytes:
        raise MalformedMessage(f"{algorithm} header says {total} bytes, image needs {nbytes}")
    if block_bytes == 0:
        raise MalformedMessage(f"{algorithm} block size is 0")
    return block_bytes


def _walk_blocks(algorithm: str, payload: bytes, count: int) -> int:
    """Follow `count` (length, data) blocks from the header; return the offset after them."""
    offset = _HDF5_HEADER.size
    for _ in range(count):
        if offset + _BLOCK_LENGTH.size > len(payload):
            raise MalformedMessage(f"{algorithm} payload ends inside its block table")
        (packed,) = _BLOCK_LENGTH.unpack_from(payload, offset)
        offset += _BLOCK_LENGTH.size + packed
        if offset > len(payload):
            raise MalformedMessage(f"{algorithm} payload ends inside a block")
    return offset


def check_bslz4_framing(payload: bytes, dtype: np.dtype, count: int) -> int:
    """Check a bitshuffle/LZ4 chunk (filter 32008) of `count` elements; its block size in elements.

    bitshuffle's decoder trusts the block lengths it reads (it has no input size) and reads
    past the buffer on a corrupt one, crashing the process; the HDF5 filter does the same to
    whoever reads the file. So the block table must add up before anything decompresses it:
    full blocks, one partial block rounded down to 8 elements, then count % 8 raw elements.
    """
    itemsize = dtype.itemsize
    block_bytes = _header("bslz4", payload, count * itemsize)
    if block_bytes % itemsize or (block_bytes // itemsize) % _BITSHUFFLE_BLOCK_MULTIPLE:
        raise MalformedMessage(f"bslz4 block size {block_bytes} bytes is not 8k elements")
    block_elements = block_bytes // itemsize
    partial = count % block_elements - count % _BITSHUFFLE_BLOCK_MULTIPLE
    blocks = count // block_elements + (1 if partial else 0)
    end = _walk_blocks("bslz4", payload, blocks)
    leftover = (count % _BITSHUFFLE_BLOCK_MULTIPLE) * itemsize
    if len(payload) - end != leftover:
        raise MalformedMessage(
            f"bslz4 payload has {len(payload) - end} bytes after its blocks, expected {leftover}"
        )
    return block_elements


def check_lz4_framing(payload: bytes, nbytes: int) -> int:
    """Check an LZ4 chunk (filter 32004) of `nbytes`; its block size in bytes."""
    block_bytes = _header("lz4", payload, nbytes)
    end = _walk_blocks("lz4", payload, -(-nbytes // block_bytes))
    if end != len(payload):
        raise MalformedMessage(f"lz4 payload has {len(payload) - end} bytes after its blocks")
    return block_bytes


def bslz4_decompress(payload: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    """Undo a bitshuffle/LZ4 chunk (HDF5 filter 32008 framing) into `count` elements."""
    import bitshuffle

    block_elements = check_bslz4_framing(payload, dtype, count)
    body = np.frombuffer(payload, dtype=np.uint8, offset=_HDF5_HEADER.size)
    try:
        return bitshuffle.decompress_lz4(body, (count,), dtype, block_elements)
    except (ValueError, RuntimeError) as exc:
        reason = exc.args[0] if exc.args else exc
        raise MalformedMessage(f"bslz4 payload does not decompress: {reason}") from exc


def lz4_decompress(payload: bytes, nbytes: int) -> bytes:
    """Undo an LZ4 chunk in HDF5 filter 32004 framing (blocks stored raw when incompressible)."""
    import lz4.block

    block_bytes = check_lz4_framing(payload, nbytes)
    view = memoryview(payload)
    out = bytearray()
    offset = _HDF5_HEADER.size
    while len(out) < nbytes:
        block_size = min(block_bytes, nbytes - len(out))
        (packed_size,) = _BLOCK_LENGTH.unpack_from(view, offset)
        offset += _BLOCK_LENGTH.size
        packed = view[offset : offset + packed_size]
        offset += packed_size
        if packed_size == block_size:  # stored uncompressed by the filter
            out += packed
            continue
        try:
            block = lz4.block.decompress(packed, uncompressed_size=block_size)
        except lz4.block.LZ4BlockError as exc:
            raise MalformedMessage(f"lz4 block does not decompress: {exc}") from exc
        if len(block) != block_size:
            raise MalformedMessage(f"lz4 block gives {len(block)} bytes, not {block_size}")
        out += block
    return bytes(out)


def hdf5_filter_options(compression: str | None) -> dict[str, Any]:
    """h5py create_dataset keywords of the HDF5 filter whose chunks a payload already is."""
    import hdf5plugin  # registers the filters with HDF5; only the writer needs it

    if compression == "bslz4":
        return dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
    if compression == "lz4":
        return dict(hdf5plugin.LZ4())
    return {}


# ----- decoded messages -----------------------------------------------------------------------
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


# ----- CBOR tags: keep structure, never decompress --------------------------------------------
@dataclass(frozen=True)
class _Compressed:
    algorithm: Any
    element_size: Any
    payload: Any


@dataclass(frozen=True)
class _TypedArray:
    tag: int
    body: Any


@dataclass(frozen=True)
class _MultiDimArray:
    dims: Any
    array: Any


def _tag_hook(*args: Any) -> Any:
    # cbor2 5.x calls hook(decoder, tag), cbor2 6.x hook(tag, immutable): find the tag.
    tag = next(a for a in args if isinstance(a, cbor2.CBORTag))
    if tag.tag == TAG_DECTRIS_COMPRESSION:
        value = tag.value
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != 3:
            raise MalformedMessage("tag 56500 content is not a 3-element array")
        return _Compressed(*value)
    if 64 <= tag.tag <= 87:
        return _TypedArray(tag.tag, tag.value)
    if tag.tag == TAG_MULTI_DIM_ARRAY:
        value = tag.value
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != 2:
            raise MalformedMessage("tag 40 content is not a 2-element array")
        return _MultiDimArray(*value)
    return tag


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
    if not isinstance(value, _MultiDimArray):
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
    if not isinstance(typed, _TypedArray):
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
    if not isinstance(body, _Compressed):
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
    if isinstance(value, _MultiDimArray):
        return _channel(name, value)
    if isinstance(value, memoryview):  # a large byte string outside an image: plain bytes
        return bytes(value)
    return value


# ----- zero-copy payloads ---------------------------------------------------------------------
LARGE_BYTE_STRING = 1024  # byte strings from this size on are handed out as views, not copied
_SLICE_TAG = 0x5EDC0DE5  # private tag: "the large byte string number N of this message"
_REFUSED_TAGS = frozenset({25, 256, 28, 29, _SLICE_TAG})  # string/shared references, ours
_BREAK = 0xFF


def _large_byte_strings(view: memoryview) -> list[tuple[int, int, int]] | None:
    """(head, start, end) of each definite byte string >= LARGE_BYTE_STRING in the one CBOR
    item that `view` holds, found from the item heads alone (no content is read).

    None when the walk cannot vouch for the substitution: truncated or reserved heads,
    indefinite-length strings, reference tags (their numbering counts strings), our own tag,
    or bytes after the item. The caller then decodes the whole message the ordinary way.
    """
    end_of_view = len(view)
    pos = 0
    spans: list[tuple[int, int, int]] = []
    left = [1]  # items still to read at each open level; -1: until a break
    while left:
        if left[-1] == 0:
            left.pop()
            continue
        if pos >= end_of_view:
            return None
        initial = view[pos]
        if initial == _BREAK:
            if left[-1] != -1:
                return None
            left.pop()
            pos += 1
            continue
        if left[-1] > 0:
            left[-1] -= 1
        head = pos
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        if info < 24:
            argument = info
        elif info <= 27:
            size = 1 << (info - 24)
            if pos + size > end_of_view:
                return None
            argument = int.from_bytes(view[pos : pos + size], "big")
            pos += size
        elif info == 31 and major in (4, 5):
            left.append(-1)
            continue
        else:  # reserved, or an indefinite-length string
            return None
        if major in (2, 3):
            if pos + argument > end_of_view:
                return None
            if major == 2 and argument >= LARGE_BYTE_STRING:
                spans.append((head, pos, pos + argument))
            pos += argument
        elif major == 4:
            left.append(argument)
        elif major == 5:
            left.append(2 * argument)
        elif major == 6:
            if argument in _REFUSED_TAGS:
                return None
            left.append(1)
    return spans if pos == end_of_view else None


class _SliceHook:
    """Tag hook of one message: our private tag -> the slice it stands for; others as usual."""

    def __init__(self, slices: list[memoryview]) -> None:
        self.slices = slices

    def __call__(self, *args: Any) -> Any:
        tag = next(a for a in args if isinstance(a, cbor2.CBORTag))
        if tag.tag == _SLICE_TAG:
            return self.slices[tag.value]
        return _tag_hook(*args)


def _decode_cbor(data: bytes, tag_hook: Callable[..., Any]) -> Any:
    """One CBOR item filling `data`, with our reasons kept and every failure MalformedMessage."""
    stream = io.BytesIO(data)
    try:
        msg = cbor2.CBORDecoder(stream, tag_hook=tag_hook).decode()
    except MalformedMessage:
        raise
    except cbor2.CBORDecodeError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, MalformedMessage):
            cause = cause.__cause__
        if cause is not None:  # our tag hook's reason, wrapped by cbor2
            raise MalformedMessage(str(cause)) from exc
        raise MalformedMessage(f"not valid CBOR: {exc}") from exc
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise MalformedMessage(f"not valid CBOR: {exc}") from exc
    if stream.tell() != len(data):
        raise MalformedMessage(f"{len(data) - stream.tell()} bytes after the CBOR message")
    return msg


def _decode_views(view: memoryview) -> Any:
    """The CBOR item in `view`, its large byte strings as views into it (None: not walkable)."""
    spans = _large_byte_strings(view)
    if not spans:
        return None
    parts: list[bytes | memoryview] = []
    done = 0
    for index, (head, _, end) in enumerate(spans):
        parts.append(view[done:head])
        parts.append(cbor2.dumps(cbor2.CBORTag(_SLICE_TAG, index)))
        done = end
    parts.append(view[done:])
    slices = [view[start:end] for _, start, end in spans]
    return _decode_cbor(b"".join(parts), _SliceHook(slices))


def decode_message(buf: bytes | bytearray | memoryview, received_ns: int | None = None) -> Message:
    """Decode one Stream V2 message (one ZeroMQ message) without decompressing pixels.

    Image payloads are read-only views into `buf` (which they keep alive), not copies.
    """
    view = memoryview(buf).cast("B").toreadonly()
    if view[: len(SELF_DESCRIBED_CBOR)] != SELF_DESCRIBED_CBOR:
        raise MalformedMessage("not a Stream V2 message: no self-described CBOR tag 55799")
    msg = _decode_views(view)
    if msg is None:
        msg = _decode_cbor(bytes(view), _tag_hook)
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


# ----- the receiver ---------------------------------------------------------------------------
class Stream2Receiver(ClosedOnExit):
    """PULL socket connected to a detector's Stream V2 PUSH socket.

    `receive()` returns the next decoded message, or None when nothing arrived in time.
    Malformed messages are counted in `malformed_total`, logged and skipped (or raised with
    raise_malformed=True). Every message gets `received_ns` (time.time_ns() at arrival).
    """

    def __init__(
        self,
        endpoint: str = f"tcp://127.0.0.1:{DEFAULT_PORT}",
        rcvhwm: int = 256,
        timeout_ms: int = 1000,
        raise_malformed: bool = False,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.raise_malformed = raise_malformed
        self.received_total = 0
        self.malformed_total = 0
        self.last_error: str | None = None
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._closed = False

    @property
    def socket(self) -> zmq.Socket:
        """The PULL socket, to wait on it in a zmq.Poller together with other sockets."""
        return self._socket

    def receive_raw(
        self, timeout_ms: int | None = None, copy: bool = True
    ) -> tuple[bytes | memoryview, int] | None:
        """Next raw message and its arrival time (ns), or None on timeout.

        copy=False: a read-only view of the ZeroMQ frame itself (no copy of a 2 MB image;
        decode_message's payloads then point into it and keep it alive).
        """
        wait = self.timeout_ms if timeout_ms is None else timeout_ms
        if not self._socket.poll(wait, zmq.POLLIN):
            return None
        buf = self._socket.recv() if copy else self._socket.recv(copy=False).buffer
        self.received_total += 1
        return buf, time.time_ns()

    def receive(self, timeout_ms: int | None = None) -> Message | None:
        """Next well-formed message, or None when none arrived within the timeout."""
        wait = self.timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + wait / 1000.0
        while True:
            remaining_ms = max(0, round((deadline - time.monotonic()) * 1000))
            raw = self.receive_raw(remaining_ms)
            if raw is None:
                return None
            buf, received_ns = raw
            try:
                return decode_message(buf, received_ns)
            except MalformedMessage as exc:
                self.malformed_total += 1
                self.last_error = str(exc)
                log.warning("dropped malformed Stream V2 message (%d bytes): %s", len(buf), exc)
                if self.raise_malformed:
                    raise

    def close(self) -> None:
        """Close the socket (and the context if it is ours); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()
