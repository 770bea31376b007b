"""The reaction front in low-magnification frames: its distance from the contact surface, and
its speed from a robust fit over a sliding window. Pure functions: arrays in, numbers out.

What is measured. The transformed (rock-salt) region attenuates more per nm of thickness than
the pristine (layered) core: NiO is denser. It starts at the contact surface, where the needle
touches the particle, and sweeps to the far side. The front position is the distance, in nm,
from the contact surface along the contact axis to the boundary between the darker transformed
region and the lighter core.

How (`measure_front`, on the `Segmentation` of morphology.py):
1. Contact point: the particle pixels nearest the needle (distance transform of the needle
   mask). No needle in the field, or a needle not touching the particle: not measurable.
2. Contact axis: from the contact point through the particle's centroid. For a convex particle
   pushed by a needle the contact normal passes through (near) the centroid; it needs no
   assumption about the needle's shape or the frame's orientation (the needle may come from
   any side).
3. Contact surface: along the axis, the edge of the nearly opaque needle, located to a
   fraction of a pixel where the profile crosses halfway between needle and vacuum levels.
4. Separating composition from thickness. Mass-thickness contrast is I = I_vac exp(-mu t): a
   darker pixel may be thicker or denser. The particle is taken to be a body of revolution
   about the contact axis (exact for a sphere, a fair guess for a rounded particle), so its
   thickness at axial position s and offset p is 2 sqrt((w(s)/2)^2 - p^2), w(s) the projected
   width of the segmented particle across the axis at s. The attenuation coefficient profile
   mu(s) = -ln(I(s) / I_vac) / t(s) is then flat for a uniform particle and steps up behind
   the front. I(s) is the frame averaged over a strip `strip_half_width_nm` wide on either side
   of the axis (the front is a curve: a narrow strip keeps it sharp); only the part of the axis
   where the particle is at least `min_thickness_fraction` of its greatest thickness is used
   (near the rim t -> 0 and mu is noise).
5. Detection: the split of mu(s) into a denser near part and a lighter far part that best
   fits two levels (weighted least squares, weights ~ t^2 I, the inverse variance of mu under
   shot noise). It counts only if the step is at least `min_contrast` of the far level and
   `min_significance` standard errors: a uniform particle (no bias applied, or fully converted)
   gives "no front" (None), not a number.
6. Position: where mu, smoothed over a few nm, rises above the far (pristine) level by
   `front_level` (a quarter) of the step, nearest the split: the edge of the pristine core. Not
   the split itself: a graded zone at the front (the simulator's 15 nm Ni/Li-disordered band
   sits at mid level) fits equally well on either side, so the split jumps by the zone's width
   from frame to frame, which would ruin the speed.

Speed (`front_speed`): Theil-Sen slope (scipy.stats.theilslopes) of position against time over
the points of the last `window_s` seconds; None with too few points, too short a span, or a
confidence interval too wide for the slope to mean anything.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

from .measurement import LmSum, Measured, measures
from .morphology import Segmentation
from .quantities import FRONT_POSITION, FRONT_VELOCITY

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontSettings:
    """Knobs of `measure_front`; the defaults suit ~1 nm/px frames of a ~500 nm particle."""

    strip_half_width_nm: float = 20.0
    min_thickness_fraction: float = 0.4
    min_contrast: float = 0.06  # (mu_near - mu_far) / mu_far
    min_significance: float = 8.0  # step / its standard error
    min_side_nm: float = 10.0  # the front must have this much measured axis on each side
    # The front is where mu, smoothed over profile_smoothing_nm, leaves the far (pristine)
    # level by front_level of the step, searched within refine_half_window_nm of the split.
    front_level: float = 0.25
    profile_smoothing_nm: float = 6.0
    refine_half_window_nm: float = 30.0
    contact_tolerance_px: float = 2.0  # binned px beyond the needle margin: still touching
    contact_zone_px: float = 4.0  # binned px beyond the nearest approach: the contact zone


DEFAULT_FRONT = FrontSettings()


@dataclass(frozen=True)
class FrontMeasurement:
    """Front position in one frame; position_nm is None when not measurable (see reason)."""

    position_nm: float | None
    reason: str | None
    contact_px: tuple[float, float] | None = None  # contact surface on the axis (row, col)
    axis: tuple[float, float] | None = None  # unit vector (row, col) into the particle
    contrast: float | None = None  # (mu_near - mu_far) / mu_far of the best split
    significance: float | None = None  # step over its standard error

    @property
    def measurable(self) -> bool:
        return self.position_nm is not None


def _not_measurable(reason: str, **known) -> FrontMeasurement:
    logger.debug("front not measurable: %s", reason)
    return FrontMeasurement(position_nm=None, reason=reason, **known)


def _contact_and_axis(
    segmentation: Segmentation, settings: FrontSettings
) -> tuple[np.ndarray, np.ndarray] | str:
    """(contact point, unit axis) in frame pixels, or the reason they cannot be found."""
    particle, needle = segmentation.particle, segmentation.needle
    distance = ndimage.distance_transform_edt(~needle)
    rows, cols = np.nonzero(particle)
    to_needle = distance[rows, cols]
    nearest = float(to_needle.min())
    if nearest > segmentation.needle_margin_px + 1 + settings.contact_tolerance_px:
        return f"needle not touching the particle ({nearest * segmentation.bin:.0f} px apart)"
    # The contact zone: the particle's pixels within a few pixels of its nearest approach to
    # the needle. Averaging over the whole zone (tens of pixels, bounded by the needle's own
    # shape) is stable from frame to frame where the single nearest pixels jump along the rim.
    near = to_needle <= nearest + settings.contact_zone_px
    contact = np.array(segmentation.to_frame_px(rows[near].mean(), cols[near].mean()))
    centroid = np.array(segmentation.to_frame_px(rows.mean(), cols.mean()))
    axis = centroid - contact
    length = float(np.hypot(*axis))
    if length < 2 * segmentation.bin:
        return "particle too small to define a contact axis"
    return contact, axis / length


def _sample(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    coords = np.stack((rows.ravel(), cols.ravel()))
    values = ndimage.map_coordinates(
        image, coords, order=1, mode="constant", cval=np.nan, output=np.float32
    )
    return values.reshape(rows.shape)


def _step_fit(y: np.ndarray, w: np.ndarray, min_side: int) -> tuple[int, float, float, float]:
    """Best split k of y into y[:k] (higher level) and y[k:]: (k, near, far, significance)."""
    n = y.size
    cw = np.cumsum(w)
    cwy = np.cumsum(w * y)
    cwyy = np.cumsum(w * y * y)
    k = np.arange(min_side, n - min_side + 1)
    w1, s1, q1 = cw[k - 1], cwy[k - 1], cwyy[k - 1]
    w2, s2, q2 = cw[-1] - w1, cwy[-1] - s1, cwyy[-1] - q1
    m1, m2 = s1 / w1, s2 / w2
    sse = (q1 - s1 * m1) + (q2 - s2 * m2)
    sse = np.where(m1 > m2, sse, np.inf)  # the transformed side is the denser one
    best = int(np.argmin(sse))
    if not np.isfinite(sse[best]):
        return int(k[best]), float(m1[best]), float(m2[best]), 0.0
    # Residual variance of unit weight (var y_i = it / w_i); var(level) = it / sum of weights.
    unit_variance = max(float(sse[best]), 0.0) / (n - 2)
    stderr = math.sqrt(unit_variance * (1.0 / w1[best] + 1.0 / w2[best]))
    significance = (m1[best] - m2[best]) / stderr if stderr > 0 else math.inf
    return int(k[best]), float(m1[best]), float(m2[best]), float(significance)


def _edge_of_far_level(
    s: np.ndarray,
    mu: np.ndarray,
    weight: np.ndarray,
    split: int,
    near: float,
    far: float,
    pixel_nm: float,
    settings: FrontSettings,
) -> float:
    """Axial position (frame px) where smoothed mu crosses far + front_level (near - far),
    nearest the split.

    Why not the split itself: a graded zone at the front (the simulator's 15 nm disordered
    band) sits at the mid level, so the two-level fit puts the split at either side of it
    depending on noise, a 15 nm jump between frames. The crossing just above the pristine
    level is at the core's edge whichever side the split fell on.
    """
    size = max(1, round(settings.profile_smoothing_nm / pixel_nm))
    smooth = ndimage.uniform_filter1d(mu * weight, size, mode="nearest")
    smooth /= ndimage.uniform_filter1d(weight, size, mode="nearest")
    level = far + settings.front_level * (near - far)
    reach = math.ceil(settings.refine_half_window_nm / pixel_nm)
    lo, hi = max(1, split - reach), min(s.size - 1, split + reach)
    i = min(max(split, lo), hi)
    if smooth[i] >= level:
        while i < hi and smooth[i] >= level:
            i += 1
    else:
        while i > lo and smooth[i - 1] < level:
            i -= 1
    step = smooth[i - 1] - smooth[i]
    frac = (smooth[i - 1] - level) / step if step > 0 else 0.5
    return float(s[i - 1] + min(max(frac, 0.0), 1.0) * (s[i] - s[i - 1]))


def measure_front(
    frame: np.ndarray,
    segmentation: Segmentation,
    settings: FrontSettings = DEFAULT_FRONT,
) -> FrontMeasurement:
    """Distance of the reaction front from the contact surface (module docstring)."""
    if not segmentation.measurable or segmentation.particle is None:
        return _not_measurable(segmentation.reason or "no particle")
    if segmentation.needle is None:
        return _not_measurable("no needle in the field: no contact surface to measure from")
    found = _contact_and_axis(segmentation, settings)
    if isinstance(found, str):
        return _not_measurable(found)
    contact, axis = found
    normal = np.array([-axis[1], axis[0]])
    pixel_nm = segmentation.pixel_size_nm
    binned = segmentation.bin
    offset = (binned - 1) / 2.0

    # Axial samples every frame pixel from behind the contact estimate to past the far side.
    rows, cols = np.nonzero(segmentation.particle)
    centroid = np.array(segmentation.to_frame_px(rows.mean(), cols.mean()))
    half_length = float(np.hypot(*(centroid - contact)))
    back = (segmentation.needle_margin_px + 8) * binned  # from well inside the needle
    s = np.arange(-back, 2.6 * half_length + 2 * binned, 1.0)

    # Width of the particle across the axis at each s (sub-pixel, from the interpolated mask).
    reach = 1.6 * half_length + 2 * binned
    p_wide = np.arange(-reach, reach + 1e-9, binned / 2.0)
    s_coarse = s[:: max(1, binned)]
    pos = contact[:, None, None] + axis[:, None, None] * s_coarse[None, :, None]
    pos = pos + normal[:, None, None] * p_wide[None, None, :]
    mask = _sample(
        segmentation.particle.astype(np.float32),
        (pos[0] - offset) / binned,
        (pos[1] - offset) / binned,
    )
    width_px = np.interp(s, s_coarse, np.nansum(mask, axis=1) * (binned / 2.0))

    # Counts along the axis, averaged over the strip.
    half_strip = max(1.0, settings.strip_half_width_nm / pixel_nm)
    p = np.arange(-math.floor(half_strip), math.floor(half_strip) + 1, 1.0)
    pos = contact[:, None, None] + axis[:, None, None] * s[None, :, None]
    pos = pos + normal[:, None, None] * p[None, None, :]
    counts = _sample(np.asarray(frame), pos[0], pos[1])
    in_frame = ~np.isnan(counts).any(axis=1)  # NaN: the strip leaves the frame there
    centre_line = counts[:, np.abs(p) <= 3].mean(axis=1)  # +-3 px: the needle edge, sharp
    strip = counts.mean(axis=1)

    # Contact surface: walking from inside the needle (where the axis starts) toward the
    # particle, the first rise above halfway between needle and vacuum. Searching from the
    # needle's side matters: a thick, dense particle can itself dip below that level.
    needle_counts = float(np.median(segmentation.image[segmentation.needle]))
    level = 0.5 * (needle_counts + segmentation.vacuum_counts)
    below = centre_line < level
    above = centre_line >= level  # both False where the line leaves the frame
    rises = np.nonzero(above)[0]
    if rises.size == 0 or rises[0] == 0 or not below[rises[0] - 1]:
        return _not_measurable("needle edge not found on the contact axis")
    k = int(rises[0]) - 1
    frac = (level - centre_line[k]) / (centre_line[k + 1] - centre_line[k])
    s0 = float(s[k] + frac)
    contact_surface = contact + axis * s0
    known = dict(
        contact_px=(float(contact_surface[0]), float(contact_surface[1])),
        axis=(float(axis[0]), float(axis[1])),
    )

    # Attenuation per nm of thickness along the axis.
    half_width = width_px * pixel_nm / 2.0
    chord = np.sqrt(np.maximum(half_width[:, None] ** 2 - (p[None, :] * pixel_nm) ** 2, 0.0))
    thickness = 2.0 * chord.mean(axis=1)
    inside = (s > s0) & in_frame & (strip > 0)
    if not inside.any():
        return _not_measurable("no particle on the contact axis", **known)
    valid = inside & (thickness >= settings.min_thickness_fraction * thickness[inside].max())
    indices = np.nonzero(valid)[0]
    runs = np.split(indices, np.nonzero(np.diff(indices) > 1)[0] + 1)
    run = max(runs, key=len)
    min_side = max(3, math.ceil(settings.min_side_nm / pixel_nm))
    if run.size < 2 * min_side + 2:
        return _not_measurable("too little of the particle on the contact axis", **known)
    transmission = strip[run] / segmentation.vacuum_counts
    mu = -np.log(transmission) / thickness[run]
    weight = thickness[run] ** 2 * strip[run]
    split, near, far, significance = _step_fit(mu, weight, min_side)
    # far <= 0: the "pristine" part is as bright as vacuum; nothing to compare against.
    contrast = (near - far) / far if far > 0 else 0.0
    known.update(contrast=float(contrast), significance=float(significance))
    if contrast < settings.min_contrast or significance < settings.min_significance:
        return _not_measurable(
            f"no front: contrast {contrast:.3f}, significance {significance:.1f}", **known
        )
    s_front = _edge_of_far_level(s[run], mu, weight, split, near, far, pixel_nm, settings)
    return FrontMeasurement(position_nm=float((s_front - s0) * pixel_nm), reason=None, **known)


@dataclass(frozen=True)
class FrontSpeed:
    """Robust front speed over a window: slope with its 95 % confidence interval."""

    speed_nm_s: float
    low_nm_s: float
    high_nm_s: float
    points: int
    span_s: float


def front_speed(
    times_s: Sequence[float],
    positions_nm: Sequence[float | None],
    window_s: float = 5.0,
    min_points: int = 6,
    min_span_fraction: float = 0.5,
    max_relative_uncertainty: float = 0.3,
    min_uncertainty_nm_s: float = 0.5,
) -> FrontSpeed | None:
    """Theil-Sen speed (nm/s) over the points of the last `window_s` s, or None.

    Points whose position is None (not measurable) are skipped. None when fewer than
    `min_points` remain, when they span less than `min_span_fraction` of the window, or when
    the half-width of the 95 % confidence interval exceeds max(max_relative_uncertainty x
    |speed|, min_uncertainty_nm_s): a stationary front is a measured 0, a scatter is not.
    """
    pairs = [
        (float(t), float(x))
        for t, x in zip(times_s, positions_nm, strict=True)
        if x is not None and math.isfinite(x) and math.isfinite(t)
    ]
    if not pairs:
        return None
    t_end = max(t for t, _ in pairs)
    pairs = [(t, x) for t, x in pairs if t >= t_end - window_s]
    if len(pairs) < min_points:
        return None
    t, x = np.array(pairs).T
    span = float(t.max() - t.min())
    if span < min_span_fraction * window_s or span <= 0:
        return None
    slope, _, low, high = stats.theilslopes(x, t, alpha=0.95)
    half_width = 0.5 * (high - low)
    if not half_width <= max(max_relative_uncertainty * abs(slope), min_uncertainty_nm_s):
        logger.debug("front speed not measurable: %.3g +- %.3g nm/s", slope, half_width)
        return None
    return FrontSpeed(float(slope), float(low), float(high), len(pairs), span)


@measures("lm", FRONT_POSITION)
def front_position(sum_: LmSum) -> Measured:
    """The front's distance from the contact surface in the sum (None: no front seen)."""
    position = sum_.front.position_nm
    if position is None:
        return Measured({FRONT_POSITION.key: None}, {"front": sum_.front.reason or "no front"})
    return Measured({FRONT_POSITION.key: position})


@measures("lm", FRONT_VELOCITY)
def front_velocity(sum_: LmSum) -> Measured:
    """The front's mean speed over the pipeline's window of positions (Theil-Sen)."""
    window_s = sum_.settings.front_window_s
    speed = front_speed(sum_.front_times, sum_.front_positions, window_s=window_s)
    return Measured({FRONT_VELOCITY.key: None if speed is None else speed.speed_nm_s})
