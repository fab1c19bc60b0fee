"""When a segmentation photo is tiled instead of resized: one rule for `predict` (deploy.tiling) and
for the data layer's size policy (data.stream), which trains and scores the way predict runs.

Dependency-free on purpose: the deploy side imports it without torch, data workers without onnxruntime.
"""

from __future__ import annotations

# "auto" tiles when resizing to the model input would shrink the frame at least this much on both axes.
AUTO_TILE_FACTOR = 2.0


def should_tile(frame: tuple[int, int], model_size: tuple[int, int]) -> bool:
    """Automatic choice: tile when the frame is at least AUTO_TILE_FACTOR x the model input both ways."""
    return min(frame[0] / model_size[0], frame[1] / model_size[1]) >= AUTO_TILE_FACTOR
