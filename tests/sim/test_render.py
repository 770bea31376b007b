"""The frame renderer draws what the model says: fringes, growth, dose, noise and truth.

Pure functions: frames are rendered straight from model states, no sockets or threads.
"""

from __future__ import annotations

import json
import math

import cbor2
import numpy as np
import pytest

from insitu_daq.sim.model import NanobatteryModel, Phase
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, Scene

EXPOSURE_S = 0.025  # 40 frames/s


def _model(x: float = 0.0, beam_on: bool = True, tip_nm: float | None = None) -> NanobatteryModel:
    model = NanobatteryModel()
    model.x = x
    model.set_beam(beam_on)
    if tip_nm is not None:
        model.tip_position_nm = tip_nm
    return model


def _optics(mode: str, pixel_nm: float | None = None, center: tuple | None = None) -> Optics:
    optics = Optics()
    optics.set_mode(mode)
    if pixel_nm is not None:
        optics.set_pixel_size(pixel_nm)
    if center is not None:
        optics.set_field_center(*center)
    return optics


def _radial_power(frame: np.ndarray, pixel_nm: float, bins: int = 400):
    """Azimuthal average of the power spectrum (Hann window), against d in angstrom."""
    image = frame.astype(np.float64)
    image -= image.mean()
    window = np.hanning(image.shape[0])[:, None] * np.hanning(image.shape[1])[None, :]
    power = np.abs(np.fft.fft2(image * window)) ** 2
    freq = np.hypot(np.fft.fftfreq(image.shape[0])[:, None], np.fft.fftfreq(image.shape[1]))
    edges = np.linspace(0.0, 0.5, bins + 1)
    index = np.digitize(freq.ravel(), edges) - 1
    inside = index < bins
    sums = np.bincount(index[inside], power.ravel()[inside], bins)
    profile = sums / np.maximum(np.bincount(index[inside], None, bins), 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    return pixel_nm * 10.0 / centres, profile  # d (A) of each bin, power


def _peak(d: np.ndarray, profile: np.ndarray, d_target: float) -> float:
    """Highest power within 3 % of d_target over the median of its surroundings (6-15 %)."""
    offset = np.abs(d / d_target - 1.0)
    background = np.median(profile[(offset > 0.06) & (offset < 0.15)])
    return float(profile[offset < 0.03].max() / background)


def _hrtem_peaks(x: float, targets: tuple[float, ...], **optics_kw) -> dict[float, float]:
    optics = _optics("hrtem", **optics_kw)
    renderer = FrameRenderer(shape=(512, 512), seed=3, counts_scale=100.0)
    frame, _ = renderer.render(Scene.capture(_model(x), optics), EXPOSURE_S, 0)
    d, profile = _radial_power(frame, optics.pixel_size_nm)
    return {t: _peak(d, profile, t) for t in targets}


# ----- frames -------------------------------------------------------------------------------


def test_frame_is_uint16_of_the_requested_shape_and_deterministic() -> None:
    scene = Scene.capture(_model(0.7, tip_nm=0.0), _optics("lm"))
    renderer = FrameRenderer(shape=(256, 384), seed=5)
    frame, _ = renderer.render(scene, EXPOSURE_S, 7)
    assert frame.dtype == np.uint16 and frame.shape == (256, 384)
    again, _ = FrameRenderer(shape=(256, 384), seed=5).render(scene, EXPOSURE_S, 7)
    assert np.array_equal(frame, again)
    next_frame, _ = renderer.render(scene, EXPOSURE_S, 8)
    other_seed, _ = FrameRenderer(shape=(256, 384), seed=6).render(scene, EXPOSURE_S, 7)
    assert not np.array_equal(frame, next_frame)
    assert not np.array_equal(frame, other_seed)
    # Only the noise differs between frames of one scene, and it is independent frame to frame.
    expected = renderer.expected_counts(scene, EXPOSURE_S)
    noise_a, noise_b = frame - expected, next_frame - expected
    assert abs(noise_a.mean()) < 0.01 * expected.mean()
    assert abs(np.corrcoef(noise_a.ravel(), noise_b.ravel())[0, 1]) < 0.02


def test_beam_off_gives_a_dark_frame_and_no_dose() -> None:
    model = _model(0.3, beam_on=False)
    for mode in ("lm", "hrtem"):
        frame, truth = FrameRenderer(shape=(128, 128)).render(
            Scene.capture(model, _optics(mode)), EXPOSURE_S, 0
        )
        assert frame.dtype == np.uint16 and not frame.any()
        assert truth.dose_e_per_a2 == 0.0


@pytest.mark.parametrize("counts_scale", [1.0, 60.0, 1000.0])
def test_counts_follow_the_dose_with_poisson_statistics(counts_scale: float) -> None:
    """Vacuum pixels: mean = dose rate * pixel area * exposure * scale, variance = mean,
    and at low counts the zero-count fraction of a Poisson law (counts are integers)."""
    optics = _optics("hrtem", center=(5000.0, 5000.0))  # far from the particle: all vacuum
    model = _model()
    scene = Scene.capture(model, optics)
    frame, truth = FrameRenderer(shape=(512, 512), counts_scale=counts_scale).render(
        scene, EXPOSURE_S, 1
    )
    assert truth.field_phase_fractions["vacuum"] == 1.0
    expected = model.dose_rate_e_per_a2_s * (0.6**2) * EXPOSURE_S * counts_scale
    counts = frame.astype(np.float64)
    assert counts.mean() == pytest.approx(expected, rel=0.02)
    assert counts.var() == pytest.approx(expected, rel=0.03)
    if expected < 5:
        assert np.mean(frame == 0) == pytest.approx(math.exp(-expected), abs=0.005)


# ----- HRTEM ---------------------------------------------------------------------------------


def test_pristine_particle_shows_003_at_4p8_angstrom_and_no_rock_salt_200() -> None:
    peaks = _hrtem_peaks(0.0, (4.8, 2.53, 2.1))
    assert peaks[4.8] > 50
    assert peaks[2.53] > 5
    assert peaks[2.1] < 2


def test_transformed_particle_shows_rock_salt_rings_and_no_003() -> None:
    peaks = _hrtem_peaks(1.0, (4.8, 2.4, 2.1))
    assert peaks[2.4] > 4 and peaks[2.1] > 4
    assert peaks[4.8] < 2


def _sector_power(x: float, d_nm: float) -> np.ndarray:
    """Power on the ring at d_nm in six 30-degree sectors of the FFT (half plane)."""
    optics = _optics("hrtem")
    frame, _ = FrameRenderer(seed=3, counts_scale=100.0).render(
        Scene.capture(_model(x), optics), EXPOSURE_S, 0
    )
    size = frame.shape[0]
    image = frame.astype(np.float64) - frame.mean()
    power = np.fft.fftshift(np.abs(np.fft.fft2(image)) ** 2)
    fy, fx = np.meshgrid(np.arange(size) - size // 2, np.arange(size) - size // 2, indexing="ij")
    ring = np.abs(np.hypot(fx, fy) - size * optics.pixel_size_nm / d_nm) < 4
    angle = np.degrees(np.arctan2(fy[ring], fx[ring])) % 180
    return np.bincount((angle // 30).astype(int), power[ring], 6)


def test_rock_salt_fringes_form_rings_and_layered_fringes_spots() -> None:
    """Polycrystalline NiO spreads (200) power round its ring; the single layered crystal
    puts (003) into two opposite spots."""
    rock_salt_200 = _sector_power(1.0, 0.21)
    assert rock_salt_200.min() > 0.1 * rock_salt_200.max()
    layered_003 = _sector_power(0.0, 0.48)
    assert np.sort(layered_003)[-2] < 0.01 * layered_003.max()


def test_fringe_below_the_transfer_limit_is_not_drawn_nor_aliased() -> None:
    """At 0.15 nm/px (006) and (101) span < 2.2 px. Drawn, they would alias to ~3.2 and ~3.5 A
    (shown with a renderer whose transfer limit is lowered to 1 px); they must be absent."""
    optics = _optics("hrtem", pixel_nm=0.15)
    scene = Scene.capture(_model(0.0), optics)

    def alias_band_peak(transfer_limit_px: float) -> tuple[float, float]:
        renderer = FrameRenderer(
            (512, 512), seed=3, counts_scale=100.0, transfer_limit_px=transfer_limit_px
        )
        frame, _ = renderer.render(scene, EXPOSURE_S, 0)
        d, profile = _radial_power(frame, optics.pixel_size_nm)
        band = (d > 3.0) & (d < 4.2)
        noise = np.median(profile[(d > 3.0) & (d < 4.2)])
        return float(profile[band].max() / noise), _peak(d, profile, 4.8)

    alias, peak_003 = alias_band_peak(2.2)
    assert peak_003 > 50  # (003) spans 3.2 px: drawn
    assert alias < 3
    alias_if_drawn, _ = alias_band_peak(1.0)
    assert alias_if_drawn > 20


def test_hrtem_vacuum_is_flat_and_the_tip_dark() -> None:
    model = _model(0.0, tip_nm=0.0)
    optics = _optics("hrtem", center=(-5.0, 70.0))  # needle flank, part vacuum, part tungsten
    renderer = FrameRenderer(shape=(256, 256), seed=1, counts_scale=100.0)
    scene = Scene.capture(model, optics)
    expected = renderer.expected_counts(scene, EXPOSURE_S)
    grid_x = optics.field_center_nm[0] + (np.arange(256) - 127.5) * optics.pixel_size_nm
    grid_y = optics.field_center_nm[1] + (np.arange(256) - 127.5) * optics.pixel_size_nm
    labels = model.phase_at(grid_x[None, :], grid_y[:, None])
    vacuum, tip = expected[labels == Phase.VACUUM], expected[labels == Phase.TIP]
    assert vacuum.size > 1000 and tip.size > 1000
    assert vacuum.std() < 1e-3 * vacuum.mean()
    assert tip.mean() < 0.2 * vacuum.mean()


# ----- low magnification ---------------------------------------------------------------------


def _particle_area_px(x: float) -> tuple[int, float]:
    model = _model(x)  # tip far outside the field
    frame, truth = FrameRenderer(seed=2, counts_scale=100.0).render(
        Scene.capture(model, _optics("lm")), EXPOSURE_S, 0
    )
    vacuum = np.median(frame[:64, :64])  # a corner: vacuum
    return int(np.count_nonzero(frame < 0.9 * vacuum)), truth.expansion


def test_low_mag_projected_area_grows_by_the_model_expansion() -> None:
    area_0, expansion_0 = _particle_area_px(0.0)
    area_1, expansion_1 = _particle_area_px(1.0)
    assert expansion_0 == 0.0 and expansion_1 == pytest.approx(0.306)
    assert area_0 == pytest.approx(math.pi * 250.0**2, rel=0.03)
    assert area_1 / area_0 == pytest.approx(1.0 + expansion_1, rel=0.02)


def test_low_mag_contrast_by_mass_thickness() -> None:
    """Particle darker than vacuum, thicker centre darker than edge, rock salt darker than
    layered at equal thickness, tungsten tip darkest."""
    model = _model(0.6, tip_nm=0.0)
    optics = _optics("lm")
    renderer = FrameRenderer(seed=1)
    image = renderer.expected_counts(Scene.capture(model, optics), EXPOSURE_S)
    radius = model.particle_radius_nm

    def at(x_nm: float, y_nm: float) -> float:
        col = round((x_nm - optics.field_center_nm[0]) / optics.pixel_size_nm + 512 - 0.5)
        row = round((y_nm - optics.field_center_nm[1]) / optics.pixel_size_nm + 512 - 0.5)
        return float(image[row, col])

    # Symmetric about the particle centre: same thickness, different phase.
    near, far = radius - 150.0, radius + 150.0
    assert model.phase_at(np.array([near]), np.array([0.0]))[0] == Phase.ROCK_SALT
    assert model.phase_at(np.array([far]), np.array([0.0]))[0] == Phase.LAYERED
    vacuum = at(700.0, 400.0)
    assert at(far, 0.0) < 0.9 * vacuum
    assert at(near, 0.0) < 0.97 * at(far, 0.0)
    assert at(radius + 240.0, 0.0) > at(far, 0.0)  # thinner near the edge
    assert at(-100.0, 0.0) < 0.1 * vacuum  # the needle


# ----- truth ----------------------------------------------------------------------------------


def test_truth_equals_the_model() -> None:
    model = NanobatteryModel()
    model.move_tip_to(2.0, 1e6)
    model.set_source(True, 4.3, 1e-7)
    model.set_beam(True, 35.0)
    model.advance_to(40.0)
    optics = _optics("lm")
    _, truth = FrameRenderer(seed=1).render(Scene.capture(model, optics), EXPOSURE_S, 3)
    state = model.snapshot()
    assert state.x > 0.5 and state.current_amperes > 0 and state.front_velocity_nm_s > 0
    assert truth.time_s == state.time_s
    assert truth.bias_volts == state.bias_volts
    assert truth.current_amperes == state.current_amperes
    assert truth.x == state.x
    assert truth.front_position_nm == state.front_position_nm
    assert truth.front_velocity_nm_s == state.front_velocity_nm_s
    assert truth.expansion == state.expansion
    assert truth.particle_phase_fractions == state.phase_fractions
    assert truth.cumulative_dose_e_per_a2 == state.cumulative_dose_e_per_a2
    assert truth.dose_e_per_a2 == pytest.approx(35.0 * EXPOSURE_S)
    assert truth.mode == "lm" and truth.pixel_size_nm == optics.pixel_size_nm
    as_dict = truth.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert cbor2.loads(cbor2.dumps(as_dict)) == as_dict


@pytest.mark.parametrize("mode", ["lm", "hrtem"])
def test_field_phase_fractions_match_per_pixel_labels(mode: str) -> None:
    """Block-wise labelling counts exactly the pixels that labelling every pixel does."""
    model = _model(0.73, tip_nm=0.0)
    # HRTEM: centred just behind the front, so rock salt, the disordered band and the layered
    # core are all in the 31 nm field.
    center = (260.0, 0.0) if mode == "lm" else (model.front_position_nm - 5.0, 3.0)
    optics = _optics(mode, center=center)
    _, truth = FrameRenderer(shape=(512, 512)).render(Scene.capture(model, optics), EXPOSURE_S, 0)
    offsets = (np.arange(512) - 255.5) * optics.pixel_size_nm
    cx, cy = optics.field_center_nm
    labels = model.phase_at((cx + offsets)[None, :], (cy + offsets)[:, None])
    counts = np.bincount(labels.ravel(), minlength=len(Phase))
    for phase in Phase:
        assert truth.field_phase_fractions[phase.name.lower()] == pytest.approx(
            counts[phase] / labels.size, abs=0.5 / labels.size
        )
    assert sum(v > 0 for v in truth.field_phase_fractions.values()) >= 3  # boundaries in view


def test_changing_the_optics_redraws_the_field() -> None:
    """A renderer reused across mode, pixel-size and field changes draws what a fresh one does."""
    model = _model(0.73)
    renderer = FrameRenderer(shape=(256, 256), seed=4, counts_scale=50.0)
    settings = [
        _optics("hrtem"),
        _optics("hrtem", pixel_nm=0.1),
        _optics("lm"),
        _optics("hrtem", center=(240.0, 10.0)),
        _optics("hrtem"),
    ]
    for index, optics in enumerate(settings):
        scene = Scene.capture(model, optics)
        frame, _ = renderer.render(scene, EXPOSURE_S, index)
        fresh, _ = FrameRenderer(shape=(256, 256), seed=4, counts_scale=50.0).render(
            scene, EXPOSURE_S, index
        )
        assert np.array_equal(frame, fresh), optics
