"""Phase map of HRTEM frames against the simulator's truth.

Pure functions on rendered frames (sim/render.py), no sockets or threads. The rock-salt grains
need about one second of dose per frame (exposure 1 s, i.e. the 40 frames of a second summed;
see insitu_daq/analysis/phasemap.py for the SNR each phase needs).

Tolerance of the fractions: tiles are 128 px = 7.7 nm at 0.06 nm/px, one column of the 8 x 8
grid is 12.5 % of the field, and a tile cut by a phase boundary takes one label; with the two
boundaries of the front (rock salt | disordered band | layered) the fractions are good to
FRACTION_TOLERANCE = 0.08 (absolute).
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
from sim_frames import cell, hrtem_optics

from insitu_daq.analysis.phasemap import (
    PhaseMapSettings,
    TileClass,
    classify_tiles,
    phase_map,
)
from insitu_daq.analysis.spectrum import sum_frames
from insitu_daq.sim.model import NanobatteryModel, Phase
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, FrameTruth, Scene

SHAPE = (1024, 1024)
FRAME_S = 0.025  # one frame at 40 frames/s
SECOND_S = 1.0  # one second of dose
FRACTION_TOLERANCE = 0.08
PHASES = ("layered", "disordered", "rock_salt")
# Truth label -> the class the map should give. The needle has no lattice and is dark: at one
# second of dose it has < 1 count/px, too few to analyse (NO_DATA).
EXPECTED = {
    Phase.VACUUM: TileClass.VACUUM,
    Phase.TIP: TileClass.NO_DATA,
    Phase.LAYERED: TileClass.LAYERED,
    Phase.DISORDERED: TileClass.DISORDERED,
    Phase.ROCK_SALT: TileClass.ROCK_SALT,
}


@lru_cache(maxsize=4)
def _renderer(shape: tuple[int, int] = SHAPE, seed: int = 2) -> FrameRenderer:
    return FrameRenderer(shape, seed=seed)


def _optics(center: tuple[float, float] | None = None) -> Optics:
    return hrtem_optics(center=center)


_model = cell


def _frame(
    model: NanobatteryModel,
    optics: Optics,
    exposure_s: float = SECOND_S,
    index: int = 0,
    shape: tuple[int, int] = SHAPE,
) -> tuple[np.ndarray, FrameTruth]:
    return _renderer(shape).render(Scene.capture(model, optics), exposure_s, index)


def _particle_fractions(truth: FrameTruth) -> dict[str, float]:
    """The truth's field fractions renormalised over the particle (no vacuum, no tip)."""
    field = truth.field_phase_fractions
    total = sum(field[p] for p in PHASES)
    return {p: field[p] / total for p in PHASES}


def _tile_truth(model: NanobatteryModel, optics: Optics, shape: tuple[int, int], tile: int):
    """(majority label, its purity) of every tile, from the model's own phase_at."""
    rows, cols = shape
    pixel, (cx, cy) = optics.pixel_size_nm, optics.field_center_nm
    x = cx + (np.arange(cols) - cols / 2 + 0.5) * pixel
    y = cy + (np.arange(rows) - rows / 2 + 0.5) * pixel
    labels = model.phase_at(x[None, :], y[:, None])
    n_rows, n_cols = rows // tile, cols // tile
    r0, c0 = (rows - n_rows * tile) // 2, (cols - n_cols * tile) // 2
    tiles = labels[r0 : r0 + n_rows * tile, c0 : c0 + n_cols * tile]
    tiles = tiles.reshape(n_rows, tile, n_cols, tile).transpose(0, 2, 1, 3)
    tiles = tiles.reshape(n_rows, n_cols, -1)
    shares = np.stack([(tiles == phase).mean(axis=-1) for phase in Phase], axis=-1)
    majority = np.vectorize(lambda p: EXPECTED[Phase(p)])(shares.argmax(axis=-1))
    return majority, shares.max(axis=-1)


def _assert_fractions_close(measured: dict[str, float] | None, truth: dict[str, float]) -> None:
    assert measured is not None
    for phase in PHASES:
        assert abs(measured[phase] - truth[phase]) <= FRACTION_TOLERANCE, (phase, measured, truth)


# ----- single frames ----------------------------------------------------------------------------


def test_pristine_field_is_all_layered() -> None:
    result = phase_map(_frame(_model(x=0.0), _optics())[0], 0.06)
    assert result.measurable and result.labels.shape == (8, 8)
    assert (result.labels == TileClass.LAYERED).all()
    assert result.fractions == {"layered": 1.0, "disordered": 0.0, "rock_salt": 0.0}


def test_converted_field_is_all_rock_salt() -> None:
    result = phase_map(_frame(_model(x=1.0), _optics())[0], 0.06)
    assert (result.labels == TileClass.ROCK_SALT).all()
    assert result.fractions == {"layered": 0.0, "disordered": 0.0, "rock_salt": 1.0}


@pytest.mark.parametrize("x", [0.66, 0.68, 0.70, 0.72, 0.74, 0.76])
def test_fractions_and_tiles_follow_the_truth_across_the_front(x: float) -> None:
    model, optics = _model(x=x), _optics()
    frame, truth = _frame(model, optics)
    result = phase_map(frame, 0.06)
    _assert_fractions_close(result.fractions, _particle_fractions(truth))
    # Every tile that is (nearly) one phase carries that phase's label.
    majority, purity = _tile_truth(model, optics, SHAPE, 128)
    pure = purity >= 0.9
    assert pure.sum() >= 32
    assert np.array_equal(result.labels[pure], majority[pure])


def test_needle_tiles_are_not_particle() -> None:
    # The field at the contact: the amorphous needle on the left, the particle's edge with its
    # 5 nm disordered surface layer, the layered particle on the right.
    model, optics = _model(x=0.0), _optics(center=(0.0, 0.0))
    frame, truth = _frame(model, optics)
    result = phase_map(frame, 0.06)
    majority, purity = _tile_truth(model, optics, SHAPE, 128)
    needle = (majority == TileClass.NO_DATA) & (purity >= 0.9)
    assert needle.sum() >= 24
    assert np.isin(result.labels[needle], [TileClass.VACUUM, TileClass.NO_DATA]).all()
    _assert_fractions_close(result.fractions, _particle_fractions(truth))
    assert result.fractions["rock_salt"] == 0.0
    assert result.particle_tiles == result.count(TileClass.LAYERED) + result.count(
        TileClass.DISORDERED
    )


# ----- nothing to map ---------------------------------------------------------------------------


def test_vacuum_frame_is_not_measurable() -> None:
    frame, truth = _frame(_model(tip_nm=-3000.0), _optics(center=(-40.0, 0.0)))
    assert truth.field_phase_fractions["vacuum"] == 1.0
    result = phase_map(frame, 0.06)
    assert not result.measurable and result.fractions is None and result.reason
    assert (result.labels == TileClass.VACUUM).all()


@pytest.mark.parametrize("shape", [SHAPE, (300, 200)])
def test_beam_off_is_not_measurable_without_exception(shape: tuple[int, int]) -> None:
    result = phase_map(np.zeros(shape, np.uint16), 0.06)
    assert not result.measurable and result.fractions is None
    assert "too few counts" in result.reason
    assert result.labels.shape == (shape[0] // 128, shape[1] // 128)
    assert (result.labels == TileClass.NO_DATA).all()


def test_low_magnification_frame_is_not_measurable() -> None:
    optics = Optics()  # low mag, 1 nm/px
    frame, _ = _renderer().render(Scene.capture(_model(x=0.5), optics), FRAME_S, 0)
    result = phase_map(frame, optics.pixel_size_nm)
    assert not result.measurable and "too coarse" in result.reason
    assert (result.labels == TileClass.NO_DATA).all()


def test_result_record_is_plain_json() -> None:
    result = phase_map(_frame(_model(x=0.7), _optics())[0], 0.06)
    record = result.to_record()
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert record["fractions"] == result.fractions
    assert sum(record["tiles"].values()) == 64
    assert np.array_equal(np.array(record["labels"]), result.labels)


def test_a_frame_smaller_than_a_tile_is_not_measurable() -> None:
    result = phase_map(np.ones((100, 300), np.uint16), 0.06)
    assert not result.measurable and "smaller than one" in result.reason
    assert result.labels.shape == (0, 0)


@pytest.mark.parametrize("x", [0.0, 0.7, 1.0])
def test_low_dose_frame_is_not_measurable_rather_than_biased(x: float) -> None:
    # One 25 ms frame (~0.15 counts/px on the particle): (003) would show in some tiles, the
    # rock-salt grains in none, so fractions would lean to layered. The map says so instead.
    result = phase_map(_frame(_model(x=x), _optics(), exposure_s=FRAME_S)[0], 0.06)
    assert not result.measurable and result.fractions is None
    assert "too few counts" in result.reason
    assert (result.labels == TileClass.NO_DATA).all()


def test_a_sum_of_low_dose_frames_is_mapped() -> None:
    model, optics = _model(x=0.7), _optics()
    scene = Scene.capture(model, optics)
    renderer = _renderer()
    frames = [renderer.render(scene, FRAME_S, index)[0] for index in range(40)]
    summed = sum_frames(frames)
    truth = renderer.render(scene, FRAME_S, 0)[1]
    _assert_fractions_close(phase_map(summed, 0.06).fractions, _particle_fractions(truth))


# ----- timelines --------------------------------------------------------------------------------


def _contact_model(volts: float) -> NanobatteryModel:
    model = _model(x=0.0, tip_nm=0.0)
    model.set_source(True, volts, 1.0e-7)  # the source-meter on the particle, 100 nA compliance
    return model


def test_biased_timeline_fractions_track_the_truth_and_reach_rock_salt() -> None:
    model, optics = _contact_model(4.3), _optics()
    rock_salt = []
    for index, t in enumerate(np.arange(0.0, 121.0, 6.0)):
        model.advance_to(float(t))
        frame, truth = _frame(model, optics, index=index)
        result = phase_map(frame, 0.06)
        _assert_fractions_close(result.fractions, _particle_fractions(truth))
        rock_salt.append(result.fractions["rock_salt"])
    assert rock_salt[0] == 0.0
    assert rock_salt[-1] >= 0.9  # what `hold until rock_salt_fraction >= 0.9` waits for
    assert np.all(np.diff(rock_salt) >= -FRACTION_TOLERANCE)


def test_no_bias_control_map_stays_layered() -> None:
    model, optics = _contact_model(0.0), _optics()
    for index, t in enumerate(np.arange(0.0, 61.0, 10.0)):
        model.advance_to(float(t))
        frame, truth = _frame(model, optics, index=index)
        assert truth.field_phase_fractions["layered"] == 1.0
        result = phase_map(frame, 0.06)
        assert not (result.labels == TileClass.ROCK_SALT).any(), t
        assert not (result.labels == TileClass.DISORDERED).any(), t
        assert result.fractions == {"layered": 1.0, "disordered": 0.0, "rock_salt": 0.0}


# ----- settings ---------------------------------------------------------------------------------


def test_tile_size_is_configurable() -> None:
    model, optics = _model(x=0.7), _optics()
    frame, truth = _frame(model, optics)
    coarse = phase_map(frame, 0.06, settings=PhaseMapSettings(tile_px=256))
    assert coarse.labels.shape == (4, 4) and coarse.tile_px == 256
    # Quarter-field columns: the fractions are good to about half a column (12.5 %).
    for phase in PHASES:
        assert abs(coarse.fractions[phase] - _particle_fractions(truth)[phase]) <= 0.15


def test_a_frame_that_is_no_multiple_of_the_tile_uses_a_centred_grid() -> None:
    shape = (1000, 904)
    frame, _ = _frame(_model(x=0.0), _optics(), shape=shape)
    result = phase_map(frame, 0.06)
    assert result.labels.shape == (7, 7)
    assert result.origin == ((1000 - 896) // 2, (904 - 896) // 2)
    assert (result.labels == TileClass.LAYERED).all()


def test_classification_rule_on_peak_ratios() -> None:
    # One tile per case: (003), 1.95 A, (200), shared 2.4 A only, nothing; threshold 18.
    names = ("lno_003", "lno_101", "lno_006_nio_111", "disordered_195", "nio_200", "nio_220")
    cases = [
        {"lno_003": 900.0, "lno_006_nio_111": 100.0},  # pristine layered
        {"lno_003": 100.0, "disordered_195": 180.0},  # weak (003), strong 1.95 A: disordered
        {"lno_006_nio_111": 90.0, "nio_200": 120.0, "nio_220": 40.0},  # rock salt
        {"lno_006_nio_111": 60.0},  # 2.4 A alone marks nothing
        {"nio_200": 17.0},  # below the threshold
    ]
    ratios = {
        name: np.array([[case.get(name, 3.0) for case in cases]], dtype=np.float32)
        for name in names
    }
    labels = classify_tiles(ratios)
    assert labels.tolist() == [
        [
            TileClass.LAYERED,
            TileClass.DISORDERED,
            TileClass.ROCK_SALT,
            TileClass.UNRESOLVED,
            TileClass.VACUUM,
        ]
    ]


@pytest.mark.parametrize(
    ("d_nm", "present", "flank_of_neighbour", "label"),
    [
        (0.195, "disordered_195", "nio_200", TileClass.DISORDERED),
        (0.24, "lno_006_nio_111", "lno_101", TileClass.UNRESOLVED),
    ],
)
def test_a_strong_spot_does_not_count_for_its_neighbour(
    d_nm: float, present: str, flank_of_neighbour: str, label: TileClass
) -> None:
    # Synthetic fringes of one spacing at high dose: the spot's flank spills into the annulus
    # of the reflection next to it (2.1 A is 2.8 Fourier pixels from 1.95 A in a 128 px tile),
    # but there it is no local maximum, so it does not count.
    rng = np.random.default_rng(5)
    rows, cols = np.mgrid[0:512, 0:512] * 0.06
    angle = np.radians(35.0)
    phase = 2 * np.pi * (np.cos(angle) * cols + np.sin(angle) * rows) / d_nm
    frame = rng.poisson(200.0 * (1.0 + 0.3 * np.cos(phase))).astype(np.uint16)
    result = phase_map(frame, 0.06)
    threshold = PhaseMapSettings().threshold
    assert (result.peak_ratio[present] > 1000 * threshold).all()
    assert (result.peak_ratio[flank_of_neighbour] < threshold).all()
    assert (result.labels == label).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_px": 8}, "tile_px"),
        ({"tile_px": 129}, "tile_px"),
        ({"threshold": 1.0}, "threshold"),
        ({"min_counts_per_pixel": -1.0}, "min_counts"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PhaseMapSettings(**kwargs)
