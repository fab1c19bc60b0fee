"""Constant-weight Gemm(A, B, C) as MatMul(A, B') + Add(C'): onnxruntime has no dynamic-int8 Gemm."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..graph import Graph, node_attrs
from .base import Fusion


class GemmToMatMul(Fusion):
    """Rewrite constant-weight Gemm(A, B, C) as MatMul(A, B') + Add(C') (exact; alpha/beta folded)."""

    anchor = "Gemm"
    key = "gemm_as_matmul"

    def match(self, g: Graph, n: onnx.NodeProto) -> dict[str, Any] | None:
        a = node_attrs(n)
        c_ok = len(n.input) < 3 or not n.input[2] or n.input[2] in g.inits
        return a if not a.get("transA", 0) and n.input[1] in g.inits and c_ok else None

    def apply(self, g: Graph, n: onnx.NodeProto, a: dict[str, Any], k: int) -> None:
        w = g.const(n.input[1]).astype(np.float32) * np.float32(a.get("alpha", 1.0))  # type: ignore[union-attr]
        w = w.T if a.get("transB", 0) else w
        wname = g.add_init(w, f"{n.input[1]}_vs_mm{k}")
        has_bias = len(n.input) > 2 and bool(n.input[2])
        mm_out = f"{n.output[0]}_vs_mm" if has_bias else n.output[0]
        nodes = [helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=n.name)]
        if has_bias:
            bias = g.const(n.input[2]).astype(np.float32) * np.float32(a.get("beta", 1.0))  # type: ignore[union-attr]
            bname = g.add_init(bias, f"{n.input[2]}_vs_mm{k}")
            nodes.append(helper.make_node("Add", [mm_out, bname], [n.output[0]], name=f"{n.name}_bias"))
        g.replace(n, nodes)

    def finish(self, g: Graph, done: int) -> dict[str, Any]:
        g.commit()  # also when nothing matched: initializers nothing reads go either way
        return {self.key: done}
