"""Reaction front on rendered low-magnification frames with known truth: its distance from the
contact surface against the model's `front_position_nm`, its speed against
`front_velocity_nm_s`, no front in the no-bias control, and "not measurable" (None) where the
frame cannot say; plus the robust speed fit on its own.

Tolerances: position within 15 nm (3 % of the 500 nm particle's diameter) wherever the front
is measured, and measured from 8 s to 100 s of the +4.3 V timeline (front 50-490 nm from the
contact); speed within 15 % over a 5 s window of frames 0.25 s apart. Measured over 10 seeds
x 24 times of that timeline: position errors within 3 nm; speeds within 7 %.

Pure functions: frames are rendered straight from model states (sim/render.py), no sockets
or threads; 1024 x 1024 frames at the simulator's LM defaults and default dose.
"""

from __future__ import annotations

import numpy as np
import pytest

from insitu_daq.analysis.front import front_speed, measure_front
from insitu_daq.analysis.morphology import segment
from insitu_daq.sim.model import NanobatteryModel
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, Scene

EXPOSURE_S = 0.025
FRAME = (1024, 1024)
POSITION_TOLERANCE_NM = 15.0
SPEED_TOLERANCE = 0.15
LM_CENTER_NM = (260.0, 0.0)


def _model(x: float = 0.0, tip_nm: float = 0.0, beam_on: bool = True) -> NanobatteryModel:
    model = NanobatteryModel()
    model.tip_position_nm = tip_nm
    model.x = x
    model.set_beam(beam_on)
    return model


def _optics(center: tuple[float, float] = LM_CENTER_NM) -> Optics:
    optics = Optics()
    optics.set_mode("lm")
    optics.set_field_center(*center)
    return optics


def _front(frame: np.ndarray, pixel_nm: float = 1.0):
    return measure_front(frame, segment(frame, pixel_nm))


def _biased(volts: float) -> NanobatteryModel:
    model = _model()
    model.set_source(True, volts, 1.0e-7)
    return model


def test_front_position_follows_the_truth_over_the_timeline() -> None:
    model, optics = _biased(4.3), _optics()
    renderer = FrameRenderer(FRAME, seed=11)
    for index, time_s in enumerate((8, 12, 20, 30, 40, 50, 60, 70, 80, 90, 100)):
        model.advance_to(float(time_s))
        frame, truth = renderer.render(Scene.capture(model, optics), EXPOSURE_S, index)
        front = _front(frame, optics.pixel_size_nm)
        assert front.measurable, (time_s, front.reason)
        assert front.position_nm == pytest.approx(
            truth.front_position_nm, abs=POSITION_TOLERANCE_NM
        ), time_s


def test_front_not_detected_before_it_leaves_the_rim_nor_after_it_has_crossed() -> None:
    """A front hugging the contact (< 20 nm) is too thin a slice to see: None, not a guess.
    A fully converted particle is uniform again: no front."""
    renderer = FrameRenderer(FRAME, seed=12)
    for index, x in enumerate((0.0, 0.05, 1.0)):
        model = _model(x=x)
        frame, _ = renderer.render(Scene.capture(model, _optics()), EXPOSURE_S, index)
        front = _front(frame)
        assert front.position_nm is None and "no front" in front.reason, (x, front)


@pytest.mark.parametrize("start_s", [15.0, 40.0])
def test_front_speed_matches_the_truth_with_drift(start_s: float) -> None:
    """5 s of frames 0.25 s apart; the field drifts by a few nm between frames."""
    model, renderer = _biased(4.3), FrameRenderer(FRAME, seed=13)
    rng = np.random.default_rng(int(start_s))
    times, positions, truth_speeds = [], [], []
    for index in range(21):
        time_s = start_s + 0.25 * index
        model.advance_to(time_s)
        drift = rng.uniform(-4.0, 4.0, size=2)
        optics = _optics((LM_CENTER_NM[0] + drift[0], LM_CENTER_NM[1] + drift[1]))
        frame, truth = renderer.render(Scene.capture(model, optics), EXPOSURE_S, index)
        front = _front(frame)
        assert front.position_nm == pytest.approx(truth.front_position_nm, abs=15.0)
        times.append(time_s)
        positions.append(front.position_nm)
        truth_speeds.append(truth.front_velocity_nm_s)
    speed = front_speed(times, positions, window_s=5.0)
    assert speed is not None
    expected = truth_speeds[10]  # the model's speed in the middle of the window
    assert speed.speed_nm_s == pytest.approx(expected, rel=SPEED_TOLERANCE)
    assert speed.points == 21


def test_no_bias_control_shows_no_front() -> None:
    """Tip in contact at 0 V for 60 s: no front in any frame, so no speed either."""
    model, optics = _biased(0.0), _optics()
    renderer = FrameRenderer(FRAME, seed=14)
    times, positions = [], []
    for index, time_s in enumerate(range(0, 61, 5)):
        model.advance_to(float(time_s))
        frame, truth = renderer.render(Scene.capture(model, optics), EXPOSURE_S, index)
        assert truth.front_position_nm == 0.0
        front = _front(frame)
        assert front.position_nm is None and "no front" in front.reason
        times.append(float(time_s))
        positions.append(front.position_nm)
    assert front_speed(times, positions, window_s=60.0) is None


def test_contact_axis_is_found_whichever_side_the_needle_comes_from() -> None:
    model = _model(x=0.5)
    frame, truth = FrameRenderer(FRAME, seed=15).render(
        Scene.capture(model, _optics()), EXPOSURE_S, 0
    )
    reference = _front(frame)
    assert reference.position_nm == pytest.approx(truth.front_position_nm, abs=15.0)
    # The simulator's needle comes from the left (-col); rotated, it comes from the bottom.
    rotated = _front(np.rot90(frame))  # counter-clockwise: (r, c) -> (W - 1 - c, r)
    assert rotated.position_nm == pytest.approx(reference.position_nm, abs=0.5)
    assert reference.axis == pytest.approx((0.0, 1.0), abs=0.02)
    assert rotated.axis == pytest.approx((-1.0, 0.0), abs=0.02)
    row, col = reference.contact_px
    assert rotated.contact_px == pytest.approx((FRAME[1] - 1 - col, row), abs=0.5)


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("needle retracted out of the field", "no needle"),
        ("needle in the field, not touching", "not touching"),
        ("particle cut by the field edge", "edge"),
        ("beam off", "no signal"),
    ],
)
def test_front_not_measurable_without_contact_particle_or_beam(case: str, why: str) -> None:
    model, optics = _model(x=0.5), _optics()
    if case == "needle retracted out of the field":
        model.tip_position_nm = -3000.0
    elif case == "needle in the field, not touching":
        model.tip_position_nm = -80.0
    elif case == "particle cut by the field edge":
        optics = _optics((260.0, 420.0))
    elif case == "beam off":
        model.set_beam(False)
    frame, _ = FrameRenderer(FRAME, seed=16).render(Scene.capture(model, optics), EXPOSURE_S, 0)
    front = _front(frame)
    assert front.position_nm is None
    assert why in front.reason


# ----- the robust speed fit on its own ----------------------------------------------------------


def test_front_speed_is_robust_to_outliers_and_skips_unmeasured_frames() -> None:
    times = np.arange(0.0, 6.0, 0.25)
    positions: list[float | None] = list(100.0 + 5.0 * times)
    positions[3] = 400.0  # a frame where something else was taken for the front
    positions[7] = None  # a frame where the front was not measurable
    speed = front_speed(times, positions, window_s=5.0)
    assert speed is not None
    assert speed.speed_nm_s == pytest.approx(5.0, rel=0.01)
    assert speed.points == 20  # t >= 0.75 s: the window is the last 5 s, minus the None


def test_front_speed_of_a_stationary_front_is_zero_and_of_a_scatter_is_none() -> None:
    rng = np.random.default_rng(0)
    times = np.arange(0.0, 5.0, 0.25)
    still = front_speed(times, 200.0 + rng.normal(0.0, 1.0, times.size), window_s=5.0)
    assert still is not None and abs(still.speed_nm_s) < 0.5
    scatter = front_speed(times, 200.0 + rng.normal(0.0, 60.0, times.size), window_s=5.0)
    assert scatter is None


def test_front_speed_needs_enough_points_over_enough_of_the_window() -> None:
    assert front_speed([], [], window_s=5.0) is None
    assert front_speed([0.0, 1.0, 2.0], [0.0, 5.0, 10.0], window_s=5.0) is None  # 3 points
    times = np.linspace(0.0, 1.0, 10)  # 10 points over 1 s of a 5 s window
    assert front_speed(times, 5.0 * times, window_s=5.0) is None
    assert front_speed(times * 5.0, 25.0 * times, window_s=5.0) is not None
