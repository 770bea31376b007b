"""One simulated station: the shared model, its clock and the lock every instrument takes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .heating import HeatingChip
from .model import CellParameters, DriftLaw, LinearDrift, NanobatteryModel
from .optics import Optics


class SimClock:
    """Model time in seconds: wall-clock monotonic time since start, times `time_scale`.

    A time scale of 20 replays the 110 s experiment in 5.5 s; the instruments all read this
    clock, so their timing (ramps, moves, frame rate in model time) scales together.
    """

    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = float(time_scale)
        self._t0 = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self.time_scale

    def wall_seconds(self, model_seconds: float) -> float:
        return model_seconds / self.time_scale


class SimStation:
    """The model plus a clock; instruments use `with station.model() as m:` to read or drive it."""

    def __init__(
        self,
        params: CellParameters | None = None,
        seed: int = 0,
        time_scale: float = 1.0,
        drift: DriftLaw | None = None,
    ) -> None:
        self.clock = SimClock(time_scale)
        self._model = NanobatteryModel(
            params=params or CellParameters(), seed=seed, drift=drift or LinearDrift()
        )
        self.optics = Optics()  # set by the microscope, read by the camera
        # The MEMS heating chip (sim/heating.py), on the same clock: a heating holder drives
        # it; anyone may read its temperature history (`chip.temperature_at`) under `lock`.
        self.chip = HeatingChip()
        self._lock = threading.RLock()

    @contextmanager
    def model(self) -> Iterator[NanobatteryModel]:
        """The model brought up to the present model time, held under the station lock."""
        with self._lock:
            now = self.clock.now()
            self._model.advance_to(now)
            self.chip.advance_to(now)
            yield self._model

    @property
    def lock(self) -> threading.RLock:
        """Hold it to read or change `optics` consistently with the model."""
        return self._lock
