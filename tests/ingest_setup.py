"""What the ingest tests share: a small bslz4 frame geometry and a station config with a short
reorder window and flush interval, so a test sees its frames in the file within a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from insitu_daq.core.config import StationConfig, parse_config
from insitu_daq.runfile.writer import FrameGeometry

SHAPE = (128, 128)
GEOMETRY = FrameGeometry(("threshold_1",), SHAPE, "<u2", "bslz4")
DETECTOR = "/entry/instrument/detector"


def ingest_config(endpoint: str, data_dir: Path, **detector: Any) -> StationConfig:
    return parse_config(
        {
            "data_dir": str(data_dir),
            "detector": {
                "endpoint": endpoint,
                "reorder_window_frames": 8,
                "reorder_window_s": 0.3,
                "geometry_timeout_s": 0.5,
                **detector,
            },
            "sampling": {"flush_interval_s": 0.2},
        }
    )
