"""int8 builders: one quantization path (dynamic / static QDQ / mixed) built from a float model.

All three call onnxruntime.quantization (quantize_dynamic, quantize_static and its calibrators); a
`Builder` only decides which nodes its path may quantize and which stay float, and why. Each path is a
subclass registered under its mode name (`vitshrink.options.QUANT_MODES`) with `@register_builder`;
`make_builder(mode, ...)` picks it from `BUILDERS`.
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import ModelError
from ..options import QUANT_MODES
from ..progress import progress
from .attention import attention_nodes, quantize_attention
from .context import Ctx
from .fusions import gemm_to_matmul
from .graph import input_spec, node_macs, weight_nodes
from .measure import ort_quiet

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
# Static int8 of the first and last weight layers (a ViT's patch embedding and classifier) costs the most
# accuracy per multiply-add saved: the first quantizes the raw pixels' projection, the last the logits
# directly. Measured on a Fashion-MNIST ViT: relative logit error vs fp32 0.0087 -> 0.0043 with both
# float. Kept float only while together they hold this share of the weight multiply-adds or less
# (DeiT-S at 224: 1.3 %; SegFormer-B0's decoder classifier alone is 8 %, so its convs all stay int8).
EDGE_SHARE = 0.02
EDGE_REASON = (
    "first / last weight layer (patch embedding, classifier): static int8 there costs the most accuracy "
    f"per multiply-add saved; together <= {EDGE_SHARE:.0%} of the weight multiply-adds"
)
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


def edge_layers(model: onnx.ModelProto) -> list[str]:
    """The first and last weight nodes (graph order is topological) when they are cheap enough to keep
    float (`EDGE_SHARE`); none otherwise."""
    nodes = weight_nodes(model)
    if len(nodes) < 3:
        return []
    macs = node_macs(model)
    edge = [nodes[0].name, nodes[-1].name]
    total = sum(macs.values())
    if not total or any(n not in macs for n in edge) or macs[edge[0]] + macs[edge[1]] > EDGE_SHARE * total:
        return []
    return edge


class CalibReader:
    """CalibrationDataReader (ORT duck-types on get_next) that reads one batch at a time.

    With onnxruntime's `CalibStridedMinMax` option, quantize_static calls the calibrator's
    collect_data once per `set_range` window; every calibrator (min-max and the histogram ones alike)
    folds that window's activations into its running ranges / histograms and drops them, so
    calibration holds one batch's activations, however many images there are (onnxruntime's default
    holds every activation of every image until the end: 22.5 GB for 100 images at 512 px).
    """

    def __init__(self, name: str, batches: Sequence[np.ndarray], quiet: bool = False) -> None:
        self._name, self._batches = name, batches
        self._order = iter(progress(range(len(batches)), desc="calibrate", disable=quiet))
        self._pos, self._end = 0, len(batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._end = end_index  # windows come in order: start_index is where the last one stopped

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._end:
            return None
        i = next(self._order, None)
        if i is None:
            return None
        self._pos = i + 1
        return {self._name: self._batches[i]}

    def __len__(self) -> int:
        return len(self._batches)


BUILDERS: dict[str, type[Builder]] = {}


def register_builder(mode: str) -> Callable[[type[Builder]], type[Builder]]:
    """Class decorator: the builder of int8 mode `mode` (one of `vitshrink.options.QUANT_MODES`)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"'{mode}' is not a quantization mode of vitshrink.options.QUANT_MODES")

    def register(cls: type[Builder]) -> type[Builder]:
        cls.kind = mode
        BUILDERS[mode] = cls
        return cls

    return register


def make_builder(kind: str, src: Path, ctx: Ctx) -> Builder:
    """The registered builder of int8 mode `kind` for the float model `src`."""
    if kind not in BUILDERS:
        raise ModelError(f"no int8 builder for mode '{kind}' (builders: {', '.join(BUILDERS)})")
    return BUILDERS[kind](src, ctx)


class Builder:
    """Builds one quantization path from a float model with a given set of nodes kept in float.

    A subclass says which nodes its path may quantize (`_choose`) and how it runs onnxruntime (`_build`).
    """

    kind: str  # the mode it is registered under
    activations = " dynamic (per batch)"  # how activations are quantized, for the report
    calibrated = False  # uses the calibration data (and a calibration method)

    def __init__(self, src: Path, ctx: Ctx) -> None:
        self.ctx = ctx
        model = onnx.load(str(src))
        self.input_name = input_spec(model)[0]
        self.src = src
        inits = {i.name for i in model.graph.initializer}
        act_mm = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]
        self.kept_ops: dict[str, str] = {}
        self.calib_method = ctx.calib_method
        self.calib_note: str | None = None
        self.cache = ctx.work / f"calib-{self.kind}-{src.stem}.json"
        self.convs: set[str] = set()
        self.op_types: list[str] | None = None
        model, present = self._choose(model)
        # Attention (onnxruntime's MultiHeadAttention, fused for CPU int8 only) has no weights for
        # onnxruntime.quantization; quantize_attention rewrites each chosen one as int8 products, and
        # each is a unit the sensitivity fallback can keep in float.
        self.attention = attention_nodes(model) if ctx.vit_aware and ctx.target == "cpu" else []
        self.candidates += self.attention
        if ctx.vit_aware:
            for op in sorted(present & FLOAT_REASONS.keys()):
                self.kept_ops[op] = FLOAT_REASONS[op]
            if act_mm:
                self.kept_ops[f"MatMul x{len(act_mm)} (activation x activation)"] = ACT_MATMUL_REASON

    def _choose(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
        """Set `candidates` (the nodes this path may quantize), `op_types` and the path's `kept_ops`;
        returns the model the path builds from and the op types in it."""
        raise NotImplementedError

    def _build(self, out: Path, limit: list[str], exclude: list[str]) -> None:
        raise NotImplementedError

    def _keep_edges(self, model: onnx.ModelProto) -> set[str]:
        """The edge layers a calibrated (static) path keeps float, noted in `kept_ops`."""
        edge = edge_layers(model)
        if edge:
            self.kept_ops[f"first / last weight layer ({', '.join(edge)})"] = EDGE_REASON
        return set(edge)

    def build(self, excluded: Iterable[str] = (), only: list[str] | None = None) -> Path:
        excluded = set(excluded)
        chosen = only if only is not None else [c for c in self.candidates if c not in excluded]
        attention = [c for c in chosen if c in self.attention]
        out = self.ctx.path(self.kind)
        self._build_weights(out, [c for c in chosen if c not in self.attention], only is not None)
        if attention:
            model, _ = quantize_attention(onnx.load(str(out)), attention, reduce_range=self.ctx.reduce_range)
            onnx.save(model, str(out))
        return out

    def _build_weights(self, out: Path, chosen: list[str], only: bool) -> None:
        """onnxruntime.quantization's part: the weight nodes in `chosen`, everything else float."""
        if not chosen:  # ORT reads an empty nodes_to_quantize as "all"; nothing to quantize = the float model
            shutil.copyfile(self.src, out)
            return
        # Explicit node lists keep ORT from quantizing anything we did not choose (e.g. attention MatMuls,
        # which its QDQ path quantizes even with MatMulConstBOnly).
        limit = chosen if (self.ctx.vit_aware or only) else []
        exclude = [] if limit else sorted(set(self.candidates) - set(chosen))
        try:
            with ort_quiet():
                self._build(out, limit, exclude)
        except Exception as e:  # noqa: BLE001 - ORT raises many types; report one line, keep the chain
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelError(f"onnxruntime could not build the {self.kind} model: {first}") from e

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
            CalibReader(self.input_name, self.ctx.batches, quiet=self.ctx.quiet),
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
            # one calibration window per batch: see CalibReader
            extra_options={"CalibStridedMinMax": 1, **({"ActivationSymmetric": True} if trt else {})},
            **kwargs,
        )


@register_builder("int8-dynamic")
class DynamicBuilder(Builder):
    """Dynamic int8 MatMuls (onnxruntime's quantize_dynamic): no calibration data."""

    def _choose(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
        weights = weight_nodes(model)
        present = {n.op_type for n in model.graph.node}
        if any(n.op_type == "Gemm" for n in weights):
            # onnxruntime has no dynamic-int8 Gemm, and onnxslim turns every Linear into one.
            model, _ = gemm_to_matmul(model)
            self.src = self.ctx.work / f"{self.src.stem}-matmul.onnx"
            onnx.save(model, str(self.src))
            weights = weight_nodes(model)
            present = {n.op_type for n in model.graph.node}
        self.candidates = [n.name for n in weights if n.op_type == "MatMul"]
        self.op_types = ["MatMul"] if self.ctx.vit_aware else None
        if "Gemm" in present:
            self.kept_ops["Gemm"] = GEMM_DYNAMIC_REASON
        self._convs(model, weights, present)
        return model, present

    def _convs(self, model: onnx.ModelProto, weights: list[onnx.NodeProto], present: set[str]) -> None:
        if "Conv" in present and self.ctx.vit_aware:
            self.kept_ops["Conv"] = CONV_DYNAMIC_REASON

    def _build(self, out: Path, limit: list[str], exclude: list[str]) -> None:
        self._dynamic(self.src, out, self.op_types, limit, exclude)


@register_builder("int8-mixed")
class MixedBuilder(DynamicBuilder):
    """Dynamic int8 MatMuls plus static QDQ Convs (fused to QLinearConv): conv-heavy models
    (SegFormer / UperNet) keep dynamic int8's speed without float conv weights."""

    activations = " static (Conv) / dynamic (MatMul)"
    calibrated = True

    def _convs(self, model: onnx.ModelProto, weights: list[onnx.NodeProto], present: set[str]) -> None:
        # Depthwise convs too: onnxruntime runs a float one in its blocked NCHWc layout, with
        # reorders in and out that cost more than the conv and scale poorly to 2 threads;
        # int8 runs channels-last (SegFormer-B0 at 512 px: 50 -> 46 ms at 2 threads). Their
        # quantize pair no longer blocks the GELU after them (fusions.FuseGelu).
        edge = self._keep_edges(model)
        self.convs = {n.name for n in weights if n.op_type == "Conv" and n.name not in edge}
        self.candidates += sorted(self.convs)

    def _build(self, out: Path, limit: list[str], exclude: list[str]) -> None:
        self._mixed(out, limit or [c for c in self.candidates if c not in exclude])

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


@register_builder("int8-static")
class StaticBuilder(Builder):
    """Static QDQ int8 (onnxruntime's quantize_static with a calibrator)."""

    activations = " static"
    calibrated = True

    def _choose(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
        if self.ctx.vit_aware:
            edge = self._keep_edges(model)
            self.candidates = [n.name for n in weight_nodes(model) if n.name not in edge]
            self.op_types = ["MatMul", "Gemm", "Conv"]
        else:
            # Naive static: everything onnxruntime can quantize; data-movement ops are not worth ranking.
            self.candidates = [
                n.name for n in model.graph.node if n.op_type not in NAIVE_SKIP and n.op_type in qdq_ops()
            ]
        return model, {n.op_type for n in model.graph.node}

    def _build(self, out: Path, limit: list[str], exclude: list[str]) -> None:
        self._static(out, limit, exclude)


def qdq_ops() -> set[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)
