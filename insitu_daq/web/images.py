"""Previews as images: a frame sum, its power spectrum with the tracked rings, the phase map.

Each preview is encoded once, whatever the number of viewers (docs/WEB.md). The pixels come
from analysis/display.py, which the report figure uses too. Frames and spectra are JPEG: a
low-dose frame is mostly shot noise, which PNG cannot compress (a 512 x 512 PNG took 60 ms
and ~200 kB, the JPEG takes ~3 ms and ~60 kB). The phase map is PNG: it needs transparency,
and its flat tiles compress well.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from insitu_daq.analysis.display import (
    ring_radius_fraction,
    scale_bar,
    shown_frame,
    spectrum_image,
    spectrum_reach,
    stretch,
)
from insitu_daq.analysis.phasemap import TileClass
from insitu_daq.analysis.reflections import ReflectionTable

MAX_SIDE = 512  # px a side of a preview as shown; `full=1` gives the frame's own size
HRTEM_SMOOTHING_PX = 0.8

# The phase map's colours, as in matplotlib's tab10 (the report figure's phase lines).
PHASE_COLOURS: dict[TileClass, tuple[int, int, int, int]] = {
    TileClass.LAYERED: (31, 119, 180, 130),
    TileClass.DISORDERED: (255, 127, 14, 130),
    TileClass.ROCK_SALT: (214, 39, 40, 150),
    TileClass.UNRESOLVED: (160, 160, 160, 50),
}
PHASE_LEGEND = [
    {"phase": tile.name.lower(), "colour": "#{:02x}{:02x}{:02x}".format(*rgba[:3])}
    for tile, rgba in PHASE_COLOURS.items()
]


JPEG_QUALITY = 88


def encode_jpeg(array: np.ndarray) -> bytes:
    """JPEG bytes of a uint8 gray (H, W) array."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 gray (H, W) or RGBA (H, W, 4) array. Compression level 1: a
    512 x 512 preview in ~5 ms, where the default level takes ~4x longer for ~10 % fewer bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def frame_jpeg(
    image: np.ndarray, full: bool = False, smoothing_px: float = 0.0
) -> tuple[bytes, tuple[int, int]]:
    """(JPEG of the frame sum as shown (analysis/display.py shown_frame), its shape)."""
    shown = shown_frame(image, None if full else MAX_SIDE, smoothing_px)
    return encode_jpeg(shown), (int(shown.shape[0]), int(shown.shape[1]))


def smoothing_of(mode: str) -> float:
    """The preview smoothing of an imaging mode, shown px (display.shown_frame says why)."""
    return HRTEM_SMOOTHING_PX if mode == "hrtem" else 0.0


def frame_meta(image: np.ndarray, pixel_nm: float, shown_shape: tuple[int, int]) -> dict[str, Any]:
    rows, cols = image.shape
    length_nm, fraction = scale_bar(pixel_nm, cols)
    return {
        "shape": [rows, cols],
        "shown_shape": list(shown_shape),
        "pixel_nm": pixel_nm,
        "scale_bar": {"length_nm": length_nm, "fraction": fraction},
    }


def spectrum_jpeg(
    image: np.ndarray, pixel_nm: float, table: ReflectionTable
) -> tuple[bytes, dict[str, Any]]:
    """(JPEG of the HRTEM sum's power spectrum, meta: its q reach and the table's rings)."""
    spectrum, q_max = spectrum_image(image, pixel_nm, spectrum_reach(table), MAX_SIDE)
    rings = [
        {
            "name": reflection.name,
            "label": reflection.label,
            "d_angstrom": reflection.d_angstrom,
            "phase": reflection.phase,
            "radius_fraction": ring_radius_fraction(reflection.d_angstrom, q_max),
        }
        for reflection in table
    ]
    return encode_jpeg(stretch(spectrum, 1.0, 99.9)), {"q_max_per_nm": q_max, "rings": rings}


def phase_overlay(
    labels: np.ndarray,
    tile_px: int,
    origin: tuple[int, int],
    frame_shape: tuple[int, int],
    shown_shape: tuple[int, int],
) -> np.ndarray:
    """The phase map as RGBA, the size of the shown frame: each tile its phase's colour,
    everything else transparent. Built at the shown size (nearest neighbour keeps the tiles'
    edges sharp), not at the frame's."""
    lut = np.zeros((256, 4), np.uint8)
    for tile, rgba in PHASE_COLOURS.items():
        lut[int(tile)] = rgba
    tiles_r = _tile_index(shown_shape[0], frame_shape[0], origin[0], tile_px, labels.shape[0])
    tiles_c = _tile_index(shown_shape[1], frame_shape[1], origin[1], tile_px, labels.shape[1])
    overlay = lut[np.asarray(labels, np.uint8)[np.ix_(np.clip(tiles_r, 0, None),
                                                      np.clip(tiles_c, 0, None))]]  # fmt: skip
    overlay[tiles_r < 0] = 0
    overlay[:, tiles_c < 0] = 0
    return overlay


def _tile_index(shown: int, frame: int, origin: int, tile_px: int, tiles: int) -> np.ndarray:
    """The tile each shown pixel falls in along one axis (-1: outside the map)."""
    frame_px = (np.arange(shown) * (frame / shown)).astype(np.int64)
    index = (frame_px - origin) // tile_px
    index[(frame_px < origin) | (index >= tiles)] = -1
    return index
