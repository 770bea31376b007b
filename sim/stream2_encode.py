"""DECTRIS Stream V2 messages as a detector writes them: CBOR `start`, `image` and `end`.

The layout follows DECTRIS' Stream V2 documentation (github.com/dectris/documentation,
stream_v2/README.md and cbor/dectris-compression-tag.md) and the messages an EIGER2 R 500K
sends (shared/testdata/dectris-stream2):

- every message is one self-described CBOR map (tag 55799) whose first key is `type`;
- DateTime fields (`arm_date`, `series_date`) are tag 0 RFC 3339 strings;
- Rationals (`start_time`, `stop_time`, `real_time`) are plain two-element arrays
  [numerator, denominator] over the detector's time base (not tag 30: the spec and the real
  detector both send an untagged array);
- image `data` maps a channel name to a MultiDimArray, tag 40 [[rows, cols], typed array],
  the typed array an RFC 8746 tag (64 uint8, 69 uint16 LE, 70 uint32 LE, ...) over a byte
  string, which may be a tag 56500 ["bslz4" | "lz4", element size, bytes] compressed string
  in HDF5 filter framing (a bitshuffle filter 32008 chunk, or an LZ4 filter 32004 chunk).

This module only writes; the receiver in drivers/stream2/ is written separately against the
same specification (a detector and its clients share a protocol, not code), so each checks
the other. Image messages are assembled from pre-encoded pieces: the channel data is encoded
once (`encode_channels`) and spliced into each message, so a replayed frame costs one copy,
not a compression.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from fractions import Fraction
from typing import Any

import bitshuffle
import cbor2
import lz4.block
import numpy as np

SELF_DESCRIBED_CBOR = b"\xd9\xd9\xf7"  # tag 55799 (RFC 8949 section 3.4.6)
TAG_DATETIME = 0
TAG_MULTI_DIM_ARRAY = 40
TAG_DECTRIS_COMPRESSION = 56500

# RFC 8746 section 2.1: the typed-array tag of each numpy dtype the encoder writes.
TYPED_ARRAY_TAGS: dict[np.dtype, int] = {
    np.dtype("u1"): 64,
    np.dtype(">u2"): 65,
    np.dtype(">u4"): 66,
    np.dtype(">u8"): 67,
    np.dtype("<u2"): 69,
    np.dtype("<u4"): 70,
    np.dtype("<u8"): 71,
    np.dtype("i1"): 72,
    np.dtype(">i2"): 73,
    np.dtype(">i4"): 74,
    np.dtype(">i8"): 75,
    np.dtype("<i2"): 77,
    np.dtype("<i4"): 78,
    np.dtype("<i8"): 79,
    np.dtype(">f2"): 80,
    np.dtype(">f4"): 81,
    np.dtype(">f8"): 82,
    np.dtype("<f2"): 84,
    np.dtype("<f4"): 85,
    np.dtype("<f8"): 86,
}

COMPRESSIONS = ("bslz4", "lz4", None)
# What an EIGER2 writes and both HDF5 filters default to: 8 KiB blocks.
HDF5_BLOCK_BYTES = 8192
_HDF5_HEADER = struct.Struct(">QI")  # uncompressed size, block size in bytes
_BLOCK_LENGTH = struct.Struct(">I")


# ----- compression in HDF5 filter framing -----------------------------------------------------
def bslz4_compress(array: np.ndarray) -> bytes:
    """Bitshuffle+LZ4 exactly as the HDF5 bitshuffle filter (32008) stores a chunk.

    Header: uint64 BE uncompressed bytes, uint32 BE block size in bytes; then the blocks that
    `bitshuffle.compress_lz4` writes (uint32 BE compressed length + LZ4 data each).
    """
    data = np.ascontiguousarray(array)
    block_elements = HDF5_BLOCK_BYTES // data.dtype.itemsize
    blocks = bitshuffle.compress_lz4(data.reshape(-1), block_elements)
    header = _HDF5_HEADER.pack(data.nbytes, block_elements * data.dtype.itemsize)
    return header + blocks.tobytes()


def lz4_compress(array: np.ndarray) -> bytes:
    """LZ4 in the HDF5 LZ4 filter (32004) chunk framing.

    Header as bslz4; then per block a uint32 BE compressed length and the LZ4 block, or the
    block stored raw when LZ4 would not make it smaller (the filter's rule).
    """
    raw = memoryview(np.ascontiguousarray(array)).cast("B")
    parts = [_HDF5_HEADER.pack(len(raw), HDF5_BLOCK_BYTES)]
    for offset in range(0, len(raw), HDF5_BLOCK_BYTES):
        block = raw[offset : offset + HDF5_BLOCK_BYTES]
        packed = lz4.block.compress(block, store_size=False)
        if len(packed) >= len(block):
            packed = bytes(block)
        parts.append(_BLOCK_LENGTH.pack(len(packed)))
        parts.append(packed)
    return b"".join(parts)


# ----- CBOR pieces ----------------------------------------------------------------------------
def rational(value: Fraction | tuple[int, int]) -> list[int]:
    """A Stream V2 Rational: [numerator, denominator], not reduced, untagged."""
    if isinstance(value, Fraction):
        return [value.numerator, value.denominator]
    numerator, denominator = value
    return [int(numerator), int(denominator)]


def date_time(value: datetime) -> cbor2.CBORTag:
    """A Stream V2 DateTime: tag 0 with an RFC 3339 string in UTC.

    Microseconds, where a DCU sends milliseconds: series_date is the origin of the image
    times, and the run clock alignment should not start 1 ms off.
    """
    if value.tzinfo is None:
        raise ValueError("DateTime needs a timezone")
    utc = value.astimezone(timezone.utc)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return cbor2.CBORTag(TAG_DATETIME, text)


def multi_dim_array(array: np.ndarray, compression: str | None = "bslz4") -> cbor2.CBORTag:
    """Tag 40 [[rows, cols], typed array], the byte string compressed with tag 56500 if asked."""
    if array.ndim != 2:
        raise ValueError(f"image channels are 2-D, got shape {array.shape}")
    data = np.ascontiguousarray(array)
    typed_tag = TYPED_ARRAY_TAGS.get(data.dtype)
    if typed_tag is None:
        raise ValueError(f"no RFC 8746 typed-array tag for dtype {data.dtype.str}")
    if compression == "bslz4":
        body: bytes | cbor2.CBORTag = cbor2.CBORTag(
            TAG_DECTRIS_COMPRESSION, ["bslz4", data.dtype.itemsize, bslz4_compress(data)]
        )
    elif compression == "lz4":
        body = cbor2.CBORTag(TAG_DECTRIS_COMPRESSION, ["lz4", 0, lz4_compress(data)])
    elif compression is None:
        body = data.tobytes()
    else:
        raise ValueError(f"unknown compression {compression!r}; use one of {COMPRESSIONS}")
    return cbor2.CBORTag(TAG_MULTI_DIM_ARRAY, [list(data.shape), cbor2.CBORTag(typed_tag, body)])


@dataclass(frozen=True)
class EncodedChannels:
    """The CBOR encoding of an image message's `data` map, ready to splice into messages."""

    cbor: bytes
    channels: tuple[str, ...]
    shape: tuple[int, int]  # (rows, cols) of the channels


def encode_channels(
    channels: Mapping[str, np.ndarray], compression: str | None = "bslz4"
) -> EncodedChannels:
    """Encode (and compress) the channel arrays of one exposure once."""
    if not channels:
        raise ValueError("an image carries at least one channel")
    shapes = {np.shape(array) for array in channels.values()}
    if len(shapes) != 1:
        raise ValueError(f"channels of one image differ in shape: {sorted(shapes)}")
    data = {name: multi_dim_array(array, compression) for name, array in channels.items()}
    (shape,) = shapes
    return EncodedChannels(cbor2.dumps(data), tuple(channels), (int(shape[0]), int(shape[1])))


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (e.g. in user_data) as the CBOR-native Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _map_header(length: int) -> bytes:
    """CBOR major type 5 (map) header for `length` pairs (RFC 8949 section 3)."""
    if length < 24:
        return bytes([0xA0 + length])
    if length < 256:
        return bytes([0xB8, length])
    return b"\xb9" + length.to_bytes(2, "big")


def _message(fields: Sequence[tuple[str, Any]], tail: Sequence[tuple[str, bytes]] = ()) -> bytes:
    """A self-described CBOR map: `fields` encoded here, `tail` values already CBOR-encoded."""
    parts = [SELF_DESCRIBED_CBOR, _map_header(len(fields) + len(tail))]
    for key, value in fields:
        parts.append(cbor2.dumps(key))
        parts.append(cbor2.dumps(value))
    for key, encoded in tail:
        parts.append(cbor2.dumps(key))
        parts.append(encoded)
    return b"".join(parts)


# ----- the three messages ---------------------------------------------------------------------
def start_message(
    series_id: int,
    series_unique_id: str,
    arm_date: datetime,
    **fields: Any,
) -> bytes:
    """The `start` message: series-level configuration, field names as in the spec table.

    Pass e.g. channels=[...], image_size_x=..., image_size_y=..., pixel_size_x=...,
    count_time=..., frame_time=..., number_of_images=..., user_data={...}.
    DateTime values are tagged automatically; numpy values become plain numbers.
    """
    items: list[tuple[str, Any]] = [
        ("type", "start"),
        ("series_id", int(series_id)),
        ("series_unique_id", series_unique_id),
        ("arm_date", date_time(arm_date)),
    ]
    for key, value in fields.items():
        if isinstance(value, datetime):
            items.append((key, date_time(value)))
        elif isinstance(value, date):
            items.append((key, value.isoformat()))
        else:
            items.append((key, _plain(value)))
    return _message(items)


def image_message(
    series_id: int,
    series_unique_id: str,
    image_id: int,
    series_date: datetime,
    start_time: Fraction | tuple[int, int],
    stop_time: Fraction | tuple[int, int],
    real_time: Fraction | tuple[int, int],
    data: EncodedChannels | Mapping[str, np.ndarray],
    user_data: Any = None,
    compression: str | None = "bslz4",
) -> bytes:
    """The `image` message of one exposure; `data` pre-encoded or arrays to encode now."""
    if not isinstance(data, EncodedChannels):
        data = encode_channels(data, compression)
    items: list[tuple[str, Any]] = [
        ("type", "image"),
        ("series_id", int(series_id)),
        ("series_unique_id", series_unique_id),
        ("image_id", int(image_id)),
        ("real_time", rational(real_time)),
        ("series_date", date_time(series_date)),
        ("start_time", rational(start_time)),
        ("stop_time", rational(stop_time)),
        ("user_data", _plain(user_data)),
    ]
    return _message(items, tail=[("data", data.cbor)])


def end_message(series_id: int, series_unique_id: str) -> bytes:
    """The `end` message that closes a series."""
    return _message(
        [("type", "end"), ("series_id", int(series_id)), ("series_unique_id", series_unique_id)]
    )
