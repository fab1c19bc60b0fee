"""Segmentation example panels: colourised masks next to the input image, one PNG per example."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from vitshrink.errors import DataError
from vitshrink.labels import IGNORE_INDEX, colorize, palette_for

from .plots import save_figure

__all__ = ["colorize", "default_palette", "save_example_panel"]


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct RGB colours for class ids 0..n-1: the generic palette of `vitshrink.labels`, the same
    colours `predict` overlays (pure black stays reserved for the ignore index)."""
    return palette_for(n)


def _display_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] in (1, 4):
        img = img[..., :3] if img.shape[2] == 4 else img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise DataError(f"image must be (H, W) or (H, W, 3), got shape {img.shape}")
    if np.issubdtype(img.dtype, np.floating):
        # Floats are taken as [0, 1]; anything larger is assumed to be a 0-255 image stored as float.
        img = img * 255.0 if img.size and np.nanmax(img) <= 1.0 else img
        img = np.clip(np.nan_to_num(img), 0, 255).astype(np.uint8)
    return img.astype(np.uint8, copy=False)


def save_example_panel(
    path: str | Path,
    image: np.ndarray,
    masks: Mapping[str, np.ndarray],
    palette: Sequence[tuple[int, int, int]],
    *,
    class_names: Sequence[str] | None = None,
    dpi: int = 100,
) -> None:
    """Write one PNG: the image, then each mask colourised, side by side under its title.

    `masks` maps a title (e.g. "ground truth", "teacher", "compressed") to an (H, W) class-id mask;
    with `class_names`, a legend lists the classes present in any mask.
    """
    img = _display_image(image)
    coloured = {title: colorize(m, palette) for title, m in masks.items()}
    h, w = img.shape[:2]
    cols = 1 + len(coloured)
    panel_w = 2.6
    present: list[int] = []
    if class_names is not None:
        ids = set()
        for m in masks.values():
            ids.update(int(v) for v in np.unique(m) if v != IGNORE_INDEX)
        present = sorted(i for i in ids if i < len(class_names))
    ncol = min(len(present), 6) if present else 1
    legend_rows = -(-len(present) // ncol) if present else 0
    # Constrained layout with an "outside" legend: panels and legend stack without empty bands.
    fig = Figure(
        figsize=(panel_w * cols, panel_w * h / max(w, 1) + 0.4 + 0.22 * legend_rows), layout="constrained"
    )
    axes = fig.subplots(1, cols, squeeze=False)[0]
    panels = [("image", img), *coloured.items()]
    for ax, (title, data) in zip(axes, panels):
        # Fixed 0-255 range: a grey image must not be contrast-stretched to its own min/max.
        ax.imshow(data, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    if present:
        handles = [
            Patch(facecolor=np.asarray(palette[i]) / 255.0, edgecolor="black", label=class_names[i])
            for i in present
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    save_figure(fig, path, dpi=dpi)
