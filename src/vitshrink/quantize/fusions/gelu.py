"""The exported erf GELU as onnxruntime's Gelu (com.microsoft)."""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

from ..graph import Graph
from .base import Fusion


def _other(n: onnx.NodeProto, t: str) -> str:
    return n.input[1] if n.input[0] == t else n.input[0]


class FuseGelu(Fusion):
    """Write the exported erf GELU, x * 0.5 * (1 + erf(x / sqrt 2)), as onnxruntime's Gelu (com.microsoft).

    onnxruntime fuses the five ops itself, but only while x feeds exactly the Div and the Mul: a
    quantize pair in front (a static int8 depthwise conv before SegFormer's GELU) makes its QDQ
    pass duplicate the DequantizeLinear and the fusion fails, leaving five elementwise passes over the
    largest activation of the block. Fused before quantizing, the GELU stays one op. Exact (the same
    function); onnxruntime-only, like `FuseAttention`.
    """

    anchor = "Erf"
    key = "gelu_fused"
    ort_only = True

    def match(self, g: Graph, erf: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        pre = g.producer.get(erf.input[0])
        if pre is None or g.sole_consumer(pre.output[0]) is not erf:
            return None
        c = g.scalar(pre.input[1])
        if c is None or not (
            (pre.op_type == "Div" and abs(c - 2**0.5) < 1e-4)
            or (pre.op_type == "Mul" and abs(c - 2**-0.5) < 1e-4)
        ):
            return None
        x = pre.input[0]
        add = g.sole_consumer(erf.output[0])
        if add is None or add.op_type != "Add" or g.scalar(_other(add, erf.output[0])) != 1.0:
            return None
        mul = g.sole_consumer(add.output[0])
        if mul is None or mul.op_type != "Mul" or _other(mul, add.output[0]) != x:
            return None
        half = g.sole_consumer(mul.output[0])
        if half is None or half.op_type != "Mul" or g.scalar(_other(half, mul.output[0])) != 0.5:
            return None
        if not all(n.name for n in (pre, erf, add, mul, half)):  # named, as every pre-processed node is
            return None
        return [pre, add, mul, half]

    def apply(self, g: Graph, erf: onnx.NodeProto, site: list[onnx.NodeProto], k: int) -> None:
        pre, add, mul, half = site
        gelu = helper.make_node(
            "Gelu", [pre.input[0]], [half.output[0]], name=f"{erf.name}_vs_gelu", domain="com.microsoft"
        )
        g.replace(half, [gelu])
        for n in (pre, erf, add, mul):
            g.remove(n)

    def finish(self, g: Graph, done: int) -> dict[str, Any]:
        if done:
            g.commit()
            g.use_domain("com.microsoft")
        return {self.key: done}
