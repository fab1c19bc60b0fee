"""baseline: a small CNN trained from scratch for the wall-clock time an earlier stage took (default:
distill), the honest "what would a plain small model do" row. A leaf: later stages ignore it."""

from __future__ import annotations

from pathlib import Path

from ...errors import VitshrinkError
from ..context import Context, Current
from . import base
from .base import Stage, StageKind, StageResult


def run(stage: Stage, ctx: Context, cur: Current, sdir: Path) -> StageResult:
    from ...baseline import train_baseline

    opts = dict(stage.options)
    budget = opts.pop("budget", "distill")
    if isinstance(budget, str):
        if budget not in ctx.stage_seconds:
            raise VitshrinkError(
                f"baseline: budget '{budget}' names no earlier stage of this run "
                f"(stages: {', '.join(ctx.stage_seconds) or 'none'}); give a stage label or seconds"
            )
        budget = ctx.stage_seconds[budget]
    pre = ctx.meta["preprocess"]
    out, m = train_baseline(
        ctx.data,
        out=sdir / "model",
        budget_s=float(budget),
        task=ctx.meta["task"],
        preset=opts.pop("model", None),
        image_size=pre["size"][0],
        data_options=ctx.data_options,
        quiet=ctx.quiet,
        **opts,
    )
    return {"model_dir": out, "artifact": base.export_model(out, sdir / "model.onnx"), "train_metrics": m}


KIND = StageKind("baseline", run, branch=True)
