"""Segmentation labels, one owner: the ignore index and how class-id masks are drawn (numpy only, so the
deploy side can use it too)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import DataError

IGNORE_INDEX = 255  # mask pixels without a label: skipped by losses and metrics
IGNORE_COLOUR = (0, 0, 0)  # how every drawing shows them (palettes avoid pure black for classes)


def colorize(mask: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Map an (H, W) class-id mask to an (H, W, 3) uint8 RGB image; IGNORE_INDEX gets IGNORE_COLOUR."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise DataError(f"mask must hold integer class ids, got dtype {mask.dtype}")
    pal = np.asarray(palette, dtype=np.int64)
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.size == 0:
        raise DataError(f"palette must be a non-empty list of (r, g, b) triples, got shape {pal.shape}")
    ids = mask.astype(np.int64)
    valid = ids[ids != IGNORE_INDEX]
    n = min(len(pal), IGNORE_INDEX)  # a 256-colour palette must not recolour the ignore index
    if valid.size and (valid.min() < 0 or valid.max() >= n):
        bad = int(valid.min() if valid.min() < 0 else valid.max())
        raise DataError(f"mask has class id {bad} but the palette has only {n} colours")
    # Look-up table indexing colours every pixel in one vectorised step.
    lut = np.zeros((IGNORE_INDEX + 1, 3), np.uint8)
    lut[:n] = np.clip(pal[:n], 0, 255)
    lut[IGNORE_INDEX] = IGNORE_COLOUR
    return lut[np.clip(ids, 0, IGNORE_INDEX)]
