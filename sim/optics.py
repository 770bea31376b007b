"""Imaging state of the simulated microscope, read by the simulated camera.

Positions are in the model's contact frame (nm): origin at the tip-particle contact point,
+x from the tip into the particle (see model.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class ImagingMode(str, Enum):
    LOW_MAG = "lm"  # whole particle and tip, mass-thickness contrast only
    HRTEM = "hrtem"  # lattice fringes of a region of the particle


@dataclass(frozen=True)
class ModeSettings:
    pixel_size_nm: float
    field_center_nm: tuple[float, float]


DEFAULT_MODES: dict[ImagingMode, ModeSettings] = {
    # 1024 px x 1.0 nm: the 500 nm particle, its 30 % growth and the needle all fit.
    ImagingMode.LOW_MAG: ModeSettings(pixel_size_nm=1.0, field_center_nm=(260.0, 0.0)),
    # 0.06 nm/px: 1.48 A fringes span 2.5 px (above Nyquist). The 61 nm field sits on the far
    # side of the particle (the last part the front reaches), 29 nm inside its far edge (clear
    # of the 5 nm disordered surface layer, which would read as a phase change at 0 V), so at
    # +4.3 V the FFT shows the layered (003) for most of the conversion: rock salt enters the
    # field at ~84 s, (003) is below half at ~88 s and gone at ~96 s, the field 90 % rock salt
    # at ~97 s (the whole particle: 90 % at ~81 s, done at ~108 s).
    ImagingMode.HRTEM: ModeSettings(pixel_size_nm=0.06, field_center_nm=(440.0, 0.0)),
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

    def set_mode(self, mode: ImagingMode | str) -> None:
        self.mode = ImagingMode(mode)

    def set_pixel_size(self, pixel_size_nm: float) -> None:
        if not 0.005 <= pixel_size_nm <= 50.0:
            raise ValueError(f"pixel size {pixel_size_nm} nm outside 0.005-50 nm")
        current = self.modes[self.mode]
        self.modes[self.mode] = ModeSettings(pixel_size_nm, current.field_center_nm)

    def set_field_center(self, x_nm: float, y_nm: float) -> None:
        current = self.modes[self.mode]
        self.modes[self.mode] = ModeSettings(current.pixel_size_nm, (float(x_nm), float(y_nm)))
