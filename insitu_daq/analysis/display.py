"""Images for people: contrast, size, the power spectrum that shows spots, a scale bar.

Pure functions, arrays in, arrays out. The web view (web/images.py) and the report figure
(report/figure.py) draw with these, so a frame looks the same in both.

The power spectrum is the one a microscopist reads. A low-dose HRTEM sum's plain log power is
a bright centre, a 1/q falloff and shot noise. The lattice spots are a few pixels above that
falloff and get lost in a contrast stretch over the whole range (the report figure's FFT panels
looked like noise). So `spectrum_image` does four things:
- it transforms the middle of the frame, at most `max_side` px a side, and keeps only the
  spatial frequencies of the tracked reflections (up to `q_max`);
- it bins to the displayed size and smooths over a spot's width (averaging the power lowers
  its noise);
- it divides out the radial background (the mean log power over each ring of the same |q|),
  and shows the log of what is left: the excess over background, where a spot is 2-100x
  and noise is ~1x.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft, ndimage

from .reflections import ReflectionTable

SCALE_BAR_STEPS = (1, 2, 5)  # bar lengths: 1, 2, 5 x 10^n nm
STRETCH_SAMPLE_STEP = 7
RING_MARGIN = 1.25  # a spectrum reaches this much beyond the widest tracked ring
SPECTRUM_SMOOTHING_PX = 1.5  # Gaussian sigma on the binned power (displayed px)


def stretch(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """`image` as uint8, mapping the `low_pct` percentile to 0 and `high_pct` to 255.
    Non-finite pixels are black."""
    values = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    # Percentiles of every 7th pixel: as good for contrast, ~10x cheaper than of all of them.
    sample = values[finite][::STRETCH_SAMPLE_STEP]
    low, high = np.percentile(sample, (low_pct, high_pct))
    span = float(high - low) or 1.0
    scaled = np.where(finite, (values - low) * (255.0 / span), 0.0)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def downsample(image: np.ndarray, max_side: int) -> np.ndarray:
    """The mean over square blocks, so that no side exceeds `max_side` (a copy as float32 if
    the image is already small enough). Trailing rows and columns that fill no block are
    cut."""
    image = np.asarray(image, dtype=np.float32)
    factor = max(1, math.ceil(max(image.shape) / max_side))
    if factor == 1:
        return image.copy()
    rows, cols = (side // factor for side in image.shape)
    # A sum of factor^2 strided views: ~10x faster than a mean over a 4-D reshape's axes.
    total = np.zeros((rows, cols), np.float32)
    for dr in range(factor):
        for dc in range(factor):
            total += image[dr : rows * factor : factor, dc : cols * factor : factor]
    return total / np.float32(factor * factor)


def shown_frame(image: np.ndarray, max_side: int | None, smoothing_px: float = 0.0) -> np.ndarray:
    """A frame sum as a person should see it, uint8: downsampled to `max_side` (None: as it
    is), smoothed by a Gaussian of `smoothing_px` shown pixels, contrast-stretched.

    Why smooth an HRTEM preview: a live sum holds ~5 counts a pixel, so its lattice fringes
    (8 px apart at 4.8 A and 0.06 nm; 4 shown px after halving) drown in shot noise. A sigma of
    0.8 shown px keeps ~45 % of the fringes' contrast and cuts the pixel noise ~3x: ~1.3x
    their signal-to-noise (tests/analysis/test_display.py measures 1.25x). Contrast on larger
    scales is kept whole, so the layered and rock-salt regions, and the front between them,
    stand out of the noise."""
    shown = np.asarray(image, np.float32) if max_side is None else downsample(image, max_side)
    if smoothing_px > 0:
        shown = ndimage.gaussian_filter(shown, smoothing_px)
    return stretch(shown)


def nyquist_per_nm(pixel_nm: float) -> float:
    return 1.0 / (2.0 * pixel_nm)


def spectrum_image(
    frame: np.ndarray, pixel_nm: float, q_max_per_nm: float, max_side: int = 512
) -> tuple[np.ndarray, float]:
    """(log10 of the power over its radial background, centred and cropped to |q| <= q_max; the
    q_max it reaches, 1/nm: at most Nyquist). The image is square with an even side (at most
    `max_side`). Its centre pixel is q = 0 and its half-width is q_max (module docstring)."""
    image = np.asarray(frame, dtype=np.float32)
    rows, cols = image.shape
    side, half = _transform_size(image.shape, pixel_nm, q_max_per_nm, max_side)
    q_max = half / (side * pixel_nm)
    top, left = (rows - side) // 2, (cols - side) // 2
    image = image[top : top + side, left : left + side]
    image = image - image.mean()
    window = np.hanning(side).astype(np.float32)
    power = np.abs(fft.fftshift(fft.fft2(image * window[:, None] * window[None, :]))) ** 2
    centre = side // 2
    cropped = power[centre - half : centre + half, centre - half : centre + half]
    binned = downsample(cropped, max_side)
    binned_side = min(binned.shape)
    binned = binned[:binned_side, :binned_side]
    # Averaging neighbours lowers the shot noise of the power (a spot is a few px wide).
    binned = ndimage.gaussian_filter(binned, SPECTRUM_SMOOTHING_PX)
    log_power = np.log10(np.maximum(binned, np.finfo(np.float32).tiny))
    return (log_power - radial_background(log_power)).astype(np.float32), q_max


def spectrum_extent(
    shape: tuple[int, ...], pixel_nm: float, q_max_per_nm: float, max_side: int = 512
) -> float:
    """The q_max (1/nm) `spectrum_image` reaches for a frame of `shape`, without computing it
    (where a page draws the rings of a spectrum it will ask for later)."""
    side, half = _transform_size(shape, pixel_nm, q_max_per_nm, max_side)
    return half / (side * pixel_nm)


def _transform_size(
    shape: tuple[int, ...], pixel_nm: float, q_max_per_nm: float, max_side: int
) -> tuple[int, int]:
    """(side of the transformed middle of the frame, half-width of the kept spectrum), px.
    The middle max_side x max_side of the frame: the transform has max_side px a side at full
    resolution in q, and costs ~4x less than the whole 1024 x 1024 frame's. Its frequency
    step is 1 / (side * pixel) per pixel."""
    side = min(shape[0], shape[1], max_side) & ~1
    q_max = min(q_max_per_nm, nyquist_per_nm(pixel_nm))
    half = min(side // 2, max(2, round(q_max * side * pixel_nm)))
    return side, half


def radial_background(log_power: np.ndarray) -> np.ndarray:
    """Each pixel's ring mean of `log_power` (rings of 1 px around the centre pixel). A mean
    of the log, not of the power: a spot 100x over background on 2 % of its ring raises the
    ring's log mean by 0.04 (10 %), where it would double a mean of the power. (A median
    would be more robust still, but costs 80 ms at 512 x 512, the mean 2 ms.)"""
    side = log_power.shape[0]
    centre = side // 2
    y, x = np.indices(log_power.shape)
    radius = np.hypot(y - centre, x - centre).round().astype(np.int64).ravel()
    sums = np.bincount(radius, weights=log_power.ravel())
    counts = np.bincount(radius)
    return (sums / np.maximum(counts, 1))[radius].reshape(log_power.shape)


def spectrum_reach(table: ReflectionTable) -> float:
    """The |q| (1/nm) a spectrum should show: RING_MARGIN beyond the tracked reflection of
    smallest d."""
    return RING_MARGIN * max(10.0 / reflection.d_angstrom for reflection in table)


def ring_radius_fraction(d_angstrom: float, q_max_per_nm: float) -> float:
    """Where a reflection of spacing d sits in a `spectrum_image`: its |q| as a fraction of
    the image's half-width (>1: outside the image)."""
    return (10.0 / d_angstrom) / q_max_per_nm


def scale_bar(pixel_nm: float, width_px: int, target_fraction: float = 0.2) -> tuple[float, float]:
    """(length nm, fraction of the image width) of a round-numbered scale bar close to
    `target_fraction` of an image `width_px` frame pixels wide."""
    width_nm = pixel_nm * width_px
    target = width_nm * target_fraction
    exponent = math.floor(math.log10(target))
    candidates = [step * 10.0**exponent for step in SCALE_BAR_STEPS]
    candidates.append(10.0 ** (exponent + 1))
    length = min(candidates, key=lambda c: abs(c - target))
    return length, length / width_nm
