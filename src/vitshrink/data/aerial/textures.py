"""Textures and compositing: the float canvas every scene layer paints on (value noise, streaks,
colour jitter, soft blobs, alpha compositing with labels) and the scene colour tables."""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw


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
