"""Shared fixtures: where the real detector messages are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _testdata_dir() -> Path | None:
    candidates = [os.environ.get("INSITU_DAQ_TESTDATA"), REPO.parent / "shared" / "testdata"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "dectris-stream2").is_dir():
            return Path(candidate) / "dectris-stream2"
    return None


@pytest.fixture(scope="session")
def stream2_testdata() -> Path:
    """Folder of the real EIGER2 R 500K Stream V2 messages (shared/testdata/dectris-stream2)."""
    found = _testdata_dir()
    if found is None:
        pytest.skip("shared/testdata/dectris-stream2 not found (set INSITU_DAQ_TESTDATA)")
    return found
