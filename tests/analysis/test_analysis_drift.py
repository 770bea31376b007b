"""Drift (analysis/drift.py, and the drift-corrected sums of analysis/pipeline.py) against the
simulator's truth: frames rendered from a drifting field (sim/model.py LinearDrift), measured
by the pure functions and by FrameAnalyzer. Pure: no sockets or processes (the process
around it: tests/live/test_liveanalysis.py).

Frames are small where the figure allows it: a drifting HRTEM field is drawn anew every
frame (sim/render.py), ~0.1 s at 512 x 512.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sim_frames import cell, hrtem_optics

from insitu_daq.analysis.drift import (
    DriftRate,
    DriftSettings,
    drift_rate,
    image_shift_correction,
    measure_shift,
    registration_image,
    shift_image,
)
from insitu_daq.analysis.pipeline import FrameAnalyzer, PipelineSettings
from insitu_daq.sim.model import LinearDrift
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import _ANGLE_101_DEG as ANGLE_101
from insitu_daq.sim.render import LAYERED_ORIENTATION_DEG, FrameRenderer, Scene

DRIFT_NM_S = 0.5  # the figure
DIRECTION_DEG = 30.0
ON = DriftSettings(enabled=True)


def _lm_optics() -> Optics:
    optics = Optics()
    optics.set_mode("lm")
    return optics


def _render(renderer: FrameRenderer, model, optics: Optics, t: float, exposure_s: float, i: int):
    model.advance_to(t)
    return renderer.render(Scene.capture(model, optics), exposure_s, i)


def test_a_sub_pixel_drift_is_rendered_and_measured_to_a_fifth_of_a_pixel() -> None:
    """The field drawn 0.5 px and 1.5 px along (x, y) away moves by that much, not by a whole
    pixel or none: in HRTEM (fringes; the lattice's search near the prediction) and in LM
    (the particle and the needle's edge)."""
    for mode, optics, pixel_nm, shape in (
        ("hrtem", hrtem_optics(), 0.06, (256, 256)),
        ("lm", _lm_optics(), 1.0, (1024, 1024)),
    ):
        renderer, model = FrameRenderer(shape, seed=5), cell(x=0.0, tip_nm=0.0)
        model.drift = lambda t, p=pixel_nm: (0.5 * p * t, 1.5 * p * t)  # px per model s
        reference, truth0 = _render(renderer, model, optics, 0.0, 0.5, 0)
        moved, truth1 = _render(renderer, model, optics, 1.0, 0.5, 1)
        assert (truth1.drift_x_nm - truth0.drift_x_nm) / pixel_nm == pytest.approx(0.5)
        ref, mov = registration_image(reference, 512), registration_image(moved, 512)
        shift = measure_shift(ref, mov)
        assert shift is not None
        assert shift.dx == pytest.approx(0.5, abs=0.15), mode
        assert shift.dy == pytest.approx(1.5, abs=0.15), mode
        # Shifted back by what was measured, the frame matches the reference's field.
        back = shift_image(moved.astype(np.float32), -shift.dy, -shift.dx)
        again = measure_shift(ref, registration_image(back, 512))
        assert again is not None and math.hypot(again.dx, again.dy) < 0.15, mode


def test_a_lattice_is_tracked_near_the_prediction_not_at_the_global_peak() -> None:
    """A pure lattice moved by a lattice vector less 0.5 px: its correlation has a peak at
    every lattice translation; searched near the prediction, the shift is the drift, searched
    near 0 it is the lattice's 0.5 px (what a global maximum may give as well)."""
    renderer, model, optics = FrameRenderer((256, 256), seed=2), cell(x=0.0), hrtem_optics()
    # The shortest lattice vector b: b.g(003) = 0, b.g(101) = 1 (sim/render.py's reflections).
    g = [
        np.array([math.cos(math.radians(a)), math.sin(math.radians(a))]) / d
        for a, d in ((LAYERED_ORIENTATION_DEG, 0.48), (LAYERED_ORIENTATION_DEG + ANGLE_101, 0.253))
    ]
    b_nm = np.linalg.solve(np.array(g), np.array([0.0, 1.0]))
    moved_nm = b_nm * (1.0 - 0.5 * 0.06 / float(np.hypot(*b_nm)))  # 0.5 px short of b
    model.drift = lambda t: (moved_nm[0] * t, moved_nm[1] * t)
    reference, _ = _render(renderer, model, optics, 0.0, 1.0, 0)
    moved, _ = _render(renderer, model, optics, 1.0, 1.0, 1)
    ref, mov = registration_image(reference, 256), registration_image(moved, 256)
    truth = moved_nm[1] / 0.06, moved_nm[0] / 0.06  # (dy, dx) px
    tracked = measure_shift(ref, mov, near=(truth[0] - 0.8, truth[1] + 0.8), radius=2.0)
    assert tracked is not None
    assert (tracked.dy, tracked.dx) == pytest.approx(truth, abs=0.3)
    untracked = measure_shift(ref, mov, (0.0, 0.0), radius=2.0)
    assert untracked is not None
    assert math.hypot(untracked.dy, untracked.dx) == pytest.approx(0.5, abs=0.3)


def test_rate_is_robust_to_one_bad_pair_and_the_correction_undoes_the_drift() -> None:
    times = np.arange(0.0, 10.0, 0.25)
    x, y = 0.5 * times, -0.2 * times
    x[17] += 8.0  # one slip
    rate = drift_rate(times, x, y, ON)
    assert rate is not None and rate.vx_nm_s == pytest.approx(0.5, rel=0.02)
    assert rate.vy_nm_s == pytest.approx(-0.2, rel=0.02)
    assert drift_rate(times[:3], x[:3], y[:3], ON) is None  # too few to fit
    assert image_shift_correction((3.0, -1.0), DriftRate(0.5, -0.2, 40), 2.0) == (-4.0, 1.4)


def test_lm_drift_position_within_half_a_pixel_and_rate_within_10_percent() -> None:
    """10 s of LM frames 0.5 s apart, the field drifting 0.5 nm/s at 30 degrees (1 nm/px):
    every position within 0.5 px of the truth since the first frame, the rate within 10 %."""
    renderer, model = FrameRenderer((1024, 1024), seed=7), cell(x=0.0, tip_nm=0.0)
    model.drift = LinearDrift(DRIFT_NM_S, DIRECTION_DEG)
    analyzer = FrameAnalyzer(PipelineSettings(drift=ON))
    first = None
    for index, t in enumerate(np.arange(0.0, 10.01, 0.5)):
        frame, truth = _render(renderer, model, _lm_optics(), float(t), 0.025, index)
        first = first or (truth.drift_x_nm, truth.drift_y_nm)
        analyzer.add(frame, float(t), "lm", 1.0)
        if index % 4:  # every frame is registered; every 4th measured (segmentation's cost)
            continue
        result = analyzer.measure()
        assert result["drift_x_nm"] == pytest.approx(truth.drift_x_nm - first[0], abs=0.5), t
        assert result["drift_y_nm"] == pytest.approx(truth.drift_y_nm - first[1], abs=0.5), t
    assert result["drift_rate_nm_s"] == pytest.approx(DRIFT_NM_S, rel=0.10)


def test_hrtem_drift_is_tracked_and_the_sum_stays_sharp_for_spacings_and_phases() -> None:
    """A mixed HRTEM field (layered core, disordered band, rock salt) drifting 0.5 nm/s, a
    frame every 0.1 s (each with 0.25 s of dose, so ~4 frames make the sum): the drift
    position within 0.5 px (8 px/s at 0.06 nm/px), the rate within 10 %, and the
    drift-corrected sum still gives the (200) d within 1 % and the phase fractions within 0.15
    of the field's truth (test_analysis_pipeline's figures); the uncorrected sum of the same
    frames loses the rock-salt rings."""
    renderer, model, optics = FrameRenderer((1024, 1024), seed=3), cell(x=0.7), hrtem_optics()
    model.drift = LinearDrift(DRIFT_NM_S, DIRECTION_DEG)
    drift = DriftSettings(enabled=True, rate_window_s=2.0)
    settings = PipelineSettings(drift=drift, phase_map_interval_s=100.0)
    corrected, uncorrected = FrameAnalyzer(settings), FrameAnalyzer(PipelineSettings())
    first = truth = None
    for index, t in enumerate(np.arange(0.0, 0.95, 0.1)):
        frame, truth = _render(renderer, model, optics, float(t), 0.25, index)
        first = first or (truth.drift_x_nm, truth.drift_y_nm)
        corrected.add(frame, float(t), "hrtem", 0.06)
        uncorrected.add(frame, float(t), "hrtem", 0.06)
    assert truth is not None
    result, plain = corrected.measure(), uncorrected.measure()
    assert result["drift_x_nm"] == pytest.approx(truth.drift_x_nm - first[0], abs=0.5 * 0.06)
    assert result["drift_y_nm"] == pytest.approx(truth.drift_y_nm - first[1], abs=0.5 * 0.06)
    assert result["drift_rate_nm_s"] == pytest.approx(DRIFT_NM_S, rel=0.10)
    assert result["d_spacing_m.nio_200"] == pytest.approx(2.1e-10, rel=0.01)
    assert result["d_spacing_m.lno_003"] == pytest.approx(4.8e-10, rel=0.01)
    # Uncorrected, the ~4 frames of the sum span 2.5 px: the (200) ring's power is 40 % of it.
    assert plain["intensity.nio_200"] < 0.6 * result["intensity.nio_200"]
    field = truth.field_phase_fractions
    particle = field["layered"] + field["disordered"] + field["rock_salt"]
    assert result["rock_salt_fraction"] == pytest.approx(field["rock_salt"] / particle, abs=0.15)
    assert result["layered_fraction"] == pytest.approx(field["layered"] / particle, abs=0.15)


def test_drift_off_adds_no_keys_and_leaves_the_sum_as_it_was() -> None:
    renderer, model = FrameRenderer((256, 256), seed=1), cell(x=0.0, tip_nm=0.0)
    model.drift = LinearDrift(DRIFT_NM_S, 0.0)
    frame, _ = _render(renderer, model, _lm_optics(), 0.0, 0.025, 0)
    result = FrameAnalyzer().analyze(frame, 0.0, "lm", 1.0)
    assert not {"drift_x_nm", "drift_y_nm", "drift_rate_nm_s"} & set(result)
