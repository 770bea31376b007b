"""CBOR as Stream V2 uses it: the tags it keeps structured (never decompressed) and the
zero-copy decoding of a message whose large byte strings stay views into the received buffer.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np

from .compression import MalformedMessage

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


# ----- CBOR tags: keep structure, never decompress --------------------------------------------
@dataclass(frozen=True)
class Compressed:
    algorithm: Any
    element_size: Any
    payload: Any


@dataclass(frozen=True)
class TypedArray:
    tag: int
    body: Any


@dataclass(frozen=True)
class MultiDimArray:
    dims: Any
    array: Any


def tag_hook(*args: Any) -> Any:
    # cbor2 5.x calls hook(decoder, tag), cbor2 6.x hook(tag, immutable): find the tag.
    tag = next(a for a in args if isinstance(a, cbor2.CBORTag))
    if tag.tag == TAG_DECTRIS_COMPRESSION:
        value = tag.value
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != 3:
            raise MalformedMessage("tag 56500 content is not a 3-element array")
        return Compressed(*value)
    if 64 <= tag.tag <= 87:
        return TypedArray(tag.tag, tag.value)
    if tag.tag == TAG_MULTI_DIM_ARRAY:
        value = tag.value
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != 2:
            raise MalformedMessage("tag 40 content is not a 2-element array")
        return MultiDimArray(*value)
    return tag


# ----- zero-copy payloads ---------------------------------------------------------------------
LARGE_BYTE_STRING = 1024  # byte strings from this size on are handed out as views, not copied
SLICE_TAG = 0x5EDC0DE5  # our own, unregistered tag: "the large byte string number N here"
_REFUSED_TAGS = frozenset({25, 256, 28, 29, SLICE_TAG})  # string/shared references, ours
_BREAK = 0xFF


def large_byte_strings(view: memoryview) -> list[tuple[int, int, int]] | None:
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
        if tag.tag == SLICE_TAG:
            return self.slices[tag.value]
        return tag_hook(*args)


def decode_cbor(data: bytes, tag_hook: Callable[..., Any]) -> Any:
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


def decode_views(view: memoryview) -> Any:
    """The CBOR item in `view`, its large byte strings as views into it (None: not walkable)."""
    spans = large_byte_strings(view)
    if not spans:
        return None
    parts: list[bytes | memoryview] = []
    done = 0
    for index, (head, _, end) in enumerate(spans):
        parts.append(view[done:head])
        parts.append(cbor2.dumps(cbor2.CBORTag(SLICE_TAG, index)))
        done = end
    parts.append(view[done:])
    slices = [view[start:end] for _, start, end in spans]
    return decode_cbor(b"".join(parts), _SliceHook(slices))
