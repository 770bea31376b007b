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
item heads first (`cbor.large_byte_strings`), hands cbor2 the message with each large byte string
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

Modules: `compression` (filter framing, `MalformedMessage`), `cbor` (tags, zero-copy decode),
`messages` (the message types, `decode_message`), `receiver` (`Stream2Receiver`). The public
API is re-exported here.
"""

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
from .messages import (
    ChannelData,
    EndMessage,
    ImageMessage,
    Message,
    StartMessage,
    decode_message,
)
from .receiver import DEFAULT_PORT, Stream2Receiver

__all__ = [
    "DEFAULT_PORT",
    "HDF5_FILTER_BITSHUFFLE",
    "HDF5_FILTER_LZ4",
    "ChannelData",
    "EndMessage",
    "ImageMessage",
    "MalformedMessage",
    "Message",
    "StartMessage",
    "Stream2Receiver",
    "bslz4_decompress",
    "check_bslz4_framing",
    "check_lz4_framing",
    "decode_message",
    "hdf5_filter_options",
    "lz4_decompress",
]
