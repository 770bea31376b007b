"""Phase map of an HRTEM frame: tiles classified from their local FFT, and phase fractions.

Pure functions: arrays in, numbers out (no I/O, no threads).

The frame is cut into square tiles (128 px by default, a centred grid; the rim that does not
fill a whole tile is left out). Each tile is Hann-windowed and transformed, all tiles in one
batched float32 `scipy.fft.rfft2` done in place in the frame's row layout. For each reflection
of the table (reflections.py) a tile gets one number, its *peak ratio*: the largest Fourier
power in the reflection's annulus (|q - q_hkl| <= max(window_tolerance * q_hkl, one Fourier
pixel)) over the tile's background there, provided that pixel is a local maximum of the 2-D
spectrum (not the flank of a neighbouring reflection's spot). The background is the mean power
of the pixels in the two annuli just inside and outside the reflection's, leaving out every
reflection's annulus, clipped at 4x the mean so that a stray spot does not lift it.

Why a peak ratio, not the ring average of the global spectrum: inside a tile of a few nm the
layered crystal and each rock-salt grain give compact spots; the largest pixel catches a spot
that a ring average would dilute among a few hundred pixels of noise. Under noise alone the
power of one pixel over its mean is exponential (P(r > t) = exp(-t)), so at `threshold` = 18
an annulus of ~200 pixels would have a ~3e-6 chance of a false detection per tile. Measured on
the simulator's layered field (2026-11-24, 5 counts/px, 2 x 1000 renders) the tails are
heavier: a false tile 1.7e-5 of the time for 1.95 A and (220), 3.6e-4 for (200), whose
annulus sits between the 2.4 and 1.95 A ones with the smallest background (157 pixels). A
class needs its marker to be the strongest in the tile as well, which a false (200) next to
the layered (003) never is: the control's maps stay all layered.

Decision rule (SCIENCE.md's markers; the table says which reflection marks which phase):
- fewer than `min_counts_per_pixel` counts per pixel -> NO_DATA: too few counts to tell (beam
  off, the dark tungsten needle, a single low-dose frame). Without this gate the weaker phases
  would drop out first and the fractions would lean towards layered;
- no reflection of the table detected -> VACUUM: no lattice (vacuum, amorphous material);
- a marker detected -> the phase of the strongest marker (largest peak ratio): layered (003)
  4.8 A, disordered 1.95 A, rock salt (200) 2.1 A. The disordered band keeps a weak (003) (Ni
  in the Li slab) that its 1.95 A spot outshines; a tile cut by a boundary takes the phase
  whose spot is stronger, about the one covering more of it;
- only non-marker reflections (the shared 2.4 A of (006)/NiO (111), (101), (220)) ->
  UNRESOLVED: crystalline, phase not identified; counted in the map, not in the fractions.
Phase fractions are tile counts over the tiles labelled layered, disordered or rock salt
(the particle). None of those: not measurable, with the reason.

Phase presence, beside the fractions: per phase, the share of those particle tiles in which
its marker is detected at all, whichever phase wins the tile. A tile the front has only begun
to cross keeps the stronger spot of the phase still covering most of it, so the fractions see
a new phase only once it wins tiles; the presence sees it in the first tile it reaches. In
the simulator's reference run (rock salt enters the HRTEM field at two corners, 4 noise seeds)
the first rock-salt tile shows 1.3-1.9 s after the field first holds any rock salt (by then
~4 % of the field: half of a corner tile), the first tile classified rock salt ~0.3 s later,
the whole-field (200) ring ~3.7 s after. That is why a rock-salt onset is judged on the
presence (verify/accuracy.py), but only when it persists: a single map's presence has no such
second test. In live streams of the layered field (25 ms frames summed to 5 counts/px, a map
every 0.125 s; 2026-11-24) 2 of 475 maps, 2 of 410 (biased, before rock salt), 2 of 1195 and
19 of 1195 saw a false rock-salt tile, at most 2 maps in a row; the onset wants three. (The
per-tile rate above comes from single renders, each one entry of the renderer's noise bank;
a live sum mixes ~30, and its false tiles are rarer.) A tile's Hann window gives
its outer band little weight, which is where such a corner entry sits; a Tukey window (half
the tile tapered) saw it ~0.2 s earlier but its sidelobes let a strong spot raise its
neighbour's annulus above the threshold (the 2.4/2.53 A pair of
test_a_strong_spot_does_not_count_for_its_neighbour), so the Hann stays.

What SNR it needs (tests/analysis/test_analysis_phasemap.py, 128 px tiles at 0.06 nm/px, peak ratios
of the weakest tile of each phase): layered (003) ~8 at one 25 ms frame of the renderer's
default dose (~0.3 counts/px on the particle), > 40 at 3x that; the disordered band's 1.95 A
> 18 from ~10x; the rock-salt grains (5-10 nm, random orientations, so each tile holds one to
four weaker spots) > 18 from ~40x, i.e. ~4-5 counts/px: one second of dose (the 40 frames of
a second, `spectrum.sum_frames`). Fractions are then good to ~0.08 (tile quantisation).
128 px tiles at 0.06 nm/px separate 2.1 A from 1.95 A by 2.8 Fourier pixels; smaller tiles
(or a smaller pixel size at the same tile) cannot, and the annuli of such reflections merge.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

import numpy as np
import scipy.fft

from .measurement import HrtemSum, Measured, measures
from .quantities import PHASE_FRACTION, PHASE_PRESENCE
from .reflections import DEFAULT_REFLECTIONS, PHASES, SHARED, ReflectionTable

logger = logging.getLogger(__name__)


class TileClass(IntEnum):
    """Label of one tile of the phase map."""

    VACUUM = 0  # enough counts and no lattice signal: vacuum, amorphous (the needle)
    LAYERED = 1
    DISORDERED = 2
    ROCK_SALT = 3
    UNRESOLVED = 4  # lattice present, but only reflections that mark no phase
    NO_DATA = 5  # too few counts to tell: beam off, the dark needle, a low-dose frame


_PHASE_CLASS = {
    "layered": TileClass.LAYERED,
    "disordered": TileClass.DISORDERED,
    "rock_salt": TileClass.ROCK_SALT,
}


@dataclass(frozen=True)
class PhaseMapSettings:
    """Parameters of the phase map."""

    tile_px: int = 128
    threshold: float = 18.0  # peak ratio for a reflection to count as present in a tile
    window_tolerance: float = 0.03  # annulus half-width, relative in q (at least one pixel)
    # Mean counts per pixel below which a tile is NO_DATA: the weakest marker (the rock-salt
    # grains' (200)) is found in nearly every tile from ~4 counts/px at the simulator's
    # contrast, in every tile from ~5 (set it for the material and microscope at hand).
    # Below it the weaker phases drop out first and the fractions would lean to layered.
    min_counts_per_pixel: float = 4.0
    workers: int = 1  # scipy.fft workers

    def __post_init__(self) -> None:
        if self.tile_px < 16 or self.tile_px % 2:
            raise ValueError("tile_px must be even and at least 16")
        if self.threshold <= 1.0:
            raise ValueError("threshold must be above 1")
        if self.min_counts_per_pixel < 0:
            raise ValueError("min_counts_per_pixel must not be negative")


DEFAULT_PHASE_MAP_SETTINGS = PhaseMapSettings()


@dataclass(frozen=True, eq=False)
class PhaseMap:
    """Tile labels of one frame and the phase fractions over the particle.

    labels[i, j] covers frame rows origin[0] + i * tile_px ... and columns origin[1] + j * ...
    fractions is None when not measurable (no tile with an identified phase).
    """

    measurable: bool
    reason: str
    labels: np.ndarray  # (tile rows, tile cols) uint8, TileClass values
    tile_px: int
    origin: tuple[int, int]
    peak_ratio: dict[str, np.ndarray]  # per reflection, (tile rows, tile cols) float32
    fractions: dict[str, float] | None
    presence: dict[str, float] | None = None  # per phase; None exactly when fractions is None

    def count(self, label: TileClass) -> int:
        return int(np.count_nonzero(self.labels == label))

    @property
    def particle_tiles(self) -> int:
        """Tiles with an identified phase (the denominator of the fractions)."""
        return sum(self.count(_PHASE_CLASS[p]) for p in PHASES)

    def to_record(self) -> dict:
        """Plain values for the event stream and the run file (JSON/CBOR-safe)."""
        return {
            "measurable": self.measurable,
            "reason": self.reason,
            "fractions": None if self.fractions is None else dict(self.fractions),
            "presence": None if self.presence is None else dict(self.presence),
            "tiles": {label.name.lower(): self.count(label) for label in TileClass},
            "tile_px": self.tile_px,
            "origin": list(self.origin),
            "labels": self.labels.tolist(),
        }


# ----- geometry cached per (shape, tile, pixel size, table) -----------------------------------


@dataclass(frozen=True, eq=False)
class _TileGeometry:
    grid: tuple[int, int]  # tiles along rows, cols
    origin: tuple[int, int]
    window: np.ndarray  # (tile, 1, tile) float32, broadcast over (tile rows, ., tile cols, .)
    gather: np.ndarray  # (tiles, pixels): flat indices into the batched rfft2 output that
    # are ever read, laid out (tile rows, ky, tile cols, kx) as the FFT leaves them
    annulus: tuple[np.ndarray, ...]  # per reflection: positions in `gather`
    neighbours: tuple[np.ndarray, ...]  # per reflection: (annulus pixels, 8) positions
    background: tuple[np.ndarray, ...]  # per reflection: positions in `gather`
    measurable: tuple[bool, ...]  # per reflection: annulus inside the tile's Nyquist circle


def _window(n: int) -> np.ndarray:
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    return np.outer(w, w).astype(np.float32)


@lru_cache(maxsize=8)
def _tile_geometry(
    shape: tuple[int, int], tile: int, pixel_nm: float, table: ReflectionTable, tolerance: float
) -> _TileGeometry:
    rows, cols = shape
    grid = (rows // tile, cols // tile)
    if grid[0] == 0 or grid[1] == 0:
        raise ValueError(f"frame {shape} smaller than one {tile} px tile")
    origin = ((rows - grid[0] * tile) // 2, (cols - grid[1] * tile) // 2)
    half = tile // 2 + 1
    fy = scipy.fft.fftfreq(tile)[:, None]  # cycles per pixel
    fx = scipy.fft.rfftfreq(tile)[None, :]
    f = np.broadcast_to(np.hypot(fy, fx), (tile, half))
    q = f / pixel_nm
    q_pixel = 1.0 / (tile * pixel_nm)  # one Fourier pixel, in 1/nm
    inside = f <= 0.5
    zones = []
    for r in table:
        zones.append(max(tolerance * r.q_per_nm, q_pixel))
    excluded = np.zeros(q.shape, dtype=bool)
    for r, h in zip(table, zones, strict=True):
        excluded |= np.abs(q - r.q_per_nm) <= h + 0.5 * q_pixel
    ky, kx = np.meshgrid(np.arange(tile), np.arange(half), indexing="ij")
    annuli, neighbours, backgrounds, measurable = [], [], [], []
    for r, h in zip(table, zones, strict=True):
        ring = (np.abs(q - r.q_per_nm) <= h) & inside & (f > 1.5 / tile)
        flat = np.flatnonzero(ring)
        measurable.append(bool(flat.size) and r.q_per_nm + h <= 0.5 / pixel_nm)
        annuli.append(flat)
        # The 8 neighbours in the full 2-D spectrum; kx = -1 is the conjugate of (-ky, 1).
        y, x = ky.ravel()[flat], kx.ravel()[flat]
        around = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == 0 and dx == 0:
                    continue
                ny, nx = (y + dy) % tile, x + dx
                mirror = nx < 0
                ny = np.where(mirror, (-ny) % tile, ny)
                nx = np.where(mirror, -nx, np.minimum(nx, half - 1))
                around.append(ny * half + nx)
        neighbours.append(np.stack(around, axis=1) if flat.size else np.zeros((0, 8), int))
        # Background: pixels just inside and outside the annulus, clear of all annuli.
        width = 2.0 * q_pixel
        distance = np.abs(q - r.q_per_nm)
        bg = (distance <= h + 0.5 * q_pixel + width) & ~excluded & inside & (f > 1.5 / tile)
        while np.count_nonzero(bg) < 64 and width < 10 * q_pixel:
            width *= 1.5
            bg = (distance <= h + 0.5 * q_pixel + width) & ~excluded & inside & (f > 1.5 / tile)
        backgrounds.append(np.flatnonzero(bg))
    pixels = np.unique(
        np.concatenate([*annuli, *(n.ravel() for n in neighbours), *backgrounds, [0]])
    )
    position = np.full(tile * half, -1, dtype=np.int64)
    position[pixels] = np.arange(pixels.size)
    # Offsets in the (tile rows, ky, tile cols, kx) output: the tiles are transformed in place
    # in the frame's row layout, with no transposed copy.
    ky_of, kx_of = np.divmod(pixels, half)
    pixel_offset = ky_of * (grid[1] * half) + kx_of
    ti, tj = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    tile_offset = ti * (tile * grid[1] * half) + tj * half
    return _TileGeometry(
        grid=grid,
        origin=origin,
        window=_window(tile)[:, None, :],
        gather=tile_offset[:, None] + pixel_offset[None, :],
        annulus=tuple(position[a] for a in annuli),
        neighbours=tuple(position[n] for n in neighbours),
        background=tuple(position[b] for b in backgrounds),
        measurable=tuple(measurable),
    )


# ----- the map ---------------------------------------------------------------------------------


# E[X | X < 4 E[X]] / E[X] for exponentially distributed X: (1 - 5 e^-4) / (1 - e^-4).
_CLIPPED_MEAN_BIAS = (1.0 - 5.0 * math.exp(-4.0)) / (1.0 - math.exp(-4.0))


def _clipped_mean(power: np.ndarray) -> np.ndarray:
    """Mean power per row (tile) after leaving out values above 4x the plain mean (a spot of
    some reflection outside the table), corrected for the clipping of exponential noise."""
    mean = power.mean(axis=1, keepdims=True)
    kept = power < 4.0 * mean
    total = np.where(kept, power, 0.0).sum(axis=1)
    return total / np.maximum(kept.sum(axis=1), 1) / np.float32(_CLIPPED_MEAN_BIAS)


def tile_peak_ratios(
    frame: np.ndarray,
    pixel_size_nm: float,
    table: ReflectionTable = DEFAULT_REFLECTIONS,
    settings: PhaseMapSettings = DEFAULT_PHASE_MAP_SETTINGS,
) -> tuple[dict[str, np.ndarray], np.ndarray, _TileGeometry]:
    """Peak ratio of every reflection in every tile, (tile rows, tile cols) each, NaN where a
    reflection is beyond the tile's Nyquist frequency; and the counts per tile."""
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ValueError(f"a frame must be 2-D, not {frame.shape}")
    if not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise ValueError(f"pixel size must be positive, not {pixel_size_nm!r}")
    tile = settings.tile_px
    geometry = _tile_geometry(
        frame.shape, tile, float(pixel_size_nm), table, settings.window_tolerance
    )
    (n_rows, n_cols), (r0, c0) = geometry.grid, geometry.origin
    view = frame[r0 : r0 + n_rows * tile, c0 : c0 + n_cols * tile]
    tiles = view.reshape(n_rows, tile, n_cols, tile)
    windowed = np.empty(tiles.shape, dtype=np.float32)
    np.multiply(tiles, geometry.window, out=windowed, casting="unsafe")
    spectra = scipy.fft.rfft2(windowed, axes=(1, 3), workers=settings.workers)
    picked = spectra.ravel().take(geometry.gather)  # (tiles, pixels)
    power = np.abs(picked)
    np.square(power, out=power)
    # DC of a tile = sum(w * counts) and sum(w) = tile**2 / 4 (Hann): counts ~ 4 DC.
    counts = picked[:, 0].real * np.float32(4.0)
    tile_index = np.arange(power.shape[0])
    ratios = {}
    for i, reflection in enumerate(table):
        if not geometry.measurable[i] or geometry.background[i].size < 8:
            ratios[reflection.name] = np.full((n_rows, n_cols), np.nan, dtype=np.float32)
            continue
        ring = power[:, geometry.annulus[i]]
        top = np.argmax(ring, axis=1)
        peak = ring[tile_index, top]
        around = power[tile_index[:, None], geometry.neighbours[i][top]]
        local_max = peak >= around.max(axis=1)
        background = _clipped_mean(power[:, geometry.background[i]])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(local_max & (background > 0), peak / background, 0.0)
        ratios[reflection.name] = ratio.astype(np.float32).reshape(n_rows, n_cols)
    return ratios, counts.reshape(n_rows, n_cols), geometry


def classify_tiles(
    ratios: dict[str, np.ndarray],
    table: ReflectionTable = DEFAULT_REFLECTIONS,
    threshold: float = DEFAULT_PHASE_MAP_SETTINGS.threshold,
) -> np.ndarray:
    """Labels (TileClass values, uint8) from peak ratios, by the rule in the module docstring."""
    shape = next(iter(ratios.values())).shape
    present = {name: np.nan_to_num(r, nan=0.0) >= threshold for name, r in ratios.items()}
    lattice = np.zeros(shape, dtype=bool)
    for name in table.names:
        lattice |= present[name]
    labels = np.where(lattice, TileClass.UNRESOLVED, TileClass.VACUUM).astype(np.uint8)
    best = np.zeros(shape, dtype=np.float32)
    for reflection in table:
        if not reflection.marks or reflection.phase == SHARED:
            continue
        ratio = np.nan_to_num(ratios[reflection.name], nan=0.0)
        wins = present[reflection.name] & (ratio > best)
        labels[wins] = _PHASE_CLASS[reflection.phase]
        best = np.where(wins, ratio, best)
    return labels


def phase_fractions(labels: np.ndarray) -> dict[str, float] | None:
    """Fraction of each phase among the tiles with an identified phase; None if there are
    none."""
    counts = {p: int(np.count_nonzero(labels == _PHASE_CLASS[p])) for p in PHASES}
    total = sum(counts.values())
    if total == 0:
        return None
    return {p: counts[p] / total for p in PHASES}


def phase_presence(
    ratios: dict[str, np.ndarray],
    labels: np.ndarray,
    table: ReflectionTable = DEFAULT_REFLECTIONS,
    threshold: float = DEFAULT_PHASE_MAP_SETTINGS.threshold,
) -> dict[str, float] | None:
    """Per phase, the share of the particle tiles (labelled with a phase) in which a marker of
    that phase is detected, whichever phase the tile was given; None if there is no such tile."""
    particle = np.isin(labels, [_PHASE_CLASS[p] for p in PHASES])
    total = int(np.count_nonzero(particle))
    if total == 0:
        return None
    presence = {}
    for phase in PHASES:
        seen = np.zeros(labels.shape, dtype=bool)
        for reflection in table.markers(phase):
            seen |= np.nan_to_num(ratios[reflection.name], nan=0.0) >= threshold
        presence[phase] = int(np.count_nonzero(seen & particle)) / total
    return presence


def phase_map(
    frame: np.ndarray,
    pixel_size_nm: float,
    table: ReflectionTable = DEFAULT_REFLECTIONS,
    settings: PhaseMapSettings = DEFAULT_PHASE_MAP_SETTINGS,
) -> PhaseMap:
    """Tile labels and phase fractions of one HRTEM frame (module docstring)."""
    frame = np.asarray(frame)
    tile = settings.tile_px
    if frame.ndim == 2 and (frame.shape[0] < tile or frame.shape[1] < tile):
        empty = np.zeros((0, 0), dtype=np.uint8)
        reason = f"frame {frame.shape} smaller than one {tile} px tile"
        return PhaseMap(False, reason, empty, tile, (0, 0), {}, None)
    ratios, counts, geometry = tile_peak_ratios(frame, pixel_size_nm, table, settings)
    if not any(geometry.measurable):
        reason = f"{pixel_size_nm:g} nm/px is too coarse for the reflections of the table"
        labels = np.full(geometry.grid, TileClass.NO_DATA, dtype=np.uint8)
        return PhaseMap(False, reason, labels, tile, geometry.origin, ratios, None)
    labels = classify_tiles(ratios, table, settings.threshold)
    per_pixel = counts / float(tile * tile)
    enough = per_pixel >= settings.min_counts_per_pixel
    labels[~enough] = TileClass.NO_DATA
    fractions = phase_fractions(labels)
    presence = phase_presence(ratios, labels, table, settings.threshold)
    reason = ""
    if fractions is None:
        if not enough.any():
            most = float(np.nanmax(per_pixel)) if per_pixel.size else 0.0
            reason = (
                f"too few counts: at most {most:.2g} counts/px in a tile, the phase map needs "
                f"{settings.min_counts_per_pixel:g} (sum frames)"
            )
        else:
            reason = "no particle lattice identified in any tile"
    return PhaseMap(
        measurable=fractions is not None,
        reason=reason,
        labels=labels,
        tile_px=tile,
        origin=geometry.origin,
        peak_ratio=ratios,
        fractions=fractions,
        presence=presence,
    )


@measures("hrtem", PHASE_FRACTION, PHASE_PRESENCE)
def phase_shares(sum_: HrtemSum) -> Measured:
    """Per phase: its fraction and presence over the particle tiles of the sum's phase map;
    nothing at a result with no map due (the pipeline's cadence)."""
    mapped = sum_.phase_map
    if mapped is None:
        return Measured({})
    values: dict[str, float | None] = {}
    for quantity, shares in ((PHASE_FRACTION, mapped.fractions), (PHASE_PRESENCE, mapped.presence)):
        for phase in PHASES:
            values[quantity.key_for(phase)] = None if shares is None else float(shares[phase])
    return Measured(values, {} if mapped.fractions is not None else {"phase_map": mapped.reason})
