"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from testdata_paths import STREAM2_DIR


@pytest.fixture(scope="session")
def stream2_testdata() -> Path:
    """Folder of the real EIGER2 R 500K Stream V2 messages (shared/testdata/dectris-stream2)."""
    if STREAM2_DIR is None:
        pytest.skip("shared/testdata/dectris-stream2 not found (set INSITU_DAQ_TESTDATA)")
    return STREAM2_DIR
