"""Segmentation labels, one owner: the ignore index and how class-id masks are drawn, with which colours
(numpy only, so the deploy side can use it too).

Two palettes: `PALETTE`, 256 colours for any model's class ids (predict overlays, report panels), and
`AERIAL_PALETTE`, the generated aerial data set's own. `palette_for` decides which one a drawing uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from .errors import DataError

IGNORE_INDEX = 255  # mask pixels without a label: skipped by losses and metrics
IGNORE_COLOUR = (0, 0, 0)  # how every drawing shows them (palettes avoid pure black for classes)


# Overlay colours: 14 hand-picked, well-separated colours (the ids of a 14-class model), then a hashed
# colour per higher id so every id maps to the same colour in every run and on every machine.
_BASE_COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (128, 0, 0),
]


def _generic_palette() -> np.ndarray:
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(_BASE_COLOURS)] = _BASE_COLOURS
    for i in range(len(_BASE_COLOURS), IGNORE_INDEX):
        pal[i] = list(hashlib.sha256(f"vitshrink-class-{i}".encode()).digest()[:3])
    pal[IGNORE_INDEX] = IGNORE_COLOUR
    return pal


PALETTE: np.ndarray = _generic_palette()  # (256, 3) uint8, indexed by class id: any model's masks


# The generated aerial data set's colours (one per class id, in data.aerial.CLASSES order).
AERIAL_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),  # background
    (170, 140, 255),  # avalanche
    (240, 200, 0),  # building_undamaged
    (220, 20, 40),  # building_damaged
    (255, 0, 255),  # cracks_fissures
    (0, 70, 230),  # flooding
    (0, 230, 230),  # ice_jam
    (140, 80, 30),  # mudslide
    (128, 128, 128),  # road
    (245, 225, 160),  # sand
    (255, 110, 0),  # smoke_fire
    (255, 255, 255),  # snow
    (0, 150, 0),  # tree
    (255, 150, 200),  # water_vehicle_person
)


def palette_for(classes: int, data: str | None = None) -> list[tuple[int, int, int]]:
    """The colours of class ids 0..classes-1: the aerial data set's own for `data` "aerial" (when the
    model's classes fit in it), else the generic `PALETTE`'s."""
    if data == "aerial" and classes <= len(AERIAL_PALETTE):
        return list(AERIAL_PALETTE)
    return [(int(r), int(g), int(b)) for r, g, b in PALETTE[:classes]]


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
