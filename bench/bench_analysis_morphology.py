"""Time the low-magnification analysis per 1024 x 1024 frame: segmentation, particle size,
expansion and reaction-front position (insitu_daq.analysis.morphology and .front).

Frames are rendered first (not timed) from a cell transforming under +4.3 V, so the front and
the expansion are really measured, then each is analysed as the live process would: one
`segment`, then `measure_particle` + `expansion_of` + `measure_front` on it. Target: < 50 ms
per frame on one core. A bare float32 `scipy.fft.rfft2` of the same frames is timed in the
same run for scale (the issue's performance figures are ratios to it). Run:
    /tmp/v/bin/python bench/bench_analysis_morphology.py
"""

from __future__ import annotations

import time

import numpy as np
import scipy.fft

from insitu_daq.analysis.front import measure_front
from insitu_daq.analysis.morphology import ExpansionReference, measure_particle, segment
from insitu_daq.sim.model import NanobatteryModel
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, Scene

FRAMES = 100
EXPOSURE_S = 0.025
PIXEL_NM = 1.0


def render_frames() -> list[np.ndarray]:
    model = NanobatteryModel()
    model.tip_position_nm = 0.0
    model.set_beam(True)
    optics = Optics()
    renderer = FrameRenderer(seed=1)
    frames = [renderer.render(Scene.capture(model, optics), EXPOSURE_S, 0)[0]]
    model.set_source(True, 4.3, 1e-7)
    for index in range(1, FRAMES + 1):
        model.advance_to(index * 1.0)  # one frame a second of the 110 s conversion
        frames.append(renderer.render(Scene.capture(model, optics), EXPOSURE_S, index)[0])
    return frames


def main() -> None:
    frames = render_frames()
    reference = ExpansionReference.from_frames(frames[:1], PIXEL_NM)
    timings = []
    fronts = 0
    for frame in frames[1:]:
        start = time.perf_counter()
        segmentation = segment(frame, PIXEL_NM)
        reference.expansion_of(measure_particle(segmentation))
        front = measure_front(frame, segmentation)
        timings.append(time.perf_counter() - start)
        fronts += front.measurable
    ms = np.array(timings) * 1e3

    fft_times = []
    for frame in frames[1:]:
        start = time.perf_counter()
        scipy.fft.rfft2(frame.astype(np.float32))
        fft_times.append(time.perf_counter() - start)
    fft_ms = float(np.mean(fft_times)) * 1e3

    print(
        f"{len(ms)} frames of {frames[0].shape[0]} x {frames[0].shape[1]}, front measured in "
        f"{fronts}"
    )
    print(
        f"low-mag analysis: mean {ms.mean():.1f} ms, p50 {np.percentile(ms, 50):.1f} ms, "
        f"p99 {np.percentile(ms, 99):.1f} ms per frame (target < 50 ms)"
    )
    print(
        f"bare float32 rfft2 of the same frames: {fft_ms:.1f} ms; "
        f"ratio analysis / rfft2 = {ms.mean() / fft_ms:.2f}"
    )


if __name__ == "__main__":
    main()
