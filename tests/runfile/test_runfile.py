"""The run file: NeXus layout, frames stored as received, per-frame bias, SWMR reading."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from insitu_daq.core.records import STATUS_LEVEL_CHANGE
from insitu_daq.drivers.stream2 import ImageMessage, decode_message
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata, RunWriter


def _images(folder: Path) -> list[ImageMessage]:
    messages = [decode_message(p.read_bytes()) for p in sorted(folder.glob("*.cbor"))]
    return [m for m in messages if isinstance(m, ImageMessage)]


def _writer(path: Path, image: ImageMessage, compression: str | None) -> RunWriter:
    first = image.channel()
    geometry = FrameGeometry(tuple(image.channels), first.shape, first.dtype.str, compression)
    meta = RunMetadata(
        run_id="test-run",
        title="run file test",
        start_time_ns=time.time_ns(),
        protocol_text="steps: []\n",
        protocol_name="empty.yaml",
        source_meter={"model": "MODEL 2400", "compliance_amperes": 1e-7},
        pixel_size_m=(75e-6, 75e-6),
    )
    return RunWriter(path, meta, geometry)


def _write_frames(writer: RunWriter, images: list[ImageMessage], raw: bool) -> None:
    for i, image in enumerate(images):
        chunks = {
            name: (channel.to_array() if raw else channel.direct_chunk())
            for name, channel in image.channels.items()
        }
        t = 0.1 * (i + 1)
        writer.write_frame(image.image_id, image.series_id, chunks, t, t, t, t, 0.0, 0.0)


@pytest.mark.parametrize(
    ("folder", "stored"),
    [
        ("r500k_bm_bslz4_16bit", "bslz4"),
        ("r500k_bm_bslz4_32bit", "bslz4"),
        ("r500k_bm_lz4_16bit", "lz4"),
        ("r500k_bm_bslz4_8bit", None),
    ],
)
def test_frames_read_back_bit_exact(
    tmp_path: Path, stream2_testdata: Path, folder: str, stored: str | None
) -> None:
    images = _images(stream2_testdata / folder)
    path = tmp_path / "run.h5"
    writer = _writer(path, images[0], stored)
    _write_frames(writer, images, raw=stored is None)
    writer.close(time.time_ns())
    with h5py.File(path, "r") as f:
        detector = f["/entry/instrument/detector"]
        assert detector["data"].shape == (len(images), 514, 1030)
        assert list(detector["image_id"][:]) == [m.image_id for m in images]
        for i, image in enumerate(images):
            arrays = image.decompress()
            names = list(arrays)
            assert np.array_equal(detector["data"][i], arrays[names[0]])
            for name in names[1:]:
                assert np.array_equal(detector[f"data_{name}"][i], arrays[name])
        plist = detector["data"].id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        assert filters == {"bslz4": [32008], "lz4": [32004], None: []}[stored]


def test_nexus_layout_has_classes_and_units(tmp_path: Path, stream2_testdata: Path) -> None:
    images = _images(stream2_testdata / "r500k_bm_bslz4_16bit")
    path = tmp_path / "run.h5"
    writer = _writer(path, images[0], "bslz4")
    _write_frames(writer, images[:1], raw=False)
    writer.write_event(0.05, "step", "approach")
    writer.write_bias_samples(*_samples([0.0, 0.2], [0.0, 0.1]))  # (an empty log is left out)
    writer.close(time.time_ns())
    with h5py.File(path, "r") as f:
        assert f["/entry"].attrs["default"] == "data"
        assert f["/entry/data"].attrs["signal"] == "data"
        assert np.array_equal(f["/entry/data/data"][0], f["/entry/instrument/detector/data"][0])
        groups = []
        f.visititems(lambda name, obj: groups.append(obj) if isinstance(obj, h5py.Group) else None)
        assert all("NX_class" in g.attrs for g in groups), [g.name for g in groups]
        for name in ("frame_time", "bias_voltage", "current", "detector_start_time"):
            assert "units" in f[f"/entry/instrument/detector/{name}"].attrs
        for name in ("time", "value", "setpoint"):
            assert "units" in f[f"/entry/sample/bias_voltage/{name}"].attrs
        assert f["/entry/protocol/data"][()].decode() == "steps: []\n"
        assert f["/entry/events/message"][0] == b"approach"
        assert f["/entry/end_time"][()].decode().startswith("20")


def _samples(times: list[float], volts: list[float]) -> tuple[np.ndarray, ...]:
    t = np.array(times)
    v = np.array(volts)
    return t, np.full_like(t, 1e-4), v, v, v * 1e-9, np.zeros(len(t), dtype=np.uint32)


def test_frame_bias_is_interpolated_once_samples_bracket_it(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    images = _images(stream2_testdata / "r500k_bm_bslz4_16bit")[:3]  # frame times 0.1, 0.2, 0.3
    path = tmp_path / "run.h5"
    writer = _writer(path, images[0], "bslz4")
    _write_frames(writer, images, raw=False)
    writer.write_bias_samples(*_samples([0.0, 0.25], [0.0, 2.5]))
    writer.flush()
    with h5py.File(path, "r", libver="latest", swmr=True) as reader:
        bias = reader["/entry/instrument/detector/bias_voltage"]
        # 0.1 and 0.2 are bracketed; 0.3 waits for a later sample
        assert bias[:2] == pytest.approx([1.0, 2.0])
        assert np.isnan(bias[2])
        writer.write_bias_samples(*_samples([0.35], [2.0]))
        writer.flush()
        bias.refresh()
        assert bias[2] == pytest.approx(2.5 - 0.5 * (0.05 / 0.1))
    writer.close(time.time_ns())
    with h5py.File(path, "r") as f:
        current = f["/entry/instrument/detector/current"][:]
        assert current == pytest.approx([1e-9, 2e-9, 2.25e-9])
        assert f["/entry/sample/current/time"][:] == pytest.approx([0.0, 0.25, 0.35])


def _level_changes(times: list[float], levels: list[float]) -> tuple[np.ndarray, ...]:
    t = np.array(times)
    nan = np.full_like(t, np.nan)
    flags = np.full(len(t), STATUS_LEVEL_CHANGE, dtype=np.uint32)
    return t, np.full_like(t, 5e-5), nan, np.array(levels), nan, flags


def test_frame_bias_follows_the_stamped_staircase_between_readings(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    # Readings at 0 and 0.25 s; the source stepped 1 V -> 2 V at 0.15 s and read 0.01 V
    # above its setpoint. Frames at 0.1 and 0.2 s straddle the step: interpolating the
    # readings would give ~1.4 and ~1.8 V; the frames saw 1.01 and 2.01 V.
    images = _images(stream2_testdata / "r500k_bm_bslz4_16bit")[:2]
    path = tmp_path / "run.h5"
    writer = _writer(path, images[0], "bslz4")
    _write_frames(writer, images, raw=False)
    batch = [np.concatenate(columns) for columns in zip(
        _level_changes([-0.01], [1.0]),
        _samples([0.0], [1.01]),
        _level_changes([0.15], [2.0]),
        _samples([0.25], [2.01]),
        strict=True,
    )]  # fmt: skip
    writer.write_bias_samples(*batch)
    writer.close(time.time_ns())
    with h5py.File(path, "r") as f:
        assert f["/entry/instrument/detector/bias_voltage"][:] == pytest.approx([1.01, 2.01])
        level = f["/entry/instrument/source_meter/output_level"]
        assert level.attrs["NX_class"] == "NXlog"
        assert level["time"][:] == pytest.approx([-0.01, 0.15])
        assert level["value"][:] == pytest.approx([1.0, 2.0])
        assert level["value"].attrs["units"] == "V"
        # the bias log holds the readings only
        assert f["/entry/sample/bias_voltage/value"][:] == pytest.approx([1.01, 2.01])
        assert f["/entry/sample/bias_voltage/time"][:] == pytest.approx([0.0, 0.25])


def test_reader_sees_frames_while_the_run_is_written(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    images = _images(stream2_testdata / "r500k_bm_bslz4_16bit")
    path = tmp_path / "run.h5"
    writer = _writer(path, images[0], "bslz4")
    _write_frames(writer, images[:1], raw=False)
    writer.flush()
    with h5py.File(path, "r", libver="latest", swmr=True) as reader:
        data = reader["/entry/instrument/detector/data"]
        assert data.shape[0] == 1
        _write_frames(writer, images[1:2], raw=False)
        writer.flush()
        data.refresh()
        assert data.shape[0] == 2
        assert np.array_equal(data[1], images[1].channel().to_array())
    writer.close(time.time_ns())


def test_events_are_in_time_order_once_closed(tmp_path: Path, stream2_testdata: Path) -> None:
    images = _images(stream2_testdata / "r500k_bm_bslz4_16bit")
    writer = _writer(tmp_path / "run.h5", images[0], "bslz4")
    for time_s, message in [(2.0, "second"), (1.0, "first"), (3.0, "third"), (1.0, "also first")]:
        writer.write_event(time_s, "mark", message)
    writer.close(time.time_ns())
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert list(f["/entry/events/time"][:]) == [1.0, 1.0, 2.0, 3.0]
        assert [m.decode() for m in f["/entry/events/message"][:]] == [
            "first",
            "also first",
            "second",
            "third",
        ]


def test_metadata_units_follow_the_key_names(tmp_path: Path, stream2_testdata: Path) -> None:
    images = _images(stream2_testdata / "r500k_bm_bslz4_16bit")
    writer = _writer(tmp_path / "run.h5", images[0], "bslz4")
    writer.close(time.time_ns())
    with h5py.File(tmp_path / "run.h5", "r") as f:
        compliance = f["/entry/instrument/source_meter/compliance_amperes"]
        assert compliance.attrs["units"] == "A"
        assert "units" not in f["/entry/instrument/source_meter/model"].attrs
