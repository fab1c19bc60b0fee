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
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..artifacts import atomic_dir, atomic_file, read_json, write_json
from ..errors import VitshrinkError
from ..labels import IGNORE_INDEX
from ..labels import colorize as _colorize

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

# Fixed colours for visualising masks (one per class id, in CLASSES order).
PALETTE: tuple[tuple[int, int, int], ...] = (
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


# --------------------------------------------------------------------------------------------------
# Canvas and primitives
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image fractions (read-only, shared between renders)."""
    r = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(r, r, indexing="ij")
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


def _rgb(v: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


class _Canvas:
    """Float32 RGB image plus label mask; layers are alpha-composited in painter's order.

    Positions and lengths are fractions of the image size. Scalars passed into array maths are
    Python floats so nothing silently upcasts to float64 (NumPy 2 keeps np.float64 scalars strong).
    """

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng = rng
        self.s = size
        self.y, self.x = _grid(size)
        self.img = np.zeros((size, size, 3), np.float32)
        self.mask = np.zeros((size, size), np.uint8)

    # -- random fields -------------------------------------------------------------------------
    def u(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return float(self.rng.uniform(lo, hi))

    def i(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi))

    def noise(self, cells: float, octaves: int = 1) -> np.ndarray:
        """Smooth value noise in ~[0, 1] with `cells` features across the image (size-independent).

        Bicubic upsampling of a small random grid with PIL costs ~1 ms at 512 px, far less than
        per-pixel gradient noise, and looks the same for our purposes.
        """
        out = None
        amp, total = 1.0, 0.0
        for o in range(octaves):
            c = max(2, round(cells * 2**o))
            g = self.rng.random((c + 1, c + 1), dtype=np.float32)
            up = np.asarray(Image.fromarray(g).resize((self.s, self.s), Image.Resampling.BICUBIC))
            out = up * amp if out is None else out + up * amp
            total += amp
            amp *= 0.5
        if octaves > 1:
            out *= 1.0 / total
        return out

    def znoise(self, cells: float, octaves: int = 2) -> np.ndarray:
        n = self.noise(cells, octaves)
        return (n - n.mean()) / (n.std() + 1e-6)

    def streaks(self, angle: float, count: float = 30.0, warp: float = 0.04) -> np.ndarray:
        """Parallel streaks along `angle` (flow texture) in [0, 1], made wavy by a smooth warp."""
        ca, sa = math.cos(angle), math.sin(angle)
        v = self.y * ca - self.x * sa
        if warp:
            v = v + (2.0 * warp) * (self.noise(3) - 0.5)
        prof = self.rng.random(int(3 * count) + 4).astype(np.float32)
        pos = (v + 1.5) * count
        return np.interp(pos, np.arange(prof.size, dtype=np.float32), prof).astype(np.float32)

    def jit(self, rgb: tuple[float, float, float] | np.ndarray, sd: float = 0.06) -> np.ndarray:
        """Per-scene colour variation; makes class colour statistics overlap across scenes."""
        return np.clip(_rgb(rgb) * self.rng.normal(1.0, sd, 3).astype(np.float32), 0.0, 1.0)

    def shade(
        self, lum: float = 0.12, grain: float = 0.04, cells: tuple[float, float] = (4.0, 40.0)
    ) -> np.ndarray:
        """Brightness field ~1: smooth drift (`lum`) plus fine grain (`grain`), shape (s, s)."""
        f = (2.0 * lum) * (self.noise(cells[0], 2) - 0.5)
        if grain:
            f += (2.0 * grain) * (self.noise(cells[1]) - 0.5)
        f += 1.0
        return f

    def tex(
        self,
        rgb: np.ndarray,
        lum: float = 0.12,
        grain: float = 0.04,
        chroma: float = 0.0,
        cells: tuple[float, float] = (4.0, 40.0),
    ) -> np.ndarray:
        """Full-image texture (s, s, 3) around colour `rgb`, optionally with a smooth hue drift."""
        t = self.shade(lum, grain, cells)[..., None] * rgb
        if chroma:
            tint = self.rng.normal(0.0, 1.0, 3).astype(np.float32) * (2.0 * chroma)
            t += (self.noise(cells[0]) - 0.5)[..., None] * tint
        return t

    # -- compositing ---------------------------------------------------------------------------
    def fill(self, colour: np.ndarray, cls: int) -> None:
        self.img[...] = colour
        self.mask[...] = cls

    def paint(
        self,
        alpha: np.ndarray,
        colour: np.ndarray,
        cls: int | None,
        thr: float = 0.5,
        box: tuple[int, int, int, int] | None = None,
    ) -> None:
        """Blend `colour` over the image with `alpha`; label pixels with alpha >= thr as `cls`."""
        if box is None:
            img, mask = self.img, self.mask
        else:
            y0, y1, x0, x1 = box
            img, mask = self.img[y0:y1, x0:x1], self.mask[y0:y1, x0:x1]
        a = alpha.astype(np.float32, copy=False)
        img += a[..., None] * (colour - img)
        if cls is not None:
            mask[a >= thr] = cls

    def layer(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        im = Image.new("L", (self.s, self.s), 0)
        return im, ImageDraw.Draw(im)

    def px(self, pts: np.ndarray) -> list[float]:
        """Fractional (N, 2) x/y points -> flat pixel coordinate list for ImageDraw."""
        return (np.asarray(pts, np.float64) * self.s).ravel().tolist()

    def disc(self, d: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: int) -> None:
        s = self.s
        d.ellipse(((x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s), fill=fill)

    def blob(
        self,
        cx: float,
        cy: float,
        r: float,
        aspect: float = 1.0,
        angle: float = 0.0,
        rough: float = 0.35,
        cells: float = 4.0,
        soft: float = 0.06,
    ) -> np.ndarray:
        """Soft-edged irregular blob (ellipse distorted by low-frequency noise), alpha in [0, 1]."""
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = self.x - float(cx), self.y - float(cy)
        u = (dx * ca + dy * sa) * (1.0 / (r * aspect))
        v = (dy * ca - dx * sa) * (1.0 / r)
        field = (2.0 * rough) * (self.noise(cells, 2) - 0.5) + 1.0 - np.sqrt(u * u + v * v)
        field *= 1.0 / soft
        field += 0.5
        return np.clip(field, 0.0, 1.0, out=field)


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float32) * (1.0 / 255.0)


def _smooth_path(pts: np.ndarray, iters: int = 3) -> np.ndarray:
    """Chaikin corner cutting: a smooth curve through control points (scipy is not a dependency)."""
    for _ in range(iters):
        q = 0.75 * pts[:-1] + 0.25 * pts[1:]
        r = 0.25 * pts[:-1] + 0.75 * pts[1:]
        mid = np.empty((2 * len(q), 2))
        mid[0::2], mid[1::2] = q, r
        pts = np.vstack([pts[:1], mid, pts[-1:]])
    return pts


def _rect(cx: float, cy: float, length: float, width: float, angle: float) -> np.ndarray:
    ca, sa = math.cos(angle), math.sin(angle)
    ax, ay = np.array([ca, sa]) * length / 2, np.array([-sa, ca]) * width / 2
    c = np.array([cx, cy])
    return np.stack([c + ax + ay, c + ax - ay, c - ax - ay, c - ax + ay])


def _edge_point(rng: np.random.Generator, side: int) -> np.ndarray:
    t = rng.uniform(0.05, 0.95)
    return np.array([(t, -0.08), (1.08, t), (t, 1.08), (-0.08, t)][side])


def _crossing_path(rng: np.random.Generator, bend: float) -> np.ndarray:
    """A smooth curve entering through one image edge and leaving through another."""
    a = int(rng.integers(4))
    b = (a + int(rng.integers(1, 4))) % 4
    p0, p1 = _edge_point(rng, a), _edge_point(rng, b)
    k = int(rng.integers(1, 4))
    t = np.linspace(0, 1, k + 2)[1:-1, None]
    d = p1 - p0
    normal = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9)
    mids = p0 + t * d + rng.normal(0, bend, (k, 1)) * normal
    return _smooth_path(np.vstack([p0, mids, p1]))


def _unit_tangent(path: np.ndarray, k: int) -> np.ndarray:
    t = path[k + 1] - path[k]
    return t / (np.linalg.norm(t) + 1e-9)


# --------------------------------------------------------------------------------------------------
# Scene layers
# --------------------------------------------------------------------------------------------------

_GROUND = (
    (0.36, 0.43, 0.24),  # grass
    (0.50, 0.49, 0.32),  # dry grass
    (0.47, 0.40, 0.30),  # bare soil (close to mud and dirt roads on purpose)
    (0.30, 0.38, 0.22),  # dark grass / crops
    (0.57, 0.53, 0.38),  # stubble (close to sand on purpose)
)
_SAND_RGB = (0.78, 0.70, 0.53)
_SNOW_RGB = (0.92, 0.93, 0.97)
_AVALANCHE_RGB = (0.84, 0.86, 0.90)
_ICE_RGB = (0.86, 0.89, 0.93)
_MUD_RGB = (0.50, 0.39, 0.26)
_DEBRIS_RGB = (0.47, 0.43, 0.38)
_WATER = ((0.42, 0.37, 0.27), (0.34, 0.36, 0.28), (0.27, 0.33, 0.37), (0.31, 0.30, 0.26))
_ROOFS = (
    (0.62, 0.30, 0.22),
    (0.55, 0.55, 0.57),
    (0.36, 0.36, 0.39),
    (0.85, 0.84, 0.80),
    (0.48, 0.36, 0.26),
    (0.40, 0.46, 0.53),
    (0.70, 0.45, 0.30),
)
_VEHICLES = (
    (0.95, 0.95, 0.95),
    (0.08, 0.08, 0.09),
    (0.75, 0.10, 0.10),
    (0.15, 0.25, 0.65),
    (0.70, 0.70, 0.72),
    (0.95, 0.80, 0.10),
)
_CLOTHES = ((0.9, 0.2, 0.1), (0.1, 0.3, 0.8), (0.95, 0.75, 0.1), (0.9, 0.9, 0.9), (0.15, 0.15, 0.15))
_BOATS = ((0.95, 0.95, 0.95), (0.95, 0.45, 0.1), (0.6, 0.1, 0.1))


def _terrain(c: _Canvas, kind: str) -> None:
    rng = c.rng
    if kind == "winter":
        c.fill(c.tex(c.jit(_SNOW_RGB, 0.015), lum=0.05, grain=0.01, chroma=0.01), _SNOW)
        if rng.random() < 0.75:  # exposed ground / rock outcrops
            a = np.clip((c.znoise(c.u(2.5, 5)) - c.u(0.6, 1.4)) * 4.0 + 0.5, 0, 1)
            c.paint(a, c.tex(c.jit((0.38, 0.36, 0.32), 0.08), lum=0.25, grain=0.08), _BG)
        return
    if kind == "arid":
        ripples = c.streaks(c.u(0, math.pi), count=c.u(25, 50), warp=0.05)
        shade = c.shade(0.08, 0.03)
        shade += 0.06 * (ripples - 0.5)
        c.fill(shade[..., None] * c.jit(_SAND_RGB, 0.04), _SAND)
        if rng.random() < 0.8:  # scrub / dry ground patches
            a = np.clip((c.znoise(c.u(3, 6)) - c.u(0.0, 1.0)) * 3.3 + 0.5, 0, 1)
            scrub = c.jit(_GROUND[int(rng.choice([1, 2, 4]))], 0.07)
            c.paint(a, c.tex(scrub, lum=0.2, grain=0.06), _BG)
        return
    # temperate: two ground colours drifting across the scene, optional field parcels, sand patches
    i, j = rng.choice(len(_GROUND), 2, replace=False)
    mix = np.clip(c.noise(c.u(1.5, 3.5), 2) * 2.0 - 0.5, 0, 1)[..., None]
    ga, gb = c.jit(_GROUND[i]), c.jit(_GROUND[j])
    base = ga + mix * (gb - ga)
    base *= c.shade(0.15, 0.06)[..., None]
    c.fill(base, _BG)
    if rng.random() < 0.5:  # field parcels: one id layer, one shared stripe texture (cheap)
        ang = c.u(0, math.pi)
        im, d = c.layer()
        n = c.i(2, 7)
        for k in range(1, n + 1):
            rect = _rect(c.u(), c.u(), c.u(0.15, 0.45), c.u(0.1, 0.3), ang)
            d.polygon(c.px(rect), fill=k)
        lut = np.stack(
            [np.zeros(3, np.float32)] + [c.jit(_GROUND[c.i(0, len(_GROUND))], 0.08) for _ in range(n)]
        )
        opacity = np.concatenate([[0.0], rng.uniform(0.5, 0.9, n)]).astype(np.float32)
        ids = np.asarray(im)
        stripes = c.streaks(ang, count=c.u(40, 90), warp=0.0)
        stripes -= 0.5
        stripes *= 0.08
        stripes += c.shade(0.08, 0.04)
        c.paint(opacity[ids], lut[ids] * stripes[..., None], _BG)
    if rng.random() < 0.3:
        for _ in range(c.i(1, 3)):
            a = c.blob(c.u(), c.u(), c.u(0.08, 0.22), c.u(1, 2.5), c.u(0, math.pi))
            c.paint(a, c.tex(c.jit(_SAND_RGB, 0.05), lum=0.1, grain=0.04), _SAND)


def _roads(c: _Canvas) -> list[tuple[np.ndarray, float]]:
    rng = c.rng
    roads = []
    for _ in range(c.i(1, 4)):
        path = _crossing_path(rng, 0.12)
        w = c.u(0.03, 0.065)
        im, d = c.layer()
        d.line(c.px(path), fill=255, width=max(2, round(w * c.s)), joint="curve")
        if rng.random() < 0.25:  # dirt road: colour close to mud and bare soil on purpose
            col = c.tex(c.jit((0.55, 0.46, 0.35), 0.06), lum=0.12, grain=0.06)
        else:
            col = c.tex(c.jit((0.44, 0.44, 0.45), 0.04) * c.u(0.8, 1.2), lum=0.08, grain=0.04)
            if rng.random() < 0.5:  # dashed centre line: every other segment of the smoothed path
                lm, ld = c.layer()
                for k in range(0, len(path) - 1, 2):
                    ld.line(c.px(path[k : k + 2]), fill=204, width=max(1, round(0.006 * c.s)))
                col += _arr(lm)[..., None] * (c.jit((0.9, 0.88, 0.7), 0.03) - col)
        c.paint(_arr(im), col, _ROAD)
        roads.append((path, w))
    return roads


def _water_colour(c: _Canvas) -> np.ndarray:
    col = c.jit(_WATER[c.i(0, len(_WATER))], 0.06)
    shade = c.shade(0.08, 0.015, (3.0, 30.0))
    shade += 0.05 * (c.streaks(c.u(0, math.pi), count=60, warp=0.08) - 0.5)  # faint ripples
    return shade[..., None] * col


def _river(c: _Canvas, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft band along a crossing curve with irregular banks; returns (alpha, path)."""
    path = _crossing_path(c.rng, 0.1)
    im, d = c.layer()
    d.line(c.px(path), fill=255, width=max(2, round(width * c.s)), joint="curve")
    im = im.filter(ImageFilter.GaussianBlur(width * c.s * 0.3))
    a = _arr(im) + 0.25 * (c.noise(8) - 0.5)
    return np.clip((a - 0.5) * 12.0 + 0.5, 0, 1), path


def _flood(c: _Canvas) -> None:
    if c.rng.random() < 0.4:
        a, _ = _river(c, c.u(0.08, 0.18))
    else:
        a = c.blob(c.u(), c.u(), c.u(0.18, 0.45), c.u(1, 2), c.u(0, math.pi), rough=0.45)
    c.paint(a, _water_colour(c), _FLOOD)


def _flow(c: _Canvas, rgb: np.ndarray, cls: int, debris: float, streak: float) -> None:
    """Mudslide / avalanche: a long irregular tongue with streaks along the flow direction."""
    ang = c.u(0, 2 * math.pi)
    a = c.blob(c.u(0.2, 0.8), c.u(0.2, 0.8), c.u(0.09, 0.2), c.u(1.8, 3.5), ang, rough=0.4, cells=5)
    shade = c.shade(0.1, 0.05)
    shade += streak * (c.streaks(ang, count=c.u(25, 45), warp=0.03) - 0.5)
    if debris:  # small darker clumps (snow boulders, rocks, wood)
        shade -= debris * np.clip((c.noise(70) - 0.7) * 8.0, 0, 1)
    c.paint(a, shade[..., None] * rgb, cls)


def _ice_jam(c: _Canvas) -> None:
    width = c.u(0.12, 0.22)
    a, path = _river(c, width)
    c.paint(a, _water_colour(c) * 0.75, _FLOOD)
    # Floes: random convex-ish polygons packed along the river, drawn one by one so thin water gaps
    # remain between some of them (the fragmented look). Gaps stay labelled as flooding.
    im, d = c.layer()
    rng = c.rng
    n = c.i(80, 160)
    seg = rng.integers(0, len(path) - 1, n)
    t = rng.random((n, 1))
    centres = path[seg] * (1 - t) + path[seg + 1] * t + rng.normal(0, width * 0.28, (n, 2))
    for k in range(n):
        ang = np.sort(rng.uniform(0, 2 * math.pi, c.i(4, 8)))
        rad = c.u(0.012, 0.035) * rng.uniform(0.6, 1.0, ang.size)
        poly = centres[k] + np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)
        d.polygon(c.px(poly), fill=c.i(170, 256))
    floes = _arr(im)
    alpha = (floes > 0) * a
    shade = c.shade(0.06, 0.03)
    shade *= 0.55 + 0.45 * floes
    c.paint(alpha, shade[..., None] * c.jit(_ICE_RGB, 0.03), _ICE)


def _cracks(c: _Canvas, roads: list[tuple[np.ndarray, float]]) -> None:
    rng = c.rng
    im, d = c.layer()
    for _ in range(c.i(1, 5)):
        if roads and rng.random() < 0.6:
            path, _ = roads[c.i(0, len(roads))]
            p = path[c.i(0, len(path))].copy()
        else:
            p = rng.uniform(0.1, 0.9, 2)
        heading = c.u(0, 2 * math.pi)
        width = max(1, round(c.u(0.005, 0.012) * c.s))
        pts = [p]
        for _ in range(c.i(6, 16)):
            heading += rng.normal(0, 0.6)  # jagged: a random turn at each step
            p = p + c.u(0.015, 0.035) * np.array([math.cos(heading), math.sin(heading)])
            pts.append(p)
        d.line(c.px(np.array(pts)), fill=255, width=width)
        if rng.random() < 0.5:  # a branch
            q = pts[c.i(1, len(pts))]
            h = heading + float(rng.choice([-1, 1])) * c.u(0.6, 1.4)
            branch = [q]
            for _ in range(c.i(3, 7)):
                h += rng.normal(0, 0.6)
                q = q + c.u(0.01, 0.025) * np.array([math.cos(h), math.sin(h)])
                branch.append(q)
            d.line(c.px(np.array(branch)), fill=255, width=max(1, width - 1))
    a = _arr(im)
    a *= 0.9 * ~np.isin(c.mask, (_FLOOD, _ICE))  # fissures do not form on water
    c.paint(a, c.jit((0.12, 0.10, 0.09), 0.1), _CRACK, thr=0.45)


def _plan_buildings(c: _Canvas, roads: list[tuple[np.ndarray, float]]) -> list[dict]:
    """Footprints: mostly lined up along roads, otherwise aligned with a shared town grid."""
    rng = c.rng
    grid_angle = c.u(0, math.pi)
    damage_rate = 0.0 if rng.random() < 0.35 else c.u(0.25, 1.0)
    out: list[dict] = []
    placed: list[tuple[float, float, float]] = []
    for _ in range(c.i(2, 14) * 3):  # attempts; candidates overlapping earlier ones are rejected
        length, width = c.u(0.05, 0.13), c.u(0.045, 0.09)
        if roads and rng.random() < 0.7:
            path, rw = roads[c.i(0, len(roads))]
            k = c.i(0, len(path) - 1)
            tangent = _unit_tangent(path, k)
            normal = np.array([-tangent[1], tangent[0]]) * float(rng.choice([-1, 1]))
            cx, cy = (path[k] + normal * (rw / 2 + width / 2 + c.u(0.01, 0.03))).tolist()
            angle = math.atan2(tangent[1], tangent[0])
        else:
            cx, cy = c.u(0.05, 0.95), c.u(0.05, 0.95)
            angle = grid_angle + rng.normal(0, 0.08) + float(rng.choice([0, math.pi / 2]))
        rad = 0.5 * math.hypot(length, width)
        if not (-0.02 < cx < 1.02 and -0.02 < cy < 1.02):
            continue
        if any(math.hypot(cx - x, cy - y) < 0.9 * (rad + r) for x, y, r in placed):
            continue
        placed.append((cx, cy, rad))
        poly = _rect(cx, cy, length, width, angle)
        damaged = rng.random() < damage_rate
        if damaged:  # irregular outline: densify, jitter, sometimes bite a chunk off; rubble spills out
            dense = np.concatenate(
                [np.linspace(poly[i], poly[(i + 1) % 4], 7, endpoint=False) for i in range(4)]
            )
            dense += rng.normal(0, 0.06 * width, dense.shape)
            centre = np.array([cx, cy])
            if rng.random() < 0.6:
                k = c.i(0, len(dense))
                idx = np.arange(k - 2, k + 3) % len(dense)
                dense[idx] += c.u(0.3, 0.6) * (centre - dense[idx])
            poly = centre + c.u(1.0, 1.15) * (dense - centre)
        out.append(
            {
                "poly": poly,
                "centre": (cx, cy),
                "angle": angle,
                "damaged": damaged,
                "height": c.u(0.012, 0.035),
                "roof": c.jit(_ROOFS[c.i(0, len(_ROOFS))], 0.07),
                "gable": rng.random() < 0.6,
            }
        )
        if len(out) >= 14:
            break
    return out


def _poly_patch(c: _Canvas, poly: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Rasterise one polygon into a small local patch; returns (alpha, box) or None if off-image."""
    pts = poly * c.s
    x0, y0 = (np.floor(pts.min(0)).astype(int) - 1).tolist()
    x1, y1 = (np.ceil(pts.max(0)).astype(int) + 2).tolist()
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, c.s), min(y1, c.s)
    if x1 <= x0 or y1 <= y0:
        return None
    im = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(im).polygon((pts - [x0, y0]).ravel().tolist(), fill=255)
    return _arr(im), (y0, y1, x0, x1)


def _paint_buildings(c: _Canvas, buildings: list[dict]) -> None:
    if not buildings:
        return
    fine, mid = c.noise(45), c.noise(14)
    for b in buildings:
        res = _poly_patch(c, b["poly"])
        if res is None:
            continue
        a, box = res
        y0, y1, x0, x1 = box
        f, m = fine[y0:y1, x0:x1], mid[y0:y1, x0:x1]
        roof = b["roof"]
        if b["damaged"]:
            # rubble: roof fragments mixed with grey-brown debris and dark holes, darker overall
            debris = c.jit(_DEBRIS_RGB, 0.08)
            w = np.clip(m * 3.0 - 1.0, 0, 1)[..., None]
            col = debris + w * (roof * 0.85 - debris)
            light = 0.5 + 0.75 * f
            light *= 1.0 - 0.6 * np.clip((f - 0.62) * 6.0, 0, 1)
            col *= (light * 0.85)[..., None]
            c.paint(a, col, _DAMAGED, box=box)
        else:
            light = 1.0 + 0.06 * (f - 0.5)
            if b["gable"]:  # two roof planes lit differently
                ca, sa = math.cos(b["angle"]), math.sin(b["angle"])
                dy = c.y[y0:y1, x0:x1] - b["centre"][1]
                dx = c.x[y0:y1, x0:x1] - b["centre"][0]
                light = light * (1.0 + 0.09 * np.sign(dy * ca - dx * sa))
            c.paint(a, light[..., None] * roof, _BUILDING, box=box)


def _plan_trees(c: _Canvas) -> list[tuple[float, float, float, int]]:
    discs = []
    for _ in range(c.i(1, 8)):
        cx, cy = c.u(), c.u()
        spread = c.u(0.02, 0.08)
        for _ in range(c.i(2, 14)):
            x, y = c.rng.normal((cx, cy), spread).tolist()
            discs.append((x, y, c.u(0.012, 0.03), c.i(140, 230)))
    return discs


def _shadows(c: _Canvas, buildings: list[dict], trees: list, sun: float) -> None:
    """Directional shadows: footprints swept away from the sun. They darken but never relabel."""
    if not buildings and not trees:
        return
    im, d = c.layer()
    dirv = np.array([math.cos(sun), math.sin(sun)])
    for b in buildings:
        for t in (0.25, 0.5, 0.75, 1.0):
            d.polygon(c.px(b["poly"] + dirv * b["height"] * t), fill=255)
    for x, y, r, _ in trees:
        c.disc(d, x + dirv[0] * r * 0.9, y + dirv[1] * r * 0.9, r, 255)
    im = im.filter(ImageFilter.GaussianBlur(max(0.5, 0.005 * c.s)))
    dark = _arr(im)
    dark *= -c.u(0.3, 0.55)
    dark += 1.0
    c.img *= dark[..., None]


def _paint_trees(c: _Canvas, trees: list, winter: bool, sun: float) -> None:
    if not trees:
        return
    im, d = c.layer()
    hx, hy = -math.cos(sun), -math.sin(sun)  # highlight on the sun-facing side of each crown
    for x, y, r, b in trees:
        c.disc(d, x, y, r, b)
        c.disc(d, x + hx * r * 0.3, y + hy * r * 0.3, r * 0.55, min(255, b + 25))
    shade = _arr(im)
    base = c.jit((0.10, 0.19, 0.12) if winter else (0.17, 0.30, 0.12), 0.08)
    light = c.noise(55)
    light *= 0.5
    light += 0.75
    light *= shade * 1.35
    c.paint(shade > 0, light[..., None] * base, _TREE)


def _small_objects(c: _Canvas, roads: list, buildings: list[dict]) -> None:
    rng = c.rng
    im, d = c.layer()
    colours = [np.zeros(3, np.float32)]

    def add(poly: np.ndarray, palette: tuple) -> None:
        if len(colours) < 256:  # ids are drawn into an 8-bit layer
            d.polygon(c.px(poly), fill=len(colours))
            colours.append(c.jit(palette[c.i(0, len(palette))], 0.05))

    if roads and rng.random() < 0.75:  # vehicles along roads, oriented with the lane
        for _ in range(c.i(1, 10)):
            path, w = roads[c.i(0, len(roads))]
            k = c.i(0, len(path) - 1)
            tangent = _unit_tangent(path, k)
            p = path[k] + np.array([-tangent[1], tangent[0]]) * c.u(-0.3, 0.3) * w
            ln = c.u(0.022, 0.04)
            add(_rect(p[0], p[1], ln, ln * 0.48, math.atan2(tangent[1], tangent[0])), _VEHICLES)
    if rng.random() < 0.5:  # people: one- or two-pixel dots in small groups
        r = max(0.55 / c.s, 0.005)
        for _ in range(c.i(1, 4)):
            if buildings and rng.random() < 0.6:
                g = np.array(buildings[c.i(0, len(buildings))]["centre"]) + rng.normal(0, 0.06, 2)
            else:
                g = rng.random(2)
            for _ in range(c.i(1, 7)):
                x, y = (g + rng.normal(0, 0.015, 2)).tolist()
                add(np.array([(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]), _CLOTHES)
    if rng.random() < 0.6:  # boats on flood water
        water = np.flatnonzero(c.mask == _FLOOD)
        for _ in range(c.i(1, 5) if water.size else 0):
            yy, xx = divmod(int(water[c.i(0, water.size)]), c.s)
            ln = c.u(0.025, 0.05)
            add(_rect((xx + 0.5) / c.s, (yy + 0.5) / c.s, ln, ln * 0.4, c.u(0, math.pi)), _BOATS)
    if len(colours) > 1:
        ids = np.asarray(im)
        c.paint(ids > 0, np.stack(colours)[ids], _SMALL)


def _smoke_fire(c: _Canvas, buildings: list[dict], trees: list) -> None:
    rng = c.rng
    wind = c.u(0, 2 * math.pi)  # one wind direction for every plume in the scene
    ca, sa = math.cos(wind), math.sin(wind)
    for _ in range(c.i(1, 3)):
        if buildings and rng.random() < 0.5:
            sx, sy = buildings[c.i(0, len(buildings))]["centre"]
        elif trees and rng.random() < 0.5:
            sx, sy = trees[c.i(0, len(trees))][:2]
        else:
            sx, sy = c.u(0.1, 0.9), c.u(0.1, 0.9)
        if rng.random() < 0.75:  # fire core at the source
            fa = c.blob(sx, sy, c.u(0.015, 0.045), rough=0.5, cells=12, soft=0.15)
            fire = c.tex(c.jit((1.0, 0.55, 0.12), 0.08), lum=0.25, grain=0.08, chroma=0.05)
            c.paint(fa, np.clip(fire, 0, 1), _SMOKE)
        dx, dy = c.x - sx, c.y - sy
        t = dx * ca + dy * sa
        p = dy * ca - dx * sa
        tp, back = np.maximum(t, 0), np.minimum(t, 0)
        width = c.u(0.2, 0.5) * tp + c.u(0.02, 0.04)
        p += 0.8 * width * (c.noise(4) - 0.5)  # meandering plume
        dens = np.exp(-(p * p + back * back) / (width * width) - tp * (1.0 / c.u(0.3, 0.7)))
        billow = c.noise(7, 3)
        billow *= 1.2
        billow += 0.35
        dens *= billow * c.u(1.0, 1.5)
        np.clip(dens, 0, 0.97, out=dens)
        grey = c.u(0.35, 0.72)  # never as bright as snow, so dense smoke stays visible on it
        smoke = c.tex(c.jit((grey * 1.04, grey, grey * 0.95), 0.04), lum=0.15, grain=0.02)
        # thin smoke only veils what is under it; the label switches to smoke where it is dense
        c.paint(dens, smoke, _SMOKE, thr=0.55)


def _camera(c: _Canvas, haze: bool) -> np.ndarray:
    """Uneven illumination, colour cast, haze, lens blur and sensor noise -> uint8 RGB."""
    rng = c.rng
    img = c.img
    ang = c.u(0, 2 * math.pi)
    gain = (c.x - 0.5) * math.cos(ang) + (c.y - 0.5) * math.sin(ang)
    gain *= c.u(0, 0.2)
    gain += 1.0
    cast = (rng.uniform(0.95, 1.05, 3) * c.u(0.8, 1.18)).astype(np.float32)
    img *= gain[..., None] * cast
    if haze:
        img += c.u(0.08, 0.25) * (c.jit((0.75, 0.78, 0.82), 0.03) - img)
    np.clip(img, 0, 1, out=img)
    img **= c.u(0.85, 1.2)
    img *= 255.0
    img += 0.5
    u8 = Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(c.u(0.25, 0.75) * c.s / 128))
    out = rng.standard_normal((c.s, c.s, 3), dtype=np.float32)
    out *= c.u(2.0, 7.0)  # sensor noise, in 8-bit levels
    out += np.asarray(u8)
    out += 0.5
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise VitshrinkError(f"aerial: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def render_sample(seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene: (image uint8 (size, size, 3) RGB, mask uint8 (size, size) with ids 0..13).

    Deterministic in `seed`; the same seed at different sizes gives the same scene.
    """
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    c = _Canvas(rng, _check_int("size", size, _MIN_SIZE))
    kind = ("temperate", "arid", "winter")[int(rng.choice(3, p=[0.53, 0.22, 0.25]))]
    winter = kind == "winter"
    sun = c.u(0, 2 * math.pi)

    _terrain(c, kind)
    roads = _roads(c) if rng.random() < 0.8 else []
    # natural hazards cover ground and roads; buildings stand out of them
    if rng.random() < {"temperate": 0.45, "arid": 0.2, "winter": 0.1}[kind]:
        _flood(c)
    if rng.random() < {"temperate": 0.3, "arid": 0.35, "winter": 0.05}[kind]:
        _flow(c, c.jit(_MUD_RGB, 0.08), _MUD, debris=0.25, streak=0.22)
    if winter and rng.random() < 0.65:
        for _ in range(c.i(1, 3)):
            _flow(c, c.jit(_AVALANCHE_RGB, 0.02), _AVALANCHE, debris=0.12, streak=0.16)
    if winter and rng.random() < 0.55:
        _ice_jam(c)
    buildings = _plan_buildings(c, roads) if rng.random() < 0.75 else []
    trees = _plan_trees(c) if rng.random() < 0.7 else []
    if rng.random() < 0.35:
        _cracks(c, roads)
    _shadows(c, buildings, trees, sun)
    _paint_buildings(c, buildings)
    _paint_trees(c, trees, winter, sun)
    _small_objects(c, roads, buildings)
    if rng.random() < 0.3:
        _smoke_fire(c, buildings, trees)
    img = _camera(c, haze=rng.random() < 0.2)
    return img, c.mask


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


def colorize(mask: np.ndarray) -> np.ndarray:
    """Mask of class ids -> uint8 RGB using PALETTE (`labels.colorize`: ignore drawn as everywhere)."""
    return _colorize(mask, PALETTE)


def _seed_for(seed: int, i: int) -> int:
    return seed * _SEED_STRIDE + i


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


def _default_cache() -> Path:
    env = os.environ.get("VITSHRINK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitshrink"


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
    base = (Path(cache_dir).expanduser() if cache_dir is not None else _default_cache()) / (
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
