"""quantize: fp16 or int8 ONNX of the latest full-precision model. Its output is a leaf: consecutive
quantize stages are siblings of the same fp32 model (e.g. fp16 and int8 side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..context import Context, Current
from .base import RecipeError, Stage, StageKind, StageResult

CALIBRATED = ("int8", "int8-static", "int8-mixed")


def run(stage: Stage, ctx: Context, cur: Current, sdir: Path) -> StageResult:
    from ...quantize import quantize

    opts = dict(stage.options)
    mode = opts.pop("mode")
    calibrate = opts.pop("calibrate", mode in CALIBRATED or "max_drop" in opts)
    # At a resolution inside the graph the stage's model is re-exported: the ONNX it has runs at its own
    src = cur.model_dir if opts.get("resolution") is not None and cur.model_dir is not None else cur.onnx
    out, rep = quantize(
        src,
        sdir / "model.onnx",
        mode=mode,
        calib_data=ctx.data if calibrate else None,
        # calibrate on the run's data as configured (e.g. the aerial scenes' size and counts)
        data_options=ctx.data_options if calibrate else None,
        quiet=ctx.quiet,
        **opts,
    )
    return {"model_dir": None, "artifact": Path(out), "train_metrics": rep}


def check(options: dict[str, Any], where: str) -> None:
    if options.get("runtime") == "openvino":
        # stage artifacts are single files (checksums, the published final model); an IR is a folder
        raise RecipeError(
            f"{where}: quantize stages write one .onnx file, so runtime 'openvino' is for `vitshrink "
            "quantize` (here 'auto' keeps onnxruntime and says so in the stage report)"
        )


def label(stage: Stage) -> str:
    return f"quantize-{stage.options['mode']}"


KIND = StageKind("quantize", run, check=check, branch=True, onnx_only=True, label=label)
