"""SmoothQuant-style outlier migration for ViTs, done on the ONNX graph.

Trained ViTs carry a few LayerNorm output channels 10-100x larger than the rest; one per-tensor int8
activation scale then leaves the other channels a handful of levels. For every LayerNormalization
whose output feeds only constant-weight MatMul/Gemm nodes, we pick per-channel factors

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (SmoothQuant, Xiao et al. 2023)

and divide LayerNorm gamma/beta by s while multiplying the matching weight rows by s. In float the
model computes exactly the same function; the activations become flat and the weights absorb the
range, where per-channel weight scales handle it. onnxruntime's own SmoothQuant option needs
neural-compressor and inserts Mul nodes; folding into LayerNorm keeps the graph (and int8 speed) as is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx

from ..artifacts import atomic_path
from .calib import prepare_calib
from .files import copy_metadata, load_onnx
from .graph import Graph, inferred, input_spec, node_attrs
from .measure import channel_absmax, rel_error, run

# Ops that read a tensor's shape only: scaling channels cannot change what they compute.
_SHAPE_ONLY = {"Shape", "Size"}


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    return node_attrs(node).get(name, default)


def _keeps_last_dim(g: Graph, node: onnx.NodeProto, channels: int) -> bool:
    """A Reshape to a constant shape whose last dim is still the channel count (e.g. (B,T,C) -> (B*T,C))."""
    shape = g.const(node.input[1]) if len(node.input) >= 2 else None
    if shape is None:
        return False
    shape = shape.reshape(-1)
    return shape.size > 0 and int(shape[-1]) == channels


def _linear_targets(g: Graph, tensor: str, channels: int) -> list[tuple[onnx.NodeProto, int]] | str:
    """(node, weight channel axis) for every weight that reads `tensor`'s channels; a reason string if the
    scale cannot be migrated exactly (some consumer is not linear in the channel)."""
    inits = g.inits
    if tensor in g.outputs:
        return "output is a graph output"
    targets: list[tuple[onnx.NodeProto, int]] = []
    for node, idx in g.uses.get(tensor, []):
        if node.op_type in _SHAPE_ONLY:
            continue
        if (
            node.op_type == "MatMul"
            and idx == 0
            and node.input[1] in inits
            and len(inits[node.input[1]].dims) == 2
        ):
            targets.append((node, 0))  # B is (C_in, C_out): scale rows
        elif node.op_type == "Gemm" and idx == 0 and node.input[1] in inits and not _attr(node, "transA", 0):
            targets.append((node, 1 if _attr(node, "transB", 0) else 0))
        elif node.op_type == "Reshape" and idx == 0 and _keeps_last_dim(g, node, channels):
            # onnxslim exports Linear as Reshape(B*T, C) -> Gemm -> Reshape: channels stay last.
            sub = _linear_targets(g, node.output[0], channels)
            if isinstance(sub, str):
                return sub
            targets += sub
        elif node.op_type == "Gather" and idx == 0:
            # Token selection (e.g. the CLS token before the classifier) keeps the channel axis last.
            rank = len(g.shapes[tensor]) if tensor in g.shapes else None
            axis = _attr(node, "axis", 0)
            if rank is None or axis % rank == rank - 1:
                return f"{node.name} gathers along the channel axis"
            sub = _linear_targets(g, node.output[0], channels)
            if isinstance(sub, str):
                return sub
            targets += sub
        else:
            return f"consumer {node.name} ({node.op_type}) is not a constant-weight MatMul/Gemm"
    return targets or "no MatMul/Gemm consumer"


def affine_absmax(ln: onnx.NodeProto, g: Graph) -> np.ndarray:
    """Data-free stand-in for max|LayerNorm output| per channel: |gamma| + |beta|.

    The normalised input has unit variance in every channel, so the channel-to-channel spread of a
    LayerNorm output (what smoothing removes) comes from its affine parameters.
    """
    gamma = np.abs(g.const(ln.input[1]).astype(np.float64))  # type: ignore[union-attr]
    beta = (
        np.abs(g.const(ln.input[2]).astype(np.float64))  # type: ignore[union-attr]
        if len(ln.input) > 2 and ln.input[2]
        else 0.0
    )
    return gamma + beta


def smooth_model(
    model: onnx.ModelProto, batches: Sequence[np.ndarray], *, alpha: float = 0.5, min_ratio: float = 3.0
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Return a smoothed copy of `model` (float function unchanged) and a report per LayerNorm.

    Activation ranges come from `batches` when given, else from the LayerNorm affine (data-free).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if not model.graph.value_info:  # ranks are needed to see which axis a Gather selects on
        # Without shapes, Gather pass-through is skipped, which is safe.
        model = inferred(model)
    g = Graph(model)
    inits = g.inits

    plans: list[tuple[onnx.NodeProto, list[tuple[onnx.NodeProto, int]]]] = []
    skipped: dict[str, str] = {}
    for node in g.nodes:
        if node.op_type != "LayerNormalization":
            continue
        if (
            len(node.input) < 2
            or node.input[1] not in inits
            or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits)
        ):
            skipped[node.name] = "gamma/beta are not constants"
            continue
        channels = int(np.prod(inits[node.input[1]].dims))
        targets = _linear_targets(g, node.output[0], channels)
        if isinstance(targets, str):
            skipped[node.name] = targets
        else:
            plans.append((node, targets))

    if batches:
        stats = channel_absmax(model, [n.output[0] for n, _ in plans], batches)
    else:
        stats = {n.output[0]: affine_absmax(n, g) for n, _ in plans}
    counter = [0]

    def fresh(name: str, arr: np.ndarray) -> str:
        # New initializers, never in-place edits: exporters share identical tensors (e.g. all-ones gammas)
        # between unrelated nodes, and those must keep their values.
        counter[0] += 1
        return g.add_init(arr.astype(np.float32), f"{name}_vsmooth{counter[0]}")

    report: dict[str, Any] = {}
    for ln, targets in plans:
        act = stats[ln.output[0]].astype(np.float64)
        ratio = float(act.max() / max(np.median(act), 1e-12))
        if ratio < min_ratio:
            # Nothing to flatten; rescaling would only move range into the weights for no gain.
            skipped[ln.name] = f"no outlier channels (max/median {ratio:.1f} < {min_ratio})"
            continue
        weights = [g.const(n.input[1]).astype(np.float64) for n, _ in targets]  # type: ignore[union-attr]
        wmax = np.max([np.abs(w).max(axis=1 - ax) for w, (_, ax) in zip(weights, targets)], axis=0)
        ok = (act > 0) & (wmax > 0)
        s = np.ones_like(act)
        s[ok] = act[ok] ** alpha / wmax[ok] ** (1 - alpha)
        s = np.clip(s, 1e-4, 1e4)
        gamma = g.const(ln.input[1]).astype(np.float64)  # type: ignore[union-attr]
        ln.input[1] = fresh(ln.input[1], gamma / s)
        if len(ln.input) > 2 and ln.input[2]:
            ln.input[2] = fresh(ln.input[2], g.const(ln.input[2]).astype(np.float64) / s)  # type: ignore[union-attr]
        for (node, ax), w in zip(targets, weights):
            node.input[1] = fresh(node.input[1], w * (s[:, None] if ax == 0 else s[None, :]))
        flat = act / s
        report[ln.name] = {
            "outlier_ratio_before": round(ratio, 2),
            "outlier_ratio_after": round(float(flat.max() / max(np.median(flat), 1e-12)), 2),
            "weights": [n.name for n, _ in targets],
        }

    g.prune_initializers(keep=g.outputs)
    stats_from = "calibration data" if batches else "LayerNorm gamma/beta (data-free)"
    return model, {"alpha": alpha, "stats": stats_from, "smoothed": report, "skipped": skipped}


def smooth_layernorm_outliers(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calib: Iterable[np.ndarray],
    *,
    alpha: float = 0.5,
    min_ratio: float = 3.0,
) -> dict[str, Any]:
    """Migrate LayerNorm outlier channels into the next MatMul/Gemm weights (file in, file out).

    The output computes the same function in float (checked on the calibration data; the relative
    output difference is in the returned report) and quantizes far better to int8 per-tensor
    activations. LayerNorms whose channel max/median is below `min_ratio` are left alone. Metadata
    is copied.
    """
    model = load_onnx(src)
    batches = prepare_calib(calib, input_spec(model)[1])
    smoothed, report = smooth_model(model, batches, alpha=alpha, min_ratio=min_ratio)
    copy_metadata(model, smoothed)
    report["float_rel_error"] = rel_error(
        run(model.SerializeToString(), batches), run(smoothed.SerializeToString(), batches)
    )
    with atomic_path(dst) as tmp:
        onnx.save(smoothed, str(tmp))
    return report
