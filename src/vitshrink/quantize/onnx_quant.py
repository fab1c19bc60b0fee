"""Quantize an exported ViT (ONNX in, ONNX out) without losing accuracy.

Built on onnxruntime.quantization (quant_pre_process, quantize_dynamic, quantize_static with its
calibrators and calibration cache). vitshrink adds what ViTs need on top:

- ViT-aware exclusions: only constant-weight MatMul/Gemm/Conv become int8. LayerNorm, Softmax, GELU,
  residual Adds and the activation x activation attention MatMuls stay float (outlier channels,
  heavy-tailed softmax; they hold no weights, so int8 would save little and cost accuracy).
- SmoothQuant-style migration of LayerNorm outlier channels into the next weights (`smooth.py`).
- "int8": builds the dynamic, the static (QDQ) and, for models with weight Convs, the mixed variant
  (dynamic MatMuls + QDQ Convs), measures them (metric + single-thread latency), then guarantees
  `max_drop` by sensitivity-driven fallback: every weight node is quantized alone and ranked by the
  output error it causes; the most sensitive go back to float until the metric drop holds. Without
  `eval_fn`, the metric is top-1 (or per-pixel) agreement with the float model on the calibration
  data, a stricter target than an accuracy drop.

The pieces live along their seams: `builders` (dynamic / static / mixed paths, one registered class
each), `sensitivity` (per-node ranking and fallback), `steps` (ORT pre-processing, the verified exact
rewrites of `fusions/`, verified smoothing, metadata), on `graph.Graph`. This module validates the
request and runs validate -> build -> check -> record.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from .._proc import peak_rss_mb
from ..artifacts import atomic_path
from ..bench.timing import onnx_latencies_ms, within_speed_tie
from ..cpu import TARGET_CPUS, int8_note, resolve_target_cpu
from ..errors import DataError, ModelError, VitshrinkError
from ..options import CALIB_METHODS, QUANT_MODES
from ..outputs import temp_dir
from . import ov
from .builders import make_builder
from .calib import batch_size_for, prepare_calib
from .context import Ctx
from .files import copy_metadata, file_size, load_onnx, read_meta
from .fp16 import to_fp16
from .graph import input_spec, weight_macs, weight_nodes
from .measure import ort_quiet, outputs, run
from .sensitivity import guarantee
from .steps import apply_smoothing, exact_rewrites, preprocess, record_int8_target

Mode = Literal["fp16", "int8-dynamic", "int8-static", "int8-mixed", "int8"]
MODES = QUANT_MODES  # declared once in vitshrink.options
TARGETS = ("cpu", "tensorrt")
DEFAULT_MAX_DROP = 0.005
METRIC_TIE = 1e-3  # then metrics this close count as equal; the smaller file wins
GENERATED_SAMPLES = 16
REL_ERROR_WARN = 0.1  # relative logit error vs fp32 above which int8 is suspect (typical: 0.01-0.05)


def make_say(quiet: bool) -> Callable[[str], None]:
    if quiet or os.environ.get("VITSHRINK_QUIET") == "1":
        return lambda msg: None
    return lambda msg: print(f"[quantize] {msg}", file=sys.stderr, flush=True)


def _generated_inputs(model: onnx.ModelProto, n: int = GENERATED_SAMPLES) -> list[np.ndarray] | None:
    """Image-like probe inputs, normalised as the runtime would, to compare int8 with fp32 when the
    user gives no calibration data: smooth random colour fields plus fine texture, so activations
    span ranges like real photos do (white noise would not exercise the saturating pair sums)."""
    from ..deploy._meta import resolve_preprocess

    dims = input_spec(model)[1]
    if len(dims) != 4:
        return None
    meta = read_meta(model) or {}
    try:
        channels, (h, w), mean, std = resolve_preprocess(meta, dims[1], (dims[2], dims[3]), "model")
    except VitshrinkError:
        return None
    step = dims[0] or batch_size_for([None, channels, h, w])  # dynamic batch: ~16 x 224^2 px
    count = max(n // step, 1) * step
    rng = np.random.default_rng(0)
    coarse = rng.random((count, channels, 4, 4))
    field = np.kron(coarse, np.ones((1, 1, -(-h // 4), -(-w // 4))))[:, :, :h, :w]
    img = np.clip(field + 0.15 * rng.standard_normal(field.shape), 0.0, 1.0)
    x = ((img - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]).astype(np.float32)
    return [x[i : i + step] for i in range(0, count, step)]


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    mode: Mode = "int8",
    calib: Iterable[np.ndarray] | None = None,
    calib_method: str = "percentile",
    per_channel: bool = True,
    vit_aware: bool = True,
    max_drop: float | None = None,
    eval_fn: Callable[[str], float] | None = None,
    target: Literal["cpu", "tensorrt"] = "cpu",
    target_cpu: str = "auto",
    quiet: bool = False,
    image_size: Sequence[int] | None = None,
    size_mb: float | None = None,
    latency_ms: float | None = None,
    runtime: str = "onnxruntime",
    openvino_out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Quantize an ONNX model to fp16 / int8 and write it atomically to `dst`; returns a report.

    mode: "fp16" (LayerNorm/Softmax kept fp32), "int8-dynamic", "int8-static" (QDQ, needs `calib`),
    "int8-mixed" (dynamic MatMuls + static QDQ Convs, needs `calib`), or "int8": vitshrink builds
    dynamic, static and (for models with weight Convs) mixed, picks the fastest by measurement (near
    ties: the more accurate, then the smaller file) and guarantees
    `max_drop` (default 0.005) by falling back the most sensitive nodes to float.
    size_mb / latency_ms: "int8" keeps the most accurate variant that meets these targets (file MB,
    1-thread ms) instead of the fastest, or the closest when none does (`choose_variant`); the report's
    `candidates` list every variant built and `kept_because` says why one was kept.
    calib: batches of `pixel_values` (float32 NCHW, normalised); at most 256 samples are used.
    eval_fn: path -> task metric (higher is better); without it the metric is agreement with fp32.
    max_drop: largest allowed metric drop (absolute, metric units); other modes apply it when given.
    image_size: (H, W) a dynamic-size graph is calibrated and deployed at; recorded in its metadata so
    predict resizes and tiles to it.
    vit_aware=False gives the plain onnxruntime recipe (no smoothing, every supported op quantized).
    target: "tensorrt" makes static int8 symmetric (what TensorRT consumes) and skips the dynamic path,
    which TensorRT cannot run.
    target_cpu: the CPU the int8 model will run on: "avx2" (x86 without VNNI: 7-bit weights, since
    onnxruntime's AVX2 int8 kernels saturate with full 8-bit weights; see `vitshrink.cpu`), "vnni",
    "arm64", or "auto" (this machine). Recorded in the report and the model's metadata.
    Without `calib`, int8-dynamic (and "int8", which then builds only the dynamic variant) is still
    compared with fp32 on generated image-like inputs (`fidelity`, with `inputs: generated`).
    runtime: "onnxruntime" (ONNX at `dst`), "openvino" (IR folder at `openvino_out`: NNCF int8 / fp16) or
    "auto": "int8" of both, the faster here at equal accuracy kept (`runtime_choice`; see `quantize.ov`).

    The report holds: mode, chosen, settings / settings_chosen, smoothing, kept_float (op types and
    fallback nodes, each with its reason), quantized_nodes, candidates (metric, latency, fallbacks of
    each path tried), metric_name / metric_before / metric_after / drop, fidelity (agreement and
    relative logit error vs fp32 on the calibration data), latency_ms, size_before / size_after /
    size_ratio (bytes), path and any warnings.
    """
    _check_options(mode, calib_method, target, target_cpu, max_drop)
    for name, v in (("size_mb", size_mb), ("latency_ms", latency_ms)):
        if v is not None and not v > 0:
            raise VitshrinkError(f"{name} must be > 0, got {v}")
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".onnx":
        raise VitshrinkError(f"output must end in .onnx: {dst}")
    say = make_say(quiet)
    original = load_onnx(src)
    check_float_model(original, src)
    check_finite_initializers(original, src)
    ov_skip = ov.check_request(runtime, mode, target_cpu, openvino_out)
    target_cpu = resolve_target_cpu(target_cpu)
    with temp_dir("quant") as tmp:
        work = Path(tmp)
        # calibration inputs and fp32 outputs live on disk, read one batch at a time (see Batches)
        batches, generated = _calibration_inputs(original, calib, mode, target, work / "calib")
        if max_drop is not None and mode != "fp16" and not batches:
            raise DataError("max_drop needs calibration data to rank nodes by sensitivity")
        if mode == "int8" and max_drop is None and not generated:
            max_drop = DEFAULT_MAX_DROP
        settings = dict(
            per_channel=per_channel,
            calib_method=calib_method,
            vit_aware=vit_aware,
            target=target,
            target_cpu=target_cpu,
        )
        ctx = _context(work, src, original, batches, generated, eval_fn, say, quiet, settings, mode)
        report = _new_report(mode, src, ctx, max_drop)
        final = _build(runtime, mode, src, ctx, max_drop, report, size_mb, latency_ms)
        final = _runtime_choice(runtime, ov_skip, final, src, ctx, max_drop, report)
        dst = _write(final, dst, original, ctx, report, image_size, openvino_out)
    report["size_after"] = ov.folder_bytes(dst) if report["runtime"] == "openvino" else file_size(dst)
    report["size_ratio"] = report["size_after"] / report["size_before"]
    report["path"] = str(dst)
    if read_meta(original) is None:
        report.setdefault("warnings", []).append("the input has no vitshrink metadata")
    # Peak resident memory of this process so far (the whole quantize run when called from the CLI):
    # calibration streams batch by batch, so it should not grow with the number of images.
    report["peak_rss_mb"] = peak_rss_mb(rusage_fallback=True)
    say(
        f"{report['chosen']}: {report['size_before'] / 2**20:.2f} MB -> {report['size_after'] / 2**20:.2f} MB"
        f" (peak memory {report['peak_rss_mb']:.0f} MB)"
    )
    return report


def _build(
    runtime: str,
    mode: str,
    src: Path,
    ctx: Ctx,
    max_drop: float | None,
    report: dict[str, Any],
    size_mb: float | None,
    latency_ms: float | None,
) -> Path:
    """The requested build (report updated with its fields and `_check_result`'s); its path."""
    if runtime == "openvino":  # from the export itself: ctx.pre holds onnxruntime-only fused ops
        final, extra = ov.fp16_ir(src, ctx) if mode == "fp16" else ov.int8_ir(src, ctx, max_drop)
    elif mode == "fp16":
        final, extra = _fp16(ctx.pre, ctx)  # type: ignore[arg-type]
    else:
        final, extra = _int8(mode, ctx.pre, ctx, max_drop, size_mb=size_mb, latency_ms=latency_ms)  # type: ignore[arg-type]
    report.update(extra)
    _check_result(final, ctx, report)
    return final


def _runtime_choice(
    runtime: str,
    ov_skip: str | None,
    final: Path,
    src: Path,
    ctx: Ctx,
    max_drop: float | None,
    report: dict[str, Any],
) -> Path:
    """`--runtime auto`: OpenVINO's int8 instead of `final` when it measures faster here (see
    `ov.choose_runtime`); the report's `runtime` and `runtime_choice` say what was kept and why."""
    if ov_skip is None and runtime == "auto":
        ov_final, extra = ov.choose_runtime(final, report, src, ctx, max_drop)
        ov.apply_choice(report, extra)
        if ov_final is not None:
            final = ov_final
            _check_result(final, ctx, report)
    elif runtime != "openvino":
        report["runtime_choice"] = {"kept": "onnxruntime", "why": ov_skip}
    report.setdefault("runtime", "onnxruntime")
    return final


def _check_options(
    mode: str, calib_method: str, target: str, target_cpu: str, max_drop: float | None
) -> None:
    if mode not in MODES:
        raise VitshrinkError(f"unknown quantization mode '{mode}' (choose from {', '.join(MODES)})")
    if calib_method not in CALIB_METHODS:
        raise VitshrinkError(
            f"unknown calibration method '{calib_method}' (choose from {', '.join(CALIB_METHODS)})"
        )
    if target not in TARGETS:
        raise VitshrinkError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    if target_cpu not in TARGET_CPUS:
        raise VitshrinkError(f"unknown target CPU '{target_cpu}' (choose from {', '.join(TARGET_CPUS)})")
    if max_drop is not None and not max_drop >= 0:
        raise VitshrinkError(f"max_drop must be >= 0, got {max_drop}")


def _calibration_inputs(
    original: onnx.ModelProto,
    calib: Iterable[np.ndarray] | None,
    mode: str,
    target: str,
    spill: Path,
) -> tuple[Sequence[np.ndarray], bool]:
    """(batches, generated): the user's calibration batches, or generated probe inputs without them."""
    batches = prepare_calib(calib, input_spec(original)[1], spill)
    if mode in ("int8-static", "int8-mixed") and not batches:
        raise DataError(f"mode '{mode}' needs calibration data; 'int8-dynamic' and 'fp16' work without")
    if target == "tensorrt" and mode == "int8" and not batches:
        raise DataError("int8 for TensorRT is static and needs calibration data")
    if target == "tensorrt" and mode == "int8-dynamic":
        raise VitshrinkError(
            "TensorRT cannot run dynamic int8; use mode 'int8-static' or 'int8' for target 'tensorrt'"
        )
    if not batches and mode != "fp16":
        # No data: still compare with fp32, on generated image-like inputs (never used to calibrate).
        probe = _generated_inputs(original)
        if probe is not None:
            return probe, True
    return batches, False


def _context(
    work: Path,
    src: Path,
    original: onnx.ModelProto,
    batches: Sequence[np.ndarray],
    generated: bool,
    eval_fn: Callable[[str], float] | None,
    say: Callable[[str], None],
    quiet: bool,
    settings: dict[str, Any],
    mode: str,
) -> Ctx:
    """Pre-process the model; hold what every build shares (fp32 reference outputs, base metric)."""
    pre = work / "pre.onnx"
    say("pre-processing (shape inference, graph optimisation)")
    preprocess(src, pre, original, say)
    # int8 for CPU is an onnxruntime model anyway; fp16 and TensorRT builds stay standard ONNX
    ort_only = mode != "fp16" and settings["target"] == "cpu"
    rewrites = exact_rewrites(pre, batches, say, ort_ops=ort_only) if settings["vit_aware"] else {}
    ref = outputs(pre, batches, work / "ref" if not generated else None) if batches else None
    ctx = Ctx(
        work, batches, ref, eval_fn, None, say=say, quiet=quiet, generated=generated, pre=pre, **settings
    )
    if generated:
        say(
            "no calibration data: int8-dynamic only (Convs stay float), compared with fp32 on "
            f"{sum(len(b) for b in batches)} generated inputs"
        )
    if batches:
        ctx.sample = batches[0][:1] if input_spec(original)[1][0] in (None, 1) else batches[0]
    ctx.base_metric = float(eval_fn(str(src))) if eval_fn is not None else (1.0 if ref is not None else None)
    ctx.rewrites = rewrites
    return ctx


def _new_report(mode: str, src: Path, ctx: Ctx, max_drop: float | None) -> dict[str, Any]:
    metric_name = None
    if ctx.eval_fn is not None:
        metric_name = "eval_fn"
    elif ctx.ref is not None:
        metric_name = "agreement_with_fp32" + ("_on_generated_inputs" if ctx.generated else "")
    return {
        "mode": mode,
        "metric_name": metric_name,
        "metric_before": ctx.base_metric,
        "size_before": file_size(src),
        **({"rewrites": ctx.rewrites} if ctx.rewrites else {}),
        "settings": {
            "per_channel": ctx.per_channel,
            "vit_aware": ctx.vit_aware,
            "calib_method": ctx.calib_method if ctx.batches and not ctx.generated else None,
            "target": ctx.target,
            "target_cpu": ctx.target_cpu if mode != "fp16" and ctx.target == "cpu" else None,
            "reduce_range": ctx.reduce_range if mode != "fp16" else None,
            "max_drop": max_drop,
        },
    }


def _check_result(final: Path, ctx: Ctx, report: dict[str, Any]) -> None:
    """Metric, fidelity and latency of the chosen model vs fp32; warnings when they look wrong."""
    metric_after = ctx.metric(final)
    report["metric_after"] = metric_after
    if metric_after is not None and ctx.base_metric is not None:
        report["drop"] = ctx.base_metric - metric_after
    report["fidelity"] = ctx.fidelity(final)
    if ctx.generated and report["fidelity"]:
        report["fidelity"]["inputs"] = "generated"
    err = report["fidelity"].get("rel_error")
    if report["mode"] != "fp16" and err is not None and err > REL_ERROR_WARN:
        report.setdefault("warnings", []).append(
            f"{report['chosen']} output differs from fp32 by {err:.3f} (relative)"
            + (
                " on generated inputs; pass calibration data to check and repair on real data"
                if ctx.generated
                else ""
            )
        )
    if ctx.sample is not None:
        fp32_ms, q_ms = onnx_latencies_ms([ctx.pre, final], ctx.sample)
        report["latency_ms"] = {"fp32": fp32_ms, report["chosen"]: q_ms}
        if not within_speed_tie(q_ms, fp32_ms):
            report.setdefault("warnings", []).append(
                f"{report['chosen']} runs slower than fp32 on this CPU (1 thread); the gain is the file size"
            )


def _write(
    final: Path,
    dst: Path,
    original: onnx.ModelProto,
    ctx: Ctx,
    report: dict[str, Any],
    image_size: Sequence[int] | None = None,
    openvino_out: str | os.PathLike | None = None,
) -> Path:
    """History and int8 target into the chosen model's metadata, then an atomic write to `dst`; an
    OpenVINO result goes to the folder `openvino_out` instead. Returns where it went."""
    if report["runtime"] == "openvino":
        folder = Path(openvino_out)  # type: ignore[arg-type]
        check_finite_outputs(final, ctx.sample, original, folder)  # before anything is written
        ov.write_openvino(final, folder, original, report, image_size)
        return folder
    out_model = onnx.load(str(final))
    # Shape annotations from pre-processing are only hints (runtimes re-infer them); they cost
    # ~4% of a small int8 file.
    del out_model.graph.value_info[:]
    history = {
        "stage": "quantize",
        "options": {"mode": report["mode"], **report["settings"], "chosen": report["chosen"]},
        "metrics": {k: report[k] for k in ("metric_before", "metric_after") if report.get(k) is not None},
    }
    copy_metadata(original, out_model, history, size=image_size)
    if report["mode"] != "fp16" and ctx.target == "cpu":
        record_int8_target(out_model, ctx.target_cpu)
    with atomic_path(dst) as tmp_out:
        onnx.save(out_model, str(tmp_out))
        check_finite_outputs(tmp_out, ctx.sample, original, dst)  # before the rename
    return dst


def check_float_model(model: onnx.ModelProto, src: Path) -> None:
    ops = {n.op_type for n in model.graph.node}
    if ops & {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "QLinearMatMul",
        "ConvInteger",
    }:
        raise ModelError(f"{src} is already quantized; quantize the float model instead")
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        raise ModelError(f"{src} already holds fp16 weights; quantize the float32 model instead")


def check_finite_initializers(model: onnx.ModelProto, src: str | os.PathLike) -> None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        floating = init.data_type in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.DOUBLE,
        )
        if floating and not np.isfinite(numpy_helper.to_array(init)).all():
            raise ModelError(f"model {src} has NaN or infinite values in {init.name}")


def check_finite_outputs(
    path: Path, sample: np.ndarray | None, original: onnx.ModelProto, dst: str | os.PathLike
) -> None:
    """The quantized model must give finite outputs (an overflowing scale would not), or nothing is written."""
    if sample is None:
        dims = input_spec(original)[1]
        sample = np.random.default_rng(0).standard_normal([d or 1 for d in dims]).astype(np.float32)
    if not np.isfinite(run(path, [sample])).all():
        raise ModelError(
            f"the quantized model for {dst} produces NaN or infinite outputs; nothing was written"
        )


def _fp16(pre: Path, ctx: Ctx) -> tuple[Path, dict[str, Any]]:
    ctx.say(
        "converting to fp16" + (" (LayerNorm / Softmax / variance ops kept fp32)" if ctx.vit_aware else "")
    )
    with ort_quiet():
        model, info = to_fp16(onnx.load(str(pre)), keep_fp32_ops=None if ctx.vit_aware else [])
    path = ctx.work / "fp16.onnx"
    onnx.save(model, str(path))
    kept = {
        op: "fp16 overflows past 65504: statistics and softmax run in fp32" for op in info["kept_fp32_ops"]
    }
    return path, {"chosen": "fp16", "kept_float": {"op_types": kept, "nodes": {}}, "fp16": info}


def choose_variant(
    candidates: Sequence[dict[str, Any]], *, size_mb: float | None = None, latency_ms: float | None = None
) -> tuple[dict[str, Any], str]:
    """The int8 variant to keep and why, from each one's `metric`, `latency_ms` and `size_mb`.

    Without a size or latency target: the fastest (near ties: the more accurate, then the smaller file).
    With one: the most accurate of the variants that meet every target (near ties: the smaller file
    under a size target, else the faster); when none meets them, the one closest to them (summed excess
    relative to each target). Latency here is onnxruntime's at 1 thread, a conservative stand-in.
    """
    if size_mb is None and latency_ms is None:
        fastest = min(c["latency_ms"] for c in candidates)
        pool = [c for c in candidates if within_speed_tie(c["latency_ms"], fastest)]  # then the more accurate
        top = max(c["metric"] or 0 for c in pool)
        pool = [c for c in pool if (c["metric"] or 0) >= top - METRIC_TIE]
        best = min(pool, key=lambda c: c["size_mb"])
        return best, f"fastest ({best['latency_ms']:.3f} ms at 1 thread)"
    targets = {k: v for k, v in (("size_mb", size_mb), ("latency_ms", latency_ms)) if v is not None}

    def excess(c: dict[str, Any]) -> float:
        return sum(max(0.0, c[k] - v) / v for k, v in targets.items())

    what = " and ".join(f"{k} <= {v:g}" for k, v in targets.items())
    meeting = [c for c in candidates if excess(c) == 0]
    if not meeting:
        best = min(candidates, key=lambda c: (excess(c), -(c["metric"] or 0)))
        return (
            best,
            f"no variant meets {what}; closest ({best['size_mb']:.2f} MB, {best['latency_ms']:.3f} ms)",
        )
    top = max(c["metric"] or 0 for c in meeting)
    pool = [c for c in meeting if (c["metric"] or 0) >= top - METRIC_TIE]
    tiebreak = "size_mb" if size_mb is not None else "latency_ms"
    best = min(pool, key=lambda c: c[tiebreak])
    return best, (
        f"meets {what} ({best['size_mb']:.2f} MB, {best['latency_ms']:.3f} ms) and is the most accurate "
        f"of the {len(meeting)} of {len(candidates)} variants that do"
    )


def _int8(
    mode: str,
    pre: Path,
    ctx: Ctx,
    max_drop: float | None,
    size_mb: float | None = None,
    latency_ms: float | None = None,
) -> tuple[Path, dict[str, Any]]:
    extra: dict[str, Any] = {}
    src = pre
    if ctx.vit_aware:
        ctx.say("smoothing LayerNorm outlier channels into the next weights")
        src, info = apply_smoothing(pre, ctx)
        extra["smoothing"] = {
            "applied": src != pre,
            "stats": info.get("stats"),
            "layernorms": len(info["smoothed"]),
            "max_outlier_ratio_before": max(
                (v["outlier_ratio_before"] for v in info["smoothed"].values()), default=None
            ),
            "max_outlier_ratio_after": max(
                (v["outlier_ratio_after"] for v in info["smoothed"].values()), default=None
            ),
            "skipped": info["skipped"],
            **({"rejected": info["rejected"]} if "rejected" in info else {}),
        }
    if mode != "int8":
        kinds = [mode]
    elif ctx.generated:
        kinds = ["int8-dynamic"]  # static variants need real calibration data
        note = _float_conv_note(src)
        if note:
            ctx.say(note)
            extra.setdefault("warnings", []).append(note)
    elif ctx.target == "tensorrt":
        kinds = ["int8-static"]
    else:
        has_convs = any(n.op_type == "Conv" for n in weight_nodes(onnx.load(str(src))))
        kinds = ["int8-dynamic", "int8-static"] + (["int8-mixed"] if has_convs else [])
    candidates = []
    for kind in kinds:
        builder = make_builder(kind, src, ctx)
        ctx.say(f"building {kind} ({len(builder.candidates)} quantizable nodes)")
        path = builder.build()
        res = {"path": path, "metric": ctx.metric(path), "fallback": {}}
        if max_drop is not None:
            res = guarantee(builder, ctx, max_drop, path, res["metric"])
        res["builder"] = builder
        res["latency_ms"] = None
        candidates.append(res)
    for c in candidates:
        c["size_mb"] = file_size(c["path"]) / 2**20
    best, why = candidates[0], f"{candidates[0]['builder'].kind} is the only variant built"
    if len(candidates) > 1:
        for c, ms in zip(candidates, onnx_latencies_ms([c["path"] for c in candidates], ctx.sample)):
            c["latency_ms"] = ms
        best, why = choose_variant(candidates, size_mb=size_mb, latency_ms=latency_ms)
    ctx.say(f"kept {best['builder'].kind}: {why}")
    best, attention = _attention_choice(best, ctx, max_drop)
    if attention:
        extra["attention"] = attention
    builder = best["builder"]
    kept_nodes = {
        n: f"sensitivity-driven fallback: rel. output error {s} when quantized alone"
        for n, s in best["fallback"].items()
    }
    extra.update(
        chosen=builder.kind,
        settings_chosen={
            "calib_method": builder.calib_method if builder.calibrated else None,
            **({"calib_note": builder.calib_note} if builder.calib_note else {}),
            "activations": ("int8 symmetric" if ctx.target == "tensorrt" else "uint8") + builder.activations,
            "weights": ("int8 (7-bit range) " if ctx.reduce_range else "int8 ")
            + ("per-channel" if ctx.per_channel else "per-tensor"),
            **({"attention": ATTENTION_SETTING} if attention.get("kept") == "int8" else {}),
            **(
                {"target_cpu": ctx.target_cpu, "target_cpu_note": int8_note(ctx.target_cpu)}
                if ctx.target == "cpu"
                else {}
            ),
        },
        quantized_nodes=len(builder.candidates) - len(best["fallback"]) - len(_float_attention(best)),
        attention_int8=len(_quantized_attention(best)),
        kept_float={"op_types": builder.kept_ops, "nodes": kept_nodes},
        candidates=[
            {
                "kind": c["builder"].kind,
                "metric": c["metric"],
                "latency_ms": c["latency_ms"],
                "size_mb": c["size_mb"],
                "fallback_nodes": len(c["fallback"]),
            }
            for c in candidates
        ],
        kept_because=why,
    )
    if "warning" in best:
        extra.setdefault("warnings", []).append(best["warning"])
    return best["path"], extra


ATTENTION_SETTING = (
    "QK^T and PV as int8 products (q, softmax output uint8; k, v int8 symmetric; ranges per run)"
)
# int8 attention adds ~20 small ops per block: it must beat float attention by this much (1 thread) to
# stay. It pays on big maps (SegFormer-B0 at 512 px: 86 -> 79 ms), not on a 50-token ViT.
ATTENTION_MIN_GAIN = 0.02


def _quantized_attention(c: dict[str, Any]) -> list[str]:
    return [a for a in c["builder"].attention if a not in c["fallback"] and not c.get("float_attention")]


def _float_attention(c: dict[str, Any]) -> list[str]:
    """Attention kept float by the speed check (not by the fallback, which `fallback` counts)."""
    return [a for a in c["builder"].attention if a not in c["fallback"] and c.get("float_attention")]


def _attention_choice(
    best: dict[str, Any], ctx: Ctx, max_drop: float | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keep the chosen variant's int8 attention only where the model times faster with it than with
    float attention (1 thread); otherwise the same variant with float attention, unless that one misses
    max_drop (a noisy metric: int8 attention already held it)."""
    quantized = _quantized_attention(best)
    if not quantized:
        return best, {}
    builder = best["builder"]
    alt = {**best, "path": builder.build(excluded=[*best["fallback"], *quantized]), "float_attention": True}
    if ctx.sample is None:  # nothing to time it on: float attention, exact
        alt["metric"] = ctx.metric(alt["path"])
        return alt, {"kept": "float", "why": "no input to time it on"}
    q_ms, f_ms = onnx_latencies_ms([best["path"], alt["path"]], ctx.sample)
    info = {"int8_ms": q_ms, "float_ms": f_ms, "blocks": len(quantized)}
    if q_ms < f_ms * (1 - ATTENTION_MIN_GAIN):
        ctx.say(f"int8 attention: {q_ms:.2f} ms vs {f_ms:.2f} ms with float attention, kept")
        return best, {**info, "kept": "int8"}
    alt["metric"] = ctx.metric(alt["path"])
    if max_drop is not None and not (
        alt["metric"] is None or ctx.base_metric - alt["metric"] <= max_drop + 1e-12
    ):
        return best, {**info, "kept": "int8", "why": "float attention missed max_drop"}
    ctx.say(f"int8 attention: {q_ms:.2f} ms vs {f_ms:.2f} ms with float attention, not worth it: float kept")
    return alt, {**info, "kept": "float"}


CONV_NOTE_SHARE = 0.1  # below this share of the weight multiply-adds, float Convs cost little


def _float_conv_note(path: Path) -> str | None:
    """One line for `int8` without calibration data on a conv-heavy model: what dynamic int8 leaves."""
    macs = weight_macs(onnx.load(str(path)))
    total = sum(macs.values())
    share = macs.get("Conv", 0) / total if total else 0.0
    if share < CONV_NOTE_SHARE:
        return None
    return (
        f"no calibration data: the Convs ({share:.0%} of the weight multiply-adds) stay float, so int8 "
        f"speeds up only the other {1 - share:.0%} (at most {1 / share:.1f}x overall, if time follows "
        "multiply-adds); pass calibration data for int8-mixed / int8-static, which quantize the Convs too"
    )
