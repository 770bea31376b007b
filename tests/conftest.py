"""Shared fixtures, and the test folders on the import path.

The test folders mirror the package's rooms (tests/control/ tests insitu_daq/control/ ...).
Some test modules reuse another's harness by name (`from test_runner import RecordingStation`,
`from test_daemon_e2e import LiveStation`), so every test folder is on sys.path from the start,
whatever order pytest collects them in; test module names are unique across the folders.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from testdata_paths import STREAM2_DIR

from insitu_daq.core.stationlock import LOCK_DIR_ENV

TESTS = Path(__file__).resolve().parent
for _folder in sorted(p for p in TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

_LOCKS = pytest.StashKey[tuple[str, str | None]]()


@pytest.fixture(scope="session")
def stream2_testdata() -> Path:
    """Folder of the real EIGER2 R 500K Stream V2 messages (shared/testdata/dectris-stream2)."""
    if STREAM2_DIR is None:
        pytest.skip("shared/testdata/dectris-stream2 not found (set INSITU_DAQ_TESTDATA)")
    return STREAM2_DIR


def pytest_configure(config: pytest.Config) -> None:
    """The station locks (insitu_daq/core/stationlock.py) of this test session in a folder of its
    own, apart from a real station's daemon on this machine and from other sessions running
    at the same time. Set before any test module is imported: several copy os.environ for
    the daemons they start at import time."""
    folder = tempfile.mkdtemp(prefix="insitu-daq-test-locks-")
    config.stash[_LOCKS] = (folder, os.environ.get(LOCK_DIR_ENV))
    os.environ[LOCK_DIR_ENV] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    folder, before = config.stash.get(_LOCKS, (None, None))
    if folder is None:
        return
    if before is None:
        os.environ.pop(LOCK_DIR_ENV, None)
    else:
        os.environ[LOCK_DIR_ENV] = before
    shutil.rmtree(folder, ignore_errors=True)
