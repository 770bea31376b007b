"""Per-frame bias from the bias log: the stamped staircase plus the measured offset."""

from __future__ import annotations

import numpy as np
import pytest

from insitu_daq.runfile.framebias import FrameBiasEstimator

STEP_V = 0.01
STEP_S = 0.01  # a 1 V/s ramp in 10 mV steps
READ_S = 0.02  # 50 Hz readings


def _ramp(duration_s: float, offset_v: float = 0.0) -> tuple[np.ndarray, ...]:
    """A 1 V/s staircase from 0 V, its change stamps and 50 Hz readings of it (+ an offset)."""
    change_times = np.arange(0, duration_s, STEP_S) + 0.0005
    levels = STEP_V * (np.arange(len(change_times)) + 1)
    read_times = np.arange(0.003, duration_s, READ_S)
    index = np.searchsorted(change_times, read_times, side="right") - 1
    read_volts = np.where(index >= 0, levels[np.clip(index, 0, None)], 0.0) + offset_v
    return change_times, levels, read_times, read_volts


def _truth(change_times: np.ndarray, levels: np.ndarray, times: np.ndarray) -> np.ndarray:
    index = np.searchsorted(change_times, times, side="right") - 1
    return levels[index]


def test_frames_on_a_ramp_get_the_level_the_source_was_at() -> None:
    change_times, levels, read_times, read_volts = _ramp(1.0, offset_v=0.002)
    estimator = FrameBiasEstimator()
    estimator.add_level_changes(change_times, levels)
    estimator.add_readings(read_times, read_volts, read_volts * 1e-9)
    frames = np.arange(0.05, 0.95, 0.0125)
    volts, amps = estimator.estimate(frames)
    truth = _truth(change_times, levels, frames) + 0.002
    assert np.max(np.abs(volts - truth)) < 1e-9
    # Interpolating the readings alone is off by up to a reading interval of steps.
    interpolated = np.interp(frames, read_times, read_volts)
    assert np.median(np.abs(interpolated - truth)) > 0.002
    assert amps == pytest.approx(np.interp(frames, read_times, read_volts * 1e-9))


def test_without_level_stamps_the_readings_are_interpolated() -> None:
    estimator = FrameBiasEstimator()
    estimator.add_readings(np.array([0.0, 1.0]), np.array([0.0, 2.0]), np.array([0.0, 2e-9]))
    volts, amps = estimator.estimate(np.array([0.25, 0.5]))
    assert volts == pytest.approx([0.5, 1.0])
    assert amps == pytest.approx([0.5e-9, 1e-9])


def test_no_readings_means_not_measured() -> None:
    estimator = FrameBiasEstimator()
    estimator.add_level_changes(np.array([0.0]), np.array([1.0]))
    volts, amps = estimator.estimate(np.array([0.5]))
    assert np.isnan(volts[0]) and np.isnan(amps[0])


def test_memory_is_a_window_of_the_log_however_long_the_run() -> None:
    estimator = FrameBiasEstimator(keep_s=5.0)
    for second in range(200):
        change_times, levels, read_times, read_volts = _ramp(1.0)
        estimator.add_level_changes(change_times + second, levels)
        estimator.add_readings(read_times + second, read_volts, read_volts)
    last_reading = 199 + read_times[-1]
    assert last_reading - 5.0 - READ_S <= estimator.oldest_time <= last_reading - 5.0
    # The window still answers for its frames, at the level in force even if it was set
    # before the window began.
    frames = np.array([196.5, 198.25])
    volts, _ = estimator.estimate(frames)
    assert volts == pytest.approx(_truth(change_times, levels, frames % 1.0), abs=1e-12)
    kept = len(estimator._readings) + len(estimator._changes)
    assert kept < 2 * (5.0 / READ_S + 5.0 / STEP_S) + 4
