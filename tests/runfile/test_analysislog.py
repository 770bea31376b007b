"""/entry/analysis in a real run file (runfile/analysislog.py through RunWriter): NeXus classes,
units, one row per result in each log that result measures, NaN for "not measurable", and a reader
attached in SWMR mode seeing the rows appended after the file switched to SWMR."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from insitu_daq.analysis.reflections import DEFAULT_REFLECTIONS
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata, RunWriter

NAMES = DEFAULT_REFLECTIONS.names


def _writer(path: Path) -> RunWriter:
    meta = RunMetadata(
        run_id="r1",
        title="analysis log",
        start_time_ns=time.time_ns(),
        reflections=NAMES,
        analysis_parameters={"hrtem_integration_s": 1.0, "phase_map_interval_s": 0.25},
    )
    return RunWriter(path, meta, FrameGeometry(("threshold_1",), (8, 8), "<u2", None))


def _hrtem(t: float, image_id: int, with_phases: bool) -> dict:
    values: dict = {}
    for name in NAMES:
        values[f"d_spacing_m.{name}"] = 4.8e-10 if name == "lno_003" else None
        values[f"intensity.{name}"] = 0.02 if name == "lno_003" else 1e-5
    if with_phases:
        values.update(layered_fraction=0.75, disordered_fraction=0.05, rock_salt_fraction=0.2)
        values.update(layered_presence=0.8, disordered_presence=0.1, rock_salt_presence=0.3)
    return {"time": t, "image_id": image_id, "latency_s": 0.02, "skipped": 1,
            "integrated_frames": 40, "values": values}  # fmt: skip


def _lm(t: float, image_id: int) -> dict:
    values = {"projected_area_m2": 2.0e-13, "expansion": 0.12, "front_position_nm": 150.0,
              "front_velocity_nm_s": None}  # fmt: skip
    return {"time": t, "image_id": image_id, "latency_s": 0.03, "skipped": 0,
            "integrated_frames": 8, "values": values}  # fmt: skip


def test_analysis_logs_read_back_with_classes_units_and_nan(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = _writer(path)
    writer.write_analysis(_hrtem(1.0, 40, with_phases=True))
    writer.write_analysis(_hrtem(1.025, 41, with_phases=False))
    writer.write_analysis(_lm(2.0, 80))
    writer.write_analysis({"values": {}})  # no time: refused, counted
    assert writer._analysis_log.malformed_total == 1
    writer.close(time.time_ns())

    with h5py.File(path, "r") as f:
        process = f["/entry/analysis"]
        assert process.attrs["NX_class"] == "NXprocess"
        assert process["program"][()].decode().startswith("insitu-daq")
        parameters = json.loads(process["parameters/data"][()])
        assert parameters["phase_map_interval_s"] == 0.25
        assert process["d_spacing"].attrs["NX_class"] == "NXcollection"
        for name in NAMES:
            log = process[f"d_spacing/{name}"]
            assert log.attrs["NX_class"] == "NXlog"
            assert log["time"].attrs["units"] == "s" and log["value"].attrs["units"] == "m"
            np.testing.assert_array_equal(log["time"][:], [1.0, 1.025])
        d003 = process["d_spacing/lno_003"]
        np.testing.assert_allclose(d003["value"][:], [4.8e-10, 4.8e-10])
        np.testing.assert_allclose(d003["intensity"][:], [0.02, 0.02])
        assert np.isnan(process["d_spacing/nio_200/value"][:]).all()  # not detected: NaN
        rock_salt = process["phase_fraction/rock_salt"]
        assert rock_salt.attrs["NX_class"] == "NXlog" and rock_salt["value"].attrs["units"] == "1"
        np.testing.assert_array_equal(rock_salt["time"][:], [1.0])  # only the mapped result
        np.testing.assert_allclose(rock_salt["value"][:], [0.2])
        np.testing.assert_allclose(rock_salt["presence"][:], [0.3])
        assert rock_salt["presence"].attrs["units"] == "1"
        for group, units, value in (
            ("front_position", "nm", 150.0),
            ("expansion", "1", 0.12),
            ("projected_area", "m^2", 2.0e-13),
        ):
            log = process[group]
            assert log.attrs["NX_class"] == "NXlog" and log["value"].attrs["units"] == units
            np.testing.assert_array_equal(log["time"][:], [2.0])
            assert log["value"][0] == pytest.approx(value)
        assert math.isnan(process["front_velocity/value"][0])  # analysed, not measurable
        results = process["results"]
        np.testing.assert_array_equal(results["image_id"][:], [40, 41, 80])
        np.testing.assert_array_equal(results["integrated_frames"][:], [40, 40, 8])
        assert results["latency"].attrs["units"] == "s"
        assert f["/entry/analysis/front_position/time"].attrs["start"]


def test_swmr_reader_sees_analysis_rows_appended_after_the_switch(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = _writer(path)
    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as reader:
            expansion = reader["/entry/analysis/expansion/value"]
            assert expansion.shape == (0,)
            writer.write_analysis(_lm(0.5, 1))
            writer.write_analysis(_lm(0.75, 2))
            writer.flush()
            expansion.refresh()
            assert expansion.shape == (2,)
    finally:
        writer.close(time.time_ns())
