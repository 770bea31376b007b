"""Simulated cells and optics for the analysis tests (frames with known truth)."""

from __future__ import annotations

from insitu_daq.sim.model import NanobatteryModel
from insitu_daq.sim.optics import Optics


def hrtem_optics(
    pixel_nm: float | None = None, center: tuple[float, float] | None = None
) -> Optics:
    optics = Optics()
    optics.set_mode("hrtem")
    if pixel_nm is not None:
        optics.set_pixel_size(pixel_nm)
    if center is not None:
        optics.set_field_center(*center)
    return optics


def cell(x: float = 0.0, tip_nm: float = 0.0, beam_on: bool = True) -> NanobatteryModel:
    """A cell at lithium extraction x with the tip at tip_nm (0: in contact)."""
    model = NanobatteryModel()
    model.x = x
    model.tip_position_nm = tip_nm
    model.set_beam(beam_on)
    return model
