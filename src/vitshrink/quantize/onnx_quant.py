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
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from ..artifacts import atomic_path
from ..bench.timing import onnx_latencies_ms
from ..cpu import TARGET_CPUS, int8_note, reduce_range_for, resolve_target_cpu
from ..deploy._meta import write_meta_props
from ..errors import DataError, ModelError, VitshrinkError
from ..options import CALIB_METHODS, QUANT_MODES
from ..outputs import temp_dir
from ..progress import progress
from ._common import (
    agreement,
    copy_metadata,
    file_size,
    input_spec,
    load_onnx,
    make_say,
    ort_quiet,
    prepare_calib,
    read_meta,
    rel_error,
    run,
    weight_nodes,
)
from .fp16 import to_fp16
from .smooth import smooth_model

Mode = Literal["fp16", "int8-dynamic", "int8-static", "int8-mixed", "int8"]
MODES = QUANT_MODES  # declared once in vitshrink.options
TARGETS = ("cpu", "tensorrt")
DEFAULT_MAX_DROP = 0.005
MAX_SENSITIVITY_UNITS = 32  # above this many weight nodes, rank and fall back whole block parts
SENSITIVITY_SAMPLES = 32  # samples used to rank nodes; the final check uses all calibration data
SMOOTH_ALPHA = 0.5
SPEED_TIE = 0.05  # latencies within 5% count as equal; the more accurate variant wins
METRIC_TIE = 1e-3  # then metrics this close count as equal; the smaller file wins

FLOAT_REASONS = {
    "LayerNormalization": "normalisation over outlier channels; a per-tensor int8 scale erases the small channels",
    "Softmax": "heavy-tailed attention probabilities; 8 bits round most of them to 0",
    "Erf": "GELU is cheap in float and its output is re-quantized at fc2's input anyway",
    "Gelu": "GELU is cheap in float and its output is re-quantized at fc2's input anyway",
    "Add": "residual stream and biases carry the outliers; elementwise, nothing to gain from int8",
    "Mul": "elementwise scaling; nothing to gain from int8",
    "Div": "elementwise scaling; nothing to gain from int8",
}
ACT_MATMUL_REASON = "activation x activation MatMul (attention QK^T / PV): no weights to shrink, softmax inputs lose precision"
CONV_DYNAMIC_REASON = (
    "onnxruntime's dynamic ConvInteger runs slower than float Conv (measured 2.4x on UperNet-Swin)"
)
GEMM_DYNAMIC_REASON = "onnxruntime has no dynamic-int8 Gemm kernel (classifier head stays float)"
NAIVE_SKIP = {
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Slice",
    "Split",
    "Gather",
    "GatherElements",
    "Where",
    "Pad",
    "TopK",
    "CumSum",
    "MaxPool",
    "Resize",
}


@dataclass
class _Ctx:
    work: Path
    batches: list[np.ndarray]
    ref: np.ndarray | None
    eval_fn: Callable[[str], float] | None
    base_metric: float | None
    per_channel: bool
    calib_method: str
    vit_aware: bool
    target: str
    say: Callable[[str], None]
    sample: np.ndarray | None = None  # one batch-1 input (or the fixed batch) for latency
    quiet: bool = False
    target_cpu: str = "vnni"  # concrete int8 CPU target (see vitshrink.cpu); "avx2" means 7-bit weights
    generated: bool = False  # `batches` are generated probe inputs, not calibration data
    counter: list[int] = field(default_factory=lambda: [0])
    memo: dict[str, float | None] = field(default_factory=dict)

    @property
    def reduce_range(self) -> bool:
        # TensorRT runs symmetric int8 x int8 on the GPU: no 16-bit pair sums to protect.
        return self.target != "tensorrt" and reduce_range_for(self.target_cpu)

    def path(self, tag: str) -> Path:
        self.counter[0] += 1
        return self.work / f"{self.counter[0]:04d}-{tag}.onnx"

    def metric(self, path: Path) -> float | None:
        key = str(path)
        if key not in self.memo:
            if self.eval_fn is not None:
                self.memo[key] = float(self.eval_fn(key))
            else:
                self.memo[key] = None if self.ref is None else agreement(self.ref, run(path, self.batches))
        return self.memo[key]

    def fidelity(self, path: Path) -> dict[str, float]:
        if self.ref is None:
            return {}
        out = run(path, self.batches)
        return {
            "agreement": agreement(self.ref, out),
            "rel_error": rel_error(self.ref, out),
            "finite": bool(np.isfinite(out).all()),
        }


class _Reader:
    """CalibrationDataReader over in-memory batches (ORT duck-types on get_next)."""

    def __init__(self, name: str, batches: list[np.ndarray], quiet: bool = False) -> None:
        feeds = [{name: b} for b in batches]
        self._it = iter(progress(feeds, desc="calibrate", disable=quiet))
        self._n = len(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __len__(self) -> int:
        return self._n


class _Builder:
    """Builds one quantization path from a float model with a given set of nodes kept in float."""

    def __init__(self, kind: str, src: Path, ctx: _Ctx) -> None:
        self.kind, self.ctx = kind, ctx
        model = onnx.load(str(src))
        self.input_name = input_spec(model)[0]
        self.src = src
        weights = weight_nodes(model)
        present = {n.op_type for n in model.graph.node}
        inits = {i.name for i in model.graph.initializer}
        act_mm = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]
        self.kept_ops: dict[str, str] = {}
        self.calib_method = ctx.calib_method
        self.calib_note: str | None = None
        self.cache = ctx.work / f"calib-{kind}-{src.stem}.json"
        self.convs: set[str] = set()
        if kind in ("int8-dynamic", "int8-mixed"):
            if any(n.op_type == "Gemm" for n in weights):
                # onnxruntime has no dynamic-int8 Gemm, and onnxslim turns every Linear into one.
                model, _ = gemm_to_matmul(model)
                self.src = ctx.work / f"{src.stem}-matmul.onnx"
                onnx.save(model, str(self.src))
                weights = weight_nodes(model)
                present = {n.op_type for n in model.graph.node}
            self.candidates = [n.name for n in weights if n.op_type == "MatMul"]
            self.op_types = ["MatMul"] if ctx.vit_aware else None
            if "Gemm" in present:
                self.kept_ops["Gemm"] = GEMM_DYNAMIC_REASON
            if kind == "int8-mixed":
                # Dynamic int8 MatMuls plus static QDQ Convs (fused to QLinearConv): conv-heavy models
                # (SegFormer / UperNet) keep dynamic int8's speed without float conv weights.
                self.convs = {n.name for n in weights if n.op_type == "Conv"}
                self.candidates += sorted(self.convs)
            elif "Conv" in present and ctx.vit_aware:
                self.kept_ops["Conv"] = CONV_DYNAMIC_REASON
        elif ctx.vit_aware:
            self.candidates = [n.name for n in weights]
            self.op_types = ["MatMul", "Gemm", "Conv"]
        else:
            # Naive static: everything onnxruntime can quantize; data-movement ops are not worth ranking.
            self.candidates = [
                n.name for n in model.graph.node if n.op_type not in NAIVE_SKIP and n.op_type in _qdq_ops()
            ]
            self.op_types = None
        if ctx.vit_aware:
            for op in sorted(present & FLOAT_REASONS.keys()):
                self.kept_ops[op] = FLOAT_REASONS[op]
            if act_mm:
                self.kept_ops[f"MatMul x{len(act_mm)} (activation x activation)"] = ACT_MATMUL_REASON

    def build(self, excluded: Iterable[str] = (), only: list[str] | None = None) -> Path:
        excluded = set(excluded)
        chosen = only if only is not None else [c for c in self.candidates if c not in excluded]
        out = self.ctx.path(self.kind)
        if not chosen:  # ORT reads an empty nodes_to_quantize as "all"; nothing to quantize = the float model
            shutil.copyfile(self.src, out)
            return out
        # Explicit node lists keep ORT from quantizing anything we did not choose (e.g. attention MatMuls,
        # which its QDQ path quantizes even with MatMulConstBOnly).
        limit = chosen if (self.ctx.vit_aware or only is not None) else []
        exclude = [] if limit else sorted(excluded)
        try:
            self._build(out, limit, exclude)
        except Exception as e:  # noqa: BLE001 - ORT raises many types; report one line, keep the chain
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelError(f"onnxruntime could not build the {self.kind} model: {first}") from e
        return out

    def _build(self, out: Path, limit: list[str], exclude: list[str]) -> None:
        with ort_quiet():
            if self.kind == "int8-mixed":
                self._mixed(out, limit or [c for c in self.candidates if c not in exclude])
            elif self.kind == "int8-dynamic":
                self._dynamic(self.src, out, self.op_types, limit, exclude)
            else:
                self._static(out, limit, exclude)

    def _dynamic(
        self, src: Path, out: Path, op_types: list[str] | None, limit: list[str], exclude: list[str]
    ) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            src,
            out,
            op_types_to_quantize=op_types,
            per_channel=self.ctx.per_channel,
            reduce_range=self.ctx.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=limit,
            nodes_to_exclude=exclude,
            extra_options={"MatMulConstBOnly": True},
        )

    def _mixed(self, out: Path, chosen: list[str]) -> None:
        convs = [c for c in chosen if c in self.convs]
        mms = [c for c in chosen if c not in self.convs]
        mid = out.with_name(out.stem + "-convs.onnx")
        if convs:
            self._static(mid, convs, [], op_types=["Conv"])
        else:
            shutil.copyfile(self.src, mid)
        if mms:
            self._dynamic(mid, out, ["MatMul"], mms, [])
            mid.unlink()
        else:
            os.replace(mid, out)

    def _static(
        self, out: Path, limit: list[str], exclude: list[str], op_types: list[str] | None = None
    ) -> None:
        try:
            self._quantize_static(out, limit, exclude, op_types)
        except ValueError as e:
            # Histogram calibrators fail on constant tensors ("Too many bins for data range").
            if self.calib_method == "minmax":
                raise
            self.calib_note = f"{self.calib_method} calibration failed ({str(e)[:120]}); used minmax"
            self.calib_method = "minmax"
            self.cache.unlink(missing_ok=True)
            self.ctx.say(self.calib_note)
            self._quantize_static(out, limit, exclude, op_types)

    def _quantize_static(
        self, out: Path, limit: list[str], exclude: list[str], op_types: list[str] | None = None
    ) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
            "distribution": CalibrationMethod.Distribution,
        }[self.calib_method]
        trt = self.ctx.target == "tensorrt"
        kwargs: dict[str, Any] = {}
        # Calibrate once and reuse the ranges for every variant (older onnxruntime lacks the cache and
        # simply calibrates again).
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            kwargs["calibration_cache_path"] = self.cache
        quantize_static(
            self.src,
            out,
            _Reader(self.input_name, self.ctx.batches, quiet=self.ctx.quiet),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types or self.op_types,
            per_channel=self.ctx.per_channel,
            reduce_range=self.ctx.reduce_range,
            # uint8 activations x int8 weights is onnxruntime's fast CPU path; TensorRT wants symmetric int8.
            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=limit,
            nodes_to_exclude=exclude,
            calibrate_method=method,
            extra_options={"ActivationSymmetric": True} if trt else {},
            **kwargs,
        )


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite constant-weight Gemm(A, B, C) as MatMul(A, B') + Add(C') (exact; alpha/beta folded)."""
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    nodes, count = [], 0
    for n in g.node:
        a = attrs(n) if n.op_type == "Gemm" else {}
        c_ok = len(n.input) < 3 or not n.input[2] or n.input[2] in inits
        if n.op_type != "Gemm" or a.get("transA", 0) or n.input[1] not in inits or not c_ok:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) * np.float32(a.get("alpha", 1.0))
        w = w.T if a.get("transB", 0) else w
        wname = f"{n.input[1]}_vs_mm{count}"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), wname))
        has_bias = len(n.input) > 2 and bool(n.input[2])
        mm_out = f"{n.output[0]}_vs_mm" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=n.name))
        if has_bias:
            bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32) * np.float32(
                a.get("beta", 1.0)
            )
            bname = f"{n.input[2]}_vs_mm{count}"
            g.initializer.append(numpy_helper.from_array(bias, bname))
            nodes.append(helper.make_node("Add", [mm_out, bname], [n.output[0]], name=f"{n.name}_bias"))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model, count


def _qdq_ops() -> set[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def _preprocess(
    src: Path, dst: Path, original: onnx.ModelProto, say: Callable[[str], None]
) -> onnx.ModelProto:
    """onnxruntime's quant_pre_process (symbolic shape inference + basic graph optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            with ort_quiet():
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            break
        except Exception as e:  # noqa: BLE001 - symbolic inference fails on some graphs; retry without it
            say(
                f"pre-processing failed ({type(e).__name__}); {'retrying without symbolic shapes' if not skip_symbolic else 'using the model as is'}"
            )
    else:
        shutil.copyfile(src, dst)
    model = onnx.load(str(dst))
    # ORT's quantizers address nodes by name; make sure every node has a unique one.
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_vs{i}"
        seen.add(node.name)
    # Every candidate derives from this file; with the metadata, an eval_fn can read preprocessing
    # and class names from any of them.
    copy_metadata(original, model)
    onnx.save(model, str(dst))
    return model


def _check_float_model(model: onnx.ModelProto, src: Path) -> None:
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


def _smooth(pre: Path, ctx: _Ctx) -> tuple[Path, dict[str, Any]]:
    model = onnx.load(str(pre))
    # Generated probe inputs say nothing about real activation ranges: smooth from the weights then.
    calib = [] if ctx.generated else ctx.batches
    smoothed, info = smooth_model(model, calib, alpha=SMOOTH_ALPHA)
    if not info["smoothed"]:
        return pre, info
    path = ctx.work / "smoothed.onnx"
    onnx.save(smoothed, str(path))
    # The migration is exact in float; refuse it if something in the graph made it not so.
    probe = ctx.batches or _random_input(model)
    if probe is None:
        info["rejected"] = "no calibration data and the input shape is not fixed: cannot verify"
        return pre, info
    ref = ctx.ref if ctx.batches else run(pre, probe)
    err = rel_error(ref, run(path, probe))
    info["float_rel_error"] = err
    if err > 1e-3:
        info["rejected"] = f"float output changed by {err:.2e}"
        return pre, info
    return path, info


GENERATED_SAMPLES = 16
REL_ERROR_WARN = 0.1  # relative logit error vs fp32 above which int8 is suspect (typical: 0.01-0.05)


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
    step = dims[0] or 8  # a fixed-batch graph gets its batch, a dynamic one batches of 8
    count = max(n // step, 1) * step
    rng = np.random.default_rng(0)
    coarse = rng.random((count, channels, 4, 4))
    field = np.kron(coarse, np.ones((1, 1, -(-h // 4), -(-w // 4))))[:, :, :h, :w]
    img = np.clip(field + 0.15 * rng.standard_normal(field.shape), 0.0, 1.0)
    x = ((img - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]).astype(np.float32)
    return [x[i : i + step] for i in range(0, count, step)]


def _random_input(model: onnx.ModelProto) -> list[np.ndarray] | None:
    dims = input_spec(model)[1]
    if any(d is None for d in dims[1:]):
        return None
    return [np.random.default_rng(0).standard_normal([dims[0] or 2, *dims[1:]]).astype(np.float32)]


# ".../layers.3/attention/...", ".../block.0.1/mlp/...", ".../blocks.1/attention/...": last block index + sub-module.
_BLOCK = re.compile(r"(.*(?:layers?|blocks?|stages?)[._/]\d+(?:[._/]\d+)?)[/._]([A-Za-z_]+)")


def _groups(names: list[str]) -> list[list[str]]:
    """Units of fallback: single nodes, or (for big models) the attention / MLP weights of one block,
    which keeps the number of one-at-a-time builds near 2x the depth."""
    if len(names) <= MAX_SENSITIVITY_UNITS:
        return [[n] for n in names]
    groups: dict[str, list[str]] = {}
    for n in names:
        m = _BLOCK.match(n)
        groups.setdefault(f"{m.group(1)}/{m.group(2)}" if m else n, []).append(n)
    return list(groups.values())


def _sensitivity(builder: _Builder, ctx: _Ctx) -> list[tuple[list[str], float]]:
    """(group, output error with only that group quantized), most sensitive first (calibration subset)."""
    n = min(SENSITIVITY_SAMPLES, sum(len(b) for b in ctx.batches))
    sub, taken = [], 0
    for b in ctx.batches:
        if taken >= n:
            break
        sub.append(b[: n - taken])
        taken += len(sub[-1])
    ref = ctx.ref[:taken]
    scores = []
    for group in progress(_groups(builder.candidates), desc="sensitivity", disable=ctx.quiet):
        path = builder.build(only=group)
        scores.append((group, rel_error(ref, run(path, sub))))
        path.unlink(missing_ok=True)
    return sorted(scores, key=lambda gs: gs[1], reverse=True)


def _guarantee(builder: _Builder, ctx: _Ctx, max_drop: float, path: Path, metric: float) -> dict[str, Any]:
    """Fall back the most sensitive nodes to float until base - metric <= max_drop (fewest groups)."""
    base = ctx.base_metric
    ok = lambda m: m is not None and base - m <= max_drop + 1e-12  # noqa: E731
    result = {"path": path, "metric": metric, "fallback": {}}
    if ok(metric) or ctx.ref is None:
        return result
    ctx.say(
        f"{builder.kind}: drop {base - metric:.4f} > {max_drop}; ranking {len(builder.candidates)} nodes by sensitivity"
    )
    order = _sensitivity(builder, ctx)
    tried: dict[int, tuple[Path, float]] = {}

    def excluded(k: int) -> list[str]:
        return [n for group, _ in order[:k] for n in group]

    def attempt(k: int) -> bool:
        if k not in tried:
            p = builder.build(excluded=excluded(k))
            tried[k] = (p, ctx.metric(p))
        return ok(tried[k][1])

    # Exponential then binary search for the smallest k that holds; k = all means a float model.
    lo, hi, k = 0, len(order), 1
    while k < len(order):
        if attempt(k):
            hi = k
            break
        lo, k = k, k * 2
    if hi == len(order) and not attempt(hi):
        result["warning"] = "even the float model misses max_drop under eval_fn (noisy metric?)"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    p, m = tried[hi]
    fallback = {n: round(score, 5) for group, score in order[:hi] for n in group}
    result.update(path=p, metric=m, fallback=fallback)
    ctx.say(f"{builder.kind}: {len(fallback)} node(s) back to float -> drop {base - m:.4f}")
    return result


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
) -> dict[str, Any]:
    """Quantize an ONNX model to fp16 / int8 and write it atomically to `dst`; returns a report.

    mode: "fp16" (LayerNorm/Softmax kept fp32), "int8-dynamic", "int8-static" (QDQ, needs `calib`),
    "int8-mixed" (dynamic MatMuls + static QDQ Convs, needs `calib`), or "int8": vitshrink builds
    dynamic, static and (for models with weight Convs) mixed, picks the fastest by measurement (near
    ties: the more accurate, then the smaller file) and guarantees
    `max_drop` (default 0.005) by falling back the most sensitive nodes to float.
    calib: batches of `pixel_values` (float32 NCHW, normalised); at most 256 samples are used.
    eval_fn: path -> task metric (higher is better); without it the metric is agreement with fp32.
    max_drop: largest allowed metric drop (absolute, metric units); other modes apply it when given.
    vit_aware=False gives the plain onnxruntime recipe (no smoothing, every supported op quantized).
    target: "tensorrt" makes static int8 symmetric (what TensorRT consumes) and skips the dynamic path,
    which TensorRT cannot run.
    target_cpu: the CPU the int8 model will run on: "avx2" (x86 without VNNI: 7-bit weights, since
    onnxruntime's AVX2 int8 kernels saturate with full 8-bit weights; see `vitshrink.cpu`), "vnni",
    "arm64", or "auto" (this machine). Recorded in the report and the model's metadata.
    Without `calib`, int8-dynamic (and "int8", which then builds only the dynamic variant) is still
    compared with fp32 on generated image-like inputs (`fidelity`, with `inputs: generated`).

    The report holds: mode, chosen, settings / settings_chosen, smoothing, kept_float (op types and
    fallback nodes, each with its reason), quantized_nodes, candidates (metric, latency, fallbacks of
    each path tried), metric_name / metric_before / metric_after / drop, fidelity (agreement and
    relative logit error vs fp32 on the calibration data), latency_ms, size_before / size_after /
    size_ratio (bytes), path and any warnings.
    """
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
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".onnx":
        raise VitshrinkError(f"output must end in .onnx: {dst}")
    say = make_say(quiet)
    original = load_onnx(src)
    _check_float_model(original, src)
    _check_finite_initializers(original, src)
    batches = prepare_calib(calib, input_spec(original)[1])
    if mode in ("int8-static", "int8-mixed") and not batches:
        raise DataError(f"mode '{mode}' needs calibration data; 'int8-dynamic' and 'fp16' work without")
    if target == "tensorrt" and mode == "int8" and not batches:
        raise DataError("int8 for TensorRT is static and needs calibration data")
    if target == "tensorrt" and mode == "int8-dynamic":
        raise VitshrinkError(
            "TensorRT cannot run dynamic int8; use mode 'int8-static' or 'int8' for target 'tensorrt'"
        )
    generated = False
    if not batches and mode != "fp16":
        # No data: still compare with fp32, on generated image-like inputs (never used to calibrate).
        probe = _generated_inputs(original)
        if probe is not None:
            batches, generated = probe, True
    if max_drop is not None and mode != "fp16" and not batches:
        raise DataError("max_drop needs calibration data to rank nodes by sensitivity")
    if mode == "int8" and max_drop is None and not generated:
        max_drop = DEFAULT_MAX_DROP
    cpu = resolve_target_cpu(target_cpu)

    with temp_dir("quant") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        say("pre-processing (shape inference, graph optimisation)")
        _preprocess(src, pre, original, say)
        ref = run(pre, batches) if batches else None
        ctx = _Ctx(
            work,
            batches,
            ref,
            eval_fn,
            None,
            per_channel,
            calib_method,
            vit_aware,
            target,
            say,
            quiet=quiet,
            target_cpu=cpu,
            generated=generated,
        )
        if generated:
            say(
                "no calibration data: int8-dynamic only (Convs stay float), compared with fp32 on "
                f"{sum(len(b) for b in batches)} generated inputs"
            )
        if batches:
            ctx.sample = batches[0][:1] if input_spec(original)[1][0] in (None, 1) else batches[0]
        ctx.base_metric = (
            float(eval_fn(str(src))) if eval_fn is not None else (1.0 if ref is not None else None)
        )
        metric_name = None
        if eval_fn is not None:
            metric_name = "eval_fn"
        elif ref is not None:
            metric_name = "agreement_with_fp32" + ("_on_generated_inputs" if generated else "")
        report: dict[str, Any] = {
            "mode": mode,
            "metric_name": metric_name,
            "metric_before": ctx.base_metric,
            "size_before": file_size(src),
            "settings": {
                "per_channel": per_channel,
                "vit_aware": vit_aware,
                "calib_method": calib_method if batches and not generated else None,
                "target": target,
                "target_cpu": cpu if mode != "fp16" and target == "cpu" else None,
                "reduce_range": ctx.reduce_range if mode != "fp16" else None,
                "max_drop": max_drop,
            },
        }
        if mode == "fp16":
            final, extra = _fp16(pre, ctx)
        else:
            final, extra = _int8(mode, pre, ctx, max_drop)
        report.update(extra)
        metric_after = ctx.metric(final)
        report["metric_after"] = metric_after
        if metric_after is not None and ctx.base_metric is not None:
            report["drop"] = ctx.base_metric - metric_after
        report["fidelity"] = ctx.fidelity(final)
        if generated and report["fidelity"]:
            report["fidelity"]["inputs"] = "generated"
        err = report["fidelity"].get("rel_error")
        if mode != "fp16" and err is not None and err > REL_ERROR_WARN:
            report.setdefault("warnings", []).append(
                f"{report['chosen']} output differs from fp32 by {err:.3f} (relative)"
                + (
                    " on generated inputs; pass calibration data to check and repair on real data"
                    if generated
                    else ""
                )
            )
        if ctx.sample is not None:
            fp32_ms, q_ms = onnx_latencies_ms([pre, final], ctx.sample)
            report["latency_ms"] = {"fp32": fp32_ms, report["chosen"]: q_ms}
            if q_ms > fp32_ms * (1 + SPEED_TIE):
                report.setdefault("warnings", []).append(
                    f"{report['chosen']} runs slower than fp32 on this CPU (1 thread); the gain is the file size"
                )
        out_model = onnx.load(str(final))
        # Shape annotations from pre-processing are only hints (runtimes re-infer them); they cost
        # ~4% of a small int8 file.
        del out_model.graph.value_info[:]
        history = {
            "stage": "quantize",
            "options": {"mode": mode, **report["settings"], "chosen": report["chosen"]},
            "metrics": {k: report[k] for k in ("metric_before", "metric_after") if report.get(k) is not None},
        }
        copy_metadata(original, out_model, history)
        if mode != "fp16" and target == "cpu":
            _record_int8_target(out_model, cpu)
        with atomic_path(dst) as tmp_out:
            onnx.save(out_model, str(tmp_out))
            _check_finite_outputs(tmp_out, ctx.sample, original, dst)  # before the rename
    report["size_after"] = file_size(dst)
    report["size_ratio"] = report["size_after"] / report["size_before"]
    report["path"] = str(dst)
    if read_meta(original) is None:
        report.setdefault("warnings", []).append("the input has no vitshrink metadata")
    say(
        f"{report['chosen']}: {report['size_before'] / 2**20:.2f} MB -> {report['size_after'] / 2**20:.2f} MB"
    )
    return report


def _check_finite_initializers(model: onnx.ModelProto, src: str | os.PathLike) -> None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        floating = init.data_type in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.DOUBLE,
        )
        if floating and not np.isfinite(numpy_helper.to_array(init)).all():
            raise ModelError(f"model {src} has NaN or infinite values in {init.name}")


def _check_finite_outputs(
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


def _fp16(pre: Path, ctx: _Ctx) -> tuple[Path, dict[str, Any]]:
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


def _int8(mode: str, pre: Path, ctx: _Ctx, max_drop: float | None) -> tuple[Path, dict[str, Any]]:
    extra: dict[str, Any] = {}
    src = pre
    if ctx.vit_aware:
        ctx.say("smoothing LayerNorm outlier channels into the next weights")
        src, info = _smooth(pre, ctx)
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
    elif ctx.target == "tensorrt":
        kinds = ["int8-static"]
    else:
        has_convs = any(n.op_type == "Conv" for n in weight_nodes(onnx.load(str(src))))
        kinds = ["int8-dynamic", "int8-static"] + (["int8-mixed"] if has_convs else [])
    candidates = []
    for kind in kinds:
        builder = _Builder(kind, src, ctx)
        ctx.say(f"building {kind} ({len(builder.candidates)} quantizable nodes)")
        path = builder.build()
        res = {"path": path, "metric": ctx.metric(path), "fallback": {}}
        if max_drop is not None:
            res = _guarantee(builder, ctx, max_drop, path, res["metric"])
        res["builder"] = builder
        res["latency_ms"] = None
        candidates.append(res)
    # Fastest variant wins; among near-equal speeds the more accurate, then the smaller file.
    best = candidates[0]
    if len(candidates) > 1:
        for c, ms in zip(candidates, onnx_latencies_ms([c["path"] for c in candidates], ctx.sample)):
            c["latency_ms"] = ms
        fastest = min(c["latency_ms"] for c in candidates)
        pool = [c for c in candidates if c["latency_ms"] <= fastest * (1 + SPEED_TIE)]
        top = max(c["metric"] or 0 for c in pool)
        pool = [c for c in pool if (c["metric"] or 0) >= top - METRIC_TIE]
        best = min(pool, key=lambda c: file_size(c["path"]))
    builder = best["builder"]
    kept_nodes = {
        n: f"sensitivity-driven fallback: rel. output error {s} when quantized alone"
        for n, s in best["fallback"].items()
    }
    extra.update(
        chosen=builder.kind,
        settings_chosen={
            "calib_method": builder.calib_method if builder.kind != "int8-dynamic" else None,
            **({"calib_note": builder.calib_note} if builder.calib_note else {}),
            "activations": ("int8 symmetric" if ctx.target == "tensorrt" else "uint8")
            + {"int8-static": " static", "int8-mixed": " static (Conv) / dynamic (MatMul)"}.get(
                builder.kind, " dynamic (per batch)"
            ),
            "weights": ("int8 (7-bit range) " if ctx.reduce_range else "int8 ")
            + ("per-channel" if ctx.per_channel else "per-tensor"),
            **(
                {"target_cpu": ctx.target_cpu, "target_cpu_note": int8_note(ctx.target_cpu)}
                if ctx.target == "cpu"
                else {}
            ),
        },
        quantized_nodes=len(builder.candidates) - len(best["fallback"]),
        kept_float={"op_types": builder.kept_ops, "nodes": kept_nodes},
        candidates=[
            {
                "kind": c["builder"].kind,
                "metric": c["metric"],
                "latency_ms": c["latency_ms"],
                "fallback_nodes": len(c["fallback"]),
            }
            for c in candidates
        ],
    )
    if "warning" in best:
        extra.setdefault("warnings", []).append(best["warning"])
    return best["path"], extra


def _record_int8_target(model: onnx.ModelProto, target_cpu: str) -> None:
    """Top-level `int8` entry of the vitshrink metadata: deploy checks it against the CPU it runs on."""
    meta = read_meta(model)
    if meta is not None:
        meta["int8"] = {"target_cpu": target_cpu, "reduce_range": reduce_range_for(target_cpu)}
        write_meta_props(model.metadata_props, meta)
