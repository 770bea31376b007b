"""Real run files for the readers' tests (report, figure, verify, the web view's replay).

`write_run` writes a run file through the real `RunWriter` (HDF5 on disk, its AnalysisLog for
the live results). Its events are the ones a real `ProtocolRunner` recorded while running an
interleaved closed-loop hold against test_runner's in-memory station, so the readers read back
exactly the messages the runner writes. The frames are synthetic (HRTEM: lattice fringes; LM:
flat), so which kind a frame is can be told from its pixels.

With `imaging=True` the writer is also told the microscope's imaging states, as the daemon
tells the ingest (from the run's microscope events, with a pixel size per mode), so each frame's
`imaging_mode` and `pixel_size` columns are filled in as in a real run. Without, they are
"unknown", as in a run whose microscope never reported its state.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from test_runner import RecordingStation

from insitu_daq.analysis.quantities import D_SPACING, INTENSITY
from insitu_daq.control.protocol import Acquire, Bias, Hold, Interleave, Microscope, Protocol
from insitu_daq.control.runner import ProtocolRunner, RunState
from insitu_daq.core.imaging import ImagingState
from insitu_daq.core.records import EventKind
from insitu_daq.report.events import imaging_modes
from insitu_daq.runfile.writer import FrameGeometry, RunMetadata, RunWriter

SHAPE = (64, 64)
FRAME_RATE_HZ = 5.0  # run-clock frames per second (enough to find frames in 1 s bursts)
HRTEM_MEAN, LM_LEVEL = 100.0, 1000
FRINGE_PERIOD_PX = 8.0
PIXEL_M = {"hrtem": 0.05e-9, "lm": 1e-9}  # the specimen-plane pixel of each mode (imaging=True)
DOSE_RATE = {"hrtem": 35.0, "lm": 2.0}  # e/A^2/s
HALF_EXPOSURE_S = 0.5 / FRAME_RATE_HZ  # each frame exposed for its whole period


class RockSaltAfterTwoBursts(RecordingStation):
    """Reports the rock-salt fraction as reached once two LM bursts are over."""

    def live_value(self, name: str) -> float | None:
        bursts = [c for c in self.events(EventKind.MICROSCOPE) if c.args[2]["cause"] != "step"]
        return 0.95 if len(bursts) >= 4 else 0.2


def run_protocol() -> RecordingStation:
    station = RockSaltAfterTwoBursts(time_scale=50.0)
    protocol = Protocol(
        name="figure",
        steps=[
            Microscope(mode="lm", beam=True, dose_rate_e_per_a2_s=2.0),
            Microscope(mode="hrtem", dose_rate_e_per_a2_s=35.0),
            Acquire(action="start"),
            Bias(volts=4.3, rate_volts_per_s=1.0),
            Hold(
                duration_s=60.0,
                until="rock_salt_fraction >= 0.9",
                interleave=Interleave(mode="lm", every_s=5.0, dwell_s=1.0),
            ),
            Bias(volts=0.0, rate_volts_per_s=1.0),
            Acquire(action="stop"),
        ],
    )
    runner = ProtocolRunner(station)
    runner.start(protocol)
    assert runner.wait(10.0)
    assert runner.progress.state is RunState.FINISHED
    return station


def hrtem_frame(rng: np.random.Generator, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    cols = np.arange(shape[1])
    fringes = HRTEM_MEAN * (1 + 0.3 * np.sin(2 * np.pi * cols / FRINGE_PERIOD_PX))
    return rng.poisson(np.broadcast_to(fringes, shape)).astype("<u2")


def frame_modes(station: RecordingStation) -> list[tuple[float, str]]:
    """(time, mode) of each imaging-mode change the run's events record, LM at its start."""
    return imaging_modes([(c.time, c.args[0], c.args[1]) for c in station.events()], "lm")


def write_run(
    path: Path,
    with_analysis: bool = True,
    shape: tuple[int, int] = SHAPE,
    imaging: bool = False,
    run_id: str = "figure-test",
) -> RecordingStation:
    station = run_protocol()
    start = station.calls("start_recording")[0].time
    stop = station.calls("stop_recording")[0].time
    meta = RunMetadata(
        run_id=run_id,
        title="report figure test",
        start_time_ns=time.time_ns(),
        protocol_name="figure",
        microscope={"mode": "lm"},
        reflections=("lno_003", "nio_200") if with_analysis else (),
        analysis_parameters={
            "reflections": [
                {"name": "lno_003", "label": "LiNiO2 (003)", "d_angstrom": 4.8, "phase": "layered"},
                {"name": "nio_200", "label": "NiO (200)", "d_angstrom": 2.1, "phase": "rock_salt"},
            ]
        },
    )
    writer = RunWriter(path, meta, FrameGeometry(("threshold_1",), shape, "<u2", None))
    for call in station.events():
        writer.write_event(call.time, call.args[0], call.args[1])
    modes = frame_modes(station)
    if imaging:
        for when, mode in modes:
            writer.add_imaging_state(ImagingState(when, when, mode, PIXEL_M[mode], DOSE_RATE[mode]))
    rng = np.random.default_rng(1)
    times = np.arange(start, stop, 1.0 / FRAME_RATE_HZ)
    for index, t in enumerate(times):
        mode = [m for when, m in modes if when <= t][-1]
        frame = hrtem_frame(rng, shape) if mode == "hrtem" else np.full(shape, LM_LEVEL, "<u2")
        row = (t, t, t, t, 0.0, 0.0)  # frame, detector start and stop, received; clock offset
        writer.write_frame(index, 1, {"threshold_1": frame}, *row, half_exposure=HALF_EXPOSURE_S)
        if with_analysis:
            writer.write_analysis(result_at(t, mode, index, start, stop))
    if imaging:
        writer.advance_imaging(math.inf)
    t = np.linspace(0.0, stop + 1.0, 200)
    volts = np.where((t > start + 4.3) & (t < stop - 4.3), 4.3, 0.0)
    writer.write_bias_samples(t, t * 0 + 1e-3, volts, volts, volts * 1e-10, np.zeros(len(t)))
    writer.close(time.time_ns())
    return station


def result_at(t: float, mode: str, image_id: int, start: float, stop: float) -> dict[str, Any]:
    progress = (t - start) / (stop - start)
    if mode == "hrtem":
        values: dict[str, Any] = {
            D_SPACING.key_for("lno_003"): 4.8e-10 if progress < 0.7 else None,
            INTENSITY.key_for("lno_003"): 10.0 * (1 - progress),
            D_SPACING.key_for("nio_200"): 2.1e-10 if progress > 0.3 else None,
            INTENSITY.key_for("nio_200"): 10.0 * progress,
            "layered_fraction": 1 - progress,
            "disordered_fraction": 0.0,
            "rock_salt_fraction": progress,
        }
    else:
        values = {
            "expansion": 0.3 * progress,
            "front_position_nm": 400.0 * progress,
            "front_velocity_nm_s": 4.5,
            "projected_area_m2": 2e-13,
        }
    return {"time": t, "image_id": image_id, "latency_s": 0.01, "skipped": 0, "values": values}
