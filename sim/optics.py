"""Imaging state of the simulated microscope, read by the simulated camera.

Positions are in the model's contact frame (nm): origin at the tip-particle contact point,
+x from the tip into the particle (see model.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum

ELEMENTARY_CHARGE_C = 1.602176634e-19
NM2_PER_A2 = 0.01


class ImagingMode(str, Enum):
    LOW_MAG = "lm"  # whole particle and tip, mass-thickness contrast only
    HRTEM = "hrtem"  # lattice fringes of a region of the particle


@dataclass(frozen=True)
class Illumination:
    """The beam of one mode: its current and the area it lights (parallel illumination).

    What a real TEM reports (the screen current; the illuminated area on some): the dose rate
    at the specimen is the current over the area. Each mode recalls its own (a TEM's mode
    presets: spot size, condenser setting), so the dose rate follows the imaging mode.
    """

    beam_current_amperes: float
    illuminated_diameter_nm: float

    @property
    def area_nm2(self) -> float:
        return math.pi * (self.illuminated_diameter_nm / 2) ** 2

    @property
    def dose_rate_e_per_a2_s(self) -> float:
        electrons_per_s = self.beam_current_amperes / ELEMENTARY_CHARGE_C
        return electrons_per_s / (self.area_nm2 / NM2_PER_A2)

    def at_dose_rate(self, dose_rate_e_per_a2_s: float) -> Illumination:
        """The same lit area at another rate (the current changed: spot size, gun lens)."""
        area_a2 = self.area_nm2 / NM2_PER_A2
        current = dose_rate_e_per_a2_s * area_a2 * ELEMENTARY_CHARGE_C
        return Illumination(current, self.illuminated_diameter_nm)

    @classmethod
    def of(cls, dose_rate_e_per_a2_s: float, illuminated_diameter_nm: float) -> Illumination:
        return cls(0.0, illuminated_diameter_nm).at_dose_rate(dose_rate_e_per_a2_s)


@dataclass(frozen=True)
class ModeSettings:
    pixel_size_nm: float
    field_center_nm: tuple[float, float]
    # Low magnification lights a wide area at a low rate; HRTEM a small one at SCIENCE.md's
    # ~35 e/A^2/s (about 17 pA over 200 nm), DEFAULT_MODES. *Model choice*: the diameters,
    # ~2-3x the field's diagonal, as an operator spreads the beam to light the field evenly.
    illumination: Illumination


DEFAULT_MODES: dict[ImagingMode, ModeSettings] = {
    # 1024 px x 1.0 nm: the 500 nm particle, its 30 % growth and the needle all fit.
    ImagingMode.LOW_MAG: ModeSettings(
        pixel_size_nm=1.0, field_center_nm=(260.0, 0.0), illumination=Illumination.of(2.0, 3000.0)
    ),
    # 0.06 nm/px: 1.48 A fringes span 2.5 px (above Nyquist). The 61 nm field sits on the far
    # side of the particle (the last part the front reaches), 29 nm inside its far edge (clear
    # of the 5 nm disordered surface layer, which would read as a phase change at 0 V), so at
    # +4.3 V the FFT shows the layered (003) for most of the conversion: rock salt enters the
    # field at ~84 s, (003) is below half at ~88 s and gone at ~96 s, the field 90 % rock salt
    # at ~97 s (the whole particle: 90 % at ~81 s, done at ~108 s).
    ImagingMode.HRTEM: ModeSettings(
        pixel_size_nm=0.06, field_center_nm=(440.0, 0.0), illumination=Illumination.of(35.0, 200.0)
    ),
}


@dataclass
class Optics:
    """What the microscope is set to: mode, pixel size and where the field of view is."""

    mode: ImagingMode = ImagingMode.LOW_MAG
    modes: dict[ImagingMode, ModeSettings] = field(default_factory=lambda: dict(DEFAULT_MODES))

    @property
    def pixel_size_nm(self) -> float:
        return self.modes[self.mode].pixel_size_nm

    @property
    def field_center_nm(self) -> tuple[float, float]:
        return self.modes[self.mode].field_center_nm

    @property
    def illumination(self) -> Illumination:
        return self.modes[self.mode].illumination

    def set_dose_rate(self, dose_rate_e_per_a2_s: float) -> None:
        """The present mode's dose rate (its beam current; the lit area stays)."""
        current = self.modes[self.mode]
        illumination = current.illumination.at_dose_rate(dose_rate_e_per_a2_s)
        self.modes[self.mode] = dataclasses.replace(current, illumination=illumination)

    def set_mode(self, mode: ImagingMode | str) -> None:
        self.mode = ImagingMode(mode)

    def set_pixel_size(self, pixel_size_nm: float) -> None:
        if not 0.005 <= pixel_size_nm <= 50.0:
            raise ValueError(f"pixel size {pixel_size_nm} nm outside 0.005-50 nm")
        current = self.modes[self.mode]
        self.modes[self.mode] = dataclasses.replace(current, pixel_size_nm=pixel_size_nm)

    def set_field_center(self, x_nm: float, y_nm: float) -> None:
        current = self.modes[self.mode]
        self.modes[self.mode] = dataclasses.replace(
            current, field_center_nm=(float(x_nm), float(y_nm))
        )
