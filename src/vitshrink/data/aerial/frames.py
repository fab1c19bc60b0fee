"""Large frames: a drone frame assembled from a grid of independent scenes at their native object
size."""

from __future__ import annotations

import numpy as np

from ...errors import VitshrinkError
from .classes import _MIN_SIZE, _check_int, _seed_for
from .rendering import render_sample

# Side of the scenes a large frame is assembled from: at 256 px a vehicle is 6-10 px and a person
# 1-2 px, what a 12 MP camera sees from ~100 m.
FRAME_SCENE = 256


def parse_frame_size(size: object) -> int | tuple[int, int]:
    """A square side (int) or a large frame's (width, height) from "WxH" / (w, h)."""
    if isinstance(size, str) and "x" in size.lower():
        try:
            w, h = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise VitshrinkError(f"aerial: size must be N or WxH in pixels, got {size!r}") from None
        size = (w, h)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        w, h = (_check_int("frame width/height", v, _MIN_SIZE) for v in size)
        return (w, h)
    return _check_int("size", size, _MIN_SIZE)


def render_frame(
    seed: int, size: tuple[int, int] = (2048, 1536), scene: int = FRAME_SCENE
) -> tuple[np.ndarray, np.ndarray]:
    """A large drone frame (width, height): (image uint8 (H, W, 3), mask uint8 (H, W)).

    Assembled from a grid of independent `scene`-px scenes (edge cells cropped), so objects keep the
    pixel size they have in a `scene`-px render: small in the frame, as from a camera flying high over
    a wide area. Scene borders are visible seams; ground truth is exact everywhere. Deterministic in
    `seed`; cell k uses scene seed `seed * 1_000_003 + k`.
    """
    w, h = parse_frame_size(tuple(size))  # type: ignore[misc]
    scene = _check_int("scene", scene, _MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    img = np.empty((h, w, 3), np.uint8)
    mask = np.empty((h, w), np.uint8)
    cols = -(-w // scene)
    for r in range(-(-h // scene)):
        for c in range(cols):
            cell_img, cell_mask = render_sample(_seed_for(seed, r * cols + c), scene)
            y0, x0 = r * scene, c * scene
            ch, cw = min(scene, h - y0), min(scene, w - x0)
            img[y0 : y0 + ch, x0 : x0 + cw] = cell_img[:ch, :cw]
            mask[y0 : y0 + ch, x0 : x0 + cw] = cell_mask[:ch, :cw]
    return img, mask
