"""A heating holder's temperature log read back (report/temperature.py): range and levels."""

from __future__ import annotations

import numpy as np
import pytest

from insitu_daq.report.temperature import summarize_temperature, temperature_lines


def test_levels_are_held_setpoints_with_the_frames_recorded_at_each() -> None:
    """Readings every 0.5 s: 4 s at room temperature (heater off), a ramp to 87 C (the setpoint
    moving at every reading), 10 s held there (last reading at 20.0 s), a ramp on from 20.5 s.
    Frames from 18.0 to 20.7 s: the level's are those before the next ramp's first reading,
    the 4 after its own last reading included."""
    room = np.arange(0.0, 4.0, 0.5)
    ramp = np.arange(4.0, 10.0, 0.5)
    held = np.arange(10.0, 20.5, 0.5)
    on = np.arange(20.5, 23.0, 0.5)
    time = np.concatenate([room, ramp, held, on])
    setpoint = np.concatenate([
        np.full(len(room), 22.0), np.linspace(27.0, 86.0, len(ramp)), np.full(len(held), 87.0),
        87.0 + 5.0 * np.arange(1, len(on) + 1),
    ])  # fmt: skip
    chip = setpoint.copy()
    chip[len(room) + len(ramp)] = 88.5  # the overshoot as the setpoint arrives
    frames = np.concatenate([np.arange(18.0, 20.75, 0.1), [30.0]])
    summary = summarize_temperature(time, chip, setpoint, frames)
    assert summary is not None
    assert (summary.min_c, summary.max_c, summary.max_setpoint_c) == (22.0, 112.0, 112.0)
    room_level, level = summary.levels  # the ramps are no level
    assert (room_level.setpoint_c, room_level.start_s, room_level.frames) == (22.0, 0.0, 0)
    assert (level.setpoint_c, level.start_s, level.duration_s) == (87.0, 10.0, 10.0)
    assert (level.min_c, level.max_c) == (87.0, 88.5)
    assert level.frames == 25  # 18.0 .. 20.4 s
    lines = temperature_lines(summary)
    assert lines[0].endswith("setpoint up to 112.0 C, 2 levels")
    assert "87.0 C from 10.0 s for 10.0 s" in lines[2] and lines[2].endswith("25 frames")


def test_a_run_without_a_temperature_log_has_no_temperature_summary() -> None:
    empty = np.zeros(0)
    assert summarize_temperature(empty, empty, empty, np.arange(3.0)) is None


@pytest.mark.parametrize("short_s", [0.5, 0.9])
def test_a_setpoint_held_for_less_than_a_second_is_no_level(short_s: float) -> None:
    time = np.array([0.0, short_s, 5.0])
    summary = summarize_temperature(time, time, np.array([30.0, 30.0, 31.0]), np.zeros(0))
    assert summary is not None and summary.levels == []
