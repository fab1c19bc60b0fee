"""Exported scaled-dot-product attention as onnxruntime's MultiHeadAttention (com.microsoft)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import helper

from ..graph import Graph, node_attrs
from .base import Fusion

HEAD_SPLIT_Q = [0, 2, 1, 3]  # q and v: [1, N, heads, d] -> [1, heads, N, d]
HEAD_SPLIT_K = [0, 2, 3, 1]  # k: [1, heads, d, N]


class Heads(NamedTuple):
    tokens: str  # the 2-D or 3-D tokens before the head split
    heads: int
    size: int  # head size
    scale: float


class Site(NamedTuple):
    qk: onnx.NodeProto
    pv: onnx.NodeProto
    q: Heads
    k: Heads
    v: Heads
    back: onnx.NodeProto | None  # Transpose back to [1, N, heads, d] (None with one head)
    out: onnx.NodeProto  # the Reshape to [1, N, width]


class FuseAttention(Fusion):
    """Replace exported scaled-dot-product attention with onnxruntime's MultiHeadAttention (com.microsoft).

    The exporter writes attention as Reshape/Transpose of q, k, v, two scaling Muls, MatMul, Softmax,
    MatMul, Transpose/Reshape: the [heads, N, M] score matrix goes through memory three times. The
    fused CPU kernel computes it in tiles (SegFormer-B0 at 512 px, stage 1, 16384 queries x 256 keys:
    8.5 -> 6.8 ms at 1 thread). Exact up to float rounding, but onnxruntime-only: used for int8
    CPU models (which target onnxruntime), never for fp16 / TensorRT. onnxruntime's own fusion
    (onnxruntime.transformers) knows BERT-style self-attention only, not SegFormer's reduced keys.
    """

    anchor = "Softmax"
    key = "attention_fused"
    ort_only = True

    def match(self, g: Graph, sm: onnx.NodeProto) -> Site | None:
        if node_attrs(sm).get("axis", -1) not in (-1, 3):
            return None
        qk = g.producer.get(sm.input[0])
        pv = g.sole_consumer(sm.output[0])
        if (
            qk is None
            or qk.op_type != "MatMul"
            or pv is None
            or pv.op_type != "MatMul"
            or pv.input[0] != sm.output[0]
        ):
            return None
        q = self._head_split(g, qk.input[0], HEAD_SPLIT_Q)
        k = self._head_split(g, qk.input[1], HEAD_SPLIT_K)
        v = self._head_split(g, pv.input[1], HEAD_SPLIT_Q)
        back = g.sole_consumer(pv.output[0])
        if q is None or k is None or v is None or back is None:
            return None
        if back.op_type == "Reshape" and q.heads == 1:  # one head: no transpose back either
            back, out = None, back
        else:
            out = g.sole_consumer(back.output[0])  # type: ignore[assignment]
            if list(node_attrs(back).get("perm", [])) != HEAD_SPLIT_Q or out is None:
                return None
        if out.op_type != "Reshape":
            return None
        if (
            not (q.heads == k.heads == v.heads and q.size == k.size == v.size and v.scale == 1.0)
            or q.heads <= 0
        ):
            return None
        return Site(qk, pv, q, k, v, back, out)

    def _head_split(self, g: Graph, t: str, perm: list[int]) -> Heads | None:
        """(2-D or 3-D tokens, heads, head size, scale) behind [Mul(scale)] <- Transpose(perm) <- Reshape."""
        n, scale = g.producer.get(t), 1.0
        if n is not None and n.op_type == "Mul":
            c = g.const(n.input[1])
            if c is None or c.size != 1:
                return None
            scale, n = float(c.reshape(())), g.producer.get(n.input[0])
        if n is not None and n.op_type == "Reshape" and perm == HEAD_SPLIT_Q:
            # one head: the optimiser wrote Reshape [1, N, 1, d] + Transpose as Reshape [1, 1, N, d]
            s = g.const(n.input[1])
            ok = s is not None and s.shape == (4,) and s[0] == 1 and s[1] == 1 and s[3] > 0
            return Heads(n.input[0], 1, int(s[3]), scale) if ok else None  # type: ignore[index]
        if n is None or n.op_type != "Transpose" or list(node_attrs(n).get("perm", [])) != perm:
            return None
        r = g.producer.get(n.input[0])
        s = g.const(r.input[1]) if r is not None and r.op_type == "Reshape" else None
        if s is None or s.shape != (4,) or s[0] != 1 or s[3] <= 0:
            return None
        heads = int(s[2])
        if heads == -1:  # [1, N, -1, d]: the heads follow from the token width
            width = self._width(g, r.input[0])  # type: ignore[union-attr]
            heads = width // int(s[3]) if width and width % int(s[3]) == 0 else -1
        return Heads(r.input[0], heads, int(s[3]), scale)  # type: ignore[union-attr]

    @staticmethod
    def _width(g: Graph, t: str) -> int | None:
        """Last dim of a tensor: from shape inference, else from the constant of a bias Add / MatMul."""
        dims = g.shapes.get(t)
        if dims and dims[-1]:
            return dims[-1]
        n = g.producer.get(t)
        for i in n.input if n is not None and n.op_type in ("Add", "MatMul") else []:
            c = g.const(i)
            if c is not None and c.ndim in (1, 2):
                return int(c.shape[-1])
        return None

    def apply(self, g: Graph, sm: onnx.NodeProto, site: Site, k: int) -> None:
        scale = site.q.scale * site.k.scale
        heads, d = site.q.heads, site.q.size
        name = f"{sm.name}_vs_mha"
        nodes, ins = [], []
        for heads_in, tag in ((site.q, "q"), (site.k, "k"), (site.v, "v")):
            shape = g.add_init(np.array([1, -1, heads * d], np.int64), f"{name}_{tag}_shape")
            nodes.append(
                helper.make_node("Reshape", [heads_in.tokens, shape], [f"{name}_{tag}"], name=f"{name}_{tag}")
            )
            ins.append(f"{name}_{tag}")
        kw: dict[str, Any] = {"num_heads": heads}
        if abs(scale - 1.0 / np.sqrt(d)) > 1e-6 / np.sqrt(d):
            kw["scale"] = scale
        nodes.append(
            helper.make_node(
                "MultiHeadAttention", ins, [f"{name}_out"], name=name, domain="com.microsoft", **kw
            )
        )
        # the Reshape after the attention reads [1, N, width] where it read [1, N, heads, head size]
        site.out.input[0] = f"{name}_out"
        g.replace(site.out, [*nodes, site.out])
        for n in (sm, site.qk, site.pv, *([site.back] if site.back is not None else [])):
            g.remove(n)

    def finish(self, g: Graph, done: int) -> dict[str, Any]:
        if not done:
            return {self.key: 0}
        # the q/k/v head splits and scaling Muls are no longer read: drop them (repeat until none)
        g.set_nodes(g.drop_dead(g.edited(), lambda n: n.op_type in ("Reshape", "Transpose", "Mul")))
        g.use_domain("com.microsoft")
        return {self.key: done}
