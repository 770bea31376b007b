"""The daemon's dose accounting: the dose map of the open run and its budget, as it happens.

An imaging sink (service/imaging_announcer.py) like the ingest and the analysis: it keeps its
own copy of the run's imaging timeline (core/imaging.py: each state's dose rate at the
specimen, 0 with the beam blanked, and where its field is) and, at each watermark, adds the
dose of the run time the watermark has passed to the cells of the field that took it
(analysis/dose.py DoseMap). Time counts whenever the beam is on during a run, recorded or
not: the specimen takes the dose either way.

What it gives:
- every ~0.5 s of run time, one row per field dosed to the run file's exposure log
  (/entry/dose/exposure, through the record bus as the series `dose_exposure`; the map at
  close is made from it, runfile/finish.py), and the metrics (`insitu_daq_dose_...`);
- the budget: the highest cell of the field being imaged against `[dose]`'s budget at the
  specimen's temperature (the holder's `temperature` series, through the same bus; none:
  room temperature). Reaching it calls `on_budget` once, on a thread of its own (it blanks
  the beam through the station, which takes the announcer's lock this runs under); a field
  still over its budget trips again as soon as the beam lights it again.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from insitu_daq.analysis.dose import CELL_NM, DoseMap, Field, budget_at
from insitu_daq.core.config import DoseConfig
from insitu_daq.core.imaging import ImagingState, ImagingTimeline
from insitu_daq.service.bus import RecordSink

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5  # run s between exposure rows of a field
TEMPERATURE_SERIES = "temperature"  # the heating holder's series (its SERIES, runfile/layout.py)


@dataclass(frozen=True)
class BudgetReached:
    """A region (the field being imaged) reached its dose budget at run time `time_s`."""

    time_s: float
    field: Field
    dose_e_per_a2: float
    budget_e_per_a2: float
    temperature_c: float | None

    def message(self) -> str:
        hot = "" if self.temperature_c is None else f" at {self.temperature_c:.0f} C"
        return (
            f"dose budget reached: {self.field.describe()} has taken {self.dose_e_per_a2:.0f}"
            f" e/A^2 of its {self.budget_e_per_a2:g} e/A^2{hot}; beam blanked"
        )

    def data(self) -> dict[str, Any]:
        return {
            "region": {
                "x_min_nm": self.field.x_min,
                "x_max_nm": self.field.x_max,
                "y_min_nm": self.field.y_min,
                "y_max_nm": self.field.y_max,
            },
            "dose_e_per_a2": self.dose_e_per_a2,
            "budget_e_per_a2": self.budget_e_per_a2,
            "temperature_c": self.temperature_c,
        }


class DoseAccountant(RecordSink):
    """The open run's dose map and budget (module doc). Thread-safe."""

    name = "dose"

    def __init__(
        self,
        config: DoseConfig,
        frame_shape: Callable[[], tuple[int, int]],
        publish_exposures: Callable[[list[tuple[float, ...]]], None],
        on_budget: Callable[[BudgetReached], None],
        observe: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        """`frame_shape()`: the detector's (rows, columns) now; `publish_exposures(rows)`:
        rows (time, 0, *the exposure log's columns) for the run file; `observe(status)`: the
        metrics."""
        self._config = config
        self._frame_shape = frame_shape
        self._publish = publish_exposures
        self._on_budget = on_budget
        self._observe = observe
        self._lock = threading.Lock()
        self._timeline = ImagingTimeline()
        self._map = DoseMap(CELL_NM)
        self._open = False
        self._accounted_to: float | None = None  # run s up to which dose has been added
        self._fields: dict[ImagingState, Field] = {}
        self._pending: dict[Field, list[float]] = {}  # field -> [first time, duration, dose]
        self._flushed_at = -math.inf
        self._tripped = False
        self._now: ImagingState | None = None
        self.temperature_c: float | None = None
        self.unknown_dose_s = 0.0  # run s whose dose rate or field was not known
        self.budgets_reached_total = 0

    # ----- runs ------------------------------------------------------------------------------
    def open_run(self) -> None:
        """A run opens: a new map (its imaging state at start comes next)."""
        with self._lock:
            self._timeline.clear()
            self._map = DoseMap(CELL_NM)
            self._fields.clear()
            self._pending.clear()
            self._accounted_to = None
            self._flushed_at = -math.inf
            self._tripped = False
            self._now = None
            self.unknown_dose_s = 0.0
            self._open = True

    def close_run(self) -> None:
        """After the announcer's last watermark, before the run file closes: the last rows."""
        with self._lock:
            self._flush()
            self._open = False

    # ----- the imaging timeline (ImagingSink; called under the announcer's lock) -------------
    def set_imaging(self, state: ImagingState, seq: int) -> None:
        with self._lock:
            if not self._open:
                return
            self._timeline.add(state)
            if not state.dose_rate_e_per_a2_s > 0:  # blanked: a field over budget may trip again
                self._tripped = False

    def imaging_watermark(self, run_time_s: float, announced: int) -> None:
        reached = None
        with self._lock:
            if not self._open:
                return
            self._timeline.advance(run_time_s)
            start = self._accounted_to
            if start is not None and run_time_s <= start:
                return
            self._accounted_to = run_time_s
            if start is None:  # the run's first watermark: its dose counts from here
                return
            for state, seconds, dose in self._timeline.exposure(start, run_time_s):
                self._add(state, seconds, dose, start)
            if run_time_s - self._flushed_at >= FLUSH_INTERVAL_S:
                self._flush()
            reached = self._check_budget(run_time_s)
        if reached is not None:
            threading.Thread(
                target=self._on_budget, args=(reached,), name="dose-budget", daemon=True
            ).start()

    # ----- the holder's temperature (RecordSink) ---------------------------------------------
    def on_series(self, record: tuple[str, list[tuple[Any, ...]]]) -> None:
        name, rows = record
        if name == TEMPERATURE_SERIES and rows:
            # Rows are (time, half-width, value, ...) on the run clock (instruments/monitor.py).
            value = float(rows[-1][2])
            self.temperature_c = value if math.isfinite(value) else None

    # ----- inside the lock -------------------------------------------------------------------
    def _field(self, state: ImagingState) -> Field:
        field = self._fields.get(state)
        if field is None:
            if len(self._fields) > 256:  # a run's recent states are all it needs
                self._fields.clear()
            center = (state.field_x_nm, state.field_y_nm)
            field = Field.of(center, state.pixel_size_m * 1e9, self._frame_shape())
            self._fields[state] = field
        return field

    def _add(self, state: ImagingState, seconds: float, dose: float, start: float) -> None:
        field = self._field(state)
        if not (math.isfinite(dose) and field.known):
            self.unknown_dose_s += seconds
            return
        if dose <= 0:
            return
        self._map.add(field, dose)
        pending = self._pending.setdefault(field, [max(start, state.start), 0.0, 0.0])
        pending[1] += seconds
        pending[2] += dose

    def _budget(self) -> float:
        return self.budget()[0]

    def budget(self) -> tuple[float, str]:
        """The budget per region at the temperature known now, and its config key."""
        config = self._config
        budget = budget_at(
            self.temperature_c,
            config.budget_e_per_a2,
            config.hot_budget_e_per_a2,
            config.hot_above_celsius,
        )
        hot = budget is config.hot_budget_e_per_a2 and budget != config.budget_e_per_a2
        return budget, "dose.hot_budget_e_per_a2" if hot else "dose.budget_e_per_a2"

    def _check_budget(self, now: float) -> BudgetReached | None:
        state = self._timeline.at(now)
        if state is None:
            return None
        self._now = state
        if not state.dose_rate_e_per_a2_s > 0 or self._tripped:
            return None
        field = self._field(state)
        dose, budget = self._map.dose_in(field), self._budget()
        if not dose >= budget:
            return None
        self._tripped = True
        self.budgets_reached_total += 1
        return BudgetReached(now, field, dose, budget, self.temperature_c)

    def _flush(self) -> None:
        if self._accounted_to is not None:
            self._flushed_at = self._accounted_to
        if self._pending:
            budget = self._budget()
            rows = [
                (first, 0.0, duration, dose, f.x_min, f.x_max, f.y_min, f.y_max, budget)
                for f, (first, duration, dose) in self._pending.items()
            ]
            self._pending = {}
            self._publish(rows)
        if self._observe is not None:
            self._observe(self._status())

    def _status(self) -> dict[str, float]:
        state = self._now
        field = None if state is None else self._field(state)
        return {
            "field_e_per_a2": math.nan if field is None else self._map.dose_in(field),
            "highest_e_per_a2": self._map.highest,
            "budget_e_per_a2": self._budget(),
            "dose_rate_e_per_a2_s": math.nan if state is None else state.dose_rate_e_per_a2_s,
        }

    # ----- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For the daemon's status: the dose of the field imaged now, the highest, the budget."""
        with self._lock:
            return {
                **self._status(),
                "temperature_c": self.temperature_c,
                "budgets_reached_total": self.budgets_reached_total,
                "unknown_dose_s": self.unknown_dose_s,
            }
