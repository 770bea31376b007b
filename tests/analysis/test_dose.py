"""The dose arithmetic and the dose map (analysis/dose.py), and a frame's dose over the imaging
timeline (core/imaging.py): pure functions, numbers in and out."""

from __future__ import annotations

import math

import pytest

from insitu_daq.analysis.dose import DoseMap, Field, budget_at, frame_dose, map_of
from insitu_daq.core.imaging import ImagingState, ImagingTimeline

HRTEM = Field.of((440.0, 0.0), 0.06, (1024, 1024))  # 61.4 nm square
LM = Field.of((260.0, 0.0), 1.0, (1024, 1024))  # 1024 nm square, holds the HRTEM field


def test_a_frame_s_dose_is_its_rate_times_its_exposure() -> None:
    assert frame_dose(35.0, 0.025) == pytest.approx(0.875)
    assert math.isnan(frame_dose(math.nan, 0.025))  # not known: not a number made up


def test_the_budget_halves_above_275_c_and_no_temperature_is_room_temperature() -> None:
    assert budget_at(None, 5000, 2500, 275) == 5000
    assert budget_at(25.0, 5000, 2500, 275) == 5000
    assert budget_at(275.0, 5000, 2500, 275) == 5000
    assert budget_at(300.0, 5000, 2500, 275) == 2500


def test_a_field_is_centred_on_the_specimen_with_the_frame_s_size() -> None:
    assert HRTEM.x_max - HRTEM.x_min == pytest.approx(61.44)
    assert (HRTEM.x_min + HRTEM.x_max) / 2 == pytest.approx(440.0)
    wide = Field.of((0.0, 0.0), 2.0, (10, 20))  # rows, columns
    assert (wide.x_min, wide.x_max, wide.y_min, wide.y_max) == (-20.0, 20.0, -10.0, 10.0)
    # Touched cells: an edge on a cell boundary does not touch the next cell.
    assert wide.cells(10.0) == (-2, 2, -1, 1)
    assert Field(0.5, 10.5, 0.0, 10.0).cells(10.0) == (0, 2, 0, 1)


def test_overlapping_fields_add_where_they_overlap_only() -> None:
    dose_map = DoseMap(cell_nm=10.0)
    dose_map.add(LM, 100.0)
    dose_map.add(HRTEM, 700.0)
    dose_map.add(HRTEM, 300.0)
    assert dose_map.dose_in(HRTEM) == pytest.approx(1100.0)  # its own two and the LM field's
    assert dose_map.dose_in(Field.of((0.0, 0.0), 0.06, (64, 64))) == pytest.approx(100.0)
    assert dose_map.dose_in(Field.of((5000.0, 0.0), 1.0, (64, 64))) == 0.0  # never lit
    assert dose_map.highest == pytest.approx(1100.0)
    assert dose_map.total_added == pytest.approx(100.0 + 1000.0)  # per field, not per area

    xs, ys, grid = dose_map.grid()
    assert grid.shape == (len(ys), len(xs)) == (104, 104)  # the LM field's cells
    assert grid.max() == pytest.approx(1100.0) and grid.min() == pytest.approx(100.0)
    hot = grid > 1000
    assert hot.sum() == 8 * 8  # the HRTEM field's 61 nm, 409-471 nm: cells 40..47
    assert xs[hot.any(axis=0)].min() == pytest.approx(405.0)
    # A map read back from its exposures is the same map.
    again = map_of([(LM, 100.0), (HRTEM, 1000.0)], 10.0)
    assert (again.grid()[2] == grid).all()


def test_nothing_unknown_is_added() -> None:
    dose_map = DoseMap()
    dose_map.add(HRTEM, math.nan)
    dose_map.add(Field.of((math.nan, 0.0), 0.06, (64, 64)), 10.0)
    assert dose_map.highest == 0.0 and dose_map.exposures() == []


def _state(start: float, end: float, rate: float, mode: str = "hrtem") -> ImagingState:
    return ImagingState(start, end, mode, 0.06e-9, rate, 440.0, 0.0)


def test_a_frame_s_dose_follows_the_timeline_over_its_exposure() -> None:
    timeline = ImagingTimeline()
    timeline.add(_state(-math.inf, -math.inf, 0.0, "lm"))  # blanked at run start
    timeline.add(_state(1.0, 1.1, 35.0))  # unblanked in HRTEM (a switch of 0.1 s)
    timeline.add(_state(3.0, 3.0, 0.0))  # blanked again
    timeline.advance(10.0)
    assert timeline.dose(0.0, 1.0) == 0.0
    # The switch is counted at the higher rate: never under the truth.
    assert timeline.dose(1.0, 2.0) == pytest.approx(35.0)
    assert timeline.dose(0.5, 3.5) == pytest.approx(35.0 * 2.0)
    assert timeline.dose(3.0, 9.0) == 0.0
    pieces = timeline.exposure(2.5, 3.5)
    assert [(s.start, seconds, dose) for s, seconds, dose in pieces] == [
        (1.0, 0.5, pytest.approx(17.5)),
        (3.0, 0.5, 0.0),
    ]
    unknown = ImagingTimeline()
    unknown.add(ImagingState(-math.inf, -math.inf, "unknown", math.nan, math.nan))
    assert math.isnan(unknown.dose(0.0, 1.0))
