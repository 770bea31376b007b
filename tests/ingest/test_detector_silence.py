"""A recording run that stops getting images says so once, and says when they came back."""

from __future__ import annotations

import pytest

from insitu_daq.ingest.silence import DetectorSilence

S = 1_000_000_000  # ns per second


def test_silence_is_declared_once_after_the_threshold_and_its_end_reported() -> None:
    watch = DetectorSilence(after_s=2.0)
    recording_since = 10 * S
    assert watch.image(11 * S) is None  # images flowing: nothing to say
    assert watch.check(12 * S, recording_since) is None
    assert watch.check(13 * S - 1, recording_since) is None  # 2 s minus 1 ns without one
    assert watch.check(13 * S, recording_since) == 11 * S  # silent since the last image
    assert watch.silent_since_ns == 11 * S
    assert watch.check(20 * S, recording_since) is None  # once per silence
    assert watch.image(21 * S) == 11 * S  # back: the silence began at the last image
    assert watch.image(22 * S) is None
    assert watch.silences_total == 1


def test_a_detector_that_never_sent_is_silent_from_the_start_of_recording() -> None:
    watch = DetectorSilence(after_s=2.0)
    assert watch.check(11 * S, 10 * S) is None
    assert watch.check(12 * S, 10 * S) == 10 * S
    # images from before recording started do not date the silence earlier
    other = DetectorSilence(after_s=2.0)
    other.image(5 * S)
    assert other.check(12 * S, 10 * S) == 10 * S


def test_a_closed_run_forgets_its_silence() -> None:
    watch = DetectorSilence(after_s=1.0)
    assert watch.check(5 * S, 0) == 0
    watch.forget()
    assert watch.image(6 * S) is None  # nothing ended that the next run should hear of
    assert watch.silences_total == 1


def test_the_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DetectorSilence(after_s=0.0)
