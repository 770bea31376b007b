"""The dose a run gave each region of the specimen, against its budget, read from its file.

A region is a field the beam lit (the exposure log's rows, /entry/dose/exposure, grouped by
their field); its dose is the highest of the dose map's cells it touches (analysis/dose.py:
other fields that overlap it count too), its budget the lowest that applied while it was lit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import h5py
import numpy as np

from insitu_daq.analysis.dose import CELL_NM, Field, map_of
from insitu_daq.report.frames import frame_stacks
from insitu_daq.runfile import layout
from insitu_daq.runfile.finish import exposures_of
from insitu_daq.runfile.h5util import read_column


@dataclass(frozen=True)
class RegionDose:
    field: Field
    dose_e_per_a2: float  # the highest cell it touches
    budget_e_per_a2: float  # the lowest budget in force while it was lit
    beam_s: float  # beam-on run time on this field

    def describe(self) -> str:
        share = self.dose_e_per_a2 / self.budget_e_per_a2 if self.budget_e_per_a2 > 0 else 0
        return (
            f"{self.field.describe()}: {self.dose_e_per_a2:.0f} e/A^2 of its"
            f" {self.budget_e_per_a2:g} e/A^2 budget ({share:.0%}), beam on {self.beam_s:.1f} s"
        )


@dataclass(frozen=True)
class DoseSummary:
    regions: list[RegionDose] = field(default_factory=list)
    delivered_e_per_a2: float = 0.0  # summed over the exposure log (every field)
    frames_e_per_a2: float = 0.0  # summed over the recorded frames' dose
    highest_e_per_a2: float = 0.0  # the dose map's highest cell


def read_dose(f: h5py.File) -> DoseSummary | None:
    """The run's dose; None for a file with no exposure log (a run without dose accounting)."""
    exposures = exposures_of(f)
    frames = 0.0
    for stack in frame_stacks(f):
        if layout.FRAME_DOSE.name in stack:
            frames += float(np.nansum(read_column(stack, layout.FRAME_DOSE.name)))
    if not exposures:
        return None if frames == 0.0 else DoseSummary(frames_e_per_a2=frames)
    dose_map = map_of(exposures, CELL_NM)
    log = layout.DOSE_EXPOSURE
    budgets = f[log.column("budget")][()]
    durations = f[log.column("duration")][()]
    regions: dict[tuple[float, ...], list[float]] = {}  # field (to 0.1 nm) -> budget, seconds
    fields: dict[tuple[float, ...], Field] = {}
    for i, (region, _) in enumerate(exposures):
        key = tuple(round(v, 1) for v in (region.x_min, region.x_max, region.y_min, region.y_max))
        fields.setdefault(key, region)
        entry = regions.setdefault(key, [math.inf, 0.0])
        entry[0] = min(entry[0], float(budgets[i]))
        entry[1] += float(durations[i])
    return DoseSummary(
        regions=[
            RegionDose(fields[key], dose_map.dose_in(fields[key]), budget, seconds)
            for key, (budget, seconds) in regions.items()
        ],
        delivered_e_per_a2=sum(dose for _, dose in exposures),
        frames_e_per_a2=frames,
        highest_e_per_a2=dose_map.highest,
    )


def format_dose(summary: DoseSummary) -> list[str]:
    lines = [
        f"dose         highest {summary.highest_e_per_a2:.0f} e/A^2 in a region; delivered"
        f" {summary.delivered_e_per_a2:.0f} e/A^2 over all fields, {summary.frames_e_per_a2:.0f}"
        " e/A^2 in the recorded frames"
    ]
    for region in sorted(summary.regions, key=lambda r: -r.dose_e_per_a2):
        lines.append(f"  region     {region.describe()}")
    return lines
