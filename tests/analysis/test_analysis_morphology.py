"""Low-magnification morphology on rendered frames with known truth: the particle's projected
size, its expansion against the model's over the +4.3 V timeline, the no-bias control, drift,
and the frames where the answer must be "not measurable" (None) instead of a number.

Pure functions: frames are rendered straight from model states (sim/render.py), no sockets
or threads. Frames are 1024 x 1024 at the simulator's LM defaults (1 nm/px, centred at
(260, 0) nm) and its default dose (counts_scale=1: ~87 counts per vacuum pixel).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from insitu_daq.analysis.morphology import (
    ExpansionReference,
    measure_expansion,
    measure_particle,
    segment,
)
from insitu_daq.sim.model import NanobatteryModel
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, Scene

EXPOSURE_S = 0.025  # 40 frames/s
FRAME = (1024, 1024)


def _model(x: float = 0.0, tip_nm: float = 0.0, beam_on: bool = True) -> NanobatteryModel:
    model = NanobatteryModel()
    model.tip_position_nm = tip_nm
    model.x = x
    model.set_beam(beam_on)
    return model


def _optics(center: tuple[float, float] | None = None) -> Optics:
    optics = Optics()
    optics.set_mode("lm")
    if center is not None:
        optics.set_field_center(*center)
    return optics


def _render(
    model: NanobatteryModel,
    optics: Optics,
    renderer: FrameRenderer,
    index: int,
) -> tuple[np.ndarray, float, object]:
    frame, truth = renderer.render(Scene.capture(model, optics), EXPOSURE_S, index)
    return frame, optics.pixel_size_nm, truth


def _pristine_reference(renderer: FrameRenderer, frames: int = 3) -> ExpansionReference:
    optics = _optics()
    model = _model()
    shots = [_render(model, optics, renderer, 1000 + i)[0] for i in range(frames)]
    return ExpansionReference.from_frames(shots, optics.pixel_size_nm)


def test_projected_size_and_centroid_match_the_particle() -> None:
    optics = _optics()
    model = _model()
    frame, pixel_nm, _ = _render(model, optics, FrameRenderer(FRAME, seed=2), 0)
    measured = measure_particle(segment(frame, pixel_nm))
    radius = model.particle_radius_nm
    assert measured.measurable, measured.reason
    assert measured.area_nm2 == pytest.approx(math.pi * radius**2, rel=0.01)
    assert measured.equivalent_diameter_nm == pytest.approx(2 * radius, rel=0.01)
    # The particle's centre is (radius, 0) nm in the contact frame; pixel (r, c) sits at
    # x = cx + (c - W/2 + 0.5) * pixel, y = cy + (r - H/2 + 0.5) * pixel.
    cx, cy = optics.field_center_nm
    expected_col = (radius - cx) / pixel_nm + FRAME[1] / 2 - 0.5
    expected_row = (0.0 - cy) / pixel_nm + FRAME[0] / 2 - 0.5
    assert measured.centroid_px == pytest.approx((expected_row, expected_col), abs=1.5)


def test_the_needle_is_not_counted_as_particle() -> None:
    """The needle touching the particle (dark, joined to it) leaves the area as without it."""
    renderer = FrameRenderer(FRAME, seed=3)
    optics = _optics()
    touching, pixel_nm, _ = _render(_model(x=0.5, tip_nm=0.0), optics, renderer, 0)
    retracted, _, _ = _render(_model(x=0.5, tip_nm=-3000.0), optics, renderer, 1)
    with_needle = segment(touching, pixel_nm)
    assert with_needle.needle is not None  # it was found, and taken out
    area_touching = measure_particle(with_needle).area_nm2
    area_alone = measure_particle(segment(retracted, pixel_nm)).area_nm2
    assert area_touching == pytest.approx(area_alone, rel=0.005)


def test_expansion_follows_the_model_over_the_4_3_volt_timeline() -> None:
    """Within 2 percentage points of the model's projected-area expansion, 0 to 120 s."""
    renderer = FrameRenderer(FRAME, seed=4)
    reference = _pristine_reference(renderer)
    model = _model()
    optics = _optics()
    model.set_source(True, 4.3, 1.0e-7)
    measured, truth = [], []
    for index, time_s in enumerate((5, 20, 27, 30, 35, 40, 45, 50, 55, 60, 80, 110, 120)):
        model.advance_to(float(time_s))
        frame, pixel_nm, frame_truth = _render(model, optics, renderer, index)
        measured.append(measure_expansion(frame, pixel_nm, reference))
        truth.append(frame_truth.expansion)
    assert None not in measured
    errors = np.array(measured) - np.array(truth)
    assert np.abs(errors).max() < 0.02, list(zip(truth, measured, strict=True))
    assert truth[-1] == pytest.approx(0.306)  # the timeline did reach full expansion


def test_no_bias_control_expansion_stays_within_noise() -> None:
    """Tip in contact at 0 V for 60 s: nothing grows, and the measurement says so (< 1 pp)."""
    renderer = FrameRenderer(FRAME, seed=5)
    reference = _pristine_reference(renderer)
    model = _model()
    optics = _optics()
    model.set_source(True, 0.0, 1.0e-7)
    expansions = []
    for index, time_s in enumerate(range(0, 61, 6)):
        model.advance_to(float(time_s))
        frame, pixel_nm, truth = _render(model, optics, renderer, index)
        assert truth.expansion == 0.0
        expansions.append(measure_expansion(frame, pixel_nm, reference))
    assert None not in expansions
    assert max(abs(e) for e in expansions) < 0.01


def test_drift_moves_the_centroid_but_not_the_expansion() -> None:
    renderer = FrameRenderer(FRAME, seed=6)
    reference = _pristine_reference(renderer)
    model = _model(x=0.9)  # fully expanded
    still, pixel_nm, truth = _render(model, _optics(), renderer, 0)
    drifted, _, _ = _render(model, _optics((260.0 + 6.0, -4.0)), renderer, 1)
    at_rest = measure_particle(segment(still, pixel_nm))
    moved = measure_particle(segment(drifted, pixel_nm))
    # The field moved +6 nm in x and -4 nm in y: the particle moves -6 px in col, +4 px in row.
    d_row = moved.centroid_px[0] - at_rest.centroid_px[0]
    d_col = moved.centroid_px[1] - at_rest.centroid_px[1]
    assert (d_row, d_col) == pytest.approx((4.0, -6.0), abs=1.0)
    for measurement in (at_rest, moved):
        assert reference.expansion_of(measurement) == pytest.approx(truth.expansion, abs=0.02)


@pytest.mark.parametrize(
    ("center", "why"),
    [
        ((260.0, 400.0), "edge"),  # the particle's lower part is out of the field
        ((700.0, 0.0), "edge"),  # its contact side is out of the field
        ((5000.0, 0.0), "no particle"),  # only vacuum in the field
    ],
)
def test_particle_not_wholly_in_the_field_is_not_measurable(
    center: tuple[float, float], why: str
) -> None:
    renderer = FrameRenderer(FRAME, seed=7)
    reference = _pristine_reference(renderer, frames=1)
    frame, pixel_nm, _ = _render(_model(x=0.9), _optics(center), renderer, 0)
    measured = measure_particle(segment(frame, pixel_nm))
    assert measured.area_nm2 is None and measured.centroid_px is None
    assert why in measured.reason
    assert measure_expansion(frame, pixel_nm, reference) is None


def test_beam_off_and_starved_frames_are_not_measurable() -> None:
    renderer = FrameRenderer(FRAME, seed=8)
    reference = _pristine_reference(renderer, frames=1)
    dark, pixel_nm, _ = _render(_model(beam_on=False), _optics(), renderer, 0)
    assert not dark.any()  # the renderer's beam-off frame: all zeros
    assert "no signal" in segment(dark, pixel_nm).reason
    assert measure_expansion(dark, pixel_nm, reference) is None
    # A hundredth of the default dose (< 1 count per vacuum pixel): the rim cannot be found.
    starved, _, _ = _render(_model(), _optics(), FrameRenderer(FRAME, 8, counts_scale=0.01), 1)
    assert "too noisy" in segment(starved, pixel_nm).reason
    assert measure_expansion(starved, pixel_nm, reference) is None


def test_reference_needs_a_measurable_frame_and_averages_several() -> None:
    with pytest.raises(ValueError, match="no signal"):
        ExpansionReference.from_frames([np.zeros(FRAME, np.uint16)], 1.0)
    renderer = FrameRenderer(FRAME, seed=9)
    reference = _pristine_reference(renderer, frames=4)
    assert reference.frames == 4
    # Shot noise moves the area of a 196000 nm^2 particle by a few tens of nm^2, not more.
    assert 0.0 < reference.area_scatter_nm2 < 0.002 * reference.area_nm2
