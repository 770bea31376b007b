"""HDF5 filter framing of Stream V2 payloads (bitshuffle/LZ4 32008, LZ4 32004): check, then
decompress; and the h5py keywords of the filter a payload already is.

The lowest layer of the package: `MalformedMessage`, raised for every wrong message, lives here
because a payload whose framing does not add up is the first thing found wrong.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

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
