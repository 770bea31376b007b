"""Simulated cells and optics for the analysis tests (frames with known truth)."""

from __future__ import annotations

from insitu_daq.sim.model import NanobatteryModel
from insitu_daq.sim.optics import Optics

# The analysis accuracy tests look at the particle's middle, where the front crosses the HRTEM
# field at 41-51 s under +4.3 V (their timelines are written for it); the simulator's default
# HRTEM field is on the far side (sim/optics.py), for the reference run's SCIENCE.md timeline.
MID_PARTICLE_FIELD_NM = (250.0, 0.0)


def hrtem_optics(
    pixel_nm: float | None = None, center: tuple[float, float] | None = None
) -> Optics:
    optics = Optics()
    optics.set_mode("hrtem")
    if pixel_nm is not None:
        optics.set_pixel_size(pixel_nm)
    optics.set_field_center(*(center or MID_PARTICLE_FIELD_NM))
    return optics


def cell(x: float = 0.0, tip_nm: float = 0.0, beam_on: bool = True) -> NanobatteryModel:
    """A cell at lithium extraction x with the tip at tip_nm (0: in contact)."""
    model = NanobatteryModel()
    model.x = x
    model.tip_position_nm = tip_nm
    model.set_beam(beam_on)
    return model
