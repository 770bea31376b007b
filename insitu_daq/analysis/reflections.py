"""The table of named lattice reflections the live analysis tracks in HRTEM frames.

Defaults are SCIENCE.md's table of spacings seen in the FFT of LiNiO2 particles during
delithiation. (006) of layered LiNiO2 and (111) of rock-salt NiO coincide at 2.4 A, so they are
one entry, `shared`, and identify neither phase: the layered phase is recognised by (003) at
4.8 A, rock salt by (200) at 2.1 A (SCIENCE.md), the Ni/Li disordered intermediate by its new
1.95 A reflection. Which reflection marks which phase is part of the table (`marks`), so the
phase map's decision rule reads it from here instead of hard-coding names.

The table is configurable (`ReflectionTable.from_records`, e.g. from a station config or a
protocol) because other cathodes have other spacings; a bad entry is refused with one line.
Names are short identifiers, safe as HDF5 dataset names and Prometheus label values.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

PHASES = ("layered", "disordered", "rock_salt")
SHARED = "shared"  # a reflection of more than one phase: evidence of lattice, not of a phase

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")


@dataclass(frozen=True)
class Reflection:
    """One tracked reflection.

    name: identifier (letters, digits, underscores), e.g. "nio_200".
    label: what a person reads, e.g. "NiO (200)".
    d_angstrom: the nominal lattice spacing.
    phase: the phase it belongs to ("layered", "disordered", "rock_salt") or "shared".
    marks: True if its presence identifies `phase` (the phase map's markers).
    """

    name: str
    label: str
    d_angstrom: float
    phase: str
    marks: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"reflection name {self.name!r}: use letters, digits and _ only")
        if not (math.isfinite(self.d_angstrom) and 0.5 <= self.d_angstrom <= 50.0):
            raise ValueError(f"reflection {self.name}: d = {self.d_angstrom!r} A not in 0.5-50 A")
        if self.phase not in (*PHASES, SHARED):
            raise ValueError(
                f"reflection {self.name}: phase {self.phase!r} not one of {(*PHASES, SHARED)}"
            )
        if self.marks and self.phase == SHARED:
            raise ValueError(f"reflection {self.name}: a shared reflection cannot mark a phase")

    @property
    def q_per_nm(self) -> float:
        """Spatial frequency of the reflection, 1/d, in 1/nm."""
        return 10.0 / self.d_angstrom


@dataclass(frozen=True)
class ReflectionTable:
    """An ordered set of reflections with unique names and distinct spacings."""

    reflections: tuple[Reflection, ...]

    def __post_init__(self) -> None:
        names = [r.name for r in self.reflections]
        if len(set(names)) != len(names):
            raise ValueError(f"reflection names repeat: {names}")
        spacings = sorted(r.d_angstrom for r in self.reflections)
        for low, high in itertools.pairwise(spacings):
            if high / low - 1.0 < 0.01:
                raise ValueError(
                    f"reflections at {low} A and {high} A are within 1 %: make them one entry"
                )

    def __iter__(self) -> Iterator[Reflection]:
        return iter(self.reflections)

    def __len__(self) -> int:
        return len(self.reflections)

    def __getitem__(self, name: str) -> Reflection:
        for reflection in self.reflections:
            if reflection.name == name:
                return reflection
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.reflections)

    def markers(self, phase: str) -> tuple[Reflection, ...]:
        """The reflections whose presence identifies `phase`."""
        return tuple(r for r in self.reflections if r.marks and r.phase == phase)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, object]]) -> ReflectionTable:
        """Table from plain mappings (TOML/YAML), e.g. {"name": "nio_200", "d_angstrom": 2.1,
        "phase": "rock_salt", "marks": true, "label": "NiO (200)"}; label defaults to name."""
        reflections = []
        for index, record in enumerate(records):
            unknown = set(record) - {"name", "label", "d_angstrom", "phase", "marks"}
            if unknown:
                raise ValueError(f"reflection #{index}: unknown keys {sorted(unknown)}")
            try:
                name = str(record["name"])
                d_angstrom = float(record["d_angstrom"])  # type: ignore[arg-type]
                phase = str(record["phase"])
            except KeyError as missing:
                raise ValueError(f"reflection #{index}: missing {missing}") from None
            except (TypeError, ValueError):
                raise ValueError(f"reflection #{index}: d_angstrom must be a number") from None
            marks = record.get("marks", False)
            if not isinstance(marks, bool):
                raise ValueError(f"reflection {name}: marks must be true or false")
            label = str(record.get("label", name))
            reflections.append(Reflection(name, label, d_angstrom, phase, marks))
        return cls(tuple(reflections))

    def to_records(self) -> list[dict[str, object]]:
        """The inverse of from_records (for run-file metadata)."""
        return [
            {
                "name": r.name,
                "label": r.label,
                "d_angstrom": r.d_angstrom,
                "phase": r.phase,
                "marks": r.marks,
            }
            for r in self.reflections
        ]


# SCIENCE.md, "Lattice spacings (d, in angstrom) seen in the FFT of HRTEM frames".
DEFAULT_REFLECTIONS = ReflectionTable(
    (
        Reflection("lno_003", "LiNiO2 (003)", 4.8, "layered", marks=True),
        Reflection("lno_101", "LiNiO2 (101)", 2.53, "layered"),
        Reflection("lno_006_nio_111", "LiNiO2 (006) / NiO (111)", 2.4, SHARED),
        Reflection("disordered_195", "Ni/Li disordered 1.95 A", 1.95, "disordered", marks=True),
        Reflection("nio_200", "NiO (200)", 2.1, "rock_salt", marks=True),
        Reflection("nio_220", "NiO (220)", 1.48, "rock_salt"),
    )
)
