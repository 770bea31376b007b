"""The station config's `[analysis] drift` reaches the live analysis's settings (off unless
asked: analysis/drift.py costs every frame a registration)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from insitu_daq.core.config import AnalysisConfig
from insitu_daq.service.daemon import pipeline_settings


def test_drift_is_off_by_default_and_on_when_the_station_asks() -> None:
    assert not pipeline_settings(AnalysisConfig()).drift.enabled
    settings = pipeline_settings(AnalysisConfig(drift=True))
    assert settings.drift.enabled and settings.to_record()["drift_corrected"] is True
    with pytest.raises(ValidationError, match="drift"):
        AnalysisConfig(drift="sometimes")
