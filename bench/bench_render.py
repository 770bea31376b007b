"""Time FrameRenderer.render for 1024 x 1024 frames in the camera's worst case.

Worst case: the cell is transforming, so x (and the structure) changes every frame and the
noise-free image cannot be reused; HRTEM with the reaction front inside the field. Run:
    /tmp/v/bin/python bench/bench_render.py
"""

from __future__ import annotations

import time

from insitu_daq.sim.model import NanobatteryModel
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, Scene

FRAMES = 100
EXPOSURE_S = 0.025


def bench(mode: str, counts_scale: float, changing: bool) -> float:
    model = NanobatteryModel()
    model.tip_position_nm = 0.0
    model.set_beam(True)
    model.x = 0.72
    optics = Optics()
    optics.set_mode(mode)
    renderer = FrameRenderer(seed=1, counts_scale=counts_scale)
    renderer.render(Scene.capture(model, optics), EXPOSURE_S, 0)  # textures, noise banks
    elapsed = 0.0
    for index in range(1, FRAMES + 1):
        if changing:
            model.x = 0.72 + 0.0005 * index  # the front crosses the HRTEM field
        scene = Scene.capture(model, optics)
        start = time.perf_counter()
        renderer.render(scene, EXPOSURE_S, index)
        elapsed += time.perf_counter() - start
    return elapsed / FRAMES * 1e3


def main() -> None:
    for mode in ("lm", "hrtem"):
        for counts_scale in (1.0, 1000.0):
            for changing in (True, False):
                ms = bench(mode, counts_scale, changing)
                state = "transforming" if changing else "static"
                print(f"{mode:6s} counts_scale={counts_scale:<7g} {state:12s} {ms:6.2f} ms/frame")


if __name__ == "__main__":
    main()
