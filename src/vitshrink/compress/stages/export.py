"""export: the latest full-precision model as ONNX with the given export options (opset, size, format)."""

from __future__ import annotations

from pathlib import Path

from ..context import Context, Current
from . import base
from .base import Stage, StageKind, StageResult


def run(stage: Stage, ctx: Context, cur: Current, sdir: Path) -> StageResult:
    path = base.export_model(cur.model_dir, sdir / "model.onnx", **stage.options)
    return {"model_dir": cur.model_dir, "artifact": path, "train_metrics": {}}


KIND = StageKind("export", run)
