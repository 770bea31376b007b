"""Electron dose: per frame, per region of the specimen (the dose map), and the budget rule.

Pure: numbers in, numbers out; no I/O, no clock. Used by the daemon (service/dose.py: the
map and the budget while a run goes on), the ingest (each frame's dose, runfile/frames.py),
the run file's close (runfile/finish.py: the map as an image) and the report.

Units: dose in electrons per square angstrom (e/A^2), dose rate in e/A^2/s, specimen
coordinates in nm.

**Where a frame is on the specimen.** The microscope's field centre (`field_center_nm`:
stage position plus image shift, in the specimen's frame; in the simulator the contact frame)
and the field's size: the imaging mode's pixel size times the frame's columns and rows. The
holder's own position log is the needle's (it moves the tip, not the specimen), so it is not
part of a region.

**The dose map: a grid of square cells over specimen coordinates.** Each exposure (a stretch
of time the beam lit one field) adds its dose to every cell its field touches, whole. A cell
therefore holds the highest dose any point in it may have had, and a budget kept by every
cell is kept by every point: a field's edge counts for the whole cell it cuts, which errs on
the specimen's side by at most one cell. Why cells rather than a total per field: fields
overlap (the low-magnification field holds the HRTEM field; a drifting or moved field
overlaps where it was), and the dose at a point is the sum over every field that covered it;
on a grid that sum is a plain addition, whatever the fields. Why CELL_NM = 10 nm: a sixth of
the smallest field (HRTEM, 61 nm at 0.06 nm/px x 1024 px), so a region's dose is resolved to
well inside a field, while the largest (low magnification, ~1 um) is ~100 x 100 cells.
The map keeps one sum per distinct field (snapped to cells), not per frame: a run has a
handful of fields, so adding 40 frames a second costs a dictionary update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

CELL_NM = 10.0  # side of a dose-map cell (module doc)
Cells = tuple[int, int, int, int]  # ix0, ix1, iy0, iy1: cells [ix0, ix1) x [iy0, iy1)


def frame_dose(dose_rate_e_per_a2_s: float, count_time_s: float) -> float:
    """The dose one frame's exposure gives the field, e/A^2 (NaN if the rate is not known)."""
    return dose_rate_e_per_a2_s * count_time_s


def budget_at(
    temperature_c: float | None, budget: float, hot_budget: float, hot_above_c: float
) -> float:
    """The dose budget per region at a specimen temperature (e/A^2): `hot_budget` above
    `hot_above_c` (SCIENCE.md: 5000 e/A^2, halved to 2500 above 275 C), `budget` otherwise.
    No temperature known (no heating holder, or it has not reported yet) is room temperature."""
    if temperature_c is not None and math.isfinite(temperature_c) and temperature_c > hot_above_c:
        return hot_budget
    return budget


@dataclass(frozen=True)
class Field:
    """The rectangle of the specimen a frame shows, nm."""

    x_min: float
    x_max: float
    y_min: float
    y_max: float

    @classmethod
    def of(
        cls, center_nm: tuple[float, float], pixel_size_nm: float, shape: tuple[int, int]
    ) -> Field:
        """The field of a frame of `shape` (rows, columns) at `pixel_size_nm`, centred there."""
        half_w = shape[1] * pixel_size_nm / 2
        half_h = shape[0] * pixel_size_nm / 2
        x, y = center_nm
        return cls(x - half_w, x + half_w, y - half_h, y + half_h)

    @property
    def known(self) -> bool:
        return all(map(math.isfinite, (self.x_min, self.x_max, self.y_min, self.y_max)))

    def cells(self, cell_nm: float = CELL_NM) -> Cells:
        """The cells the field touches (an edge on a cell boundary does not touch the next)."""
        ix0 = math.floor(self.x_min / cell_nm)
        iy0 = math.floor(self.y_min / cell_nm)
        ix1 = max(ix0 + 1, math.ceil(self.x_max / cell_nm))
        iy1 = max(iy0 + 1, math.ceil(self.y_max / cell_nm))
        return ix0, ix1, iy0, iy1

    def describe(self) -> str:
        width, height = self.x_max - self.x_min, self.y_max - self.y_min
        x, y = (self.x_min + self.x_max) / 2, (self.y_min + self.y_max) / 2
        return f"{width:.3g} x {height:.3g} nm field at ({x:.4g}, {y:.4g}) nm"


class DoseMap:
    """Dose accumulated per cell of the specimen (module doc). Not thread-safe."""

    def __init__(self, cell_nm: float = CELL_NM) -> None:
        if not cell_nm > 0:
            raise ValueError(f"cell size {cell_nm} nm is not positive")
        self.cell_nm = cell_nm
        self._sums: dict[Cells, float] = {}  # per distinct field (as cells): dose added

    def add(self, field: Field, dose: float) -> None:
        """`dose` (e/A^2) given to `field`; a field or dose not known adds nothing."""
        if dose > 0 and field.known:  # False for NaN
            key = field.cells(self.cell_nm)
            self._sums[key] = self._sums.get(key, 0.0) + dose

    def dose_in(self, field: Field) -> float:
        """The highest dose of any cell `field` touches (0 if it has none)."""
        if not field.known:
            return math.nan
        _, _, grid = self._grid(field.cells(self.cell_nm))
        return float(grid.max()) if grid.size else 0.0

    @property
    def highest(self) -> float:
        """The highest dose of any cell (0 for an empty map)."""
        _, _, grid = self.grid()
        return float(grid.max()) if grid.size else 0.0

    @property
    def total_added(self) -> float:
        """The dose added over all exposures (per field, not per area: what was delivered)."""
        return sum(self._sums.values())

    def exposures(self) -> list[tuple[Cells, float]]:
        return list(self._sums.items())

    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x cell centres nm, y cell centres nm, dose [y, x]) over every cell dosed."""
        if not self._sums:
            return np.zeros(0), np.zeros(0), np.zeros((0, 0))
        keys = list(self._sums)
        box = (
            min(k[0] for k in keys),
            max(k[1] for k in keys),
            min(k[2] for k in keys),
            max(k[3] for k in keys),
        )
        return self._grid(box)

    def _grid(self, box: Cells) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return dose_grid(self._sums.items(), box, self.cell_nm)


def dose_grid(
    exposures: Iterable[tuple[Cells, float]], box: Cells, cell_nm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dose of every cell in `box` from exposures (cells, dose): (x centres, y centres,
    dose [y, x]), nm and e/A^2."""
    bx0, bx1, by0, by1 = box
    grid = np.zeros((by1 - by0, bx1 - bx0))
    for (ix0, ix1, iy0, iy1), dose in exposures:
        x0, x1 = max(ix0, bx0) - bx0, min(ix1, bx1) - bx0
        y0, y1 = max(iy0, by0) - by0, min(iy1, by1) - by0
        if x0 < x1 and y0 < y1:
            grid[y0:y1, x0:x1] += dose
    xs = (np.arange(bx0, bx1) + 0.5) * cell_nm
    ys = (np.arange(by0, by1) + 0.5) * cell_nm
    return xs, ys, grid


def map_of(fields: Iterable[tuple[Field, float]], cell_nm: float = CELL_NM) -> DoseMap:
    """A dose map of (field, dose) exposures (a run file's exposure log read back)."""
    dose_map = DoseMap(cell_nm)
    for field, dose in fields:
        dose_map.add(field, dose)
    return dose_map
