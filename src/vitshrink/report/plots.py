"""Report plots: the accuracy/latency Pareto chart and per-class IoU bars.

Figures are built with `matplotlib.figure.Figure` directly (rendered by Agg), not pyplot, so nothing
touches pyplot's global backend or figure registry: the report can run inside other programs and
threads without leaking figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
from matplotlib.transforms import Bbox

from vitshrink.artifacts import atomic_path

from .analysis import pareto_front
from .results import StageResult

FRONT_COLOUR = "#d1495b"
OTHER_COLOUR = "#8d99ae"
SERIES_COLOURS = ("#30638e", "#d1495b", "#edae49", "#00798c", "#7b6d8d", "#66a182")
MAX_SERIES = 4  # beyond this, per-class bars only compare the first and last stage
MAX_VERTICAL_CLASSES = 24  # more classes than this: horizontal bars, so every class name stays readable


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        # The temp name ends in .tmp, so the format must be explicit.
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


def plot_pareto(stages: Sequence[StageResult], metric_label: str, path: str | Path) -> Path:
    """Metric (%) against p50 latency; marker area proportional to file size; Pareto front as steps."""
    lat = np.array([s.p50 for s in stages])
    met = np.array([s.metric * 100 for s in stages])
    sizes = [s.size_mb for s in stages]
    known = [v for v in sizes if v]
    biggest = max(known) if known else 1.0
    # Area (points^2) proportional to MB, with a floor so tiny INT8 files stay visible.
    area = np.array([max(1500.0 * (v or 0.0) / biggest, 40.0) for v in sizes])
    front = pareto_front(list(zip(lat.tolist(), met.tolist())))
    on_front = np.zeros(len(stages), bool)
    on_front[front] = True

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    if len(front) > 1:
        # Steps, not segments: between two front points the best reachable metric is the faster one's.
        ax.step(lat[front], met[front], where="post", color=FRONT_COLOUR, lw=1.5, ls="--", zorder=1)
    for mask, colour, label in (
        (on_front, FRONT_COLOUR, "Pareto front"),
        (~on_front, OTHER_COLOUR, "dominated"),
    ):
        if mask.any():
            ax.scatter(lat[mask], met[mask], s=area[mask], c=colour, alpha=0.55, edgecolors="black",
                       linewidths=0.8, label=label, zorder=2)  # fmt: skip
    if lat.max() / lat.min() >= 4:
        ax.set_xscale("log")
        # 1-2-5 ticks as plain numbers: the default log axis can show a single "10^2" tick.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.margins(x=0.18, y=0.2)
    ax.set_xlabel("latency p50 (ms, lower is better)")
    ax.set_ylabel(f"{metric_label} (%)")
    ax.set_title(f"{metric_label} vs latency (marker area ∝ file size)", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    _place_labels(fig, ax, lat, met, np.sqrt(area) / 2, [s.name for s in stages], on_front, front)
    # Legend after the labels so "best" avoids them; fixed marker size, as scatter sizes mean MB.
    legend = ax.legend(loc="best", fontsize=9, framealpha=0.9)
    for handle in legend.legend_handles:
        handle.set_sizes([60])
    return save_figure(fig, path)


# (dx, dy, ha, va), in marker radii: right first, then the diagonals, above/below, left.
_LABEL_SPOTS = (
    (1.0, 0.0, "left", "center"),
    (0.75, 0.75, "left", "bottom"),
    (0.75, -0.75, "left", "top"),
    (0.0, 1.0, "center", "bottom"),
    (0.0, -1.0, "center", "top"),
    (-0.75, 0.75, "right", "bottom"),
    (-0.75, -0.75, "right", "top"),
    (-1.0, 0.0, "right", "center"),
)


def _place_labels(
    fig: Figure,
    ax: Axes,
    xs: np.ndarray,
    ys: np.ndarray,
    radii: np.ndarray,
    names: list[str],
    bold: np.ndarray,
    front: list[int],
) -> None:
    """Put each stage name beside its marker, where it overlaps no other label or marker.

    Hand-written greedy placement (try 8 spots, keep the first free one, else the least crowded):
    adjustText, the usual library for this, is not a project dependency, and a run has few stages.
    """
    renderer = FigureCanvasAgg(fig).get_renderer()
    ax.autoscale_view()  # fix the data limits now, so data -> pixel transforms are final
    to_px = fig.dpi / 72.0
    centres = ax.transData.transform(np.column_stack([xs, ys]))
    markers = [Bbox.from_extents(cx - r * to_px, cy - r * to_px, cx + r * to_px, cy + r * to_px)
               for (cx, cy), r in zip(centres, radii)]  # fmt: skip
    # The front's step line is an obstacle too: its horizontal then vertical leg between front points.
    for a, b in zip(front, front[1:]):
        (xa, ya), (xb, yb) = centres[a], centres[b]
        markers.append(Bbox.from_extents(xa, ya - 1, xb, ya + 1))
        markers.append(Bbox.from_extents(xb - 1, min(ya, yb), xb + 1, max(ya, yb)))
    frame = ax.get_window_extent(renderer)
    placed: list[Bbox] = []
    for i in sorted(range(len(names)), key=lambda i: -radii[i]):  # big markers have fewest free spots
        others = placed + [m for j, m in enumerate(markers) if j != i]  # step-line boxes sit past index n
        best, best_cost = None, float("inf")
        for dx, dy, ha, va in _LABEL_SPOTS:
            gap = radii[i] + 3.0
            text = ax.annotate(names[i], (xs[i], ys[i]), xytext=(dx * gap, dy * gap), textcoords="offset points",
                               ha=ha, va=va, fontsize=9, fontweight="bold" if bold[i] else "normal", zorder=3)  # fmt: skip
            box = text.get_window_extent(renderer)
            # Overlap with others, plus a heavy penalty for any part outside the axes.
            cost = sum(_overlap(box, o) for o in others) + 10 * (
                box.width * box.height - _overlap(box, frame)
            )
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (text, box), cost
            else:
                text.remove()
            if cost == 0:
                break
        placed.append(best[1])


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def per_class_series(stages: Sequence[StageResult], n_classes: int = 0) -> list[StageResult]:
    """Stages whose per-class IoU is plotted: all if few (stages and classes), else the first and last."""
    with_iou = [s for s in stages if s.per_class_iou]
    if len(with_iou) <= MAX_SERIES and n_classes <= MAX_VERTICAL_CLASSES:
        return with_iou
    return [with_iou[0], with_iou[-1]] if len(with_iou) > 1 else with_iou


def class_order(stages: Sequence[StageResult], class_names: Sequence[str]) -> list[str]:
    """Classes in dataset order, then any extra names found only in the results."""
    seen = {c for s in stages for c in s.per_class_iou}
    ordered = [c for c in class_names if c in seen]
    return ordered + sorted(seen - set(ordered))


def plot_per_class_iou(
    stages: Sequence[StageResult], class_names: Sequence[str], path: str | Path
) -> Path | None:
    """Grouped IoU bars per class (vertical; horizontal for many classes); None if nothing to plot."""
    classes = class_order(stages, class_names)
    series = per_class_series(stages, len(classes))
    if not series:
        return None
    n, k = len(classes), len(series)
    bar = 0.8 / k
    pos = np.arange(n)
    vertical = n <= MAX_VERTICAL_CLASSES
    if vertical:
        fig = Figure(figsize=(min(max(6.0, 0.5 * n + 2.0), 11.0), 4.2))
    else:
        fig = Figure(figsize=(7.5, min(1.5 + 0.3 * n, 60.0)))
    ax = fig.add_subplot()
    for j, s in enumerate(series):
        vals = np.array([s.per_class_iou.get(c, np.nan) * 100 for c in classes])
        offset, colour = (j - (k - 1) / 2) * bar, SERIES_COLOURS[j % len(SERIES_COLOURS)]
        if vertical:
            ax.bar(pos + offset, vals, width=bar, label=s.name, color=colour)
        else:
            ax.barh(pos + offset, vals, height=bar, label=s.name, color=colour)
    if vertical:
        ax.set_xticks(pos, classes, fontsize=9, rotation=40, ha="right", rotation_mode="anchor")
        ax.set_ylim(0, 100)
        ax.set_ylabel("IoU (%)")
        ax.set_xlim(-0.6, n - 0.4)
        ax.grid(True, axis="y", alpha=0.3)
    else:
        ax.set_yticks(pos, classes, fontsize=9)
        ax.invert_yaxis()  # first class at the top, as in the table
        ax.set_xlim(0, 100)
        ax.set_xlabel("IoU (%)")
        ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title("Per-class IoU", fontsize=11)
    # Outside the axes: inside, it would hide the bars of whichever classes sit under it.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return save_figure(fig, path)
