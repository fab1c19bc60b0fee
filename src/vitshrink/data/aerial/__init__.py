"""Procedurally generated aerial disaster-scene segmentation data (LPCV 2023 UAV style).

Top-down drone views rendered from a seed, with a pixel-exact mask, so examples, tests and CI can train
and evaluate segmentation models without downloading anything. Scenes are built from layered procedural
shapes and textures, then passed through a simple "camera" (illumination and colour jitter, haze, blur,
sensor noise). All geometry is expressed in fractions of the image size, so 128 px and 512 px renders
of the same seed show the same scene.

Classes (mask ids 0..13; 255 is reserved for "ignore" but never produced here):

==  ====================  ===========================================================================
id  name                  what it looks like
==  ====================  ===========================================================================
0   background            grass, dry grass and bare soil, often as field parcels; exposed rock in snow
1   avalanche             large streaky, slightly grey-blue white tongues with debris clumps on snow
2   building_undamaged    rotated rectangles with a flat roof colour (tile, grey, white...), gable shading
3   building_damaged      irregular footprints, darker rubble texture mixing roof fragments and debris
4   cracks_fissures       thin, dark, jagged branching lines across ground and roads
5   flooding              smooth murky (brown / grey-green / blue-grey) water blobs and rivers
6   ice_jam               bright fragmented polygons (floes) packed on a river; gaps are flooding
7   mudslide              large brown tongues with flow streaks (colours overlap sand and rubble)
8   road                  thick grey asphalt or brown dirt curves, sometimes with a dashed centre line
9   sand                  pale beige with soft ripples; whole scenes (arid) or patches
10  smoke_fire            orange fire cores and grey plumes; semi-transparent smoke occludes what is
                          under it and is labelled only where it is dense
11  snow                  smooth bright white with soft blue shading
12  tree                  clusters of dark-green discs (crowns) with sunlit highlights
13  water_vehicle_person  tiny objects: vehicles on roads, people (dots), boats on flood water
==  ====================  ===========================================================================

Buildings and trees cast directional shadows (which darken but do not change the label); some colour
statistics deliberately overlap (snow / avalanche / ice jam, mud / sand / rubble / murky water), objects
are tiny and boundaries are blurred, so the task is learnable but far from trivially solvable.

Use :func:`render_sample` for one in-memory sample, :func:`generate` to write a split to disk and
:func:`ensure` for cached train/val/test splits.

Along its seams: `classes` (names, ids, colours, normalisation, cache VERSION), `textures` (the canvas:
noise, texture, compositing; scene colours), `layouts` (paths, footprints, building and tree plans),
`rendering` (the layers in painting order, the camera, `render_sample`), `frames` (large frames from
scene grids); this module writes splits, caches them and draws previews.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ...artifacts import atomic_dir, atomic_file, cache_root, read_json, write_json
from ...errors import VitshrinkError
from ...labels import IGNORE_INDEX
from ...labels import colorize as _colorize
from .classes import _MIN_SIZE, CLASSES, MEAN, NUM_CLASSES, PALETTE, STD, VERSION, _check_int, _seed_for
from .frames import FRAME_SCENE, parse_frame_size, render_frame
from .rendering import render_sample

__all__ = [
    "CLASSES",
    "IGNORE_INDEX",
    "MEAN",
    "NUM_CLASSES",
    "PALETTE",
    "STD",
    "VERSION",
    "colorize",
    "ensure",
    "generate",
    "preview",
    "render_frame",
    "render_sample",
]


def colorize(mask: np.ndarray) -> np.ndarray:
    """Mask of class ids -> uint8 RGB using PALETTE (`labels.colorize`: ignore drawn as everywhere)."""
    return _colorize(mask, PALETTE)


def _progress(n: int, quiet: bool, desc: str) -> Iterator[int]:
    if quiet:
        return iter(range(n))
    from tqdm import tqdm

    return iter(tqdm(range(n), desc=desc, unit="img"))


def generate(
    root: str | Path, n: int, size: int | str | tuple[int, int] = 128, seed: int = 0, quiet: bool = True
) -> Path:
    """Write `n` samples to `root/images/{i:05d}.png`, `root/masks/{i:05d}.png` (mode "L" ids),
    `root/classes.json` and `root/aerial.json`. Sample i uses seed `seed * 1_000_003 + i`.
    `size` N renders N x N scenes; "WxH" (e.g. "2048x1536") large frames (`render_frame`).

    The split is built in a temp dir beside `root` and renamed into place when complete (an existing
    `root` is replaced), so an interrupted run leaves nothing half-written.
    """
    n, size, seed = _check_int("n", n, 1), parse_frame_size(size), _check_int("seed", seed, 0)
    root = Path(root)
    with atomic_dir(root) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i in _progress(n, quiet, f"aerial {root.name}"):
            if isinstance(size, tuple):  # "WxH": a large frame of FRAME_SCENE-px scenes
                img, mask = render_frame(_seed_for(seed, i), size)
            else:
                img, mask = render_sample(_seed_for(seed, i), size)
            # noisy RGB barely compresses; a low level keeps writing fast
            Image.fromarray(img, "RGB").save(tmp / "images" / f"{i:05d}.png", compress_level=1)
            Image.fromarray(mask, "L").save(tmp / "masks" / f"{i:05d}.png")
        write_json(tmp / "classes.json", list(CLASSES))
        write_json(tmp / "aerial.json", _info(n, size, seed))
    return root


def _is_complete(path: Path, n: int, size: int | tuple[int, int], seed: int) -> bool:
    info = path / "aerial.json"
    if not info.is_file():
        return False
    try:
        meta = read_json(info)
    except VitshrinkError:
        return False
    return meta == _info(n, size, seed)


def _info(n: int, size: int | tuple[int, int], seed: int) -> dict[str, object]:
    if isinstance(size, tuple):
        return {"n": n, "size": list(size), "scene": FRAME_SCENE, "seed": seed, "version": VERSION}
    return {"n": n, "size": size, "seed": seed, "version": VERSION}


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialise generation of one cache entry across processes (POSIX flock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(
    cache_dir: str | Path | None = None,
    *,
    n_train: int = 800,
    n_val: int = 100,
    n_test: int = 100,
    size: int | str | tuple[int, int] = 128,
    seed: int = 0,
    quiet: bool = True,
) -> dict[str, Path]:
    """Return {"train", "val", "test"} split directories, generating each once into the cache.

    Cache layout: `cache_dir` (default $VITSHRINK_CACHE or ~/.cache/vitshrink) /
    `aerial-{size}-s{seed}-v{VERSION}/{split}-{n}`. Splits use disjoint sample seeds.
    """
    seed, size = _check_int("seed", seed, 0), parse_frame_size(size)
    counts = {
        s: _check_int(f"n_{s}", n, 1) for s, n in (("train", n_train), ("val", n_val), ("test", n_test))
    }
    base = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / (
        f"aerial-{size}-s{seed}-v{VERSION}"
        if isinstance(size, int)
        else f"aerial-{size[0]}x{size[1]}-s{seed}-v{VERSION}"
    )
    out: dict[str, Path] = {}
    for k, (split, n) in enumerate(counts.items()):
        path = base / f"{split}-{n}"
        # seed*3+k: disjoint sample seeds between splits and between different user seeds
        split_seed = seed * 3 + k
        if not _is_complete(path, n, size, split_seed):
            with _lock(base / f".{split}-{n}.lock"):
                if not _is_complete(path, n, size, split_seed):  # another process may have finished
                    # under the lock, temp dirs for this split can only be leftovers of killed runs
                    for stale in base.glob(f".{path.name}.*.tmp"):
                        shutil.rmtree(stale, ignore_errors=True)
                    generate(path, n, size=size, seed=split_seed, quiet=quiet)
        out[split] = path
    return out


def preview(path_png: str | Path, n: int = 8, size: int = 128, seed: int = 0) -> Path:
    """Write a grid (images on top, colourised masks below, class legend at the bottom) to a PNG."""
    n, size, seed = _check_int("n", n, 1), _check_int("size", size, _MIN_SIZE), _check_int("seed", seed, 0)
    cols, gap = min(n, 8), 2
    rows = -(-n // cols)
    legend_h = 16 * (-(-NUM_CLASSES // 4)) + 4
    w = max(cols * (size + gap) + gap, 4 * 170)  # wide enough for the 4-column legend
    h = rows * 2 * (size + gap) + gap + legend_h
    canvas = Image.new("RGB", (w, h), (30, 30, 30))
    for i in range(n):
        img, mask = render_sample(_seed_for(seed, i), size)
        r, col = divmod(i, cols)
        x = gap + col * (size + gap)
        y = gap + r * 2 * (size + gap)
        canvas.paste(Image.fromarray(img), (x, y))
        canvas.paste(Image.fromarray(colorize(mask)), (x, y + size + gap))
    draw = ImageDraw.Draw(canvas)
    y0 = h - legend_h + 2
    cw = max(1, w // 4)
    for k, name in enumerate(CLASSES):
        x, y = gap + (k % 4) * cw, y0 + 16 * (k // 4)
        draw.rectangle((x, y, x + 11, y + 11), fill=PALETTE[k], outline=(200, 200, 200))
        draw.text((x + 15, y), f"{k} {name}", fill=(230, 230, 230))
    path = Path(path_png)
    with atomic_file(path, "wb") as f:
        canvas.save(f, format="PNG")
    return path
