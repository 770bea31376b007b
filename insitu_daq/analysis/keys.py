"""Names of the live-analysis quantities (the keys of a result's `values`), in one place.

Kept apart from pipeline.py so that the run-file writer (analysislog.py, in the ingest process)
and the daemon can name quantities without importing the analysis and scipy.
"""

from __future__ import annotations

from .reflections import PHASES, ReflectionTable

PHASE_KEYS = {phase: f"{phase}_fraction" for phase in PHASES}
# Share of the particle tiles in which a phase's marker is seen at all (phasemap.py).
PRESENCE_KEYS = {phase: f"{phase}_presence" for phase in PHASES}
LM_KEYS = ("projected_area_m2", "expansion", "front_position_nm", "front_velocity_nm_s")


def d_spacing_key(reflection: str) -> str:
    """Measured d of a reflection, in metres (None: not detected)."""
    return f"d_spacing_m.{reflection}"


def intensity_key(reflection: str) -> str:
    """Relative power above background in a reflection's window (spectrum.py)."""
    return f"intensity.{reflection}"


def value_keys(table: ReflectionTable) -> tuple[str, ...]:
    """Every key a result for `table` can carry."""
    per_reflection = [f(name) for name in table.names for f in (d_spacing_key, intensity_key)]
    return (*per_reflection, *PHASE_KEYS.values(), *PRESENCE_KEYS.values(), *LM_KEYS)
