"""The run file follows the stream's frame geometry (RunWriter with the real EIGER2 messages).

A series may start after the run opened with the config's default geometry, or the detector
may change shape, channels, pixel type or compression mid-run. The frames of each geometry
are stored as received, bit for bit, in datasets made for it; the file leaves SWMR for the
moment it takes to make them, and a SWMR reader that reopens the file sees them. At close
the file keeps no empty dataset (NeXus readers fail on them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters for reading)
import numpy as np
import pytest

from insitu_daq.core.config import DetectorConfig
from insitu_daq.drivers.stream2 import ImageMessage, decode_message
from insitu_daq.ingest.frames import chunks_for_file, default_geometry, geometry_of_image
from insitu_daq.ingest.wire import series_dtype
from insitu_daq.report.summary import format_summary, summarize
from insitu_daq.runfile.writer import FrameGeometry, GeometryRefusedError, RunMetadata, RunWriter

DETECTOR = "/entry/instrument/detector"
CONFIG = DetectorConfig()


def _images(folder: Path) -> list[ImageMessage]:
    messages = [decode_message(p.read_bytes()) for p in sorted(folder.glob("*.cbor"))]
    return [m for m in messages if isinstance(m, ImageMessage)]


def _writer(path: Path, geometry: FrameGeometry, **kwargs: int) -> RunWriter:
    meta = RunMetadata(run_id=path.stem, title="layout test", start_time_ns=time.time_ns())
    return RunWriter(path, meta, geometry, **kwargs)


def _write(writer: RunWriter, images: list[ImageMessage], t0: float) -> list[str | None]:
    """Write images as the ingest does (stack_for, chunks as received); what changed."""
    changes = []
    for i, image in enumerate(images):
        stack, change = writer.stack_for(geometry_of_image(image, CONFIG))
        changes.append(change)
        chunks, refiltered = chunks_for_file(image, writer.geometries[stack])
        assert not refiltered
        t = t0 + 0.1 * i
        writer.write_frame(
            image.image_id, image.series_id, chunks, t, t, t, t, 0.0, 0.0, stack=stack
        )
    return changes


def _stored_bit_exact(detector: h5py.Group, images: list[ImageMessage]) -> None:
    assert detector["data"].attrs["channel"] == next(iter(images[0].channels))
    assert list(detector["image_id"][()]) == [m.image_id for m in images]
    for name in images[0].channels:
        dataset = detector["data" if name == next(iter(images[0].channels)) else f"data_{name}"]
        assert dataset.shape[0] == len(images)
        for i, image in enumerate(images):
            assert dataset.id.read_direct_chunk((i, 0, 0))[1] == image.channels[name].payload
            np.testing.assert_array_equal(dataset[i], image.channels[name].to_array())


def test_a_series_later_than_the_default_geometry_remakes_the_empty_frame_datasets(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    images = _images(stream2_testdata / "r500k_bm_bslz4_16bit")
    path = tmp_path / "late.h5"
    writer = _writer(path, default_geometry(CONFIG))  # 1 channel 1024 x 1024: no frame yet
    changes = _write(writer, images, 3.0)
    writer.close(time.time_ns())

    assert changes[0] is not None and "re-made" in changes[0] and changes[1:] == [None, None]
    assert writer.layout_changes == 1
    with h5py.File(path, "r") as f:
        assert "detector_1" not in f["/entry/instrument"]  # the contract's paths hold them
        _stored_bit_exact(f[DETECTOR], images)
        assert f[DETECTOR]["data"].shape == (3, 514, 1030)
        assert f[f"{DETECTOR}/compression"][()] == b"bslz4"
        np.testing.assert_array_equal(f["/entry/data/data"][2], images[2].channel().to_array())


def test_a_new_geometry_mid_run_gets_its_own_detector_and_returns_to_its_first(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    first = _images(stream2_testdata / "r500k_bm_bslz4_16bit")
    wider = _images(stream2_testdata / "r500k_bm_bslz4_32bit")  # another pixel type
    other = _images(stream2_testdata / "r500k_bm_lz4_16bit")  # another compression
    path = tmp_path / "changed.h5"
    writer = _writer(path, geometry_of_image(first[0], CONFIG))
    changes = _write(writer, first[:2], 0.0)
    changes += _write(writer, wider, 1.0)
    changes += _write(writer, other, 2.0)
    changes += _write(writer, first[2:], 3.0)  # back to the first geometry: its datasets
    writer.close(time.time_ns())

    made = [change for change in changes if change is not None]
    assert len(made) == 2 and "detector_1" in made[0] and "detector_2" in made[1]
    assert writer.frames_written == 9
    with h5py.File(path, "r") as f:
        _stored_bit_exact(f[DETECTOR], first)
        _stored_bit_exact(f[f"{DETECTOR}_1"], wider)
        _stored_bit_exact(f[f"{DETECTOR}_2"], other)
        assert f[f"{DETECTOR}_1/data"].dtype == np.dtype("<u4")
        plist = f[f"{DETECTOR}_2/data"].id.get_create_plist()
        assert plist.get_filter(0)[0] == 32004  # lz4 chunks, as the detector sent them
        for k in (1, 2):
            group = f[f"/entry/frames_{k}"]
            assert group.attrs["NX_class"] == "NXdata" and group.attrs["signal"] == "data"
            assert group["data"].shape == (3, 514, 1030)
            assert group["frame_time"].shape == (3,)
        assert f[f"{DETECTOR}_1"].attrs["NX_class"] == "NXdetector"
        assert f["/entry/data/data"].shape[0] == 3  # /entry/data: the first geometry
    summary = summarize(path)  # `insitu-daq report` counts every geometry's frames
    assert summary.frames == 3 and summary.missing_image_ids == 0
    assert [(p, n) for p, n, _ in summary.other_geometries] == [
        (f"{DETECTOR}_1", 3),
        (f"{DETECTOR}_2", 3),
    ]
    assert f"3 of 514x1030 in {DETECTOR}_2" in format_summary(summary)


# A SWMR reader in another process (as a viewer would be): holds the file open, then on each
# line from the test reopens it (or refreshes) and reports what it sees, as JSON.
READER = """
import json, sys
import h5py, hdf5plugin
path = sys.argv[1]
f = h5py.File(path, "r", libver="latest", swmr=True)
def report():
    instrument = f["/entry/instrument"]
    frames = {name: instrument[name]["frame_time"].shape[0] for name in instrument
              if name.startswith("detector")}
    print(json.dumps(frames), flush=True)
report()
for line in sys.stdin:
    if line.strip() == "reopen":
        f.close()
        f = h5py.File(path, "r", libver="latest", swmr=True)
    else:
        for name in f["/entry/instrument"]:
            if name.startswith("detector"):
                f[f"/entry/instrument/{name}/frame_time"].refresh()
    report()
"""


def test_a_swmr_reader_that_reopens_after_a_layout_change_sees_the_new_frames(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    first = _images(stream2_testdata / "r500k_bm_bslz4_8bit")
    second = _images(stream2_testdata / "r500k_bm_bslz4_16bit")
    path = tmp_path / "swmr.h5"
    writer = _writer(path, geometry_of_image(first[0], CONFIG))
    _write(writer, first, 0.0)
    writer.flush()
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def ask(line: str | None = None) -> dict[str, int]:
        assert reader.stdin is not None and reader.stdout is not None
        if line is not None:
            reader.stdin.write(line + "\n")
            reader.stdin.flush()
        return json.loads(reader.stdout.readline())

    try:
        assert ask() == {"detector": 3}
        # The reader's shared file lock does not stop the writer's reopen.
        _write(writer, second, 1.0)
        writer.flush()
        assert ask("reopen") == {"detector": 3, "detector_1": 3}
        _write(writer, second[:1], 2.0)  # SWMR again: appends are seen with a refresh
        writer.flush()
        assert ask("refresh") == {"detector": 3, "detector_1": 4}
    finally:
        if reader.stdin is not None:
            reader.stdin.close()
        reader.wait(10)
        writer.close(time.time_ns())
    assert reader.returncode == 0
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(
            f[f"{DETECTOR}_1/data_difference"][1], second[1].channels["difference"].to_array()
        )


def test_geometries_past_the_limit_are_refused_not_followed(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    folders = ("r500k_bm_bslz4_8bit", "r500k_bm_bslz4_16bit", "r500k_bm_bslz4_32bit")
    images = [_images(stream2_testdata / folder)[0] for folder in folders]
    writer = _writer(tmp_path / "capped.h5", geometry_of_image(images[0], CONFIG), max_geometries=2)
    _write(writer, images[:2], 0.0)
    with pytest.raises(GeometryRefusedError, match="at most 2"):
        writer.stack_for(geometry_of_image(images[2], CONFIG))
    writer.close(time.time_ns())
    assert writer.frames_written == 2


def test_records_after_a_layout_change_land_in_the_reopened_file(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    # Every handle the writer's parts hold (logs, analysis log, frame stacks) is found again.
    first = _images(stream2_testdata / "r500k_bm_bslz4_8bit")
    second = _images(stream2_testdata / "r500k_bm_bslz4_16bit")
    path = tmp_path / "handles.h5"
    writer = _writer(path, geometry_of_image(first[0], CONFIG))
    _write(writer, first, 0.0)
    writer.write_event(0.1, "mark", "before")
    _write(writer, second, 1.0)
    writer.write_event(1.1, "mark", "after")
    writer.write_series(
        "holder_position", np.array([(1.2, 0.002, 250.0)], series_dtype("holder_position"))
    )
    t = np.array([0.0, 2.0])
    writer.write_bias_samples(t, t * 0, t, t, t * 1e-9, np.zeros(2, dtype=np.uint32))
    writer.write_analysis({"time": 1.5, "image_id": 1, "values": {"expansion": 0.01}})
    writer.close(time.time_ns())
    with h5py.File(path, "r") as f:
        assert [m.decode() for m in f["/entry/events/message"][()]] == ["before", "after"]
        assert f["/entry/instrument/holder/position/value"][()].tolist() == [250.0]
        assert f["/entry/analysis/expansion/value"][()].tolist() == [0.01]
        np.testing.assert_allclose(f[f"{DETECTOR}_1/bias_voltage"][()], [1.0, 1.1, 1.2])
        np.testing.assert_allclose(f[f"{DETECTOR}/bias_voltage"][()], [0.0, 0.1, 0.2])


def _empty_datasets(f: h5py.File) -> list[str]:
    empty: list[str] = []
    f.visititems(
        lambda name, item: (
            empty.append(name) if isinstance(item, h5py.Dataset) and item.size == 0 else None
        )
    )
    return empty


def _dangling_links(f: h5py.File) -> list[str]:
    dangling: list[str] = []

    def visit(name: str, item: h5py.HLObject) -> None:
        if isinstance(item, h5py.Group):
            for key in item:
                link = item.get(key, getlink=True)
                if isinstance(link, h5py.SoftLink) and link.path not in f:
                    dangling.append(f"{name}/{key}")

    f.visititems(visit)
    return dangling


def test_a_closed_run_file_has_no_empty_dataset_and_no_dangling_link(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    images = _images(stream2_testdata / "r500k_bm_bslz4_16bit")
    path = tmp_path / "sparse.h5"
    meta = RunMetadata(
        run_id="sparse",
        title="no holder, no analysis",
        start_time_ns=time.time_ns(),
        holder={"identity": "OPEN-CELL 1"},
    )
    writer = RunWriter(path, meta, geometry_of_image(images[0], CONFIG))
    _write(writer, images, 0.0)
    writer.write_event(0.0, "run", "opened")
    writer.close(time.time_ns())
    with h5py.File(path, "r") as f:
        assert _empty_datasets(f) == []
        assert _dangling_links(f) == []
        holder = f["/entry/instrument/holder"]
        assert "position" not in holder  # nothing recorded it: left out, not empty
        assert holder["identity"][()] == b"OPEN-CELL 1"
        assert "bias_voltage" not in f["/entry/sample"]  # no source-meter reading
        assert f[f"{DETECTOR}/data"].shape[0] == 3 and f["/entry/events/time"].shape == (1,)
    assert "/entry/instrument/holder/position/value" in writer.finished.removed


def test_a_run_without_frames_keeps_its_frame_datasets(tmp_path: Path) -> None:
    path = tmp_path / "frameless.h5"
    writer = _writer(path, default_geometry(CONFIG))
    writer.close(time.time_ns())
    with h5py.File(path, "r") as f:
        assert f[f"{DETECTOR}/data"].shape == (0, 1024, 1024)
        assert f["/entry/data/frame_time"].shape == (0,)
        assert "events" not in f["/entry"]
