"""The run report: `report.md` and a self-contained `report.html` with plots, from `results.json`.

`report(run_dir)` reads DIR/results.json (written by compress/bench) and writes, all atomically:
  DIR/pareto.png         metric vs p50 latency, marker area ~ file size, Pareto front
  DIR/per_class_iou.png  segmentation only, when stages carry per-class IoU
  DIR/report.md          tables, ratios vs the original, image links
  DIR/report.html        the same content, images embedded as data URIs, no external references
"""

from __future__ import annotations

import sys
from pathlib import Path

from vitshrink.artifacts import atomic_file

from .analysis import Comparison, compare, lpcvc_score, pareto_front
from .panel import colorize, default_palette, save_example_panel
from .plots import plot_pareto, plot_per_class_iou
from .render import METRIC_LABELS, build_content, to_html, to_markdown
from .results import Results, StageResult, load_results
from .screenshot import screenshot

__all__ = [
    "Comparison",
    "Results",
    "StageResult",
    "colorize",
    "compare",
    "default_palette",
    "load_results",
    "lpcvc_score",
    "pareto_front",
    "report",
    "save_example_panel",
    "screenshot",
]


def _write_text(path: Path, text: str) -> Path:
    with atomic_file(path, "w") as f:
        f.write(text)
    return path


def report(run_dir: str | Path, quiet: bool = False) -> dict[str, Path]:
    """Write the report files into `run_dir`; return {"markdown", "html", "pareto"[, "per_class_iou"]}."""
    res = load_results(run_dir)
    run_dir = res.run_dir
    comps = compare(res.stages)
    written: dict[str, Path] = {}
    written["pareto"] = plot_pareto(res.stages, METRIC_LABELS[res.metric], run_dir / "pareto.png")
    per_class_png = None
    if res.task == "segmentation":
        per_class_png = plot_per_class_iou(res.stages, res.class_names, run_dir / "per_class_iou.png")
        if per_class_png is not None:
            written["per_class_iou"] = per_class_png
    content = build_content(res, comps, written["pareto"], per_class_png)
    written["markdown"] = _write_text(run_dir / "report.md", to_markdown(content))
    written["html"] = _write_text(run_dir / "report.html", to_html(content))
    if not quiet:
        for path in written.values():
            print(f"wrote {path}", file=sys.stderr)
    return written


from vitshrink._callable import install as _install; _install(__name__, "report")  # noqa: E402, E702, I001  # fmt: skip
