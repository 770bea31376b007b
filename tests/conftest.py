"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from testdata_paths import STREAM2_DIR

from insitu_daq.stationlock import LOCK_DIR_ENV


@pytest.fixture(scope="session")
def stream2_testdata() -> Path:
    """Folder of the real EIGER2 R 500K Stream V2 messages (shared/testdata/dectris-stream2)."""
    if STREAM2_DIR is None:
        pytest.skip("shared/testdata/dectris-stream2 not found (set INSITU_DAQ_TESTDATA)")
    return STREAM2_DIR


@pytest.fixture(scope="session", autouse=True)
def private_station_locks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The station locks (insitu_daq/stationlock.py) of this test session, in a folder of its
    own: inherited by every daemon and sim the tests start, apart from a real station's
    daemon on this machine and from other test sessions running at the same time."""
    folder = tmp_path_factory.mktemp("station-locks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LOCK_DIR_ENV, str(folder))
        yield folder
