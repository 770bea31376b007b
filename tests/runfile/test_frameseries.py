"""Per-frame columns of logged series (runfile/frameseries.py): a heating holder's temperature
at each frame's time, in every frame stack, through the real RunWriter and the real detector
messages (a run with no reading at all leaves no column: test_runfile_layout's sparse run).
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
from test_runfile_layout import CONFIG, _images, _write, _writer

from insitu_daq.ingest.frames import geometry_of_image
from insitu_daq.ingest.wire import series_dtype
from insitu_daq.runfile.layout import DETECTOR, TEMPERATURE


def _temperatures(*rows: tuple[float, float]) -> np.ndarray:
    """Rows of the holder_temperature series: (time, half-width, value, setpoint)."""
    return np.array([(t, 0.001, v, v) for t, v in rows], series_dtype(TEMPERATURE.record))


def test_each_frame_gets_the_temperature_log_at_its_time_in_every_stack(
    tmp_path: Path, stream2_testdata: Path
) -> None:
    first = _images(stream2_testdata / "r500k_bm_bslz4_8bit")[:3]
    second = _images(stream2_testdata / "r500k_bm_bslz4_16bit")[:3]
    path = tmp_path / "heated.h5"
    writer = _writer(path, geometry_of_image(first[0], CONFIG))
    _write(writer, first, 0.0)  # frames at 0.0, 0.1, 0.2 s
    writer.write_series(TEMPERATURE.record, _temperatures((0.05, 30.0), (0.15, 40.0)))
    writer.flush()  # the frame at 0.2 s waits: no reading at or after it yet
    _write(writer, second, 1.0)  # a new geometry: a second stack, the file reopened
    writer.write_series(TEMPERATURE.record, _temperatures((1.05, 50.0)))
    writer.close(time.time_ns())
    with h5py.File(path, "r") as f:
        assert f[f"{DETECTOR}/temperature"].attrs["units"] == "degC"
        np.testing.assert_allclose(
            f[f"{DETECTOR}/temperature"][()], [30.0, 35.0, 40.0 + 10.0 * 0.05 / 0.9]
        )
        # Clamped after the last reading, as at the first: no extrapolation.
        np.testing.assert_allclose(
            f[f"{DETECTOR}_1/temperature"][()], [40.0 + 10.0 * 0.85 / 0.9, 50.0, 50.0]
        )
        assert f["/entry/sample/temperature/value"][()].tolist() == [30.0, 40.0, 50.0]
