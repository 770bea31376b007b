"""The ingest process keeps frame-sized buffers in the heap (glibc mallopt), or is told not to.

Real glibc calls in this test process (the settings only change how freed memory is kept).
"""

from __future__ import annotations

import platform

import pytest

from insitu_daq.ingest.process import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD, tune_malloc

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")


@glibc
def test_both_thresholds_are_set_and_reported() -> None:
    assert tune_malloc() == {
        "M_MMAP_THRESHOLD": MALLOC_MMAP_THRESHOLD,
        "M_TRIM_THRESHOLD": MALLOC_TRIM_THRESHOLD,
    }
    assert MALLOC_MMAP_THRESHOLD > 2 * 1024 * 1024  # a raw 1024 x 1024 uint16 frame fits under


def test_the_environment_can_leave_malloc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSITU_DAQ_MALLOPT", "0")
    assert tune_malloc() == {}
