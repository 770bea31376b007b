"""Spectral analysis of HRTEM frames against the simulator's truth.

Pure functions on rendered frames (sim/render.py), no sockets or threads. Dose: at the model's
35 e/A2/s an HRTEM pixel of 0.06 nm collects ~12.6 electrons per second in vacuum; the
renderer's counts_scale=1 at 25 ms is one 40 frames/s frame (~0.3 counts/px). Tests that need
the rock-salt rings use one second of dose per frame (exposure 1 s: the sum of that second's
40 frames, which `sum_frames` reproduces in test_sum_of_frames_reaches_what_one_frame_cannot).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np
import pytest
from sim_frames import cell, hrtem_optics

from insitu_daq.analysis.reflections import DEFAULT_REFLECTIONS, Reflection, ReflectionTable
from insitu_daq.analysis.spectrum import (
    SpectrumSettings,
    analyze_frame,
    radial_spectrum,
    sum_frames,
)
from insitu_daq.sim.model import NanobatteryModel
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, FrameTruth, Scene

SHAPE = (1024, 1024)
FRAME_S = 0.025  # one frame at 40 frames/s
SECOND_S = 1.0  # the dose of one second: 40 frames summed
# Truth onset of rock salt: the first time it covers this fraction of the field of view.
ONSET_FIELD_FRACTION = 0.02


@lru_cache(maxsize=8)
def _renderer(pixel_nm: float, seed: int = 1, counts_scale: float = 1.0) -> FrameRenderer:
    # One renderer per field: the HRTEM textures of a field are drawn once (~0.3 s).
    return FrameRenderer(SHAPE, seed=seed, counts_scale=counts_scale)


def _optics(pixel_nm: float = 0.06, center: tuple[float, float] | None = None) -> Optics:
    return hrtem_optics(pixel_nm, center)


_model = cell


def _frame(
    model: NanobatteryModel,
    optics: Optics,
    exposure_s: float = SECOND_S,
    index: int = 0,
    seed: int = 1,
) -> tuple[np.ndarray, FrameTruth]:
    renderer = _renderer(optics.pixel_size_nm, seed)
    return renderer.render(Scene.capture(model, optics), exposure_s, index)


def _relative_error(measured: float | None, nominal: float) -> float:
    assert measured is not None, f"{nominal} A not measured"
    return abs(measured / nominal - 1.0)


# ----- d-spacings ------------------------------------------------------------------------------


@pytest.mark.parametrize("pixel_nm", [0.04, 0.05, 0.06])
def test_pristine_particle_gives_the_layered_spacings_within_1_percent(pixel_nm: float) -> None:
    frame, truth = _frame(_model(x=0.0), _optics(pixel_nm))
    assert truth.field_phase_fractions["layered"] == 1.0
    result = analyze_frame(frame, pixel_nm)
    assert result.measurable
    spacings = result.d_spacings()
    assert _relative_error(spacings["lno_003"], 4.8) < 0.01
    assert _relative_error(spacings["lno_101"], 2.53) < 0.01
    assert _relative_error(spacings["lno_006_nio_111"], 2.4) < 0.01
    # Nothing of the other phases is claimed.
    for name in ("disordered_195", "nio_200", "nio_220"):
        assert spacings[name] is None, name
    # The strongest peak of the spectrum is (003).
    assert abs(result.peaks[0].d_angstrom / 4.8 - 1.0) < 0.01


@pytest.mark.parametrize("pixel_nm", [0.04, 0.05, 0.06])
def test_rock_salt_particle_gives_the_nio_spacings_within_1_percent(pixel_nm: float) -> None:
    frame, truth = _frame(_model(x=1.0), _optics(pixel_nm))
    assert truth.field_phase_fractions["rock_salt"] == 1.0
    spacings = analyze_frame(frame, pixel_nm).d_spacings()
    assert _relative_error(spacings["nio_200"], 2.1) < 0.01
    assert _relative_error(spacings["lno_006_nio_111"], 2.4) < 0.01
    # 1.48 A spans >= 2.47 px at these pixel sizes: above the renderer's transfer limit.
    assert _relative_error(spacings["nio_220"], 1.48) < 0.01
    assert spacings["lno_003"] is None
    assert spacings["disordered_195"] is None
    # (101) at 2.53 A sits on the flank of the 2.4 A ring: a flank is not a reflection.
    assert spacings["lno_101"] is None


def test_a_reflection_the_optics_do_not_transfer_is_none_not_a_guess() -> None:
    # At 0.07 nm/px, 1.48 A is 2.1 px: below the renderer's 2.2 px transfer limit, not drawn,
    # though still below the Nyquist frequency of the analysis.
    frame, _ = _frame(_model(x=1.0), _optics(0.07))
    result = analyze_frame(frame, 0.07)
    assert result.reflections["nio_220"].d_angstrom is None
    assert not result.reflections["nio_220"].detected
    assert _relative_error(result.reflections["nio_200"].d_angstrom, 2.1) < 0.01


def test_intensity_is_the_squared_relative_fringe_amplitude_independent_of_dose() -> None:
    # The renderer draws (003) with relative amplitude 0.30: (a/2)**2 = 0.0225.
    frame_low, _ = _frame(_model(x=0.0), _optics(), exposure_s=FRAME_S)
    frame_high, _ = _frame(_model(x=0.0), _optics(), exposure_s=SECOND_S)
    low = analyze_frame(frame_low, 0.06).reflections["lno_003"].intensity
    high = analyze_frame(frame_high, 0.06).reflections["lno_003"].intensity
    assert high == pytest.approx(0.0225, rel=0.1)
    assert low == pytest.approx(high, rel=0.1)


# ----- noise, empty fields, drift ---------------------------------------------------------------


def test_vacuum_only_frame_has_no_reflections_and_no_peaks() -> None:
    optics = _optics(center=(-40.0, 0.0))  # in front of the particle, tip retracted
    frame, truth = _frame(_model(tip_nm=-3000.0), optics)
    assert truth.field_phase_fractions["vacuum"] == 1.0
    result = analyze_frame(frame, 0.06)
    assert result.measurable  # there is signal: the beam through vacuum
    assert result.peaks == ()
    for measurement in result.reflections.values():
        assert not measurement.detected and measurement.d_angstrom is None


def test_tip_only_frame_has_no_reflections() -> None:
    # The amorphous tungsten needle: a smooth speckle spectrum, no lattice.
    frame, truth = _frame(_model(tip_nm=0.0), _optics(center=(-40.0, 0.0)))
    assert truth.field_phase_fractions["tip"] == 1.0
    result = analyze_frame(frame, 0.06)
    assert all(m.d_angstrom is None for m in result.reflections.values())


@pytest.mark.parametrize(
    "frame",
    [np.zeros(SHAPE, np.uint16), np.zeros((64, 48), np.float32), "500 counts"],
    ids=["beam-off", "small-beam-off", "500-counts"],
)
def test_no_signal_is_not_measurable_without_exception(frame: np.ndarray | str) -> None:
    if isinstance(frame, str):  # a few stray counts: too few for a spectrum
        frame = np.zeros(SHAPE, np.uint16)
        frame[500:510, 500:550] = 1
    result = analyze_frame(frame, 0.06)
    assert not result.measurable and result.reason
    assert result.spectrum is None and result.peaks == ()
    assert set(result.reflections) == set(DEFAULT_REFLECTIONS.names)
    for measurement in result.reflections.values():
        assert measurement.d_angstrom is None and math.isnan(measurement.intensity)


def test_low_magnification_frame_is_not_measurable() -> None:
    optics = Optics()  # low mag, 1 nm/px: no lattice fringe reaches the spectrum
    frame, _ = _renderer(1.0).render(Scene.capture(_model(x=0.5), optics), FRAME_S, 0)
    result = analyze_frame(frame, optics.pixel_size_nm)
    assert not result.measurable and "too coarse" in result.reason
    assert all(m.d_angstrom is None for m in result.reflections.values())


def test_result_record_is_plain_json() -> None:
    frame, _ = _frame(_model(x=0.7), _optics())
    record = analyze_frame(frame, 0.06).to_record()
    assert record["reflections"]["nio_200"]["d_angstrom"] == pytest.approx(2.1, rel=0.01)
    assert record["peaks"][0]["d_angstrom"] == pytest.approx(4.8, rel=0.01)
    json.dumps(record, allow_nan=False)
    off = analyze_frame(np.zeros(SHAPE, np.uint16), 0.06).to_record()
    assert off["reflections"]["lno_003"] == {
        "detected": False,
        "d_angstrom": None,
        "intensity": None,
        "significance": 0.0,
    }
    json.dumps(off, allow_nan=False)


def test_flat_frame_has_no_peaks_and_no_reflections() -> None:
    result = analyze_frame(np.full(SHAPE, 7, np.uint16), 0.06)
    assert result.peaks == ()
    assert all(m.d_angstrom is None for m in result.reflections.values())


def test_beam_off_render_is_not_measurable() -> None:
    frame, _ = _frame(_model(beam_on=False), _optics())
    assert not frame.any()
    assert not analyze_frame(frame, 0.06).measurable


def test_single_low_dose_frame_does_not_claim_the_rock_salt_rings() -> None:
    # ~0.13 counts/px on rock salt: the rings are below the threshold, d is None, not guessed.
    frame, _ = _frame(_model(x=1.0), _optics(), exposure_s=FRAME_S)
    result = analyze_frame(frame, 0.06)
    assert result.measurable
    assert result.reflections["nio_200"].d_angstrom is None
    assert all(m.d_angstrom is None for m in result.reflections.values())


def test_sum_of_frames_reaches_what_one_frame_cannot() -> None:
    model, optics = _model(x=1.0), _optics()
    renderer = _renderer(0.06)
    scene = Scene.capture(model, optics)
    frames = [renderer.render(scene, FRAME_S, index)[0] for index in range(40)]
    summed = sum_frames(frames)
    assert summed.dtype == np.float32
    assert np.array_equal(summed, np.sum(np.stack(frames), axis=0, dtype=np.float32))
    result = analyze_frame(summed, 0.06)
    assert _relative_error(result.reflections["nio_200"].d_angstrom, 2.1) < 0.01


def test_sum_frames_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="no frames"):
        sum_frames([])
    with pytest.raises(ValueError, match="shapes differ"):
        sum_frames([np.zeros((4, 4)), np.zeros((4, 5))])
    with pytest.raises(ValueError, match="2-D"):
        sum_frames([np.zeros(4)])


def test_partly_empty_field_still_measures_the_lattice() -> None:
    # Field at the contact: half needle, a sliver of vacuum, the particle's edge with its
    # disordered surface layer.
    frame, truth = _frame(_model(x=0.0), _optics(center=(0.0, 0.0)))
    assert truth.field_phase_fractions["tip"] > 0.4
    spacings = analyze_frame(frame, 0.06).d_spacings()
    assert _relative_error(spacings["lno_003"], 4.8) < 0.01
    assert spacings["nio_200"] is None


def test_drift_of_the_field_does_not_change_the_measurement() -> None:
    model = _model(x=0.7)
    centred = analyze_frame(_frame(model, _optics())[0], 0.06)
    drifted = analyze_frame(_frame(model, _optics(center=(253.3, 1.7)))[0], 0.06)
    for name in ("lno_003", "disordered_195", "nio_200"):
        a, b = centred.reflections[name], drifted.reflections[name]
        assert a.detected and b.detected, name
        assert b.d_angstrom == pytest.approx(a.d_angstrom, rel=0.005)
        assert b.intensity == pytest.approx(a.intensity, rel=0.3)


def test_spectrum_axis_uses_the_pixel_size() -> None:
    frame, _ = _frame(_model(x=0.0), _optics(0.05))
    spectrum = radial_spectrum(frame, 0.05)
    assert spectrum is not None
    assert spectrum.q_per_nm[-1] == pytest.approx(0.5 / 0.05, rel=0.01)  # Nyquist, 1/nm
    assert spectrum.q_per_nm[0] >= 10.0 / SpectrumSettings().d_max_angstrom - 0.02
    top = np.argmax(spectrum.excess)
    assert spectrum.d_angstrom[top] == pytest.approx(4.8, rel=0.01)


# ----- the reflection table ---------------------------------------------------------------------


def test_a_configured_table_is_tracked() -> None:
    table = ReflectionTable.from_records(
        [
            {"name": "nio_200", "d_angstrom": 2.1, "phase": "rock_salt", "marks": True},
            {
                "name": "made_up_3p3",
                "label": "nothing at 3.3 A",
                "d_angstrom": 3.3,
                "phase": "layered",
            },
        ]
    )
    frame, _ = _frame(_model(x=1.0), _optics())
    result = analyze_frame(frame, 0.06, table=table)
    assert set(result.reflections) == {"nio_200", "made_up_3p3"}
    assert result.reflections["made_up_3p3"].d_angstrom is None
    assert _relative_error(result.reflections["nio_200"].d_angstrom, 2.1) < 0.01
    assert ReflectionTable.from_records(table.to_records()) == table


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"name": "a", "d_angstrom": 2.1}], "missing"),
        ([{"name": "a", "d_angstrom": "x", "phase": "layered"}], "must be a number"),
        ([{"name": "a b", "d_angstrom": 2.1, "phase": "layered"}], "letters"),
        ([{"name": "a", "d_angstrom": 0.1, "phase": "layered"}], "not in"),
        ([{"name": "a", "d_angstrom": 2.1, "phase": "spinel"}], "phase"),
        ([{"name": "a", "d_angstrom": 2.1, "phase": "shared", "marks": True}], "cannot mark"),
        ([{"name": "a", "d_angstrom": 2.1, "phase": "layered", "colour": 1}], "unknown keys"),
        (
            [
                {"name": "a", "d_angstrom": 2.1, "phase": "layered"},
                {"name": "b", "d_angstrom": 2.105, "phase": "rock_salt"},
            ],
            "within 1 %",
        ),
        (
            [
                {"name": "a", "d_angstrom": 2.1, "phase": "layered"},
                {"name": "a", "d_angstrom": 3.1, "phase": "layered"},
            ],
            "repeat",
        ),
    ],
)
def test_a_bad_table_is_refused_in_one_line(records: list[dict], message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        ReflectionTable.from_records(records)
    assert "\n" not in str(error.value)


def test_default_table_is_science_md() -> None:
    spacings = {r.name: r.d_angstrom for r in DEFAULT_REFLECTIONS}
    assert spacings == {
        "lno_003": 4.8,
        "lno_101": 2.53,
        "lno_006_nio_111": 2.4,
        "disordered_195": 1.95,
        "nio_200": 2.1,
        "nio_220": 1.48,
    }
    # The shared 2.4 A marks no phase: layered is recognised by (003), rock salt by (200).
    assert [r.name for r in DEFAULT_REFLECTIONS.markers("layered")] == ["lno_003"]
    assert [r.name for r in DEFAULT_REFLECTIONS.markers("rock_salt")] == ["nio_200"]
    assert DEFAULT_REFLECTIONS["lno_006_nio_111"].phase == "shared"
    assert isinstance(DEFAULT_REFLECTIONS["nio_200"], Reflection)


# ----- timelines --------------------------------------------------------------------------------


def _contact_model(volts: float) -> NanobatteryModel:
    model = _model(x=0.0, tip_nm=0.0)
    model.set_source(True, volts, 1.0e-7)  # the source-meter on the particle, 100 nA compliance
    return model


def _rock_salt_onset_truth(volts: float, t_low: float, t_high: float) -> float:
    """First model time (to 0.05 s) at which rock salt covers ONSET_FIELD_FRACTION of the
    default HRTEM field, by bisection on fresh models (the fraction only grows)."""
    renderer, optics = _renderer(0.06), _optics()

    def fraction(t: float) -> float:
        model = _contact_model(volts)
        model.advance_to(t)
        _, truth = renderer.render(Scene.capture(model, optics), FRAME_S, 0)
        return truth.field_phase_fractions["rock_salt"]

    assert fraction(t_low) <= ONSET_FIELD_FRACTION < fraction(t_high)
    while t_high - t_low > 0.05:
        middle = 0.5 * (t_low + t_high)
        if fraction(middle) > ONSET_FIELD_FRACTION:
            t_high = middle
        else:
            t_low = middle
    return t_high


def _timeline(volts: float, duration_s: float, step_s: float) -> list[tuple[float, object, dict]]:
    """Advance a model in contact at `volts` and analyse one frame of one second's dose every
    step_s at the default HRTEM field; (time, FrameSpectrum, truth field fractions)."""
    model, optics = _contact_model(volts), _optics()
    renderer = _renderer(0.06)
    out = []
    for index, t in enumerate(np.arange(0.0, duration_s + 1e-9, step_s)):
        model.advance_to(float(t))
        frame, truth = renderer.render(Scene.capture(model, optics), SECOND_S, index)
        out.append((float(t), analyze_frame(frame, 0.06), truth.field_phase_fractions))
    return out


def test_biased_timeline_003_fades_200_rises_and_onset_within_2_s() -> None:
    timeline = _timeline(4.3, 120.0, 1.0)
    times = np.array([t for t, _, _ in timeline])
    i003 = np.array([r.reflections["lno_003"].intensity for _, r, _ in timeline])
    i200 = np.array([r.reflections["nio_200"].intensity for _, r, _ in timeline])
    detected_200 = np.array([r.reflections["nio_200"].detected for _, r, _ in timeline])

    # (003) falls: strong and at 4.8 A in the first 30 s, gone in the last 30 s.
    early, late = times <= 30.0, times >= 90.0
    assert all(timeline[i][1].reflections["lno_003"].detected for i in np.flatnonzero(early))
    assert not any(timeline[i][1].reflections["lno_003"].detected for i in np.flatnonzero(late))
    assert np.median(i003[late]) < 0.02 * np.median(i003[early])
    # NiO (200) rises: absent early, detected at 2.1 A in every late frame.
    assert not detected_200[early].any()
    assert detected_200[late].all()
    assert np.median(i200[late]) > 20 * max(np.max(np.abs(i200[early])), 1e-6)
    for i in np.flatnonzero(late):
        assert _relative_error(timeline[i][1].reflections["nio_200"].d_angstrom, 2.1) < 0.01

    # Onset: the first frame with (200) detected, against the first time rock salt covers
    # ONSET_FIELD_FRACTION of the field in the simulator's truth.
    measured_onset = float(times[np.argmax(detected_200)])
    truth_onset = _rock_salt_onset_truth(4.3, 30.0, 60.0)
    assert abs(measured_onset - truth_onset) <= 2.0, (measured_onset, truth_onset)
    # Consistent with the per-frame truth: nothing detected while the field had no rock salt.
    for t, result, fractions in timeline:
        if fractions["rock_salt"] == 0.0:
            assert not result.reflections["nio_200"].detected, t


def test_no_bias_control_shows_no_phase_change() -> None:
    timeline = _timeline(0.0, 60.0, 2.0)
    i003 = []
    for t, result, fractions in timeline:
        assert fractions["layered"] == 1.0  # the truth: nothing happens at 0 V
        reflections = result.reflections
        assert not reflections["nio_200"].detected, t
        assert not reflections["nio_220"].detected, t
        assert not reflections["disordered_195"].detected, t
        assert _relative_error(reflections["lno_003"].d_angstrom, 4.8) < 0.01
        i003.append(reflections["lno_003"].intensity)
    # (003) intact: its intensity steady within a few % (shot noise only).
    assert np.std(i003) < 0.05 * np.mean(i003)
