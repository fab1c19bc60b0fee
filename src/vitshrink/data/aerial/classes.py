"""The aerial data set's spec: class names and ids, mask colours, normalisation, cache version and
the argument checks every entry point shares."""

from __future__ import annotations

import numpy as np

from ...errors import VitshrinkError
from ...labels import AERIAL_PALETTE

# Bump whenever rendering changes: it is part of the cache key, so stale caches are never reused.
VERSION = 1

CLASSES: tuple[str, ...] = (
    "background",
    "avalanche",
    "building_undamaged",
    "building_damaged",
    "cracks_fissures",
    "flooding",
    "ice_jam",
    "mudslide",
    "road",
    "sand",
    "smoke_fire",
    "snow",
    "tree",
    "water_vehicle_person",
)
NUM_CLASSES = len(CLASSES)

PALETTE = AERIAL_PALETTE  # mask colours, one per class id (owned by vitshrink.labels)

# Per-channel mean/std of rendered images (0..1 scale), measured over 200 samples at 128 px (seeds
# 0..199); suitable for the "preprocess" metadata of models trained on this data.
MEAN: tuple[float, float, float] = (0.571, 0.557, 0.473)
STD: tuple[float, float, float] = (0.232, 0.221, 0.259)

(
    _BG,
    _AVALANCHE,
    _BUILDING,
    _DAMAGED,
    _CRACK,
    _FLOOD,
    _ICE,
    _MUD,
    _ROAD,
    _SAND,
    _SMOKE,
    _SNOW,
    _TREE,
    _SMALL,
) = range(NUM_CLASSES)

_MIN_SIZE = 16
_SEED_STRIDE = 1_000_003


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise VitshrinkError(f"aerial: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _seed_for(seed: int, i: int) -> int:
    return seed * _SEED_STRIDE + i
