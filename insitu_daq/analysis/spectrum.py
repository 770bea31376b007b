"""Spectral analysis of HRTEM frames: power spectrum, radial profile, peaks, d-spacings and
the tracking of named reflections. Pure functions: arrays in, numbers out (no I/O, no threads).

What it computes, per frame (`analyze_frame`):
1. One windowed float32 `scipy.fft.rfft2` of the whole frame. The window is a Tukey (tapered
   cosine, 2.5 % of each axis at each edge): its taper kills the streaks the frame's edges
   would draw through the spectrum, while its flat middle weighs the whole field equally, so
   a phase entering at the edge of the field (the reaction front does) shows at once. A Hann
   window weighs the outer 10 % of the field by < 10 % and would see rock salt covering the
   first 7 % of the field not at all, delaying the onset by 2-3 s at +4.3 V.
2. The radially averaged power spectrum against spatial frequency q = 1/d (1/nm), from the
   pixel size, normalised so that fringes of relative amplitude a (image = mean * (1 + a cos))
   covering the field integrate to (a/2)**2 above the background, whatever the dose, frame
   size or window: intensities of different frames and runs compare directly.
3. A background under it: a Gaussian-weighted local quadratic fit of log power (it follows the
   curvature of, e.g., the needle's speckle falloff) through the bins that are neither peaks
   (masked iteratively) nor inside the tracked reflections' windows (a weak reflection would
   otherwise lift its own background). The scatter of a bin's mean power about it is
   kappa / sqrt(pixels in the bin), kappa measured on the quiet bins (1 for shot noise);
   the fit's own uncertainty is kept too, as it is common to all bins of a window.
4. Peaks (`find_peaks`) and named reflections (`track_reflections`, the table in
   reflections.py): a reflection is detected when the power above background summed over its
   window of +/- `window_tolerance` in q has a significance of at least `threshold_sigma`, and
   the profile inside the window has its own maximum (not the flank of a neighbour). Its d is
   then measured to a fraction of a bin by a Gaussian fit (a parabola in log power) to the
   bins around the maximum. Below the threshold d is None: "not measurable", never a guessed
   number. The intensity above background is reported either way (a measurement, near 0 when
   the reflection is absent), NaN when the frame has no signal (beam off, < 1000 counts).

What SNR it needs (1024 x 1024 at 0.06 nm/px, tests/analysis/test_analysis_spectrum.py): one 25 ms
frame at the renderer's default dose (~0.15-0.3 counts/px) shows the layered (003) at ~70
sigma; the polycrystalline rock-salt rings, spread over whole circles, are at ~3 sigma in such
a frame (not detected) and need ~10x the counts for a full field (~38 sigma at counts_scale
10) and one second of dose (~5 counts/px: 40 frames summed, `sum_frames`) to be detected when
they cover ~7 % of the field (the onset).

Why it is shaped so (throughput at 1024 x 1024 of the order of a bare rfft2; numbers in
bench/bench_analysis_spectrum.py): the window, the radial bin of every Fourier pixel (a sparse
averaging matrix) and the background fit's kernels depend only on (shape, pixel size,
settings) and are built once, cached; per frame there is one cast-and-window pass into a
reused buffer, one FFT, |X|**2, one sparse mat-vec and work on the ~500-bin profile only.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import scipy.fft
from scipy import ndimage, sparse

from .measurement import HrtemSum, Measured, measures
from .quantities import D_SPACING, INTENSITY
from .reflections import DEFAULT_REFLECTIONS, ReflectionTable

logger = logging.getLogger(__name__)

WINDOWS = ("tukey", "hann")


@dataclass(frozen=True)
class SpectrumSettings:
    """Parameters of the spectral analysis (defaults are the ones the accuracy tests use)."""

    window: str = "tukey"
    tukey_alpha: float = 0.05  # fraction of each axis in the cosine tapers (half at each edge)
    d_max_angstrom: float = 8.0  # analysed range: from 1/d_max up to the Nyquist frequency
    background_width_per_nm: float = 1.6  # width of the background filter, in q (1/nm)
    threshold_sigma: float = 6.0  # detection threshold of peaks and reflections
    window_tolerance: float = 0.03  # half-width of a reflection's window, relative in q
    min_total_counts: float = 1000.0  # fewer counts in the frame: not measurable
    workers: int = 1  # scipy.fft workers (threads); 1 leaves the other core to ingest

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ValueError(f"window {self.window!r} not one of {WINDOWS}")
        if not 0.0 < self.tukey_alpha <= 1.0:
            raise ValueError("tukey_alpha must be in (0, 1]")
        if not 0.0 < self.window_tolerance < 0.2:
            raise ValueError("window_tolerance must be in (0, 0.2)")
        if self.threshold_sigma <= 0 or self.background_width_per_nm <= 0:
            raise ValueError("threshold_sigma and background_width_per_nm must be positive")


DEFAULT_SETTINGS = SpectrumSettings()


# ----- geometry cached per (shape, pixel size, window) -----------------------------------------


def window_1d(n: int, kind: str, alpha: float) -> np.ndarray:
    """Periodic window of length n (float64): "hann" or "tukey" with taper fraction alpha."""
    x = np.arange(n) / n
    if kind == "hann":
        return 0.5 - 0.5 * np.cos(2.0 * np.pi * x)
    w = np.ones(n)
    taper = alpha / 2.0
    edge = x < taper
    w[edge] = 0.5 - 0.5 * np.cos(np.pi * x[edge] / taper)
    tail = x > 1.0 - taper
    w[tail] = 0.5 - 0.5 * np.cos(np.pi * (1.0 - x[tail]) / taper)
    return w


@dataclass(frozen=True, eq=False)
class SpectrumGeometry:
    """Everything about the spectrum of a frame that does not depend on its content."""

    shape: tuple[int, int]
    pixel_size_nm: float
    window: np.ndarray  # (rows, cols) float32
    window_mean: float  # mean of `window` (counts = DC / window_mean), kept: 0.3 ms a frame
    gain: float  # N * sum(w**2) / sum(w)**2: the window's noise gain (normalisation)
    q_step_per_nm: float  # radial bin width
    bin_q_per_nm: np.ndarray  # mean |q| of the Fourier pixels in each bin
    bin_pixels: np.ndarray  # pixels per bin (int)
    averaging: sparse.csr_matrix  # (bins, Fourier pixels): power -> mean power per bin
    first_bin: int  # the analysed range: bins first_bin .. last_bin - 1
    last_bin: int

    @staticmethod
    def get(
        shape: tuple[int, int], pixel_size_nm: float, settings: SpectrumSettings = DEFAULT_SETTINGS
    ) -> SpectrumGeometry:
        """The cached geometry for (shape, pixel size, window settings)."""
        return _geometry(
            (int(shape[0]), int(shape[1])),
            float(pixel_size_nm),
            settings.window,
            settings.tukey_alpha,
            settings.d_max_angstrom,
        )

    @property
    def n_bins(self) -> int:
        return self.bin_q_per_nm.size


@lru_cache(maxsize=4)  # ~8 MB each at 1024 x 1024 (window and averaging matrix)
def _geometry(
    shape: tuple[int, int], pixel_nm: float, kind: str, alpha: float, d_max_angstrom: float
) -> SpectrumGeometry:
    rows, cols = shape
    if rows < 16 or cols < 16:
        raise ValueError(f"frame {shape} too small for a spectrum (at least 16 x 16)")
    if not (math.isfinite(pixel_nm) and pixel_nm > 0):
        raise ValueError(f"pixel size must be positive, not {pixel_nm!r}")
    w = np.outer(window_1d(rows, kind, alpha), window_1d(cols, kind, alpha))
    gain = float(w.size * np.sum(w * w) / np.sum(w) ** 2)
    qy = scipy.fft.fftfreq(rows, d=pixel_nm)[:, None]
    qx = scipy.fft.rfftfreq(cols, d=pixel_nm)[None, :]
    q = np.hypot(qy, qx).ravel()
    q_step = 1.0 / (min(rows, cols) * pixel_nm)
    nyquist = 0.5 / pixel_nm
    n_bins = int(nyquist / q_step + 0.5) + 1
    index = np.rint(q / q_step).astype(np.int64)
    inside = index < n_bins
    pixels = np.bincount(index[inside], minlength=n_bins)
    bin_q = np.bincount(index[inside], q[inside], minlength=n_bins) / np.maximum(pixels, 1)
    columns = np.nonzero(inside)[0]
    weights = (1.0 / pixels[index[inside]]).astype(np.float32)
    averaging = sparse.csr_matrix((weights, (index[inside], columns)), shape=(n_bins, q.size))
    first_bin = max(3, math.ceil((10.0 / d_max_angstrom) / q_step))
    return SpectrumGeometry(
        shape=shape,
        pixel_size_nm=pixel_nm,
        window=w.astype(np.float32),
        window_mean=float(np.mean(w.astype(np.float32), dtype=np.float64)),
        gain=gain,
        q_step_per_nm=q_step,
        bin_q_per_nm=bin_q,
        bin_pixels=pixels,
        averaging=averaging,
        first_bin=min(first_bin, n_bins - 1),
        last_bin=n_bins,
    )


# ----- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RadialSpectrum:
    """Radially averaged power spectrum of one frame, with its background and noise.

    Power is relative: fringes of relative amplitude a over the whole field integrate
    (sum over bins of (power - background) * pixels) to (a/2)**2.
    Arrays cover the analysed range of bins (q from 1/d_max to the Nyquist frequency).
    """

    q_per_nm: np.ndarray
    power: np.ndarray
    background: np.ndarray
    sigma: np.ndarray  # standard deviation of `power` about `background` in each bin
    background_sigma: np.ndarray  # relative uncertainty of `background` (common to nearby bins)
    pixels: np.ndarray  # Fourier pixels averaged in each bin
    pixel_size_nm: float
    total_counts: float

    _centres: dict[int, float] = field(default_factory=dict, repr=False)

    @property
    def d_angstrom(self) -> np.ndarray:
        return 10.0 / self.q_per_nm

    @cached_property
    def excess(self) -> np.ndarray:
        return self.power - self.background

    def peak_centre(self, top: int) -> float:
        """Sub-bin q (1/nm) of the maximum of the excess at bin `top` (`_fit_centre`), fitted
        once per bin (peaks and tracked reflections share their maxima)."""
        if top not in self._centres:
            self._centres[top] = _fit_centre(self.q_per_nm, self.excess, top)
        return self._centres[top]


@dataclass(frozen=True)
class Peak:
    """A maximum of the radial profile above the background."""

    q_per_nm: float
    d_angstrom: float
    intensity: float  # integrated relative power above background over the peak
    significance: float  # in units of the noise of that integral


@dataclass(frozen=True)
class ReflectionMeasurement:
    """One tracked reflection in one frame. d_angstrom is None when it is not detected."""

    name: str
    d_nominal_angstrom: float
    detected: bool
    d_angstrom: float | None
    intensity: float  # relative power above background in the reflection's window; NaN: no data
    significance: float


@dataclass(frozen=True, eq=False)
class FrameSpectrum:
    """The spectral analysis of one frame."""

    measurable: bool
    reason: str  # why not measurable ("" when measurable)
    spectrum: RadialSpectrum | None
    peaks: tuple[Peak, ...]
    reflections: dict[str, ReflectionMeasurement] = field(default_factory=dict)

    def d_spacings(self) -> dict[str, float | None]:
        """Measured d (A) per reflection name, None where not detected."""
        return {name: m.d_angstrom for name, m in self.reflections.items()}

    def to_record(self) -> dict:
        """Plain values for the event stream and the run file (JSON/CBOR-safe: NaN -> None)."""

        def number(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else float(value)

        return {
            "measurable": self.measurable,
            "reason": self.reason,
            "reflections": {
                name: {
                    "detected": m.detected,
                    "d_angstrom": number(m.d_angstrom),
                    "intensity": number(m.intensity),
                    "significance": number(m.significance),
                }
                for name, m in self.reflections.items()
            },
            "peaks": [
                {
                    "d_angstrom": p.d_angstrom,
                    "intensity": p.intensity,
                    "significance": p.significance,
                }
                for p in self.peaks
            ],
        }


# ----- frames ----------------------------------------------------------------------------------


def sum_frames(frames: Iterable[np.ndarray]) -> np.ndarray:
    """Pixel-wise sum of equally shaped frames, as float32 (a sum of N frames has sqrt(N) times
    the SNR of one; at the renderer's default dose single HRTEM frames have ~0.3 counts/px)."""
    total: np.ndarray | None = None
    for frame in frames:
        array = np.asarray(frame)
        if array.ndim != 2:
            raise ValueError(f"a frame must be 2-D, not {array.shape}")
        if total is None:
            total = array.astype(np.float32)
        elif array.shape != total.shape:
            raise ValueError(f"frame shapes differ: {array.shape} vs {total.shape}")
        else:
            total += array
    if total is None:
        raise ValueError("no frames to sum")
    return total


# ----- the spectrum ----------------------------------------------------------------------------


_scratch = threading.local()


def _window_buffer(shape: tuple[int, int]) -> np.ndarray:
    """A float32 scratch frame reused from frame to frame (one per thread): allocating and
    first touching 4 MB per frame costs a visible share of the FFT's time."""
    buffer = getattr(_scratch, "windowed", None)
    if buffer is None or buffer.shape != shape:
        buffer = np.empty(shape, dtype=np.float32)
        _scratch.windowed = buffer
    return buffer


def _profile(
    frame: np.ndarray, geometry: SpectrumGeometry, workers: int
) -> tuple[np.ndarray, float]:
    """(mean relative power per bin over all bins, total counts)."""
    windowed = _window_buffer(geometry.shape)
    np.multiply(frame, geometry.window, out=windowed, casting="unsafe")
    spectrum = scipy.fft.rfft2(windowed, workers=workers)
    dc = float(spectrum[0, 0].real)  # sum(w * frame)
    magnitude = np.abs(spectrum)
    np.square(magnitude, out=magnitude)
    profile = geometry.averaging @ magnitude.ravel()
    total = dc / geometry.window_mean if dc > 0 else 0.0
    if dc <= 0:
        return profile, total
    # Relative power: (a/2)**2 for fringes of amplitude a (module docstring).
    profile /= np.float32(dc * dc * geometry.gain)
    return profile, total


@dataclass(frozen=True, eq=False)
class _Smoother:
    """Gaussian-weighted local quadratic regression of a profile of n bins, evaluated at
    centres every `step` bins and interpolated linearly between them (the fit is smooth on the
    scale of sigma >> step). All kernel moments are dense matrices built once per (n, sigma),
    so a fit is three small matrix products and m 3 x 3 solves."""

    kernel: np.ndarray  # (5 * m, n): k(i - c) * u**p, u = (i - c) / sigma, p = 0..4
    kernel_sq: np.ndarray  # (5 * m, n): the same with k**2 (variance of the fit)
    interpolate: np.ndarray  # (n, m): linear interpolation from the centres to every bin

    @staticmethod
    @lru_cache(maxsize=8)
    def get(n: int, sigma_bins: float) -> _Smoother:
        step = max(1, int(sigma_bins / 3.0))
        centres = np.unique(np.append(np.arange(0, n, step), n - 1))
        u = (np.arange(n)[None, :] - centres[:, None]) / sigma_bins
        k = np.exp(-0.5 * u * u)
        k[np.abs(u) > 4.0] = 0.0
        powers = np.stack([u**p for p in range(5)])  # (5, m, n)
        kernel = (powers * k).reshape(5 * centres.size, n)
        kernel_sq = (powers * k * k).reshape(5 * centres.size, n)
        interpolate = np.zeros((n, centres.size))
        right = np.clip(np.searchsorted(centres, np.arange(n), side="right"), 1, centres.size - 1)
        left = right - 1
        span = centres[right] - centres[left]
        share = (np.arange(n) - centres[left]) / np.maximum(span, 1)
        interpolate[np.arange(n), left] = 1.0 - share
        interpolate[np.arange(n), right] += share
        return _Smoother(kernel, kernel_sq, interpolate)

    def fit(
        self, y: np.ndarray, use: np.ndarray, variance: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fit, variance of the fit, fit_ok) at every bin, from the bins where `use`."""
        m = self.interpolate.shape[1]
        w = use.astype(np.float64)
        moments = self.kernel @ np.stack([w, w * y], axis=1)  # (5m, 2)
        mw = moments[:, 0].reshape(5, m).T  # sum k w u^p
        my = moments[: 3 * m, 1].reshape(3, m).T  # sum k w u^p y
        mv = (self.kernel_sq @ (w * variance)).reshape(5, m).T
        index = np.add.outer(np.arange(3), np.arange(3))
        a, b = mw[:, index], mv[:, index]  # (m, 3, 3)
        # At least three bins with weight: the 3 x 3 system is regular.
        ok = mw[:, 0] > 2.0
        at_centres = np.zeros((m, 3))  # fit, its variance, ok
        if ok.any():
            rhs = np.zeros((int(ok.sum()), 3, 2))
            rhs[:, :, 0] = my[ok]
            rhs[:, 0, 1] = 1.0  # second column: e1, for row = A^-1 e1 (A symmetric)
            solved = np.linalg.solve(a[ok], rhs)
            row = solved[:, :, 1]
            at_centres[ok, 0] = solved[:, 0, 0]
            at_centres[ok, 1] = np.einsum("ni,nij,nj->n", row, b[ok], row)
            at_centres[ok, 2] = 1.0
        fit, fit_var, good = (self.interpolate @ at_centres).T
        return fit, fit_var, good > 0.999


def _erode(mask: np.ndarray, reach: int) -> np.ndarray:
    """True where mask is True within `reach` bins on both sides (outside counts as True)."""
    out = mask.copy()
    for shift in range(1, reach + 1):
        out[shift:] &= mask[:-shift]
        out[:-shift] &= mask[shift:]
    return out


def _background(
    power: np.ndarray, pixels: np.ndarray, width_bins: float, excluded: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background, sigma, background_sigma) of a radial profile, in the units of power.

    A local quadratic fit of log power (Gaussian kernel of sigma width_bins / 4) through the
    quiet bins: not `excluded` (the windows of the tracked reflections, so that a weak
    reflection does not lift its own background: a fit through it absorbs much of its power)
    and not peaks (|residual| < 2.5 sigma, masks refined over three passes). kappa (the relative
    scatter of a bin times sqrt(pixels), 1 for independent shot noise) is measured on the quiet
    bins. background_sigma is the relative uncertainty of the fit itself, which is common to
    all the bins of a reflection's window.
    """
    log_power = np.log(np.maximum(power, np.finfo(np.float32).tiny)).astype(np.float64)
    safe_pixels = np.maximum(pixels, 1).astype(np.float64)
    root_pixels = np.sqrt(safe_pixels)
    smoother = _Smoother.get(power.size, max(2.0, width_bins / 4.0))
    kappa = 1.0
    quiet = ~excluded
    base = np.full_like(log_power, np.median(log_power))
    base_var = np.zeros_like(log_power)
    for _ in range(3):
        if quiet.sum() < 8:
            break
        fit, fit_var, fit_ok = smoother.fit(log_power, quiet, kappa**2 / safe_pixels)
        base = np.where(fit_ok, fit, base)
        base_var = np.where(fit_ok, fit_var, base_var)
        residual = (log_power - base) * root_pixels
        candidates = ~excluded & fit_ok
        if candidates.sum() >= 8:
            r = residual[candidates]  # robust sigma (median absolute deviation): peaks are outliers
            kappa = max(1.0, 1.4826 * float(np.median(np.abs(r - np.median(r)))))
        quiet = (np.abs(residual) < 2.5 * kappa) & ~excluded
        # A peak's shoulders sit below 2.5 sigma: leave two bins either side out too.
        quiet = _erode(quiet, 2)
    # exp(mean of log) of an average of n exponential variates is low by ~1/(2n): negligible.
    background = np.exp(base)
    return background, background * kappa / root_pixels, np.sqrt(base_var)


def radial_spectrum(
    frame: np.ndarray,
    pixel_size_nm: float,
    settings: SpectrumSettings = DEFAULT_SETTINGS,
    exclude: Iterable[tuple[float, float]] = (),
) -> RadialSpectrum | None:
    """The radial power spectrum of a frame with its background; None if the frame has no
    signal (beam off, too few counts). `exclude`: q ranges (1/nm) kept out of the background
    fit, e.g. the windows of tracked reflections (`reflection_windows`)."""
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ValueError(f"a frame must be 2-D, not {frame.shape}")
    geometry = SpectrumGeometry.get(frame.shape, pixel_size_nm, settings)
    profile, total = _profile(frame, geometry, settings.workers)
    if not (total >= settings.min_total_counts and math.isfinite(total)):
        return None
    lo, hi = geometry.first_bin, geometry.last_bin
    if hi - lo < 16:
        return None  # the pixel is too coarse for lattice fringes (low magnification)
    power = profile[lo:hi].astype(np.float64)
    if not np.any(power > 0):
        return None
    q = geometry.bin_q_per_nm[lo:hi]
    excluded = np.zeros(q.size, dtype=bool)
    for q_low, q_high in exclude:
        excluded |= (q >= q_low) & (q <= q_high)
    pixels = geometry.bin_pixels[lo:hi]
    width = max(8.0, settings.background_width_per_nm / geometry.q_step_per_nm)
    background, sigma, background_sigma = _background(power, pixels, width, excluded)
    return RadialSpectrum(
        q_per_nm=q,
        power=power,
        background=background,
        sigma=sigma,
        background_sigma=background_sigma,
        pixels=pixels,
        pixel_size_nm=float(pixel_size_nm),
        total_counts=total,
    )


# ----- peaks -----------------------------------------------------------------------------------


def _fit_centre(q: np.ndarray, excess: np.ndarray, top: int) -> float:
    """Sub-bin position of the maximum at index `top`: weighted least-squares parabola through
    log excess over the bins above half the maximum (at least the three around it), i.e. a
    Gaussian fit; the excess-weighted centroid where the fit has no maximum there."""
    peak = excess[top]
    lo = top
    while lo > 0 and excess[lo - 1] > 0.5 * peak:
        lo -= 1
    hi = top
    while hi < excess.size - 1 and excess[hi + 1] > 0.5 * peak:
        hi += 1
    lo, hi = min(lo, max(top - 1, 0)), max(hi, min(top + 1, excess.size - 1))
    qs = q[lo : hi + 1]
    values = np.maximum(excess[lo : hi + 1], peak * 1e-3)
    if qs.size >= 3:
        x = (qs - q[top]) / (qs[-1] - qs[0])
        weight = values / peak  # the log of a small excess is noisy: weigh by the excess
        design = np.stack([np.ones_like(x), x, x * x], axis=1) * weight[:, None]
        (_, c1, c2), *_ = np.linalg.lstsq(design, np.log(values) * weight, rcond=None)
        if c2 < 0:
            centre = q[top] - c1 / (2.0 * c2) * (qs[-1] - qs[0])
            if qs[0] <= centre <= qs[-1]:
                return float(centre)
    return float(np.sum(qs * values) / np.sum(values))


def _integrate(spectrum: RadialSpectrum, lo: int, hi: int) -> tuple[float, float]:
    """(intensity, significance) of the excess summed over bins lo..hi-1. The noise is that of
    the bins (independent) plus that of the background under them (common to all)."""
    weights = spectrum.pixels[lo:hi]
    intensity = float(np.sum(spectrum.excess[lo:hi] * weights))
    background = spectrum.background[lo:hi] * weights
    common = float(np.sum(background * spectrum.background_sigma[lo:hi]))
    noise = math.sqrt(float(np.sum((spectrum.sigma[lo:hi] * weights) ** 2)) + common**2)
    return intensity, intensity / noise if noise > 0 else 0.0


def find_peaks(
    spectrum: RadialSpectrum, threshold_sigma: float = DEFAULT_SETTINGS.threshold_sigma
) -> tuple[Peak, ...]:
    """Peaks of the radial profile above its background, strongest first.

    A peak is a run of bins more than 1 sigma above the background; it counts when the excess
    integrated over the run reaches threshold_sigma (noise as in `_integrate`).
    """
    excess = spectrum.excess
    labels, count = ndimage.label(excess > spectrum.sigma)
    if count == 0:
        return ()
    # Integrate every run at once; only the significant ones are fitted.
    weights = spectrum.pixels
    intensity = np.bincount(labels, excess * weights, count + 1)[1:]
    independent = np.bincount(labels, (spectrum.sigma * weights) ** 2, count + 1)[1:]
    common = np.bincount(
        labels, spectrum.background * weights * spectrum.background_sigma, count + 1
    )[1:]
    significance = intensity / np.sqrt(independent + common**2)
    peaks = []
    for run in np.flatnonzero(significance >= threshold_sigma):
        members = np.flatnonzero(labels == run + 1)
        top = int(members[np.argmax(excess[members])])
        q = spectrum.peak_centre(top)
        peaks.append(Peak(q, 10.0 / q, float(intensity[run]), float(significance[run])))
    peaks.sort(key=lambda p: -p.significance)
    return tuple(peaks)


def reflection_windows(table: ReflectionTable, tolerance: float) -> dict[str, tuple[float, float]]:
    """q range (1/nm) of each reflection's window: +/- tolerance relative, cut at the midpoint
    to the nearest other reflection so that windows never overlap."""
    qs = sorted((r.q_per_nm, r.name) for r in table)
    windows = {}
    for i, (q, name) in enumerate(qs):
        low, high = q * (1.0 - tolerance), q * (1.0 + tolerance)
        if i > 0:
            low = max(low, 0.5 * (q + qs[i - 1][0]))
        if i + 1 < len(qs):
            high = min(high, 0.5 * (q + qs[i + 1][0]))
        windows[name] = (low, high)
    return windows


_reflection_windows = lru_cache(maxsize=16)(reflection_windows)  # read-only use inside


def track_reflections(
    spectrum: RadialSpectrum | None,
    table: ReflectionTable = DEFAULT_REFLECTIONS,
    settings: SpectrumSettings = DEFAULT_SETTINGS,
) -> dict[str, ReflectionMeasurement]:
    """Intensity above background and measured d of every reflection of the table.

    Detected: significance of the window's summed excess >= threshold_sigma AND the window's
    largest excess is a local maximum inside the window, not its edge (a neighbour's flank).
    Reflections beyond the Nyquist frequency or below 1/d_max are not measurable here.
    """
    out = {}
    windows = _reflection_windows(table, settings.window_tolerance)
    for reflection in table:
        nan = ReflectionMeasurement(
            reflection.name, reflection.d_angstrom, False, None, math.nan, 0.0
        )
        if spectrum is None:
            out[reflection.name] = nan
            continue
        q = spectrum.q_per_nm
        q_low, q_high = windows[reflection.name]
        lo, hi = np.searchsorted(q, [q_low, q_high])
        if hi - lo < 3 or lo == 0 or hi >= q.size:
            out[reflection.name] = nan  # window not (wholly) inside the analysed range
            continue
        lo, hi = int(lo), int(hi)
        intensity, significance = _integrate(spectrum, lo, hi)
        excess = spectrum.excess
        top = lo + int(np.argmax(excess[lo:hi]))
        inner_maximum = excess[top] >= excess[top - 1] and excess[top] >= excess[top + 1]
        inner_maximum = inner_maximum and lo < top < hi - 1
        detected = significance >= settings.threshold_sigma and inner_maximum
        d = None
        if detected:
            d = 10.0 / spectrum.peak_centre(top)
        out[reflection.name] = ReflectionMeasurement(
            reflection.name, reflection.d_angstrom, detected, d, intensity, significance
        )
    return out


def analyze_frame(
    frame: np.ndarray,
    pixel_size_nm: float,
    table: ReflectionTable = DEFAULT_REFLECTIONS,
    settings: SpectrumSettings = DEFAULT_SETTINGS,
) -> FrameSpectrum:
    """Spectrum, peaks and tracked reflections of one HRTEM frame (module docstring)."""
    windows = _reflection_windows(table, settings.window_tolerance)
    spectrum = radial_spectrum(frame, pixel_size_nm, settings, exclude=windows.values())
    reflections = track_reflections(spectrum, table, settings)
    if spectrum is None:
        geometry = SpectrumGeometry.get(np.shape(frame), pixel_size_nm, settings)
        if geometry.last_bin - geometry.first_bin < 16:
            reason = (
                f"{pixel_size_nm:g} nm/px is too coarse: no spacing below "
                f"{settings.d_max_angstrom:g} A reaches the spectrum"
            )
        else:
            reason = "no signal (beam off or too few counts)"
        return FrameSpectrum(False, reason, None, (), reflections)
    peaks = find_peaks(spectrum, settings.threshold_sigma)
    return FrameSpectrum(True, "", spectrum, peaks, reflections)


@measures("hrtem", D_SPACING, INTENSITY)
def reflection_spacings(sum_: HrtemSum) -> Measured:
    """Per tracked reflection: its d in metres and its relative intensity (None: not
    detected, or not finite), from the sum's spectrum."""
    spectrum = sum_.spectrum
    values: dict[str, float | None] = {}
    for name in sum_.settings.table.names:
        measurement = spectrum.reflections.get(name)
        d = None if measurement is None else measurement.d_angstrom
        values[D_SPACING.key_for(name)] = None if d is None else d * 1e-10
        intensity = None if measurement is None else measurement.intensity
        ok = intensity is not None and math.isfinite(intensity)
        values[INTENSITY.key_for(name)] = float(intensity) if ok else None
    return Measured(values, {} if spectrum.measurable else {"spectrum": spectrum.reason})
