"""Demo stages after distillation: prune (+ distillation recovery), then fp16 and int8.

Each stage is `(cfg, out, model_dir, onnx, **ctx) -> (model_dir, onnx, [stage records])`; the model
directory / ONNX returned feed the next stage, the records go into results.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def prune_stage(
    cfg: Any,
    out: Path,
    model_dir: Path,
    onnx: Path,
    *,
    teacher_dir: Path,
    quick: bool,
    quiet: bool,
    log: Any,
    ev: dict[str, Any],
):
    from .demo import _stage_record
    from .evaluate import evaluate
    from .export import export_onnx
    from .prune import GRANULARITIES, prune

    gran = cfg.extra.get("prune_granularity", GRANULARITIES)
    what = "the least damaging axes (auto)" if gran == "auto" else "heads/neurons/channels"
    log(
        f"pruning the parameters of a {cfg.prune_ratio:.0%} cut of {what}, recovering {cfg.prune_recover_epochs} "
        "epoch(s) with distillation"
    )
    pdir, pm = prune(
        model_dir,
        out / "prune",
        ratio=cfg.prune_ratio,
        granularity=gran,
        steps=1,
        recover_epochs=cfg.prune_recover_epochs,
        teacher=teacher_dir,
        data=cfg.data,
        data_options=cfg.data_options,
        limit=cfg.distill_limit,
        batch_size=cfg.batch_size,
        lr=cfg.extra.get("prune_lr", 5e-4),
        augment=cfg.augment,
        recover_losses=cfg.extra.get("prune_recover_losses", "kd"),
        quiet=quiet,
    )
    ponnx, _ = export_onnx(pdir, out / "prune.onnx")
    m = evaluate(ponnx, cfg.data, **ev)
    log(
        f"prune: {m.get('accuracy', m.get('miou')):.4f}  params {pm.get('params_before')} -> {pm.get('params_after')}"
    )
    return pdir, ponnx, [_stage_record("prune", pdir, ponnx, m, cfg.task)]


def quantize_stage(
    cfg: Any,
    out: Path,
    model_dir: Path,
    onnx: Path,
    *,
    teacher_dir: Path,
    quick: bool,
    quiet: bool,
    log: Any,
    ev: dict[str, Any],
):
    from .demo import _stage_record
    from .evaluate import evaluate
    from .quantize import quantize

    recs = []
    fp16, _ = quantize(onnx, out / "fp16.onnx", mode="fp16", quiet=True)
    m = evaluate(fp16, cfg.data, **ev)
    log(f"fp16: {m.get('accuracy', m.get('miou')):.4f}")
    recs.append(
        _stage_record(
            "fp16",
            None,
            fp16,
            m,
            cfg.task,
            notes="fp16 weights, LayerNorm/Softmax kept fp32 (the Jetson/TensorRT latency path)",
        )
    )
    int8, rep = quantize(
        onnx,
        out / "int8.onnx",
        mode="int8",
        calib_data=cfg.data,
        data_options=cfg.data_options,
        max_drop=cfg.extra.get("max_drop", 0.005),
        quiet=True,
    )
    m = evaluate(int8, cfg.data, **ev)
    log(f"int8: {m.get('accuracy', m.get('miou')):.4f} ({rep.get('chosen', rep.get('mode'))})")
    recs.append(
        _stage_record(
            "int8", None, int8, m, cfg.task, notes=f"vitshrink int8: {rep.get('chosen', '')}".strip()
        )
    )
    return model_dir, int8, recs


STAGES: list[Any] = [prune_stage, quantize_stage]
