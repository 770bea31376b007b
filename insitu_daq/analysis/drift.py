"""Drift of the field: the shift of each frame against its mode's dose sum, the drift position
and rate, the sub-pixel shift that keeps a sum sharp, and the image shift that would undo it.
Pure: arrays in, numbers out (pipeline.py keeps the state: each sum's anchor, the track).

How a shift is measured (`measure_shift`). The central `region_px` square of the frame, at
full resolution, is cross-correlated with the same square of its mode's running dose sum; the
peak sits at the shift. Plain cross-correlation, not phase-normalised: at 0.2 counts per HRTEM
pixel almost every Fourier coefficient is shot noise, and phase normalisation would weigh
those as much as the lattice's few strong ones; the unnormalised product is the matched
filter. Both squares are windowed (a Tukey window: the wrap-around edge of an unwindowed crop
is a feature that does not move, and pulls the shift to 0; so does a window, less the flatter
it is, which a second measurement on the frame moved back by the first takes away). The
peak's sub-pixel place is the vertex of a quadratic surface (cross term included) fitted to
its 3 x 3 neighbourhood in HRTEM (within ~0.25 px on a pure lattice: its peaks are cosines,
not parabolas). Not binned, even at low magnification: binning a frame
whose edges are sharper than the bins (the needle's) locks the shift toward whole bins.

Why not `skimage.registration.phase_cross_correlation`: it refines its global maximum, and in
a lattice image that is the wrong peak as often as not (and it took 115 ms for a 512 x 512
pair here, against ~10 ms). A lattice is periodic, so its
cross-correlation has a peak at every lattice translation, all of one height within the
noise. Low-pass filtering the fringes away would leave the particle's edge and phase
boundaries to lock onto, but a field inside one crystal (the simulator's HRTEM field, many
real ones) has none. So the drift is tracked instead: the peak is searched only within
`hrtem_search_px` of the predicted shift (the newest position moved on at the fitted rate),
which must stay below half the shortest lattice period (the (101)'s 2.53 A is 4.2 px at
0.06 nm/px: 2 px). That holds while the field moves less than ~2 px between a frame and its
prediction: 0.24 s of a 0.5 nm/s drift in real time, or a rate known well enough to carry
the prediction across a look at low magnification. A slip by one lattice vector leaves the
sum sharp (the fringes coincide again) but offsets the drift position by that vector
(0.25-0.5 nm). 512 px: 256 px of a 25 ms HRTEM frame locked onto noise peaks.

Position and rate. The drift position is cumulative: where the specimen has moved to since
the run's first frame (+x along the frame's columns, +y along its rows, nm via the pixel
size), as the frame's shift against its sum plus the position the sum is aligned to (its
anchor, pipeline.py). The rate (`drift_rate`) is a Theil-Sen fit of x and y against run time
over the last `rate_window_s`: the median of pairwise slopes, so one bad pair (a slip, a frame
half in a mode switch) moves it by no more than one point of many.

Compensation is not done here (the microscope's image shift, later): `image_shift_correction`
gives the shift that would bring the field back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import scipy.fft
from scipy import signal, stats

from .measurement import Measured, measures
from .quantities import DRIFT_RATE, DRIFT_X, DRIFT_Y

if TYPE_CHECKING:
    from .measurement import HrtemSum, LmSum


@dataclass(frozen=True)
class DriftSettings:
    """How drift is measured and corrected (module docstring). Off by default: a station turns
    it on with `[analysis] drift = true` (core/config.py)."""

    enabled: bool = False
    region_px: int = 512  # HRTEM: the central square registered, at full resolution
    # LM: ... larger: the particle fills the field, and with its edges in the window's taper
    # (512 px) a 4 px drift read 3.6; at 768 px, 4.0.
    lm_region_px: int = 768
    hrtem_search_px: float = 2.0  # HRTEM: peak searched this close to the prediction (frame px)
    lm_search_px: float = 32.0  # LM: ... (no period: as far as the field may go between frames)
    lm_smooth_px: float = 3.0  # LM: Gaussian sigma the correlation is smoothed by (measure_shift)
    # A frame whose shift against its sum is below this is summed as it is: at 0.1 px the
    # finest fringe drawn (2.2 px) keeps 99 % of its contrast, and the shift costs ~6 ms.
    min_shift_px: float = 0.1
    # When the newest frame is this far from the sum's anchor, the sum is re-anchored by whole
    # pixels (a roll: exact), so shifts stay small and a shifted frame wraps few pixels.
    reanchor_px: float = 2.0
    # Frames are registered against a reference: the sum's central square, taken anew while
    # the sum builds up to its dose, then kept (a reference renewed with every frame would
    # add each frame's error to the next: a random walk) until the field has moved this far
    # from it, losing overlap.
    refresh_px: float = 32.0
    rate_window_s: float = 10.0  # run s of positions the rate is fitted over
    rate_min_points: int = 6
    rate_min_span: float = 0.3  # ... spanning at least this share of the window

    def __post_init__(self) -> None:
        if min(self.region_px, self.lm_region_px) < 16:
            raise ValueError("drift region_px and lm_region_px must be >= 16")
        if not (self.hrtem_search_px > 0 and self.rate_window_s > 0):
            raise ValueError("drift search radii and rate_window_s must be positive")


DEFAULT_DRIFT = DriftSettings()


@dataclass(frozen=True)
class Shift:
    """Where the moving image's content lies relative to the reference's, in the registration
    image's pixels (+ = toward higher rows/columns), and the normalised peak (0-1)."""

    dy: float
    dx: float
    correlation: float


@dataclass(frozen=True)
class DriftRate:
    """Theil-Sen drift velocity (nm/s) over the window and its speed."""

    vx_nm_s: float
    vy_nm_s: float
    points: int

    @property
    def speed_nm_s(self) -> float:
        return math.hypot(self.vx_nm_s, self.vy_nm_s)


@dataclass(frozen=True)
class DriftTrack:
    """What a sum's drift measurement reads (pipeline.py fills it): the newest frame's drift
    position (None: not measured, `reason` says why) and the positions of the rate window."""

    position_nm: tuple[float, float] | None
    times_s: Sequence[float]
    x_nm: Sequence[float]
    y_nm: Sequence[float]
    reason: str = ""


# Share of each edge the window tapers over. A window multiplies content that moves by one that
# does not, which pulls the correlation peak toward 0: a Hann window (all taper) measured a
# 0.5 px drift of the noise-free LM field as 0.4; flat over the middle, the pull is that of
# the edges alone.
WINDOW_TAPER = 0.25


@lru_cache(maxsize=8)
def _window(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = (signal.windows.tukey(n, WINDOW_TAPER) for n in shape)
    return np.outer(rows, cols).astype(np.float32)


def registration_image(image: np.ndarray, region_px: int) -> np.ndarray:
    """The central `region_px` square of `image` at full resolution, float32, mean removed
    (`measure_shift` windows it). Not binned, even at low magnification: binning a frame
    whose edges are sharper than the bins (the needle's) locks the shift toward whole bins
    (a 0.5 px drift read as 0.3 with 4 x 4 bins)."""
    rows, cols = image.shape
    n = region_px
    top, left = max(0, (rows - n) // 2), max(0, (cols - n) // 2)
    out = np.array(image[top : top + n, left : left + n], dtype=np.float32)
    out -= out.mean(dtype=np.float64)
    return out


@lru_cache(maxsize=8)
def _gaussian_weights(shape: tuple[int, int], rows: int, sigma_px: float) -> np.ndarray:
    """The rfft2 of a Gaussian of `sigma_px` applied to each image, on their product."""
    ky = scipy.fft.fftfreq(rows)[:, None]
    kx = scipy.fft.rfftfreq(2 * (shape[1] - 1))[None, :]
    return np.exp(-4.0 * np.pi**2 * sigma_px**2 * (ky**2 + kx**2)).astype(np.float32)


@lru_cache(maxsize=8)
def _lags(n: int) -> np.ndarray:
    """Integer lag of each index of a length-n circular correlation: 0, 1, ..., -1."""
    return (np.arange(n) + n // 2) % n - n // 2


@dataclass(frozen=True)
class Reference:
    """A registration image prepared once for many frames: windowed, and its spectrum."""

    windowed: np.ndarray
    spectrum: np.ndarray  # conj(rfft2(windowed))

    @classmethod
    def of(cls, image: np.ndarray) -> Reference:
        windowed = image * _window(image.shape)
        return cls(windowed, np.conj(scipy.fft.rfft2(windowed)))


def measure_shift(
    reference: np.ndarray | Reference,
    moving: np.ndarray,
    near: tuple[float, float] = (0.0, 0.0),
    radius: float = 2.0,
    smooth_px: float = 0.0,
    refine: bool = True,
) -> Shift | None:
    """The shift of `moving`'s content against `reference`'s (same shape, registration
    images): the correlation's peak within `radius` px of `near` (dy, dx), placed by a
    quadratic surface through its 3 x 3 neighbourhood. `smooth_px`: the correlation is taken
    of both images smoothed by a Gaussian of that sigma (in Fourier space, at no cost): for
    a smooth image (LM), whose information is in its low frequencies, the shot noise of the
    others would otherwise move a broad peak by tenths of a pixel. Measured twice: the window
    (fixed) pulls a shift toward 0; with `refine`, measured again on `moving` moved back by
    the first estimate, what is left is small and so is its pull (an LM field, whose edges
    reach the window's taper, needs it; a lattice filling the field hardly: 3 FFTs instead of
    8). None when either image is blank (no contrast to correlate)."""
    if not isinstance(reference, Reference):
        reference = Reference.of(reference)
    if reference.windowed.shape != moving.shape:
        raise ValueError(f"images differ in shape: {reference.windowed.shape} vs {moving.shape}")
    window = _window(moving.shape)
    first = _windowed_shift(reference, moving * window, near, radius, smooth_px)
    if first is None or not refine:
        return first
    back = shift_image(moving, -first.dy, -first.dx)
    rest = _windowed_shift(reference, back * window, (0.0, 0.0), radius, smooth_px)
    if rest is None:
        return first
    return Shift(first.dy + rest.dy, first.dx + rest.dx, rest.correlation)


def _windowed_shift(
    reference: Reference,
    moving: np.ndarray,
    near: tuple[float, float],
    radius: float,
    smooth_px: float,
) -> Shift | None:
    """One measurement of `measure_shift` on a windowed image."""
    ref = reference.windowed
    norm = math.sqrt(float(np.vdot(ref, ref)) * float(np.vdot(moving, moving)))
    if not norm > 0:
        return None
    rows, cols = ref.shape
    product = reference.spectrum * scipy.fft.rfft2(moving)
    if smooth_px > 0:
        product *= _gaussian_weights(product.shape, rows, smooth_px)
    correlation = scipy.fft.irfft2(product, s=(rows, cols))  # c(s) = sum_x ref(x) mov(x+s)
    lag_y, lag_x = _lags(rows), _lags(cols)
    inside = (lag_y[:, None] - near[0]) ** 2 + (lag_x[None, :] - near[1]) ** 2 <= radius**2
    if not inside.any():  # a radius below half a pixel: the nearest lag
        inside[round(near[0]) % rows, round(near[1]) % cols] = True
    peak_y, peak_x = np.unravel_index(
        np.argmax(np.where(inside, correlation, -np.inf)), inside.shape
    )
    peak = float(correlation[peak_y, peak_x])
    rows_3 = (peak_y + np.arange(-1, 2)) % rows
    cols_3 = (peak_x + np.arange(-1, 2)) % cols
    sub_y, sub_x = _vertex(correlation[np.ix_(rows_3, cols_3)])
    return Shift(float(lag_y[peak_y] + sub_y), float(lag_x[peak_x] + sub_x), max(0.0, peak / norm))


# Least squares of a + b x + c y + d x^2 + e xy + f y^2 on a 3 x 3 neighbourhood (x along
# columns, y along rows, -1..1): the pseudo-inverse maps its 9 values to (a, b, c, d, e, f).
_Y3, _X3 = (g.ravel() for g in np.mgrid[-1:2, -1:2].astype(np.float64))
_QUADRATIC = np.linalg.pinv(np.column_stack((np.ones(9), _X3, _Y3, _X3**2, _X3 * _Y3, _Y3**2)))


def _vertex(values: np.ndarray) -> tuple[float, float]:
    """Sub-pixel (dy, dx), each within +-1, of the vertex of the quadratic surface fitted to a
    3 x 3 neighbourhood of a maximum. The cross term matters: a lattice's correlation peak is
    elongated along its fringes, at an angle to the pixel axes, and per-axis parabolas put it
    off by a third of a pixel. (0, 0) when the surface has no maximum there."""
    _, b, c, d, e, f = _QUADRATIC @ values.ravel().astype(np.float64)
    hessian = np.array([[2 * d, e], [e, 2 * f]])
    if not (hessian[0, 0] < 0 and np.linalg.det(hessian) > 0):
        return 0.0, 0.0
    dx, dy = np.linalg.solve(hessian, [-b, -c])
    return float(np.clip(dy, -1.0, 1.0)), float(np.clip(dx, -1.0, 1.0))


def shift_image(image: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """`image` moved by (dy, dx) px (float32), sub-pixel, by a Fourier phase ramp: exact for
    the band-limited fringes, circular at the edges. The two ramps are separable: 1.6x
    cheaper than scipy.ndimage.fourier_shift's per-coefficient exponentials at 1024 x 1024
    (bench/bench_drift.py)."""
    rows, cols = image.shape
    spectrum = scipy.fft.rfft2(np.asarray(image, dtype=np.float32))
    spectrum *= np.exp(-2j * np.pi * scipy.fft.fftfreq(rows) * dy).astype(np.complex64)[:, None]
    spectrum *= np.exp(-2j * np.pi * scipy.fft.rfftfreq(cols) * dx).astype(np.complex64)[None, :]
    return scipy.fft.irfft2(spectrum, s=(rows, cols)).astype(np.float32, copy=False)


def drift_rate(
    times_s: Sequence[float],
    x_nm: Sequence[float],
    y_nm: Sequence[float],
    settings: DriftSettings = DEFAULT_DRIFT,
) -> DriftRate | None:
    """Theil-Sen drift velocity over the last `rate_window_s` of positions, or None when
    fewer than `rate_min_points` span less than `rate_min_span` of the window."""
    t = np.asarray(times_s, dtype=np.float64)
    if t.size == 0:
        return None
    keep = t >= t.max() - settings.rate_window_s
    t = t[keep]
    x, y = np.asarray(x_nm, dtype=np.float64)[keep], np.asarray(y_nm, dtype=np.float64)[keep]
    if t.size < settings.rate_min_points:
        return None
    if float(t.max() - t.min()) < settings.rate_min_span * settings.rate_window_s:
        return None
    vx = stats.theilslopes(x, t).slope
    vy = stats.theilslopes(y, t).slope
    return DriftRate(float(vx), float(vy), int(t.size))


def image_shift_correction(
    position_nm: tuple[float, float], rate: DriftRate | None = None, latency_s: float = 0.0
) -> tuple[float, float]:
    """The image shift (x, y nm in the frame's axes) that brings the field back to where it was
    at the run's first frame when it takes effect `latency_s` from the position's time: minus
    the position, moved on at the rate. For closed-loop compensation (not done here: the
    caller limits its rate and logs it)."""
    x, y = position_nm
    if rate is not None:
        x, y = x + rate.vx_nm_s * latency_s, y + rate.vy_nm_s * latency_s
    return -x, -y


def _drift_values(sum_: HrtemSum | LmSum) -> Measured:
    """Drift position of the sum's newest frame and the rate over the window (None: drift
    not measured in this run: no keys at all)."""
    track = sum_.drift
    if track is None:
        return Measured({})
    values: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    if track.position_nm is None:
        values[DRIFT_X.key] = values[DRIFT_Y.key] = None
        reasons["drift"] = track.reason or "no drift position"
    else:
        values[DRIFT_X.key], values[DRIFT_Y.key] = track.position_nm
    rate = drift_rate(track.times_s, track.x_nm, track.y_nm, sum_.settings.drift)
    values[DRIFT_RATE.key] = None if rate is None else rate.speed_nm_s
    if rate is None:
        reasons["drift_rate"] = "too few drift positions in the rate window"
    return Measured(values, reasons)


@measures("hrtem", DRIFT_X, DRIFT_Y, DRIFT_RATE)
def hrtem_drift(sum_: HrtemSum) -> Measured:
    """The drift of an HRTEM sum (module docstring)."""
    return _drift_values(sum_)


@measures("lm", DRIFT_X, DRIFT_Y, DRIFT_RATE)
def lm_drift(sum_: LmSum) -> Measured:
    """The drift of an LM sum (module docstring)."""
    return _drift_values(sum_)
