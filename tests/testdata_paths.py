"""Where the real DECTRIS Stream V2 messages are (shared/testdata beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _stream2_dir() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "testdata"]
    if os.environ.get("INSITU_DAQ_TESTDATA"):
        candidates.insert(0, Path(os.environ["INSITU_DAQ_TESTDATA"]))
    for base in candidates:
        for folder in (base / "dectris-stream2", base):
            if (folder / "r500k_bm_bslz4_16bit").is_dir():
                return folder
    return None


STREAM2_DIR = _stream2_dir()
needs_stream2 = pytest.mark.skipif(
    STREAM2_DIR is None,
    reason="recorded DECTRIS Stream V2 messages not found (shared/testdata/dectris-stream2 "
    "beside the repo, or set INSITU_DAQ_TESTDATA)",
)
