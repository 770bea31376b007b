"""The registry of live measurements: what fills a result's values, per imaging mode.

A measurement is a function in an analysis module (spectrum.py, phasemap.py, morphology.py,
front.py, drift.py), registered with `@measures(mode, QUANTITY, ...)` naming the quantities
(quantities.py) whose keys it fills, the way a LiberTEM UDF holds its computation and declares
its result buffers. FrameAnalyzer (pipeline.py) computes what several measurements share once
per sum (the spectrum, the phase map when one is due, the segmentation, the particle, the
front) and keeps the state across sums (the expansion reference, the front's window); it hands
them to each registered measurement of the sum's mode in a context (`HrtemSum`, `LmSum`) and
merges the values they return. A new quantity is its registered function plus its declaration
in quantities.py: no edit to pipeline.py.

A measurement takes arrays and numbers and returns numbers (`Measured`): no state, no I/O.
Order: a mode's measurements run in the order of pipeline.py's list of analysis modules, then
in the order each module registers them (a result's keys keep that order); measurements
registered elsewhere (a test) run after those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .quantities import Quantity

if TYPE_CHECKING:  # types only: the analysis modules import this module
    import numpy as np

    from .drift import DriftTrack
    from .front import FrontMeasurement
    from .morphology import ParticleMeasurement, Segmentation
    from .phasemap import PhaseMap
    from .pipeline import PipelineSettings
    from .spectrum import FrameSpectrum

Mode = Literal["hrtem", "lm"]
MODES: tuple[Mode, ...] = ("hrtem", "lm")


@dataclass(frozen=True, slots=True)
class SumContext:
    """One dose sum being measured (pipeline.py's module docstring)."""

    summed: np.ndarray  # float32 counts, the sum of `integrated_frames` frames
    pixel_nm: float
    time_s: float  # run time of the newest frame of the sum (the result's stamp)
    settings: PipelineSettings


@dataclass(frozen=True, slots=True)
class HrtemSum(SumContext):
    spectrum: FrameSpectrum
    phase_map: PhaseMap | None  # None: no map due at this result (the run-time cadence)
    drift: DriftTrack | None = None  # None: drift not measured in this run (drift.py)


@dataclass(frozen=True, slots=True)
class LmSum(SumContext):
    segmentation: Segmentation
    particle: ParticleMeasurement
    reference_area_nm2: float | None  # the expansion reference; None: no LM frame before it
    front: FrontMeasurement
    # The front's window (settings.front_window_s), this sum's position last; None: not measured
    front_times: Sequence[float]
    front_positions: Sequence[float | None]
    drift: DriftTrack | None = None  # None: drift not measured in this run (drift.py)


@dataclass(frozen=True, slots=True)
class Measured:
    """A measurement's values (keys of the quantities it fills; None: not measurable) and,
    for a value it could not measure, why (FrameAnalyzer.last_reasons, keyed by the part)."""

    values: dict[str, float | None]
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurement:
    mode: Mode
    fills: tuple[Quantity, ...]
    compute: Callable[[Any], Measured]  # takes the mode's context: HrtemSum or LmSum


_REGISTERED: list[Measurement] = []


def measures(mode: Mode, *fills: Quantity) -> Callable[[Callable], Callable]:
    """Register the decorated function as a measurement of `mode` sums filling `fills`."""
    if mode not in MODES:
        raise ValueError(f"imaging mode {mode!r} not one of {MODES}")
    if not fills or not all(isinstance(quantity, Quantity) for quantity in fills):
        raise ValueError("a measurement names the Quantity declarations it fills")

    def register(compute: Callable[[Any], Measured]) -> Callable[[Any], Measured]:
        _REGISTERED.append(Measurement(mode, tuple(fills), compute))
        return compute

    return register


def unregister(compute: Callable[[Any], Measured]) -> None:
    """Forget a registered measurement (a test's throwaway)."""
    _REGISTERED[:] = [m for m in _REGISTERED if m.compute is not compute]


def registered(mode: Mode, module_order: Sequence[str]) -> tuple[Measurement, ...]:
    """`mode`'s measurements: by their module's place in `module_order` (others last), then
    in registration order (the sort is stable)."""
    rank = {name: index for index, name in enumerate(module_order)}
    chosen = [m for m in _REGISTERED if m.mode == mode]
    return tuple(sorted(chosen, key=lambda m: rank.get(m.compute.__module__, len(rank))))
