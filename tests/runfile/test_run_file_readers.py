"""The run file in the readers microscopists use: HyperSpy's (RosettaSciIO's NeXus reader,
`rsciio.nexus.file_reader`, what `hyperspy.api.load` calls), nexusformat and silx.

The file is a real one written by RunWriter with the real EIGER2 frames (3 channels, 514 x
1030, bslz4 as received): HRTEM at 0.06 nm/px, a switch to LM at 1 nm/px and back to HRTEM
at 0.05 nm/px (test_runfile_imaging's run), bias readings, events, a live-analysis result,
a holder that reported no position. Each reader gets calibrated image axes from the per-mode
NXdata and reads the frames (through `hdf5plugin`, as the README tells readers to import);
and nowhere in the file is there an empty dataset (RosettaSciIO reads every dataset as
metadata and fails on one: "can only convert an array of size 1 to a Python scalar").
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the frames are bslz4: readers must import it, README)
import numpy as np
import pytest
from test_runfile_imaging import ORDERS, Run

CALIBRATION_NM = {"images_hrtem": 0.06, "images_lm": 1.0, "images_hrtem_2": 0.05}


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory, stream2_testdata: Path) -> Path:
    path = tmp_path_factory.mktemp("readers") / "readers.h5"
    run = Run(path, stream2_testdata / "r500k_bm_bslz4_16bit")
    writer = run.writer
    writer.write_event(0.0, "run", "opened")
    for step in ORDERS["as_it_happened"]:
        step(run)
    t = np.linspace(0.0, 3.1, 32)
    writer.write_bias_samples(t, t * 0 + 1e-4, t, t, t * 1e-9, np.zeros(len(t), dtype=np.uint32))
    writer.write_analysis({"time": 1.7, "image_id": 17, "values": {"expansion": 0.01}})
    writer.write_event(3.1, "run", "closed")
    writer.close(time.time_ns())
    return path


def test_no_dataset_anywhere_in_the_file_is_empty(run_file: Path) -> None:
    sizes: dict[str, int] = {}
    with h5py.File(run_file, "r") as f:
        f.visititems(
            lambda name, item: (
                sizes.update({name: item.size}) if isinstance(item, h5py.Dataset) else None
            )
        )
    assert len(sizes) > 50
    assert [name for name, size in sizes.items() if size == 0] == []
    assert "entry/instrument/holder/position/value" not in sizes  # nothing reported one


def test_rosettasciio_loads_each_mode_with_calibrated_image_axes(run_file: Path) -> None:
    from rsciio.nexus import file_reader

    for lazy in (False, True):
        signals = {s["metadata"]["General"]["title"]: s for s in file_reader(run_file, lazy=lazy)}
        for name, pixel_nm in CALIBRATION_NM.items():
            signal = signals[name]
            image_axes = [axis for axis in signal["axes"] if not axis["navigate"]]
            assert [axis["name"] for axis in image_axes] == ["y", "x"]
            assert [axis["size"] for axis in image_axes] == [514, 1030]
            for axis in image_axes:
                assert axis["scale"] == pytest.approx(pixel_nm)
                assert axis["units"] == "nm"
        lm = np.asarray(signals["images_lm"]["data"][0])
        assert lm.shape == (514, 1030) and lm.max() > 0  # frames read through the VDS
    default = file_reader(run_file, use_default=True)
    assert len(default) == 1 and default[0]["data"].shape == (30, 514, 1030)


def test_nexusformat_finds_the_axes_their_units_and_the_frames(run_file: Path) -> None:
    from nexusformat.nexus import nxload

    root = nxload(str(run_file))
    try:
        assert root["entry"].get_default().nxpath == "/entry/data"
        for name, pixel_nm in CALIBRATION_NM.items():
            data = root[f"entry/{name}"]
            frame_time, y, x = data.nxaxes
            assert (frame_time.nxname, y.nxname, x.nxname) == ("frame_time", "y", "x")
            for axis in (y, x):
                assert axis.attrs["units"] == "nm"
                np.testing.assert_allclose(np.diff(axis.nxvalue), pixel_nm)
            assert frame_time.attrs["units"] == "s"
            # nexusformat takes a virtual dataset for one source file per frame and misreads
            # these (runfile/finish.py): its frames are read from /entry/data at frame_index.
            rows = data["frame_index"].nxvalue
            assert len(rows) == len(frame_time)
            first = np.asarray(root["entry/data"].nxsignal[int(rows[0])].nxvalue)
            assert first.shape == (514, 1030) and first.max() > 0
    finally:
        root.nxfile.close()


def test_silx_sees_valid_image_nxdata_with_calibrated_axes(run_file: Path) -> None:
    from silx.io.nxdata import NXdata, get_default

    with h5py.File(run_file, "r") as f:
        default = get_default(f)
        assert default is not None and default.group.name == "/entry/data"
        for name, pixel_nm in CALIBRATION_NM.items():
            nxdata = NXdata(f[f"/entry/{name}"])
            assert nxdata.is_valid and nxdata.interpretation == "image"
            assert nxdata.axes_dataset_names == ["frame_time", "y", "x"]
            for axis in nxdata.axes[1:]:
                assert axis.attrs["units"] == "nm"
                np.testing.assert_allclose(np.diff(axis[()]), pixel_nm)
            assert nxdata.signal[0].max() > 0
            assert nxdata.auxiliary_signals_dataset_names == ["data_difference", "data_threshold_2"]
