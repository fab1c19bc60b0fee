"""Rendering: the scene layers painted in order (terrain, roads, water, hazards, buildings, trees,
small objects, smoke), the camera model, and `render_sample`."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .classes import (
    _AVALANCHE,
    _BG,
    _BUILDING,
    _CRACK,
    _DAMAGED,
    _FLOOD,
    _ICE,
    _MIN_SIZE,
    _MUD,
    _ROAD,
    _SAND,
    _SMALL,
    _SMOKE,
    _SNOW,
    _TREE,
    _check_int,
)
from .layouts import _crossing_path, _plan_buildings, _plan_trees, _rect, _unit_tangent
from .textures import (
    _AVALANCHE_RGB,
    _BOATS,
    _CLOTHES,
    _DEBRIS_RGB,
    _GROUND,
    _ICE_RGB,
    _MUD_RGB,
    _SAND_RGB,
    _SNOW_RGB,
    _VEHICLES,
    _WATER,
    _arr,
    _Canvas,
)


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
