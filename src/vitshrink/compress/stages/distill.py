"""distill: a student (a preset, optionally with config overrides, or a model directory) learns from
the latest full-precision model (MODEL itself when distill comes first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import VitshrinkError
from ..context import Context, Current
from . import base
from .base import RecipeError, Stage, StageKind, StageResult


def _build_student(preset: str, overrides: dict[str, Any], ctx: Context, out: Path, size: int | None) -> Path:
    """A preset student with config overrides, normalised like the teacher (distill takes presets as is)."""
    from ...models import build_model, save_model

    pre = ctx.meta["preprocess"]
    try:
        net, meta = build_model(
            preset,
            task=ctx.meta["task"],
            image_size=size or pre["size"][0],
            num_channels=pre["channels"],
            class_names=ctx.meta["class_names"],
            mean=pre["mean"],
            std=pre["std"],
            **overrides,
        )
    except TypeError as e:
        raise VitshrinkError(f"bad student_options for '{preset}': {str(e).splitlines()[0]}") from None
    return save_model(net, meta, out, stage="build", options={"preset": preset, **overrides})


def run(stage: Stage, ctx: Context, cur: Current, sdir: Path) -> StageResult:
    from ...distill import distill

    opts = dict(stage.options)
    student = opts.pop("student")
    overrides = opts.pop("student_options", None)
    if overrides:
        student = str(_build_student(student, overrides, ctx, sdir / "student-init", opts.get("image_size")))
        opts.pop("image_size", None)  # the built student carries its size
    out, m = distill(
        cur.model_dir,
        student,
        ctx.data,
        out=sdir / "model",
        resume=True,  # an interrupted distillation continues from its last epoch
        quiet=ctx.quiet,
        data_options=ctx.data_options,
        teacher_cache_dir=ctx.logits_dir if opts.get("cache_teacher") else None,
        on_epoch_end=base.epoch_hook(ctx, "distill"),
        **opts,
    )
    return {"model_dir": out, "artifact": base.export_model(out, sdir / "model.onnx"), "train_metrics": m}


def check(options: dict[str, Any], where: str) -> None:
    if "student_options" in options and Path(options["student"]).exists():
        raise RecipeError(f"{where}: 'student_options' apply to a preset student, not a directory")


KIND = StageKind("distill", run, check=check)
