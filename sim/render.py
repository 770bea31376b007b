"""Renderer of simulated detector frames from the physical model (pure: no I/O, no clock).

The camera server captures a `Scene` (a few numbers) while it holds the station lock and draws
the frame from it after releasing the lock, so rendering never stalls the source-meter
simulator that shares the lock. `FrameRenderer.render` is deterministic for
(seed, frame_index, scene).

What a frame shows (SCIENCE.md; geometry from `NanobatteryModel.phase_at`, never re-derived):
- HRTEM mode: lattice fringes per phase. Layered LiNiO2 is one crystal with (003) 4.8 A strong,
  (101) 2.53 A and (006) 2.4 A weaker; the disordered band keeps a weakened (003) and adds the
  1.95 A reflection; rock salt NiO is polycrystalline (grains of ~5-10 nm, random orientation
  each, (111) 2.4 A, (200) 2.1 A, (220) 1.48 A) so its FFT shows rings. Vacuum is flat, the
  tungsten tip dark and amorphous. A fringe whose period is below `transfer_limit_px` pixels is
  not drawn (the optics cannot transfer it, and drawing it would alias), so the same code
  works at any magnification.
- Low-mag mode: mass-thickness contrast exp(-mu t), t the projected thickness of a sphere of the
  particle's present radius (so the particle grows with the model's expansion); mu is larger
  for rock salt (denser NiO) than for the layered phase, the disordered band in between; the
  tungsten needle is nearly opaque.
- Counts: expected counts per pixel = dose rate [e/A2/s] * pixel area [A2] * exposure [s]
  * contrast (vacuum = 1) * counts_scale, with shot noise. The default counts_scale of 1 is a
  counting detector (one count per electron) at the model's dose rate: about 87 counts per
  vacuum pixel in low mag and 0.3 in HRTEM at 35 e/A2/s and 40 frames/s, as real low-dose
  in situ movies have. Raise counts_scale for a higher SNR without changing the dose
  bookkeeping in the truth. Beam off gives an all-zero frame (a counting detector has no read
  noise).

Why it is shaped so (1024 x 1024 at 40 frames/s on a 2-core machine shared with the daemon):
- Pixels are processed in block layout (rows/b, cols/b, b, b). Labels come from `phase_at` at
  block corners; a block whose four corners agree takes that label whole and only blocks
  straddling a boundary are labelled pixel by pixel. All boundaries of the model are circles
  and lines far larger than a block, so this matches per-pixel labelling at a few % of the cost.
- HRTEM fringes depend only on where the field is, not on the state of the cell: one texture
  per phase is computed once per (pixel size, field centre) and frames are composited from them
  by label. The noise-free image is also reused while the scene's structure does not change.
- Drift (model.py `DriftLaw`): the specimen moves by the scene's `field_offset_nm`, so the
  field is drawn at the microscope's centre less that offset, exactly (fringes, grains and
  edges at their sub-pixel positions, the needle's edge pixels by the share it covers; the
  HRTEM tip's speckle alone is fixed to the pixels). A drifting field is a new field every
  frame: only the textures of the phases it shows are drawn, and the rock-salt grains are
  searched per pixel only where a grain boundary crosses a block. A 1024 x 1024 HRTEM frame
  then costs ~46 ms with one phase in the field, ~390 ms with three, above the 25 ms frame
  period (bench/README.md, drift); the still default reuses its textures as before.
- Noise comes from banks of variates generated once per renderer, read at an offset that
  depends on (seed, frame_index); see `_NoiseBank`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
from scipy import ndimage, stats
from scipy.spatial import cKDTree

from .model import CellParameters, NanobatteryModel, Phase
from .optics import ImagingMode, Optics

logger = logging.getLogger(__name__)

_N_PHASES = len(Phase)

# ----- contrast model (SCIENCE.md spacings; amplitudes and means are *model choices*) ---------


@dataclass(frozen=True)
class Reflection:
    """One set of lattice fringes: spacing, amplitude (fraction of the mean), direction."""

    name: str
    d_nm: float
    amplitude: float
    angle_deg: float  # direction of g relative to the crystal's reference direction


# Direction of the layered crystal's (003) normal in the image (fixed: one single crystal).
LAYERED_ORIENTATION_DEG = 20.0
# g(101) makes the angle acos(|g003/3| / |g101|) = acos(d101 / (3 d003)) with g(003), about 80 deg.
_ANGLE_101_DEG = math.degrees(math.acos(0.253 / (3 * 0.48)))

LAYERED_REFLECTIONS = (
    Reflection("(003)", 0.48, 0.30, 0.0),
    Reflection("(101)", 0.253, 0.12, _ANGLE_101_DEG),
    Reflection("(006)", 0.24, 0.10, 0.0),
)
# Ni in the Li slab weakens (003) and adds the 1.95 A reflection (its direction: model choice).
DISORDERED_REFLECTIONS = (
    Reflection("(003)", 0.48, 0.10, 0.0),
    Reflection("(101)", 0.253, 0.12, _ANGLE_101_DEG),
    Reflection("(006)", 0.24, 0.10, 0.0),
    Reflection("1.95 A", 0.195, 0.15, 35.0),
)
# Rock-salt NiO grains seen along <110>: (111), (200) at 54.74 deg and (220) at -35.26 deg.
ROCK_SALT_REFLECTIONS = (
    Reflection("(111)", 0.24, 0.20, 0.0),
    Reflection("(200)", 0.21, 0.20, 54.74),
    Reflection("(220)", 0.148, 0.12, -35.26),
)
ROCK_SALT_GRAIN_NM = 7.0  # spacing of the jittered grid of grain seeds: grains of ~5-10 nm

# HRTEM mean intensity of each phase relative to vacuum (scattering outside the aperture).
HRTEM_MEAN = {
    Phase.VACUUM: 1.0,
    Phase.LAYERED: 0.55,
    Phase.DISORDERED: 0.50,
    Phase.ROCK_SALT: 0.45,
    Phase.TIP: 0.05,
}
HRTEM_TIP_MOTTLE = 0.4  # relative amplitude of the tip's amorphous speckle
HRTEM_TIP_SPECKLE_NM = 0.15  # its correlation length

# Low-mag attenuation per nm of projected thickness. A 500 nm pristine particle transmits 35 %
# at its centre; NiO (6.7 g/cm3) is denser than LiNiO2 (4.8 g/cm3).
_MU_LAYERED = -math.log(0.35) / 500.0
LM_MU_PER_NM = {
    Phase.VACUUM: 0.0,
    Phase.LAYERED: _MU_LAYERED,
    Phase.DISORDERED: 1.12 * _MU_LAYERED,
    Phase.ROCK_SALT: 1.25 * _MU_LAYERED,
    Phase.TIP: 0.0,  # the needle uses LM_TIP_TRANSMISSION instead
}
LM_TIP_TRANSMISSION = 0.03  # tungsten: nearly opaque

DEFAULT_TRANSFER_LIMIT_PX = 2.2


def drawn_reflections(
    reflections: tuple[Reflection, ...], pixel_size_nm: float, transfer_limit_px: float
) -> tuple[Reflection, ...]:
    """The reflections whose fringe period spans at least `transfer_limit_px` pixels."""
    return tuple(r for r in reflections if r.d_nm / pixel_size_nm >= transfer_limit_px)


# ----- scene and truth -------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _particle_phase_fractions(params: CellParameters, x: float) -> dict[str, float]:
    # The fractions depend on the structure only (params, x); computing them on a detached
    # model runs the model's own code, so the truth is exactly model.phase_fractions().
    return NanobatteryModel(params=params, x=x).phase_fractions()


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one frame, captured under the station lock in microseconds."""

    time_s: float
    bias_volts: float
    current_amperes: float
    x: float
    front_position_nm: float
    front_velocity_nm_s: float
    expansion: float
    particle_radius_nm: float
    core_radius_nm: float
    tip_position_nm: float
    params: CellParameters
    mode: ImagingMode
    pixel_size_nm: float
    field_center_nm: tuple[float, float]
    beam_on: bool
    dose_rate_e_per_a2_s: float
    cumulative_dose_e_per_a2: float
    # Where the specimen has drifted to (model.field_offset_nm): the frame shows it displaced.
    field_offset_nm: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def capture(cls, model: NanobatteryModel, optics: Optics) -> Scene:
        """Copy the numbers a frame needs; call with the station lock held."""
        _, current, _ = model.terminal()
        return cls(
            time_s=model.time_s,
            bias_volts=model.applied_bias(),
            current_amperes=current,
            x=model.x,
            front_position_nm=model.front_position_nm,
            front_velocity_nm_s=model.front_velocity_nm_s(),
            expansion=model.expansion,
            particle_radius_nm=model.particle_radius_nm,
            core_radius_nm=model.core_radius_nm,
            tip_position_nm=model.tip_position_nm,
            params=model.params,
            mode=ImagingMode(optics.mode),
            pixel_size_nm=optics.pixel_size_nm,
            field_center_nm=tuple(optics.field_center_nm),
            beam_on=model.beam_on,
            dose_rate_e_per_a2_s=model.dose_rate_e_per_a2_s,
            cumulative_dose_e_per_a2=model.cumulative_dose_e_per_a2,
            field_offset_nm=model.field_offset_nm(),
        )

    @property
    def specimen_center_nm(self) -> tuple[float, float]:
        """The field's centre on the specimen (contact frame): the microscope's centre less
        the drift, so the specimen appears moved by +offset in the frame. Evaluated exactly,
        so fringes and edges move continuously (sub-pixel), not in whole pixels."""
        (cx, cy), (ox, oy) = self.field_center_nm, self.field_offset_nm
        return (cx - ox, cy - oy)

    @cached_property
    def structure(self) -> NanobatteryModel:
        """A detached model with this scene's structure, for `phase_at` outside the lock."""
        return NanobatteryModel(params=self.params, x=self.x, tip_position_nm=self.tip_position_nm)

    @cached_property
    def particle_phase_fractions(self) -> dict[str, float]:
        """model.phase_fractions() of the captured state, computed on first use (~1 ms)."""
        return dict(_particle_phase_fractions(self.params, self.x))

    def structure_key(self) -> tuple:
        """What the noise-free image depends on (besides the renderer's own settings)."""
        return (
            self.mode,
            self.pixel_size_nm,
            self.specimen_center_nm,
            self.params,
            self.x,
            self.tip_position_nm,
        )


@dataclass(frozen=True)
class FrameTruth:
    """Ground truth of one frame, for the image message's user_data."""

    time_s: float
    bias_volts: float
    current_amperes: float
    x: float
    front_position_nm: float
    front_velocity_nm_s: float
    expansion: float
    particle_phase_fractions: dict[str, float]
    field_phase_fractions: dict[str, float]
    mode: str
    pixel_size_nm: float
    dose_e_per_a2: float
    cumulative_dose_e_per_a2: float
    drift_x_nm: float = 0.0  # the field's true offset (Scene.field_offset_nm)
    drift_y_nm: float = 0.0

    def to_dict(self) -> dict:
        """Plain floats, strings and dicts: encodable as JSON and CBOR."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, dict):
                out[key] = {str(k): float(v) for k, v in value.items()}
            elif isinstance(value, (int, float, np.floating)) and not isinstance(value, bool):
                out[key] = float(value)
        out["mode"] = str(self.mode)
        return out


# ----- helpers ---------------------------------------------------------------------------------


def _hash_uniform(seed: int, i: np.ndarray, j: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) floats from integer coordinates: splitmix64 of (seed, i, j, salt).

    Grain seeds are a function of their cell in the contact frame, not of the field, so panning
    or zooming shows the same grains in the same places.
    """
    with np.errstate(over="ignore"):
        z = (
            np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
            + np.asarray(i, dtype=np.int64).astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
            + np.asarray(j, dtype=np.int64).astype(np.uint64) * np.uint64(0xABC98388FB8FAC03)
            + np.uint64(salt) * np.uint64(0x8CB92BA72F3D8DD7)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _block_size(shape: tuple[int, int]) -> int:
    for size in (8, 4, 2):
        if shape[0] % size == 0 and shape[1] % size == 0:
            return size
    return 1


class _FieldGrid:
    """Pixel positions of one field of view, in block layout, relative to the field centre."""

    def __init__(self, shape: tuple[int, int], block: int, pixel_nm: float, center_nm: tuple):
        rows, cols = shape
        self.shape, self.block, self.pixel_nm = shape, block, pixel_nm
        self.center_nm = (float(center_nm[0]), float(center_nm[1]))
        self.blocks = (rows // block, cols // block)
        self.full_shape = (*self.blocks, block, block)
        col = (np.arange(cols) - cols / 2 + 0.5) * pixel_nm
        row = (np.arange(rows) - rows / 2 + 0.5) * pixel_nm
        # Offsets from the field centre, float32, broadcastable to (rows/b, cols/b, b, b).
        self.x_rel = col.reshape(1, self.blocks[1], 1, block).astype(np.float32)
        self.y_rel = row.reshape(self.blocks[0], 1, block, 1).astype(np.float32)
        # Block corners in the contact frame (pixel edges shared by neighbouring blocks).
        self.x_corners = (
            self.center_nm[0] + (np.arange(self.blocks[1] + 1) * block - cols / 2) * pixel_nm
        )
        self.y_corners = (
            self.center_nm[1] + (np.arange(self.blocks[0] + 1) * block - rows / 2) * pixel_nm
        )

    def contact_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Full arrays of contact-frame x and y (nm, float64) in block layout."""
        x = self.x_rel.astype(np.float64) + self.center_nm[0]
        y = self.y_rel.astype(np.float64) + self.center_nm[1]
        return np.broadcast_to(x, self.full_shape), np.broadcast_to(y, self.full_shape)

    def to_raster(self, blocks: np.ndarray) -> np.ndarray:
        """Block layout (rows/b, cols/b, b, b) -> a new C-contiguous (rows, cols) array."""
        return blocks.transpose(0, 2, 1, 3).reshape(self.shape)


@dataclass
class _Labels:
    """Phase labels of a field: per block where uniform, per pixel in the boundary blocks."""

    block_labels: np.ndarray  # (rows/b, cols/b) uint8; the top-left corner's for boundary blocks
    boundary_rows: np.ndarray  # block indices of the boundary blocks
    boundary_cols: np.ndarray
    boundary_labels: np.ndarray  # (n, b, b) uint8 per-pixel labels of those blocks

    def fractions(self, block: int) -> dict[str, float]:
        counts = np.bincount(self.block_labels.ravel(), minlength=_N_PHASES) * block * block
        if self.boundary_rows.size:
            counts -= np.bincount(
                self.block_labels[self.boundary_rows, self.boundary_cols], minlength=_N_PHASES
            ) * (block * block)
            counts += np.bincount(self.boundary_labels.ravel(), minlength=_N_PHASES)
        total = counts.sum()
        return {phase.name.lower(): float(counts[phase] / total) for phase in Phase}


def _label_field(structure: NanobatteryModel, grid: _FieldGrid) -> _Labels:
    corners = structure.phase_at(grid.x_corners[None, :], grid.y_corners[:, None])
    top_left = corners[:-1, :-1]
    uniform = (
        (top_left == corners[:-1, 1:])
        & (top_left == corners[1:, :-1])
        & (top_left == corners[1:, 1:])
    )
    rows, cols = np.nonzero(~uniform)
    x = grid.x_rel[0, cols, 0, :].astype(np.float64) + grid.center_nm[0]  # (n, b)
    y = grid.y_rel[rows, 0, :, 0].astype(np.float64) + grid.center_nm[1]
    pixel_labels = structure.phase_at(x[:, None, :], y[:, :, None])
    return _Labels(
        np.ascontiguousarray(top_left), rows, cols, pixel_labels.reshape(-1, grid.block, grid.block)
    )


# ----- HRTEM textures --------------------------------------------------------------------------


def _add_fringes(
    out: np.ndarray,
    grid: _FieldGrid,
    reflections: tuple[Reflection, ...],
    orientation_deg: float,
) -> None:
    """out += a cos(2 pi g.r + phi) for one crystal of fixed orientation (phase tied to the
    contact frame, so moving the field pans the lattice)."""
    cx, cy = grid.center_nm
    for refl in reflections:
        angle = math.radians(orientation_deg + refl.angle_deg)
        gx, gy = math.cos(angle) / refl.d_nm, math.sin(angle) / refl.d_nm
        phase0 = 2 * math.pi * ((gx * cx + gy * cy) % 1.0)
        px = (2 * math.pi * gx) * grid.x_rel + np.float32(phase0)
        py = (2 * math.pi * gy) * grid.y_rel
        arg = px + py
        np.cos(arg, out=arg)
        arg *= np.float32(refl.amplitude)
        out += arg


def _grain_map(tree: cKDTree, grid: _FieldGrid) -> np.ndarray:
    """Index of the nearest grain seed of every pixel, in block layout. As the phase labels
    (`_label_field`): a block whose four corners have one grain takes it whole, and only the
    blocks a grain boundary crosses (~15 % at 0.06 nm/px, grains ~120 px across) are searched
    pixel by pixel: 6x cheaper than searching every pixel, which a drifting field does every
    frame."""
    xc, yc = np.meshgrid(grid.x_corners, grid.y_corners)
    _, corners = tree.query(np.column_stack((xc.ravel(), yc.ravel())), workers=1)
    corners = corners.reshape(xc.shape)
    top_left = corners[:-1, :-1]
    uniform = (
        (top_left == corners[:-1, 1:])
        & (top_left == corners[1:, :-1])
        & (top_left == corners[1:, 1:])
    )
    grain = np.empty(grid.full_shape, dtype=np.intp)
    grain[...] = top_left[:, :, None, None]
    rows, cols = np.nonzero(~uniform)
    if rows.size:
        b = grid.block
        x = grid.x_rel[0, cols, 0, :].astype(np.float64) + grid.center_nm[0]  # (n, b)
        y = grid.y_rel[rows, 0, :, 0].astype(np.float64) + grid.center_nm[1]
        xs = np.broadcast_to(x[:, None, :], (rows.size, b, b))
        ys = np.broadcast_to(y[:, :, None], (rows.size, b, b))
        _, nearest = tree.query(np.column_stack((xs.ravel(), ys.ravel())), workers=1)
        grain[rows, cols] = nearest.reshape(rows.size, b, b)
    return grain


def _rock_salt_texture(
    grid: _FieldGrid, reflections: tuple[Reflection, ...], seed: int
) -> np.ndarray:
    """1 + sum of fringes of a polycrystal: Voronoi grains from a jittered grid of seeds."""
    full = grid.full_shape
    texture = np.ones(full, dtype=np.float32)
    if not reflections:
        return texture
    cell = ROCK_SALT_GRAIN_NM
    x_min, x_max = grid.x_corners[0], grid.x_corners[-1]
    y_min, y_max = grid.y_corners[0], grid.y_corners[-1]
    i = np.arange(math.floor(x_min / cell) - 2, math.floor(x_max / cell) + 3)
    j = np.arange(math.floor(y_min / cell) - 2, math.floor(y_max / cell) + 3)
    ii, jj = (a.ravel() for a in np.meshgrid(i, j))
    seeds = np.column_stack(
        ((ii + _hash_uniform(seed, ii, jj, 1)) * cell, (jj + _hash_uniform(seed, ii, jj, 2)) * cell)
    )
    grain = _grain_map(cKDTree(seeds), grid)
    theta = np.pi * _hash_uniform(seed, ii, jj, 3)
    cx, cy = grid.center_nm
    for k, refl in enumerate(reflections):
        angle = theta + math.radians(refl.angle_deg)
        gx, gy = np.cos(angle) / refl.d_nm, np.sin(angle) / refl.d_nm
        phase0 = 2 * np.pi * (((gx * cx + gy * cy) + _hash_uniform(seed, ii, jj, 10 + k)) % 1.0)
        amplitude = refl.amplitude * (0.6 + 0.4 * _hash_uniform(seed, ii, jj, 20 + k))
        arg = (2 * np.pi * gx).astype(np.float32)[grain] * grid.x_rel
        arg += (2 * np.pi * gy).astype(np.float32)[grain] * grid.y_rel
        arg += phase0.astype(np.float32)[grain]
        np.cos(arg, out=arg)
        arg *= amplitude.astype(np.float32)[grain]
        texture += arg
    return texture


def _tip_texture(grid: _FieldGrid, seed: int) -> np.ndarray:
    """Amorphous speckle: smoothed white noise at the resolution limit."""
    rng = np.random.default_rng([seed, 0x7195])
    sigma_px = max(1.0, HRTEM_TIP_SPECKLE_NM / grid.pixel_nm)
    rows, cols = grid.shape
    speckle = ndimage.gaussian_filter(rng.standard_normal((rows, cols), dtype=np.float32), sigma_px)
    speckle *= np.float32(1.0 / max(float(speckle.std()), 1e-12))
    b = grid.block
    speckle = speckle.reshape(rows // b, b, cols // b, b).transpose(0, 2, 1, 3)
    return 1.0 + np.float32(HRTEM_TIP_MOTTLE) * np.clip(speckle, -2.0, 2.0)


@dataclass
class _Textures:
    """The HRTEM image each phase would give in one field, (phases, rows/b, cols/b, b, b)
    float32, drawn on first use: a drifting field is a new field every frame, and most fields
    show one or two phases (the rock-salt grains alone are ~70 % of drawing all five)."""

    array: np.ndarray
    drawn: set[int] = field(default_factory=set)

    def of(
        self, grid: _FieldGrid, seed: int, transfer_limit_px: float, phases: set[int]
    ) -> np.ndarray:
        for phase in sorted(phases - self.drawn):
            self.array[phase] = _hrtem_texture(grid, seed, transfer_limit_px, Phase(phase))
            self.drawn.add(phase)
        return self.array


def _hrtem_texture(
    grid: _FieldGrid, seed: int, transfer_limit_px: float, phase: Phase
) -> np.ndarray:
    """(rows/b, cols/b, b, b) float32: the HRTEM image `phase` would give here."""
    pixel = grid.pixel_nm
    if phase == Phase.VACUUM:
        return np.full(grid.full_shape, HRTEM_MEAN[Phase.VACUUM], dtype=np.float32)
    if phase in (Phase.LAYERED, Phase.DISORDERED):
        reflections = LAYERED_REFLECTIONS if phase == Phase.LAYERED else DISORDERED_REFLECTIONS
        texture = np.ones(grid.full_shape, dtype=np.float32)
        _add_fringes(
            texture,
            grid,
            drawn_reflections(reflections, pixel, transfer_limit_px),
            LAYERED_ORIENTATION_DEG,
        )
    elif phase == Phase.ROCK_SALT:
        texture = _rock_salt_texture(
            grid, drawn_reflections(ROCK_SALT_REFLECTIONS, pixel, transfer_limit_px), seed
        )
    else:
        texture = _tip_texture(grid, seed)
    texture *= np.float32(HRTEM_MEAN[phase])
    return texture


# ----- noise -----------------------------------------------------------------------------------


class _NoiseBank:
    """Variates generated once and read at a per-frame offset.

    Fresh variates cost too much for 40 frames/s of 1024 x 1024 on one core (measured here:
    8.5 ms for 1M float32 normals, 19 ms for 1M Poisson draws at low mean, 35 ms at high mean,
    against a 15 ms budget for the whole frame). A bank of `pixels + period` variates read from
    offset (start + frame_index * stride) mod period, with period prime, gives every frame
    index below `period` its own offset and every pixel a different variate in every frame, so
    per-pixel statistics over time are those of fresh noise. Frames are shifted windows of the
    same bank: cross-correlating the noise of two frames would find the shift, nothing else
    in an image tells them from fresh noise.
    """

    U_BITS = 12  # uniform variates quantised to 4096 levels: probabilities good to 2.4e-4

    def __init__(self, pixels: int, seed: int) -> None:
        self.pixels = pixels
        self.period = _prime_at_least(max(pixels, 4099))
        self.stride = 0x9E3779B1 % self.period or 1
        self.start = int(_hash_uniform(seed, np.int64(0), np.int64(0), 99) * self.period)
        self._seed = seed
        self._normal: np.ndarray | None = None
        self._uniform: np.ndarray | None = None

    def offset(self, frame_index: int) -> int:
        return (self.start + frame_index * self.stride) % self.period

    def normal(self, frame_index: int) -> np.ndarray:
        if self._normal is None:
            rng = np.random.default_rng([self._seed, 1])
            self._normal = rng.standard_normal(self.pixels + self.period, dtype=np.float32)
        o = self.offset(frame_index)
        return self._normal[o : o + self.pixels]

    def uniform_levels(self, frame_index: int) -> np.ndarray:
        if self._uniform is None:
            rng = np.random.default_rng([self._seed, 2])
            size = self.pixels + self.period
            self._uniform = rng.integers(0, 1 << self.U_BITS, size, dtype=np.uint16)
        o = self.offset(frame_index)
        return self._uniform[o : o + self.pixels]


def _prime_at_least(n: int) -> int:
    candidate = n | 1
    while any(candidate % p == 0 for p in range(3, math.isqrt(candidate) + 1, 2)):
        candidate += 2
    return candidate


# Mean counts at or below which noise is drawn from a (quantised) Poisson inverse CDF table;
# above it, the normal approximation lambda + sqrt(lambda) z is accurate enough.
POISSON_TABLE_MAX_COUNTS = 32.0
_LAMBDA_LEVELS = 256


@lru_cache(maxsize=8)
def _poisson_table(lambda_top: float) -> np.ndarray:
    """Flat uint16 table: k = table[level << U_BITS | u] is the Poisson(lambda) inverse CDF at
    lambda = lambda_top * level / 255 and probability (u + 0.5) / 4096."""
    lambdas = lambda_top * np.arange(_LAMBDA_LEVELS) / (_LAMBDA_LEVELS - 1)
    k_max = math.ceil(lambda_top + 10 * math.sqrt(lambda_top) + 10)
    cdf = stats.poisson.cdf(np.arange(k_max + 1)[None, :], lambdas[:, None])
    probs = (np.arange(1 << _NoiseBank.U_BITS) + 0.5) / (1 << _NoiseBank.U_BITS)
    table = np.empty((_LAMBDA_LEVELS, probs.size), dtype=np.uint16)
    for level in range(_LAMBDA_LEVELS):
        table[level] = np.minimum(np.searchsorted(cdf[level], probs, side="right"), k_max)
    return table.ravel()


# ----- the renderer ----------------------------------------------------------------------------


class FrameRenderer:
    """Draws uint16 frames of `shape` from scenes. One per camera thread (caches are not locked).

    counts_scale multiplies the expected counts (and so the SNR, as sqrt) without changing the
    dose reported in the truth; 1.0 is a counting detector at the model's dose (module doc).
    """

    def __init__(
        self,
        shape: tuple[int, int] = (1024, 1024),
        seed: int = 0,
        counts_scale: float = 1.0,
        transfer_limit_px: float = DEFAULT_TRANSFER_LIMIT_PX,
    ) -> None:
        rows, cols = (int(shape[0]), int(shape[1]))
        if rows <= 0 or cols <= 0:
            raise ValueError(f"bad frame shape {shape}")
        if counts_scale <= 0:
            raise ValueError("counts_scale must be positive")
        self.shape = (rows, cols)
        self.seed = int(seed)
        self.counts_scale = float(counts_scale)
        self.transfer_limit_px = float(transfer_limit_px)
        self.block = _block_size(self.shape)
        self._noise = _NoiseBank(rows * cols, self.seed)
        self._grid: _FieldGrid | None = None
        self._textures: _Textures | None = None
        # Recent fields with their HRTEM textures, so toggling LM <-> HRTEM does not redraw them.
        self._fields: dict[tuple, tuple[_FieldGrid, _Textures | None]] = {}
        self._mean_key: tuple | None = None
        self._mean: np.ndarray | None = None  # noise-free contrast, block layout
        self._mean_max = 0.0
        self._field_fractions: dict[str, float] = {}
        self._prepared_key: tuple | None = None
        self._prepared: tuple[np.ndarray, ...] = ()

    # ----- public ----------------------------------------------------------------------------
    def render(
        self, scene: Scene, exposure_s: float, frame_index: int
    ) -> tuple[np.ndarray, FrameTruth]:
        """uint16 frame of `shape` (rows, cols) and its truth; deterministic for
        (seed, frame_index, scene)."""
        if not exposure_s >= 0.0 or math.isinf(exposure_s):
            raise ValueError(f"exposure must be finite and >= 0 s, not {exposure_s!r}")
        self._update_mean(scene)
        dose = scene.dose_rate_e_per_a2_s * exposure_s if scene.beam_on else 0.0
        pixel_area_a2 = (scene.pixel_size_nm * 10.0) ** 2
        counts_per_contrast = dose * pixel_area_a2 * self.counts_scale
        if counts_per_contrast > 0.0 and self._mean_max > 0.0:
            frame = self._grid.to_raster(self._noisy(counts_per_contrast, frame_index))
        else:
            frame = np.zeros(self.shape, dtype=np.uint16)  # counting detector: no read noise
        truth = FrameTruth(
            time_s=scene.time_s,
            bias_volts=scene.bias_volts,
            current_amperes=scene.current_amperes,
            x=scene.x,
            front_position_nm=scene.front_position_nm,
            front_velocity_nm_s=scene.front_velocity_nm_s,
            expansion=scene.expansion,
            particle_phase_fractions=scene.particle_phase_fractions,
            field_phase_fractions=dict(self._field_fractions),
            mode=ImagingMode(scene.mode).value,
            pixel_size_nm=scene.pixel_size_nm,
            dose_e_per_a2=dose,
            cumulative_dose_e_per_a2=scene.cumulative_dose_e_per_a2,
            drift_x_nm=scene.field_offset_nm[0],
            drift_y_nm=scene.field_offset_nm[1],
        )
        return frame, truth

    def expected_counts(self, scene: Scene, exposure_s: float) -> np.ndarray:
        """The noise-free expectation of `render`'s frame (float32 counts, raster layout)."""
        self._update_mean(scene)
        dose = scene.dose_rate_e_per_a2_s * exposure_s if scene.beam_on else 0.0
        scale = dose * (scene.pixel_size_nm * 10.0) ** 2 * self.counts_scale
        return self._grid.to_raster(self._mean * np.float32(scale))

    # ----- noise-free image ------------------------------------------------------------------
    def _update_mean(self, scene: Scene) -> None:
        key = scene.structure_key()
        if key == self._mean_key:
            return
        self._select_field(scene.pixel_size_nm, scene.specimen_center_nm)
        grid = self._grid
        labels = _label_field(scene.structure, grid)
        if scene.mode == ImagingMode.HRTEM:
            mean = self._hrtem_mean(grid, labels)
        else:
            mean = self._low_mag_mean(grid, labels, scene)
        self._mean, self._mean_key = mean, key
        self._mean_max = float(mean.max())
        self._field_fractions = labels.fractions(grid.block)

    def _select_field(self, pixel_nm: float, center_nm: tuple[float, float]) -> None:
        key = (pixel_nm, center_nm)
        grid = self._grid
        if grid is not None and (grid.pixel_nm, grid.center_nm) == key:
            return
        if grid is not None:
            self._fields[(grid.pixel_nm, grid.center_nm)] = (grid, self._textures)
        cached = self._fields.pop(key, None)
        if cached is None:
            cached = (_FieldGrid(self.shape, self.block, pixel_nm, center_nm), None)
            logger.debug("new field: %s nm/px centred at %s nm", pixel_nm, center_nm)
        self._grid, self._textures = cached
        while len(self._fields) > 2:
            self._fields.pop(next(iter(self._fields)))

    def _hrtem_mean(self, grid: _FieldGrid, labels: _Labels) -> np.ndarray:
        if self._textures is None:
            self._textures = _Textures(np.empty((_N_PHASES, *grid.full_shape), dtype=np.float32))
        shown = set(np.unique(labels.block_labels).tolist())
        shown.update(np.unique(labels.boundary_labels).tolist())
        textures = self._textures.of(grid, self.seed, self.transfer_limit_px, shown)
        rows = np.arange(grid.blocks[0])[:, None]
        cols = np.arange(grid.blocks[1])[None, :]
        mean = textures[labels.block_labels, rows, cols]
        if labels.boundary_rows.size:
            b = np.arange(grid.block)
            br = labels.boundary_rows[:, None, None]
            bc = labels.boundary_cols[:, None, None]
            mean[labels.boundary_rows, labels.boundary_cols] = textures[
                labels.boundary_labels, br, bc, b[None, :, None], b[None, None, :]
            ]
        return mean

    def _low_mag_mean(self, grid: _FieldGrid, labels: _Labels, scene: Scene) -> np.ndarray:
        """exp(-mu t), t = projected thickness of a sphere of the particle's present radius."""
        radius = scene.particle_radius_nm
        mu = np.array([LM_MU_PER_NM[p] for p in Phase], dtype=np.float32)
        # Particle centre is (radius, 0) in the contact frame (model.py).
        dx = grid.x_rel + np.float32(grid.center_nm[0] - radius)
        dy = grid.y_rel + np.float32(grid.center_nm[1])
        dx *= dx
        dy *= dy
        half = dx + dy  # r^2, full block layout
        np.subtract(np.float32(radius * radius), half, out=half)
        np.maximum(half, 0.0, out=half)
        np.sqrt(half, out=half)  # half the projected thickness

        def transmission(lab: np.ndarray, half_t: np.ndarray) -> np.ndarray:
            out = (-2.0 * mu)[lab] * half_t
            np.exp(out, out=out)
            return out

        block_labels = labels.block_labels
        mean = transmission(block_labels[:, :, None, None], half)
        mean[block_labels == Phase.TIP] = LM_TIP_TRANSMISSION
        if labels.boundary_rows.size:
            r, c = labels.boundary_rows, labels.boundary_cols
            values = transmission(labels.boundary_labels, half[r, c])
            # The needle's edge pixels are as transparent as the share of them it covers
            # (from the distance of their centre to its outline), so the needle moves
            # continuously, not pixel by pixel, when the field drifts.
            x = grid.x_rel[0, c, 0, :].astype(np.float64) + grid.center_nm[0]  # (n, b)
            y = grid.y_rel[r, 0, :, 0].astype(np.float64) + grid.center_nm[1]
            outside = scene.structure.tip_outside_nm(x[:, None, :], y[:, :, None])
            covered = np.clip(0.5 - outside / np.float32(grid.pixel_nm), 0.0, 1.0)
            clear = np.isin(labels.boundary_labels, (Phase.VACUUM, Phase.TIP))
            values[clear] = (1.0 - (1.0 - LM_TIP_TRANSMISSION) * covered)[clear]
            mean[r, c] = values
        return mean

    # ----- shot noise ------------------------------------------------------------------------
    def _noisy(self, counts_per_contrast: float, frame_index: int) -> np.ndarray:
        """Poisson-distributed counts with mean counts_per_contrast * mean, block layout."""
        lam_max = counts_per_contrast * self._mean_max
        key = (self._mean_key, counts_per_contrast)
        blocks_shape = self._mean.shape
        if lam_max <= POISSON_TABLE_MAX_COUNTS:
            # Exact Poisson (to the quantisation) where the normal approximation fails.
            if key != self._prepared_key:
                lam_top = 2.0 ** (math.ceil(4 * math.log2(max(lam_max, 2**-8))) / 4)
                scale = counts_per_contrast * (_LAMBDA_LEVELS - 1) / lam_top
                level = self._mean * np.float32(scale)
                level += np.float32(0.5)
                index_base = level.astype(np.int32)
                index_base <<= _NoiseBank.U_BITS
                self._prepared_key, self._prepared = key, (index_base, _poisson_table(lam_top))
            index_base, table = self._prepared
            index = index_base + self._noise.uniform_levels(frame_index).reshape(blocks_shape)
            return table.take(index)
        if key != self._prepared_key:
            mean_counts = self._mean * np.float32(counts_per_contrast)
            sigma = np.sqrt(mean_counts)
            mean_counts += np.float32(0.5)  # round to nearest on the cast below
            self._prepared_key, self._prepared = key, (mean_counts, sigma)
        mean_counts, sigma = self._prepared
        counts = self._noise.normal(frame_index).reshape(blocks_shape) * sigma
        counts += mean_counts
        np.clip(counts, 0.0, 65535.0, out=counts)
        return counts.astype(np.uint16)
