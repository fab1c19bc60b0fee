"""A 1x1 Conv over a channel Concat folded into the Linear layers that feed the Concat."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import Graph, node_attrs
from .base import Fusion

# Ops that move or resample each channel on its own, so a per-pixel channel mix (1x1 conv / Linear)
# commutes with them: a bilinear / nearest Resize is linear per channel and keeps constants constant.
CHANNEL_WISE = {"Reshape", "Transpose", "Resize"}
LINEAR_RESIZE = (b"linear", b"nearest")

Source = tuple[onnx.NodeProto, "onnx.NodeProto | None"]  # (MatMul / Gemm, optional bias Add)


def plain_pointwise(a: dict[str, Any]) -> bool:
    """A Conv's attributes leave it a plain per-pixel channel mix (given a 1x1 kernel)."""
    return (
        a.get("group", 1) == 1
        and all(s == 1 for s in a.get("strides", [1, 1]))
        and all(p == 0 for p in a.get("pads", [0, 0, 0, 0]))
    )


def linear_resize(n: onnx.NodeProto) -> bool:
    return node_attrs(n).get("mode", b"nearest") in LINEAR_RESIZE


class FoldConcatConv(Fusion):
    """Fold a 1x1 Conv over a channel Concat into the Linear layers that feed the Concat.

    SegFormer's all-MLP decoder projects each stage with a Linear, upsamples to 1/4 size, concatenates
    (4 x 256 channels) and mixes with a 1x1 Conv (1024 -> 256): at 512 px that conv is 4.3 of the
    model's ~8 GMACs, on 128x128 maps. Linear maps commute with the per-channel Resize / layout ops in
    between, so W_fuse[:, slice_i] @ W_i becomes stage i's Linear (same size as before, at the stage's
    own resolution) and Concat + Conv become a Sum plus the conv's bias: exact in float, the conv
    disappears. onnxruntime has no such fusion. Patterns that do not match are left alone; the caller
    verifies the result numerically.
    """

    anchor = "Conv"
    key = "folded"

    def match(self, g: Graph, conv: onnx.NodeProto) -> tuple[onnx.NodeProto, list[Source]] | None:
        if conv.input[1] not in g.inits:
            return None
        w_shape = tuple(g.inits[conv.input[1]].dims)
        cat = g.producer.get(conv.input[0])
        if (
            w_shape[2:] != (1, 1)
            or not plain_pointwise(node_attrs(conv))
            or cat is None
            or cat.op_type != "Concat"
            or node_attrs(cat).get("axis") != 1
            or g.sole_consumer(cat.output[0]) is None
        ):
            return None
        sources = [self._linear_source(g, t) for t in cat.input]
        if any(s is None for s in sources):
            return None
        widths = [self._out_width(g, mm) for mm, _ in sources]  # type: ignore[misc]
        # the layout ops in between hold the channel count in their shapes: it must not change
        if sum(widths) != w_shape[1] or any(width != w_shape[0] for width in widths):
            return None
        return cat, sources  # type: ignore[return-value]

    @staticmethod
    def _linear_source(g: Graph, t: str) -> Source | None:
        """(MatMul with a constant weight, optional constant-bias Add) behind channel-wise ops."""
        while True:
            n = g.producer.get(t)
            if n is None or g.sole_consumer(t) is None:
                return None
            if n.op_type == "Resize" and not linear_resize(n):
                return None
            if n.op_type not in CHANNEL_WISE:
                break
            t = n.input[0]
        add = None
        if n.op_type == "Add" and n.input[1] in g.inits:
            add, n = n, g.producer.get(n.input[0])
            if n is None or g.sole_consumer(add.input[0]) is None:
                return None
        if n.op_type == "Gemm":  # onnxslim's Linear: A @ B(^T) + C, plain alpha/beta only
            a = node_attrs(n)
            plain = a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0)
            bias_ok = len(n.input) < 3 or not n.input[2] or n.input[2] in g.inits
            if add is not None or not plain or not bias_ok or n.input[1] not in g.inits:
                return None
        elif n.op_type != "MatMul" or n.input[1] not in g.inits:
            return None
        return n, add

    @staticmethod
    def _out_width(g: Graph, mm: onnx.NodeProto) -> int:
        dims = g.inits[mm.input[1]].dims
        return dims[0] if mm.op_type == "Gemm" and node_attrs(mm).get("transB", 0) else dims[-1]

    def apply(
        self, g: Graph, conv: onnx.NodeProto, site: tuple[onnx.NodeProto, list[Source]], k: int
    ) -> None:
        cat, sources = site
        w = g.const(conv.input[1]).astype(np.float32)  # type: ignore[union-attr]
        out_ch, start = w.shape[0], 0
        carrier: Any = None  # the first stage bias (a node's input list) the conv bias can join
        for mm, add in sources:
            width = self._out_width(g, mm)
            f = w[:, start : start + width, 0, 0]  # (out, width)
            start += width
            wm = g.const(mm.input[1]).astype(np.float32)  # type: ignore[union-attr]
            trans_b = mm.op_type == "Gemm" and node_attrs(mm).get("transB", 0)
            mm.input[1] = g.add_init(
                (f @ wm if trans_b else wm @ f.T).astype(np.float32), f"{mm.input[1]}_vs_fold{k}"
            )
            bias_in = (
                add.input if add is not None else (mm.input if len(mm.input) > 2 and mm.input[2] else None)
            )
            if bias_in is not None:
                b = g.const(bias_in[-1]).astype(np.float32)  # type: ignore[union-attr]
                bias_in[-1] = g.add_init((b @ f.T).astype(np.float32), f"{bias_in[-1]}_vs_fold{k}")
                carrier = carrier if carrier is not None else bias_in
        bias = (
            g.const(conv.input[2]).astype(np.float32)  # type: ignore[union-attr]
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(out_ch, np.float32)
        )
        summed = f"{conv.output[0]}_vs_sum"
        if carrier is not None:
            # The conv's bias rides on one stage's Linear bias: a bilinear / nearest Resize keeps a
            # constant map constant, so the sum is the same and one full-size Add pass goes.
            init = g.inits[carrier[-1]]
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + bias, init.name))
            summed = conv.output[0]
        nodes = [helper.make_node("Sum", list(cat.input), [summed], name=f"{conv.name}_vs_sum")]
        if carrier is None:
            bname = g.add_init(bias.reshape(1, out_ch, 1, 1), f"{conv.name}_vs_fold_bias")
            nodes.append(
                helper.make_node("Add", [summed, bname], [conv.output[0]], name=f"{conv.name}_vs_bias")
            )
        g.replace(cat, nodes)
        g.remove(conv)
