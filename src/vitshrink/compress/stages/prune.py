"""prune: structured (and optionally unstructured) pruning of the latest full-precision model, with
recovery distillation from MODEL when asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import VitshrinkError
from ..context import Context, Current
from . import base
from .base import RecipeError, Stage, StageKind, StageResult

TARGETS = ("ratio", "target_params", "target_latency_ms", "target_macs")


def run(stage: Stage, ctx: Context, cur: Current, sdir: Path) -> StageResult:
    try:
        from ...prune import prune
    except ImportError:
        raise VitshrinkError("the prune stage is not available in this installation") from None
    opts = dict(stage.options)
    if isinstance(opts.get("granularity"), str):
        opts["granularity"] = tuple(p.strip() for p in opts["granularity"].split(","))
    elif "granularity" in opts:
        opts["granularity"] = tuple(opts["granularity"])
    if opts.get("recover_epochs"):
        opts["teacher"] = str(ctx.teacher)  # recovery learns from MODEL, the strongest model in the run
    if opts.get("recover_epochs") or opts.get("importance") == "taylor" or opts.get("depth_ratio"):
        # depth pruning ranks blocks on real images when it has them
        opts.update(data=ctx.data, data_options=ctx.data_options)
    if opts.get("recover_epochs"):
        opts.update(teacher_cache_dir=ctx.logits_dir, on_epoch_end=base.epoch_hook(ctx, "prune"))
    out, m = prune(cur.model_dir, sdir / "model", quiet=ctx.quiet, **opts)
    return {
        "model_dir": Path(out),
        "artifact": base.export_model(Path(out), sdir / "model.onnx"),
        "train_metrics": m,
    }


def check(options: dict[str, Any], where: str) -> None:
    given = [t for t in TARGETS if t in options]
    if len(given) > 1:
        raise RecipeError(f"{where}: give only one of {', '.join(TARGETS)}, got {', '.join(given)}")
    if not given and "unstructured" not in options:
        raise RecipeError(f"{where}: needs one of {', '.join(TARGETS)} (or 'unstructured')")


KIND = StageKind("prune", run, check=check)
