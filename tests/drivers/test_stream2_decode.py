"""Stream V2 decoding against messages recorded from a real DECTRIS EIGER2 R 500K.

The recorded series (shared/testdata/dectris-stream2, see its README) are the contract: if
the receiver reads them right, it reads the detector. The HDF5 checks use real h5py +
hdf5plugin files, as the daemon's writer does.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import cbor2
import h5py
import hdf5plugin
import numpy as np
import pytest
import zmq
from testdata_paths import STREAM2_DIR, needs_stream2

from insitu_daq.drivers.stream2 import (
    EndMessage,
    ImageMessage,
    MalformedMessage,
    StartMessage,
    Stream2Receiver,
    decode_message,
)
from insitu_daq.drivers.stream2.cbor import SLICE_TAG
from insitu_daq.sim import stream2_encode as s2

DATA = STREAM2_DIR
needs_data = needs_stream2

# folder -> (dtype, compression, real_time ticks over the 50 MHz time base): the README table
SERIES = {
    "r500k_bm_bslz4_8bit": (np.dtype("u1"), "bslz4", 499995),
    "r500k_bm_bslz4_16bit": (np.dtype("<u2"), "bslz4", 999995),
    "r500k_bm_bslz4_32bit": (np.dtype("<u4"), "bslz4", 4999995),
    "r500k_bm_lz4_16bit": (np.dtype("<u2"), "lz4", 999995),
}
CHANNELS = ["threshold_1", "threshold_2", "difference"]
SHAPE = (514, 1030)
TIME_BASE = 50_000_000
DEAD_TICKS = 5  # the EIGER2's 100 ns between exposures


def _raw(folder: str, name: str) -> bytes:
    assert DATA is not None
    return (DATA / folder / name).read_bytes()


def _image_files(folder: str) -> list[str]:
    assert DATA is not None
    return sorted(p.name for p in (DATA / folder).glob("*.cbor") if p.name != "000011.cbor")


@needs_data
@pytest.mark.parametrize("folder", sorted(SERIES))
def test_recorded_images_decode_to_the_declared_layout_and_times(folder: str) -> None:
    dtype, compression, real_ticks = SERIES[folder]
    files = _image_files(folder)
    assert files, "no image messages in the recorded series"
    unique_ids = set()
    for name in files:
        msg = decode_message(_raw(folder, name))
        assert isinstance(msg, ImageMessage)
        image_id = int(name.split(".")[0]) - 1  # files count from 1, image ids from 0
        assert msg.image_id == image_id
        assert msg.series_id == 1
        unique_ids.add(msg.series_unique_id)
        assert list(msg.channels) == CHANNELS
        for channel in msg.channels.values():
            assert channel.shape == SHAPE
            assert channel.dtype == dtype
            assert channel.compression == compression
            assert channel.element_size == dtype.itemsize
            assert len(channel.payload) < channel.nbytes  # still compressed: nothing inflated
        frame_ticks = real_ticks + DEAD_TICKS
        assert msg.time_base_hz == TIME_BASE
        assert msg.real_time == Fraction(real_ticks, TIME_BASE)
        assert msg.start_time == Fraction(image_id * frame_ticks, TIME_BASE)
        assert msg.stop_time == msg.start_time + msg.real_time
        assert msg.start_time_s == pytest.approx(image_id * frame_ticks / TIME_BASE)
        assert msg.series_date.year == 2023 and msg.series_date.utcoffset() is not None
        assert msg.user_data == [1, "\N{BLUE HEART}"]
    assert len(unique_ids) == 1


@needs_data
@pytest.mark.parametrize("folder", sorted(SERIES))
def test_end_message_closes_the_recorded_series(folder: str) -> None:
    end = decode_message(_raw(folder, "000011.cbor"))
    image = decode_message(_raw(folder, _image_files(folder)[0]))
    assert isinstance(end, EndMessage)
    assert (end.series_id, end.series_unique_id) == (image.series_id, image.series_unique_id)


@needs_data
@pytest.mark.parametrize("folder", sorted(SERIES))
def test_decompressed_pixels_equal_what_hdf5_reads_from_the_direct_chunk(
    folder: str, tmp_path: Path
) -> None:
    """The archive contract: the payload as received is a valid HDF5 chunk of its filter."""
    dtype = SERIES[folder][0]
    messages = [decode_message(_raw(folder, name)) for name in _image_files(folder)]
    path = tmp_path / "direct.h5"
    with h5py.File(path, "w") as f:
        for name in CHANNELS:
            first = messages[0].channels[name]
            dset = f.create_dataset(
                name,
                shape=(len(messages), *SHAPE),
                dtype=dtype,
                chunks=(1, *SHAPE),
                **first.hdf5_filter(),
            )
            for i, msg in enumerate(messages):
                dset.id.write_direct_chunk((i, 0, 0), msg.channels[name].direct_chunk())
    with h5py.File(path, "r") as f:
        for name in CHANNELS:
            stored = f[name][()]
            for i, msg in enumerate(messages):
                ours = msg.channels[name].to_array()
                assert ours.dtype == dtype and ours.shape == SHAPE
                np.testing.assert_array_equal(stored[i], ours)
    # A detector frame is not constant: a decompressor returning zeros would not pass above,
    # but make the point explicit for the counting channel.
    first = messages[0].channels["threshold_1"].to_array()
    assert first.min() < first.max()


@needs_data
def test_bslz4_and_lz4_filters_are_what_the_payloads_need() -> None:
    bslz4 = decode_message(_raw("r500k_bm_bslz4_16bit", "000001.cbor")).channel()
    lz4 = decode_message(_raw("r500k_bm_lz4_16bit", "000001.cbor")).channel()
    assert bslz4.hdf5_filter()["compression"] == hdf5plugin.BSHUF_ID == bslz4.hdf5_filter_id
    assert lz4.hdf5_filter()["compression"] == hdf5plugin.LZ4_ID == lz4.hdf5_filter_id


@needs_data
@pytest.mark.parametrize("folder", ["r500k_bm_bslz4_8bit", "r500k_bm_bslz4_32bit"])
def test_reencoding_a_recorded_frame_round_trips_bit_exactly(folder: str, tmp_path: Path) -> None:
    """Our encoder's bslz4, lz4 and uncompressed paths agree with the detector's pixels."""
    detector = decode_message(_raw(folder, "000002.cbor"))
    pixels = detector.channel("threshold_1").to_array()
    decoded = {}
    for compression in ("bslz4", "lz4", None):
        buf = s2.image_message(
            detector.series_id,
            detector.series_unique_id,
            detector.image_id,
            detector.series_date,
            (detector.start_time.numerator, detector.start_time.denominator),
            (detector.stop_time.numerator, detector.stop_time.denominator),
            (detector.real_time.numerator, detector.real_time.denominator),
            {"threshold_1": pixels},
            compression=compression,
        )
        msg = decode_message(buf)
        assert isinstance(msg, ImageMessage)
        assert (msg.image_id, msg.start_time, msg.stop_time, msg.real_time) == (
            detector.image_id,
            detector.start_time,
            detector.stop_time,
            detector.real_time,
        )
        assert msg.series_date == detector.series_date
        channel = msg.channel()
        assert channel.compression == compression
        assert channel.dtype == pixels.dtype
        decoded[compression] = channel
        np.testing.assert_array_equal(channel.to_array(), pixels)
    # Same framing as the detector: 12-byte header (size, 8 KiB blocks) identical.
    assert decoded["bslz4"].payload[:12] == detector.channel("threshold_1").payload[:12]
    # And the encoder's compressed payloads are valid HDF5 chunks too.
    with h5py.File(tmp_path / "ours.h5", "w") as f:
        for compression in ("bslz4", "lz4"):
            channel = decoded[compression]
            dset = f.create_dataset(
                compression,
                shape=(1, *SHAPE),
                dtype=pixels.dtype,
                chunks=(1, *SHAPE),
                **channel.hdf5_filter(),
            )
            dset.id.write_direct_chunk((0, 0, 0), channel.direct_chunk())
            np.testing.assert_array_equal(dset[0], pixels)


@needs_data
def test_start_message_round_trips_through_encoder_and_decoder() -> None:
    """No recorded start message exists; check ours carries the spec's fields."""
    arm = decode_message(_raw("r500k_bm_bslz4_16bit", "000001.cbor")).series_date
    buf = s2.start_message(
        7,
        "SERIES-7",
        arm,
        channels=["threshold_1"],
        image_size_x=1030,
        image_size_y=514,
        pixel_size_x=75e-6,
        pixel_size_y=75e-6,
        count_time=0.01,
        frame_time=0.0100001,
        number_of_images=3,
        detector_description="Dectris EIGER2 R 500K",
        user_data={"sample": "LiNiO2", "nested": [1, 2.5, "x"]},
    )
    msg = decode_message(buf)
    assert isinstance(msg, StartMessage)
    assert (msg.series_id, msg.series_unique_id) == (7, "SERIES-7")
    assert msg.arm_date == arm
    assert msg.channels == ["threshold_1"]
    assert msg.image_shape == SHAPE
    assert msg.pixel_size == (75e-6, 75e-6)
    assert (msg.count_time, msg.frame_time, msg.number_of_images) == (0.01, 0.0100001, 3)
    assert msg.user_data == {"sample": "LiNiO2", "nested": [1, 2.5, "x"]}


# ----- malformed input --------------------------------------------------------------------------
def _edited(raw: bytes, edit) -> bytes:
    """Decode a recorded message to plain CBOR items, apply `edit`, encode it back."""

    def keep(*args):
        return next(a for a in args if isinstance(a, cbor2.CBORTag))

    def thaw(value):
        if isinstance(value, cbor2.CBORTag):
            return cbor2.CBORTag(value.tag, thaw(value.value))
        if isinstance(value, Mapping):
            return {k: thaw(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [thaw(v) for v in value]
        return value

    msg = thaw(cbor2.loads(raw, tag_hook=keep))
    edit(msg)
    return s2.SELF_DESCRIBED_CBOR + cbor2.dumps(msg)


def _compressed(msg: dict, channel: str = "threshold_1") -> list:
    return msg["data"][channel].value[1].value.value  # tag40 -> [dims, tag69(tag56500([..]))]


def _retag_typed_array(msg: dict, tag: int, channel: str = "threshold_1") -> None:
    multi_dim = msg["data"][channel].value
    multi_dim[1] = cbor2.CBORTag(tag, multi_dim[1].value)


BSLZ4 = ("r500k_bm_bslz4_16bit", "000001.cbor")


@needs_data
def test_reencoding_an_unedited_message_still_decodes() -> None:
    """Guard for the edits below: the editing itself must not break a message."""
    msg = decode_message(_edited(_raw(*BSLZ4), lambda m: None))
    assert isinstance(msg, ImageMessage) and msg.image_id == 0


@needs_data
@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m.pop("image_id"), "no 'image_id'"),
        (lambda m: m.__setitem__("image_id", "0"), "'image_id' is str"),
        (lambda m: m.__setitem__("type", "picture"), "unknown message type"),
        (lambda m: m.__setitem__("series_id", -1), "negative"),
        (lambda m: m.__setitem__("start_time", [1, 0]), "rational"),
        (lambda m: m.__setitem__("data", {}), "no channels"),
        (lambda m: m["data"]["threshold_1"].value.__setitem__(0, [514]), "dimensions"),
        (lambda m: m["data"]["threshold_1"].value.__setitem__(0, [514, 1031]), "needs"),
        (lambda m: _retag_typed_array(m, 83), "typed-array tag 83 is not supported"),
        (lambda m: _compressed(m).__setitem__(0, "zstd"), "not supported"),
        (lambda m: _compressed(m).__setitem__(1, 4), "element size"),
        (lambda m: _compressed(m).__setitem__(2, _compressed(m)[2][:-100]), "bslz4"),
        (lambda m: _compressed(m).__setitem__(2, _compressed(m)[2] + b"\0"), "bslz4"),
        (lambda m: m["data"].__setitem__("threshold_1", b"pixels"), "MultiDimArray"),
    ],
)
def test_malformed_fields_raise_one_exception_with_a_reason(edit, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason) as info:
        decode_message(_edited(_raw(*BSLZ4), edit))
    assert "\n" not in str(info.value)


@needs_data
def test_truncated_or_garbled_bytes_raise_malformed() -> None:
    raw = _raw(*BSLZ4)
    rng = np.random.default_rng(0)
    bad = [b"", b"not cbor at all", raw[:3], raw[: len(raw) // 2], raw[:-1], raw + b"\x00"]
    bad += [cbor2.dumps({"type": "image"}), raw[3:]]  # no self-described tag
    bad += [s2.SELF_DESCRIBED_CBOR + cbor2.dumps(["type", "image"])]
    for case in bad:
        with pytest.raises(MalformedMessage):
            decode_message(case)
    # Random damage: a message either still decodes and decompresses, or raises
    # MalformedMessage; never another exception, never a crash of the process (bitshuffle
    # trusts the block table, so the decoder checks it before decompressing).
    outcomes = set()
    for _ in range(60):
        damaged = bytearray(raw)
        for position in rng.integers(0, len(raw), int(rng.integers(1, 20))):
            damaged[position] = int(rng.integers(0, 256))
        try:
            decode_message(bytes(damaged)).decompress()
            outcomes.add("decoded")
        except MalformedMessage:
            outcomes.add("malformed")
    assert "malformed" in outcomes


@needs_data
def test_damaged_lz4_blocks_raise_malformed_when_decompressed() -> None:
    raw = _raw("r500k_bm_lz4_16bit", "000001.cbor")

    def damage(m: dict) -> None:
        payload = bytearray(_compressed(m)[2])
        payload[100:400] = bytes(300)  # inside the first block: framing intact, data wrong
        _compressed(m)[2] = bytes(payload)

    msg = decode_message(_edited(raw, damage))  # framing is intact: decodes
    with pytest.raises(MalformedMessage, match="lz4"):
        msg.channel("threshold_1").to_array()


# ----- zero-copy payloads -------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("folder", sorted(SERIES))
def test_payloads_are_views_into_the_message_equal_to_what_cbor2_decodes(folder: str) -> None:
    for name in _image_files(folder):
        raw = _raw(folder, name)
        plain = cbor2.loads(
            raw, tag_hook=lambda *a: next(x for x in a if isinstance(x, cbor2.CBORTag))
        )
        msg = decode_message(raw)
        assert isinstance(msg, ImageMessage)
        for channel in CHANNELS:
            payload = msg.channel(channel).payload
            assert isinstance(payload, memoryview) and payload.readonly
            assert payload.obj is raw  # a view of the message, not a copy
            typed = plain["data"][channel].value[1].value
            expected = typed if isinstance(typed, bytes) else typed.value[2]
            assert payload == expected
            assert payload == memoryview(expected)


def _indefinite(raw: bytes, payload: bytes) -> bytes:
    """`raw` with the definite byte string `payload` re-encoded as two indefinite chunks."""
    start = raw.index(payload)
    head = 5 if raw[start - 5] == 0x5A else 3  # 0x5A: 4-byte length, 0x59: 2-byte length
    assert raw[start - head] in (0x59, 0x5A)
    half = len(payload) // 2
    chunks = b"".join(
        b"\x5a" + len(c).to_bytes(4, "big") + c for c in (payload[:half], payload[half:])
    )
    return raw[: start - head] + b"\x5f" + chunks + b"\xff" + raw[start + len(payload) :]


@needs_data
def test_messages_the_zero_copy_walk_does_not_follow_decode_as_before() -> None:
    raw = _raw(*BSLZ4)
    reference = decode_message(raw)
    assert isinstance(reference, ImageMessage)
    payload = bytes(reference.channel("threshold_2").payload)
    # An indefinite-length byte string (valid CBOR; no detector sends it): decoded whole.
    msg = decode_message(_indefinite(raw, payload))
    assert isinstance(msg, ImageMessage)
    assert msg.channel("threshold_2").payload == payload
    assert msg.channel("threshold_1").payload == reference.channel("threshold_1").payload
    np.testing.assert_array_equal(
        msg.channel("threshold_2").to_array(), reference.channel("threshold_2").to_array()
    )
    # The decoder's private placeholder tag in the detector's own data stays what it is.
    tagged = decode_message(
        _edited(raw, lambda m: m.__setitem__("user_data", cbor2.CBORTag(SLICE_TAG, 0)))
    )
    assert tagged.user_data == cbor2.CBORTag(SLICE_TAG, 0)
    # A large byte string outside the image data is plain bytes, as cbor2 gives it.
    blob = bytes(range(256)) * 8
    extra = decode_message(_edited(raw, lambda m: m.__setitem__("user_data", {"blob": blob})))
    assert extra.user_data == {"blob": blob} and isinstance(extra.user_data["blob"], bytes)


# ----- over a real ZeroMQ socket ----------------------------------------------------------------
@needs_data
def test_receiver_reads_recorded_messages_and_skips_garbage() -> None:
    """Recorded detector messages pushed over ZeroMQ, garbage in between: counted, skipped."""
    folder = "r500k_bm_bslz4_16bit"
    messages = [_raw(folder, name) for name in _image_files(folder)]
    messages.append(_raw(folder, "000011.cbor"))
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Stream2Receiver(f"tcp://127.0.0.1:{port}", timeout_ms=5000) as receiver:
            push.send(b"\xd9\xd9\xf7garbage")
            for raw in messages[:-1]:
                push.send(raw)
                push.send(raw[: len(raw) // 3])  # a truncated copy after each image
            push.send(messages[-1])
            received = []
            while not received or received[-1].type != "end":
                msg = receiver.receive()
                assert msg is not None, "receiver timed out"
                received.append(msg)
            assert [m.type for m in received] == ["image"] * (len(messages) - 1) + ["end"]
            assert [m.image_id for m in received[:-1]] == list(range(len(messages) - 1))
            assert all(m.received_ns is not None for m in received)
            assert zlib.crc32(received[0].channel().payload) == zlib.crc32(
                decode_message(messages[0]).channel().payload
            )
            assert receiver.malformed_total == len(messages)  # 1 garbage + 1 per image
            assert receiver.received_total == 2 * len(messages)
            assert receiver.receive(timeout_ms=50) is None
            # copy=False: the ZeroMQ frame itself, which the decoded payloads point into
            push.send(messages[0])
            raw = receiver.receive_raw(5000, copy=False)
            assert raw is not None and isinstance(raw[0], memoryview)
            image = decode_message(*raw)
            assert image.channel().payload == decode_message(messages[0]).channel().payload
            assert image.channel().payload.obj is raw[0].obj
    finally:
        push.close(linger=0)
        context.term()


def test_receiver_raises_malformed_when_asked() -> None:
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    try:
        receiver = Stream2Receiver(f"tcp://127.0.0.1:{port}", timeout_ms=5000, raise_malformed=True)
        try:
            push.send(b"junk")
            with pytest.raises(MalformedMessage, match="55799"):
                receiver.receive()
            assert receiver.malformed_total == 1
        finally:
            receiver.close()
            receiver.close()  # idempotent
    finally:
        push.close(linger=0)
        context.term()
