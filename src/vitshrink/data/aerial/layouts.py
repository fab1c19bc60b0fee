"""Layouts: where things go. Paths crossing the image, rotated footprints, building and tree plans
(positions in image fractions, so every size renders the same scene)."""

from __future__ import annotations

import math

import numpy as np

from .textures import _ROOFS, _Canvas


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


def _plan_trees(c: _Canvas) -> list[tuple[float, float, float, int]]:
    discs = []
    for _ in range(c.i(1, 8)):
        cx, cy = c.u(), c.u()
        spread = c.u(0.02, 0.08)
        for _ in range(c.i(2, 14)):
            x, y = c.rng.normal((cx, cy), spread).tolist()
            discs.append((x, y, c.u(0.012, 0.03), c.i(140, 230)))
    return discs
