"""Previews to PNG for the web view."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grey (rows x cols) or RGBA (rows x cols x 4) image. Compression
    level 1: a preview is encoded once per version and sent to a few viewers, so encoding
    time matters more than the few percent of bytes a higher level saves."""
    image = np.ascontiguousarray(array)
    grey = image.ndim == 2
    rgba = image.ndim == 3 and image.shape[2] == 4
    if image.dtype != np.uint8 or not (grey or rgba):
        raise ValueError(f"not a uint8 grey or RGBA image: {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
