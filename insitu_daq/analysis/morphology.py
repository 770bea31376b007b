"""Low-magnification morphology: segment the particle, measure its projected size, and its
expansion relative to a reference taken before the bias step. Pure functions: arrays in,
numbers out (no I/O, no threads).

What a low-magnification frame shows (mass-thickness contrast): bright vacuum, the particle
darker toward its centre (transmission exp(-mu t), t its projected thickness, so its rim fades
into the vacuum), and the tungsten needle nearly opaque, entering from the edge of the frame and
touching the particle.

How it is segmented (`segment`), and why:
1. The frame is binned by an integer factor to ~256 px a side (one pass of adds on float32;
   a 1024 x 1024 frame takes ~1 ms) and lightly smoothed: 16x the counts per pixel, so the
   default dose (~87 counts per vacuum pixel) gives a vacuum level known to < 1 % per pixel,
   and everything after works on 1/16 of the pixels.
2. The vacuum level is the median of the pixels above an Otsu threshold (the bright mode).
   Thresholds are then fractions of it, so the result does not depend on dose or gain.
3. Particle-or-needle = darker than (1 - edge_contrast) of the vacuum. The particle's rim fades
   into the vacuum, so the threshold sits close to the vacuum level (7 % below it): the rim it
   cuts off is a thin annulus (~0.5 % of the area of a 500 nm particle) which nearly cancels in
   A / A_ref. A frame whose vacuum noise is too large for that threshold is not measurable.
4. The needle = the nearly opaque pixels (< opaque_fraction of vacuum) connected to the edge of
   the frame; it is removed with a margin of a few binned pixels, which also removes the grey
   pixels along its outline that would otherwise join it to the particle at the contact.
5. The particle = the largest remaining connected blob (holes filled). If it touches the frame
   edge, it is cut by the field of view: its area is "not measurable" (None), never a number.

Operating range: with the default 4x binning and 7 % edge threshold, a frame needs about 25
counts per vacuum pixel (the simulator's default 40 frames/s dose gives ~87); below that the
segmentation says "too noisy" rather than draw a ragged outline. Measured on simulated frames
(tests/analysis/test_analysis_morphology.py): area within 1 % of the disk's, expansion within ~0.8
pp of the model's over the +4.3 V timeline; ~12 ms per 1024 x 1024 frame together with the front
(bench/bench_analysis_morphology.py).

Expansion is the projected-area growth A / A_ref - 1, the model's definition (sim/model.py):
`ExpansionReference.from_frames` holds A_ref from one or a few frames taken before the bias
step; `measure_expansion` (or `ExpansionReference.expansion_of`) turns a frame into a number
or None. Drift does not matter (areas do not depend on where the particle sits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .measurement import LmSum, Measured, measures
from .quantities import EXPANSION, PROJECTED_AREA

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentationSettings:
    """Knobs of `segment`; the defaults suit 1024 x 1024 frames at ~1 nm/px."""

    target_binned_px: int = 256  # bin the frame to about this many pixels a side
    smoothing_sigma_px: float = 1.0  # Gaussian smoothing of the binned image (binned px)
    edge_contrast: float = 0.07  # particle = darker than (1 - this) x vacuum
    opaque_fraction: float = 0.12  # needle = darker than this x vacuum, connected to the edge
    needle_margin_px: int = 2  # binned px removed around the needle
    min_particle_px: int = 50  # binned px: smaller blobs are not a particle
    # The edge threshold must be this many standard deviations of the smoothed vacuum noise.
    min_edge_snr: float = 5.0


DEFAULT_SEGMENTATION = SegmentationSettings()


@dataclass(frozen=True)
class Segmentation:
    """Particle and needle of one frame, on the binned grid.

    Binned pixel (i, j) covers frame pixels [i*bin, (i+1)*bin) x [j*bin, (j+1)*bin); its
    centre is at frame pixel (i*bin + (bin-1)/2, j*bin + (bin-1)/2). `image` is in counts per
    frame pixel (the mean over the bin), smoothed. `reason` says why something is missing.
    """

    frame_shape: tuple[int, int]
    pixel_size_nm: float
    bin: int
    image: np.ndarray | None  # float32, binned and smoothed
    vacuum_counts: float  # mean counts per frame pixel in vacuum (0 when no signal)
    particle: np.ndarray | None  # bool, binned; None when no particle was found
    needle: np.ndarray | None  # bool, binned; None when no needle was found
    particle_touches_edge: bool
    reason: str | None  # why the particle is not measurable; None when it is
    needle_margin_px: int = 0  # binned px of particle removed around the needle

    @property
    def measurable(self) -> bool:
        return self.reason is None

    def to_frame_px(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Binned (row, col) -> frame pixel (row, col) coordinates."""
        offset = (self.bin - 1) / 2.0
        return np.asarray(rows) * self.bin + offset, np.asarray(cols) * self.bin + offset


@dataclass(frozen=True)
class ParticleMeasurement:
    """Projected size of the particle in one frame; None fields are not measurable."""

    area_nm2: float | None
    equivalent_diameter_nm: float | None  # diameter of the disk of the same area
    centroid_px: tuple[float, float] | None  # (row, col) in frame pixels
    reason: str | None  # why it is not measurable; None when it is

    @property
    def measurable(self) -> bool:
        return self.reason is None


def bin_frame(frame: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks (float32); a ragged right/bottom margin is dropped."""
    rows, cols = frame.shape[0] // factor, frame.shape[1] // factor
    image = np.asarray(frame)[: rows * factor, : cols * factor].astype(np.float32)
    if factor == 1:
        return image
    # Explicit adds of strided views: ~5x faster than .sum(axis=...) on these shapes.
    by_cols = image.reshape(rows * factor, cols, factor)
    summed = by_cols[:, :, 0].copy()
    for k in range(1, factor):
        summed += by_cols[:, :, k]
    by_rows = summed.reshape(rows, factor, cols)
    out = by_rows[:, 0].copy()
    for k in range(1, factor):
        out += by_rows[:, k]
    out *= np.float32(1.0 / (factor * factor))
    return out


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of `values` (Otsu 1979)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return low
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = 0.5 * (edges[1:] + edges[:-1])
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _touches_edge(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _edge_labels(labels: np.ndarray) -> np.ndarray:
    border = np.concatenate((labels[0], labels[-1], labels[:, 0], labels[:, -1]))
    return np.unique(border[border > 0])


def segment(
    frame: np.ndarray,
    pixel_size_nm: float,
    settings: SegmentationSettings = DEFAULT_SEGMENTATION,
) -> Segmentation:
    """Find the particle and the needle in a low-magnification frame (module docstring)."""
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {frame.shape}")
    if not pixel_size_nm > 0:
        raise ValueError(f"pixel size must be positive, not {pixel_size_nm!r}")
    shape = (int(frame.shape[0]), int(frame.shape[1]))
    factor = max(1, min(shape) // settings.target_binned_px)

    def missing(reason: str, **known) -> Segmentation:
        logger.debug("particle not measurable: %s", reason)
        fields = dict(
            frame_shape=shape,
            pixel_size_nm=float(pixel_size_nm),
            bin=factor,
            image=None,
            vacuum_counts=0.0,
            particle=None,
            needle=None,
            particle_touches_edge=False,
        )
        fields.update(known)
        return Segmentation(reason=reason, **fields)

    if min(shape) < 8 * factor or min(shape) < 16:
        return missing(f"frame {shape} too small")
    binned = bin_frame(frame, factor)
    if not float(binned.max()) > 0.0:
        return missing("no signal (beam off?)")
    image = ndimage.gaussian_filter(binned, settings.smoothing_sigma_px, mode="nearest")

    bright = image > otsu_threshold(image)
    if not bright.any():
        return missing("no vacuum in the field", image=image)
    vacuum = float(np.median(image[bright]))
    # Noise of the smoothed vacuum, from the unsmoothed binned pixels (robust sigma) and the
    # Gaussian's white-noise gain 1/(2 sqrt(pi) sigma) per axis.
    raw_sigma = 1.4826 * float(np.median(np.abs(binned[bright] - np.median(binned[bright]))))
    gain = 1.0 / (2.0 * math.sqrt(math.pi) * settings.smoothing_sigma_px)
    noise = raw_sigma * gain if settings.smoothing_sigma_px > 0 else raw_sigma
    if not vacuum > 0.0:
        return missing("no signal (beam off?)", image=image)
    if settings.edge_contrast * vacuum < settings.min_edge_snr * noise:
        return missing(
            f"too noisy: vacuum {vacuum:.3g} +- {noise:.2g} counts per pixel after smoothing",
            image=image,
            vacuum_counts=vacuum,
        )

    dark = image < np.float32((1.0 - settings.edge_contrast) * vacuum)
    opaque = image < np.float32(settings.opaque_fraction * vacuum)
    opaque_labels, _ = ndimage.label(opaque)
    needle_ids = _edge_labels(opaque_labels)
    needle = np.isin(opaque_labels, needle_ids) if needle_ids.size else None
    if needle is not None:
        margin = settings.needle_margin_px
        exclusion = ndimage.binary_dilation(needle, iterations=margin) if margin > 0 else needle
        dark &= ~exclusion

    labels, count = ndimage.label(dark)
    if count == 0:
        return missing("no particle in the field", image=image, vacuum_counts=vacuum, needle=needle)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    if sizes[largest] < settings.min_particle_px:
        return missing("no particle in the field", image=image, vacuum_counts=vacuum, needle=needle)
    particle = ndimage.binary_fill_holes(labels == largest)
    touches = _touches_edge(particle)
    return Segmentation(
        frame_shape=shape,
        pixel_size_nm=float(pixel_size_nm),
        bin=factor,
        image=image,
        vacuum_counts=vacuum,
        particle=particle,
        needle=needle,
        particle_touches_edge=touches,
        reason="particle cut by the edge of the field of view" if touches else None,
        needle_margin_px=settings.needle_margin_px if needle is not None else 0,
    )


def measure_particle(segmentation: Segmentation) -> ParticleMeasurement:
    """Projected area (nm^2), equivalent diameter and centroid of the segmented particle."""
    if not segmentation.measurable or segmentation.particle is None:
        return ParticleMeasurement(None, None, None, segmentation.reason or "no particle")
    mask = segmentation.particle
    binned_pixel_nm = segmentation.bin * segmentation.pixel_size_nm
    area = float(np.count_nonzero(mask)) * binned_pixel_nm**2
    rows, cols = np.nonzero(mask)
    row, col = segmentation.to_frame_px(rows.mean(), cols.mean())
    return ParticleMeasurement(
        area_nm2=area,
        equivalent_diameter_nm=2.0 * math.sqrt(area / math.pi),
        centroid_px=(float(row), float(col)),
        reason=None,
    )


@dataclass(frozen=True)
class ExpansionReference:
    """Projected area of the particle before the bias step, the denominator of expansion."""

    area_nm2: float
    area_scatter_nm2: float  # standard deviation over the reference frames (0 for one frame)
    frames: int  # how many frames it was averaged over

    @classmethod
    def from_frames(
        cls,
        frames: Iterable[np.ndarray],
        pixel_size_nm: float,
        settings: SegmentationSettings = DEFAULT_SEGMENTATION,
    ) -> ExpansionReference:
        """Average the area over the frames where it is measurable; ValueError if none is."""
        areas = []
        reasons = []
        for frame in frames:
            measurement = measure_particle(segment(frame, pixel_size_nm, settings))
            if measurement.area_nm2 is None:
                reasons.append(measurement.reason)
            else:
                areas.append(measurement.area_nm2)
        if not areas:
            why = "; ".join(sorted(set(reasons))) or "no frames"
            raise ValueError(f"no reference frame has a measurable particle: {why}")
        return cls.from_areas(areas)

    @classmethod
    def from_areas(cls, areas_nm2: Iterable[float]) -> ExpansionReference:
        values = np.asarray(list(areas_nm2), dtype=np.float64)
        if values.size == 0 or not np.all(values > 0):
            raise ValueError("reference areas must be positive and at least one")
        scatter = float(values.std(ddof=1)) if values.size > 1 else 0.0
        return cls(float(values.mean()), scatter, int(values.size))

    def expansion_of(self, measurement: ParticleMeasurement) -> float | None:
        """A / A_ref - 1, or None when the particle's area is not measurable."""
        if measurement.area_nm2 is None:
            return None
        return measurement.area_nm2 / self.area_nm2 - 1.0


def measure_expansion(
    frame: np.ndarray,
    pixel_size_nm: float,
    reference: ExpansionReference,
    settings: SegmentationSettings = DEFAULT_SEGMENTATION,
) -> float | None:
    """Projected-area expansion of the particle in `frame` relative to `reference`, or None."""
    return reference.expansion_of(measure_particle(segment(frame, pixel_size_nm, settings)))


@measures("lm", PROJECTED_AREA)
def projected_area(sum_: LmSum) -> Measured:
    """The particle's projected area in m^2 (None: not segmented)."""
    area = sum_.particle.area_nm2
    if area is None:
        return Measured(
            {PROJECTED_AREA.key: None}, {"particle": sum_.particle.reason or "no particle"}
        )
    return Measured({PROJECTED_AREA.key: area * 1e-18})


@measures("lm", EXPANSION)
def expansion(sum_: LmSum) -> Measured:
    """A / A_ref - 1 against the pipeline's expansion reference (pipeline.py's docstring)."""
    reference = sum_.reference_area_nm2
    if reference is None:
        reason = "no reference: no LM frame before the bias step"
        return Measured({EXPANSION.key: None}, {"expansion": reason})
    area = sum_.particle.area_nm2
    return Measured({EXPANSION.key: None if area is None else area / reference - 1.0})
