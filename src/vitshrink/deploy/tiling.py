"""Sliding-window ("slide") segmentation of frames larger than the model input, torch-free.

mmsegmentation's slide inference: tiles of the model's input size at a fixed stride cover the frame at
its own resolution, the last tile of each row/column is shifted back inside the frame, and logits are
averaged where tiles overlap. Unlike a resize to the model input, a person that is 6 px wide in a
4000x3000 photo stays 6 px wide for the model.

Memory: full-frame logits would be K x H x W float32 (14 classes at 4000x3000: 670 MB, more than a
Jetson Nano can spare), so tiles are processed row by row and only one tile-high strip of logit sums is
kept; rows no later tile can reach are reduced to class ids (uint8) straight away.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError
from ..tile_rule import AUTO_TILE_FACTOR, should_tile  # noqa: F401  (re-exported: predict's rule)

# Default overlap between neighbouring tiles (a fraction of the tile side). mmsegmentation configs use
# stride 2/3 of the crop for ADE20K/Cityscapes; a quarter keeps most of the seam benefit at less cost.
DEFAULT_OVERLAP = 0.25


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one frame go: tile (h, w), stride (h, w), top-left corners by row."""

    frame: tuple[int, int]
    tile: tuple[int, int]
    stride: tuple[int, int]
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)


def starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis, mmsegmentation's rule: ceil((L - tile) / stride) + 1 tiles, the
    last one moved back so it ends at the edge (a frame shorter than the tile gets one, padded)."""
    if length <= tile:
        return [0]
    n = -(-(length - tile) // stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(n)})


def plan(
    frame: tuple[int, int], tile: tuple[int, int], overlap: float = DEFAULT_OVERLAP, multiple: int = 1
) -> TilePlan:
    """Tile plan for a (H, W) frame. `overlap` in [0, 1): the fraction of a tile shared with its
    neighbour; the stride is rounded to `multiple` (a dynamic-size model's size step) when possible."""
    if not 0 <= overlap < 1:
        raise DataError(f"overlap must be in [0, 1), got {overlap}")
    strides = []
    for t in tile:
        s = max(1, round(t * (1 - overlap)))
        if multiple > 1 and s > multiple:
            s = s // multiple * multiple  # tiles keep landing on the model's size grid
        strides.append(s)
    h, w = frame
    return TilePlan(
        frame=(h, w),
        tile=(int(tile[0]), int(tile[1])),
        stride=(strides[0], strides[1]),
        rows=tuple(starts(h, tile[0], strides[0])),
        cols=tuple(starts(w, tile[1], strides[1])),
    )


def slide(
    pixels: np.ndarray,
    run: Callable[[np.ndarray], np.ndarray],
    to_input: Callable[[np.ndarray], np.ndarray],
    tile_plan: TilePlan,
    batch: int = 1,
) -> tuple[np.ndarray, int]:
    """Slide-window class ids of one frame.

    pixels: (H, W[, C]) array of the frame; to_input: one (h, w[, C]) crop -> (C, h, w) float32 model
    input; run: (N, C, h, w) -> (N, K, h', w') logits (resized to the tile when h', w' differ).
    Returns (uint8 (H, W) class ids, number of classes K).
    """
    H, W = tile_plan.frame
    th, tw = tile_plan.tile
    rows, cols = tile_plan.rows, tile_plan.cols
    ids = np.empty((H, W), np.uint8)
    acc: np.ndarray | None = None  # (K, th, W) logit sums for frame rows [top, top + th)
    k = 0
    for r, y0 in enumerate(rows):
        if acc is not None and r:  # shift the strip down to start at y0 (rows above y0 were emitted)
            d = y0 - rows[r - 1]
            acc[:, : th - d] = acc[:, d:]
            acc[:, th - d :] = 0
        crops = [_crop(pixels, y0, x0, th, tw) for x0 in cols]
        for i in range(0, len(crops), batch):
            chunk = crops[i : i + batch]
            logits = run(np.stack([to_input(c) for c, _ in chunk]))
            for j, (_, valid) in enumerate(chunk):
                out = _fit(logits[j], (th, tw))
                if acc is None:
                    k = out.shape[0]
                    acc = np.zeros((k, th, W), np.float32)
                vh, vw = valid
                x0 = cols[i + j]
                acc[:, :vh, x0 : x0 + vw] += out[:, :vh, :vw]
        # rows no later tile reaches: up to the next tile row's top, or the whole remaining strip
        end = (rows[r + 1] if r + 1 < len(rows) else H) - y0
        end = min(end, H - y0, th)
        assert acc is not None
        # Every class at a pixel has the same tile count, so the argmax of the sums is the argmax of
        # the average: no count map or division needed.
        ids[y0 : y0 + end] = acc[:, :end].argmax(axis=0).astype(np.uint8)
    return ids, k


def average(
    pixels: np.ndarray,
    run: Callable[[np.ndarray], np.ndarray],
    to_input: Callable[[np.ndarray], np.ndarray],
    tile_plan: TilePlan,
) -> np.ndarray:
    """Full-frame averaged logits (K, H, W): the reference `slide` reduces strip by strip (tests, small
    frames)."""
    H, W = tile_plan.frame
    th, tw = tile_plan.tile
    acc: np.ndarray | None = None
    cnt = np.zeros((H, W), np.float32)
    for y0 in tile_plan.rows:
        for x0 in tile_plan.cols:
            crop, (vh, vw) = _crop(pixels, y0, x0, th, tw)
            out = _fit(run(to_input(crop)[None])[0], (th, tw))
            if acc is None:
                acc = np.zeros((out.shape[0], H, W), np.float32)
            acc[:, y0 : y0 + vh, x0 : x0 + vw] += out[:, :vh, :vw]
            cnt[y0 : y0 + vh, x0 : x0 + vw] += 1.0
    assert acc is not None
    return acc / cnt


def _crop(pixels: np.ndarray, y0: int, x0: int, th: int, tw: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A th x tw crop at (y0, x0); a frame smaller than the tile is padded at the bottom/right by edge
    replication (its logits there are dropped). Returns (crop, (valid h, valid w))."""
    c = pixels[y0 : y0 + th, x0 : x0 + tw]
    vh, vw = c.shape[:2]
    if (vh, vw) != (th, tw):
        pad = [(0, th - vh), (0, tw - vw)] + [(0, 0)] * (pixels.ndim - 2)
        c = np.pad(c, pad, mode="edge")
    return c, (vh, vw)


def _fit(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h', w') logits at the tile size: a graph that outputs at 1/4 resolution is upsampled
    bilinearly per class (vitshrink exports already output at the input size)."""
    if logits.ndim != 3:
        raise DataError(f"segmentation output per tile has shape {logits.shape}; expected (K, H, W)")
    if logits.shape[1:] == tuple(size):
        return logits
    h, w = size
    return np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.float32), "F").resize((w, h), Image.Resampling.BILINEAR))
            for m in logits
        ]
    )


def describe(tile_plan: TilePlan, overlap: float, reason: str) -> dict[str, Any]:
    """The per-image "inference" entry of predict's JSON for a tiled frame."""
    return {
        "mode": "tiled",
        "tile": list(tile_plan.tile),
        "overlap": overlap,
        "stride": list(tile_plan.stride),
        "tiles": tile_plan.count,
        "reason": reason,
    }
