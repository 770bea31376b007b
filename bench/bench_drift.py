"""Cost of the drift step per frame, as a ratio to the spectrum step (analysis/drift.py).

What the live analysis adds per frame when a station turns drift on (`[analysis] drift =
true`): the registration (the frame's and the sum's registration images, a cross-correlation
searched near the prediction) on every frame, and the sub-pixel Fourier shift of the frame into
the sum when the field has moved by `min_shift_px` or more (every frame of a drifting field).
The reference is `analysis.spectrum.analyze_frame` on the same frames (the step every HRTEM
result runs). Ratios are step time / spectrum time, each the median of rounds interleaved in
one run (the machine is shared and noisy): below 1 is cheaper than the spectrum.

Frames: 40 rendered 1024 x 1024 uint16 HRTEM frames (the default field, pristine: layered
fringes) and LM frames, the field drifting 0.5 nm/s, 25 ms apart. Also timed: the whole
`FrameAnalyzer.add` of the drifting HRTEM stream with drift on and off (the dose sum's own
cost), and scipy.ndimage.fourier_shift against drift.py's separable ramps. Run:
    .venv/bin/python bench/bench_drift.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.fft
from bench_analysis_spectrum import per_frame_ms
from scipy import ndimage

from insitu_daq.analysis.drift import (
    DriftSettings,
    Reference,
    measure_shift,
    registration_image,
    shift_image,
)
from insitu_daq.analysis.pipeline import FrameAnalyzer, PipelineSettings
from insitu_daq.analysis.spectrum import SpectrumSettings, analyze_frame
from insitu_daq.sim.model import LinearDrift, NanobatteryModel
from insitu_daq.sim.optics import Optics
from insitu_daq.sim.render import FrameRenderer, Scene

SHAPE = (1024, 1024)
FRAMES = 40
ROUNDS = 5
FRAME_PERIOD_S = 0.025
HRTEM_NM, LM_NM = 0.06, 1.0
SETTINGS = DriftSettings(enabled=True)


def frames(mode: str) -> list[np.ndarray]:
    """A drifting field, 25 ms apart (render cost per frame printed: a drifting HRTEM field is
    drawn anew each frame)."""
    optics = Optics()
    optics.set_mode(mode)
    renderer = FrameRenderer(SHAPE, seed=1)
    model = NanobatteryModel(drift=LinearDrift(0.5, 30.0))
    model.tip_position_nm = 0.0
    model.set_beam(True)
    out = []
    start = time.perf_counter()
    for index in range(FRAMES):
        model.advance_to(index * FRAME_PERIOD_S)
        out.append(renderer.render(Scene.capture(model, optics), FRAME_PERIOD_S, index)[0])
    print(f"render {mode}: {(time.perf_counter() - start) / FRAMES * 1e3:.1f} ms/frame")
    return out


def registration(mode: str, first: np.ndarray) -> Callable[[np.ndarray], object]:
    """The per-frame registration as the pipeline's `_register` does it: against a reference
    prepared once, HRTEM measured once, LM twice and smoothed."""
    region = SETTINGS.region_px if mode == "hrtem" else SETTINGS.lm_region_px
    reference = Reference.of(registration_image(first.astype(np.float32), region))

    def work(frame: np.ndarray) -> object:
        moving = registration_image(frame, region)
        if mode == "hrtem":
            return measure_shift(
                reference, moving, (0.0, 0.0), SETTINGS.hrtem_search_px, refine=False
            )
        return measure_shift(reference, moving, (0.0, 0.0), 32.0, SETTINGS.lm_smooth_px)

    return work


def ndimage_shift(frame: np.ndarray) -> np.ndarray:
    spectrum = scipy.fft.rfft2(frame.astype(np.float32))
    spectrum = ndimage.fourier_shift(spectrum, (0.3, 0.7), SHAPE[1])
    return scipy.fft.irfft2(spectrum, s=SHAPE)


def analyzer_add(drift: bool, mode: str, pixel_nm: float) -> Callable[[np.ndarray], object]:
    analyzer = FrameAnalyzer(PipelineSettings(drift=DriftSettings(enabled=drift)))
    clock = iter(range(10**9))

    def work(frame: np.ndarray) -> None:
        analyzer.add(frame, next(clock) * FRAME_PERIOD_S, mode, pixel_nm)

    return work


def main() -> None:
    hrtem, lm = frames("hrtem"), frames("lm")
    one = SpectrumSettings(workers=1)
    cases: dict[str, tuple[Callable[[np.ndarray], object], list[np.ndarray]]] = {
        "spectrum (analyze_frame) [reference]": (
            lambda f: analyze_frame(f, HRTEM_NM, settings=one),
            hrtem,
        ),
        "HRTEM registration": (registration("hrtem", hrtem[0]), hrtem),
        "LM registration": (registration("lm", lm[0]), lm),
        "sub-pixel shift (drift.shift_image)": (lambda f: shift_image(f, 0.3, 0.7), hrtem),
        "sub-pixel shift (ndimage.fourier_shift)": (ndimage_shift, hrtem),
        "FrameAnalyzer.add HRTEM, drift off": (analyzer_add(False, "hrtem", HRTEM_NM), hrtem),
        "FrameAnalyzer.add HRTEM, drift on": (analyzer_add(True, "hrtem", HRTEM_NM), hrtem),
        "FrameAnalyzer.add LM, drift off": (analyzer_add(False, "lm", LM_NM), lm),
        "FrameAnalyzer.add LM, drift on": (analyzer_add(True, "lm", LM_NM), lm),
    }
    for work, data in cases.values():  # warm the caches (windows, plans, buffers)
        per_frame_ms(work, data[:2])
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, (work, data) in cases.items():
            times[name].append(per_frame_ms(work, data))
    median = {name: statistics.median(values) for name, values in times.items()}
    reference = median["spectrum (analyze_frame) [reference]"]
    print(f"{FRAMES} frames of {SHAPE[0]} x {SHAPE[1]}, median of {ROUNDS} rounds")
    print(f"{'case':42s} {'ms/frame':>9s} {'/ spectrum':>11s}")
    for name, ms in median.items():
        print(f"{name:42s} {ms:9.2f} {ms / reference:11.2f}")
    step = {
        mode: median[f"FrameAnalyzer.add {mode}, drift on"]
        - median[f"FrameAnalyzer.add {mode}, drift off"]
        for mode in ("HRTEM", "LM")
    }
    for mode, ms in step.items():
        print(f"drift step per {mode} frame (add on - off): {ms:.2f} ms = {ms / reference:.2f}")


if __name__ == "__main__":
    main()
