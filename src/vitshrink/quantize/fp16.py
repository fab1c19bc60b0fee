"""fp16 conversion that keeps LayerNorm, Softmax and the variance arithmetic in fp32.

fp16 tops out at 65504: a LayerNorm computes mean((x - mu)^2), which overflows once activations pass
~256, and ViT residual streams do. onnxruntime's converter leaves blocked ops in fp32, but it casts
every blocked op's output back to fp16, so in a decomposed LayerNorm (Pow -> ReduceMean -> Sqrt) the
squared values would still pass through fp16. `_drop_roundtrip_casts` removes those fp32 -> fp16 ->
fp32 round trips so chains of blocked ops really stay fp32.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from .graph import Graph, inferred

# Ops kept in fp32: normalisation statistics, softmax, and the pieces of a decomposed LayerNorm.
FP32_OPS = [
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "BatchNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Div",
    "Exp",
    "Resize",  # coordinate transforms in segmentation heads; cheap, and fp16 sizes/scales round badly
]


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    for a in node.attribute:
        if a.name == "to":
            return int(a.i)
    return None


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of tensors known to be float32 (graph inputs, initializers, inferred value_info)."""
    g = inferred(model).graph
    names = {i.name for i in g.initializer if i.data_type == TensorProto.FLOAT}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            names.add(vi.name)
    return names


def _drop_roundtrip_casts(model: onnx.ModelProto) -> int:
    """Rewire Cast(fp16 -> fp32)(Cast(fp32 -> fp16)(x)) to read x directly; returns how many were removed."""
    g = Graph(model)
    fp32 = _float_tensors(model)
    removed: dict[int, onnx.NodeProto] = {}  # by id, node held (see Graph)
    rename: dict[str, str] = {}
    for node in g.nodes:
        if _cast_to(node) != TensorProto.FLOAT or node.output[0] in g.outputs:
            continue
        up = g.producer.get(node.input[0])
        # Only an fp32 -> fp16 -> fp32 round trip may be skipped (not e.g. int64 -> fp16 -> fp32).
        if up is None or _cast_to(up) != TensorProto.FLOAT16 or up.input[0] not in fp32:
            continue
        rename[node.output[0]] = up.input[0]
        removed[id(node)] = node
    if not rename:
        return 0
    for node in g.nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    # Drop the now-unused casts (and fp16 casts left without readers).
    kept = [n for n in g.nodes if id(n) not in removed]
    g.set_nodes(g.drop_dead(kept, lambda n: _cast_to(n) == TensorProto.FLOAT16, repeat=False), prune=False)
    return len(removed)


def to_fp16(model: onnx.ModelProto, keep_fp32_ops: list[str] | None = None) -> tuple[onnx.ModelProto, dict]:
    """fp16 weights/activations with float32 inputs/outputs and FP32_OPS kept in fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    ops = FP32_OPS if keep_fp32_ops is None else keep_fp32_ops
    present = sorted({n.op_type for n in model.graph.node} & set(ops))
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(ops)
    )
    removed = _drop_roundtrip_casts(converted)
    return converted, {"kept_fp32_ops": present, "roundtrip_casts_removed": removed}
