"""int8 attention: onnxruntime's MultiHeadAttention (fp32) rewritten as dynamic int8 matrix products.

Attention has no weights, so onnxruntime.quantization leaves it in float; at deployment size it is
the largest float cost left (SegFormer-B0 at 512 px: 16384 queries x 256 keys per first-stage block,
about a quarter of the int8 model's time). NNCF quantizes the same two products. No onnxruntime tool
does this for an attention op, hence this rewrite, in standard onnxruntime ops:

    q -> DynamicQuantizeLinear (uint8, per tensor)            \
    k -> int8 symmetric, scale max|k| / 127 (computed per run) -> MatMulIntegerToFloat -> Softmax
    P -> uint8 at 1/255 (softmax outputs lie in [0, 1])        \
    v -> int8 symmetric                                        -> MatMulIntegerToFloat -> out

uint8 x int8 is the operand pair onnxruntime's VNNI / AVX2 int8 GEMMs take (uint8 x uint8 runs
through 16-bit products at half the speed). Every range is computed at run time or known, so no
calibration data is needed and no value is clipped. Each attention node is a unit the sensitivity
fallback can keep in float.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .graph import Graph, node_attrs

MHA = "MultiHeadAttention"
# Shared constants (one copy per model). Softmax outputs lie in [0, 1]: uint8 at 1/255 covers them
# exactly; a dynamic range would be the same, since some query's top probability is near 1.
CONSTS = {
    "vs_qattn_inv127": np.array(1 / 127, np.float32),
    "vs_qattn_inv63": np.array(1 / 63, np.float32),
    # smallest k / v scale: an all-zero k or v must quantize to zeros, not 0 / 0
    "vs_qattn_min_scale": np.array(1e-12, np.float32),
    "vs_qattn_zero_s8": np.array(0, np.int8),
    "vs_qattn_zero_u8": np.array(0, np.uint8),
    "vs_qattn_p_scale": np.array(1 / 255, np.float32),
}
INV127, INV63, MIN_SCALE, ZERO_S8, ZERO_U8, P_SCALE = CONSTS


def attention_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the attention nodes `quantize_attention` can rewrite: q, k, v only (no mask, no bias,
    no past state) and no attribute beyond heads and scale (not causal), as `fuse_attention` writes."""
    return [
        n.name
        for n in model.graph.node
        if n.op_type == MHA
        and n.domain == "com.microsoft"
        and n.name
        and list(n.input) == [i for i in n.input[:3] if i]
        and len(n.input) == 3
        and len(n.output) == 1
        and {a.name for a in n.attribute} <= {"num_heads", "scale"}
    ]


def quantize_attention(
    model: onnx.ModelProto, names: Iterable[str], *, reduce_range: bool = False
) -> tuple[onnx.ModelProto, int]:
    """Rewrite the named MultiHeadAttention nodes as int8 products (in a copy); returns (model, count).

    reduce_range: k and v in [-63, 63] (x86 without VNNI: its uint8 x int8 kernel adds pairs of
    products in 16 bits, which saturate with full-range operands; see `vitshrink.cpu`)."""
    wanted = set(names) & set(attention_nodes(model))
    if not wanted:
        return model, 0
    g = Graph.copy_of(model)
    widths = _widths(g.model)
    done = 0
    for n in list(g.nodes):
        width = widths.get(n.input[0]) if n.name in wanted else None
        if width is not None:
            g.replace(n, _int8_attention(n, width, g, INV63 if reduce_range else INV127))
            done += 1
    g.commit(prune=False)
    used = {i for n in g.nodes for i in n.input} - set(g.inits)
    for k, v in CONSTS.items():
        if k in used:
            g.add_init(v, k)
    return g.model, done


def _widths(model: onnx.ModelProto) -> dict[str, int]:
    """Token width (last dim) of each tensor: from shape inference (which stops at onnxruntime's
    contrib ops), else from the constant target of the Reshape that made it."""
    shapes = Graph(onnx.shape_inference.infer_shapes(model)).shapes
    out = {name: dims[-1] for name, dims in shapes.items() if dims and dims[-1] is not None}
    g = Graph(model)
    for n in g.nodes:
        target = g.const(n.input[1]) if n.op_type == "Reshape" and n.output[0] not in out else None
        if target is not None and target.ndim == 1 and target.size and target[-1] > 0:
            out[n.output[0]] = int(target[-1])
    return out


def _int8_attention(mha: onnx.NodeProto, width: int, g: Graph, inv_qmax: str) -> list[onnx.NodeProto]:
    attrs: dict[str, Any] = node_attrs(mha)
    heads = int(attrs["num_heads"])
    d = width // heads
    scale = float(attrs.get("scale", 0.0)) or 1.0 / float(np.sqrt(d))
    p = f"{mha.name}_q8"  # every new name starts with the node's name: unique per node
    q, k, v = mha.input[:3]

    def const(name: str, value: np.ndarray) -> str:
        return g.add_init(value, f"{p}_{name}")

    split = const("split", np.array([1, -1, heads, d], np.int64))
    one_head = const("one_head", np.array([1, 1, -1, d], np.int64)) if heads == 1 else ""
    merge = const("merge", np.array([1, -1, width], np.int64))

    def per_head(src: str, t: str, perm: list[int]) -> list[onnx.NodeProto]:
        """[1, N, width] -> [1, heads, N, d] (perm [0, 2, 1, 3]) or [1, heads, d, N] ([0, 2, 3, 1])."""
        if heads == 1 and perm == [0, 2, 1, 3]:  # moving a dim of 1: a view, not a copy
            return [helper.make_node("Reshape", [src, one_head], [f"{p}_{t}h"], name=f"{p}_{t}h")]
        return [
            helper.make_node("Reshape", [src, split], [f"{p}_{t}4"], name=f"{p}_{t}4"),
            helper.make_node("Transpose", [f"{p}_{t}4"], [f"{p}_{t}h"], name=f"{p}_{t}h", perm=perm),
        ]

    nodes = [
        helper.make_node("DynamicQuantizeLinear", [q], [f"{p}_q", f"{p}_q_s", f"{p}_q_z"], name=f"{p}_q"),
        helper.make_node(
            "Mul", [f"{p}_q_s", const("scale", np.array(scale, np.float32))], [f"{p}_qk_s"], name=f"{p}_qk_s"
        ),
        *per_head(f"{p}_q", "q", [0, 2, 1, 3]),
    ]
    for t, src, perm in (("k", k, [0, 2, 3, 1]), ("v", v, [0, 2, 1, 3])):
        nodes += [
            helper.make_node("Abs", [src], [f"{p}_{t}_abs"], name=f"{p}_{t}_abs"),
            helper.make_node(
                "ReduceMax", [f"{p}_{t}_abs"], [f"{p}_{t}_max"], name=f"{p}_{t}_max", keepdims=0
            ),
            helper.make_node("Mul", [f"{p}_{t}_max", inv_qmax], [f"{p}_{t}_s0"], name=f"{p}_{t}_s0"),
            helper.make_node("Max", [f"{p}_{t}_s0", MIN_SCALE], [f"{p}_{t}_s"], name=f"{p}_{t}_s"),
            helper.make_node("QuantizeLinear", [src, f"{p}_{t}_s", ZERO_S8], [f"{p}_{t}"], name=f"{p}_{t}"),
            *per_head(f"{p}_{t}", t, perm),
        ]
    ms = "com.microsoft"
    nodes += [
        helper.make_node(
            "MatMulIntegerToFloat",
            [f"{p}_qh", f"{p}_kh", f"{p}_qk_s", f"{p}_k_s", f"{p}_q_z", ZERO_S8],
            [f"{p}_scores"],
            name=f"{p}_qk",
            domain=ms,
        ),
        helper.make_node("Softmax", [f"{p}_scores"], [f"{p}_probs"], name=f"{p}_softmax", axis=-1),
        helper.make_node(
            "QuantizeLinear",
            [f"{p}_probs", P_SCALE, ZERO_U8],
            [f"{p}_p"],
            name=f"{p}_p",
        ),
        helper.make_node(
            "MatMulIntegerToFloat",
            [f"{p}_p", f"{p}_vh", P_SCALE, f"{p}_v_s", ZERO_U8, ZERO_S8],
            [f"{p}_ctx"],
            name=f"{p}_pv",
            domain=ms,
        ),
    ]
    if heads == 1:
        nodes.append(helper.make_node("Reshape", [f"{p}_ctx", merge], [mha.output[0]], name=f"{p}_out"))
    else:
        nodes += [
            helper.make_node("Transpose", [f"{p}_ctx"], [f"{p}_ctx4"], name=f"{p}_ctx4", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{p}_ctx4", merge], [mha.output[0]], name=f"{p}_out"),
        ]
    return nodes
