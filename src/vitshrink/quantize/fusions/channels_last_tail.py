"""A decoder's upsample-and-sum tail run channels-last, up to its 1x1 classifier conv."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..graph import Graph, node_attrs
from .base import Fusion
from .concat_conv import linear_resize, plain_pointwise

# Elementwise ops a channels-last tail may carry: unary, or binary with a per-channel constant.
TAIL_UNARY = {"Relu", "Clip", "Sigmoid", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh", "Identity"}
TAIL_BINARY = {"Add", "Mul", "Sub", "Div"}

Branch = tuple["onnx.NodeProto | None", onnx.NodeProto]  # (Resize or None, Transpose NHWC -> NCHW)


def _to_nhwc(n: onnx.NodeProto) -> bool:
    return n.op_type == "Transpose" and list(node_attrs(n).get("perm", [])) == [0, 3, 1, 2]


def _opt(n: onnx.NodeProto, k: int) -> str:
    """The node's k-th input name, '' when absent."""
    return n.input[k] if len(n.input) > k else ""


class ChannelsLastTail(Fusion):
    """Run a decoder's upsample-and-sum tail channels-last, up to its 1x1 classifier conv.

    After `FoldConcatConv`, SegFormer's decoder computes each stage's Linear token-major (NHWC),
    transposes the 256-channel map to NCHW, upsamples it to 1/4 size (one of them to its own size)
    and sums. onnxruntime's bilinear Resize is ~3.5x faster on NHWC than on NCHW maps (1 thread,
    256 x 128 x 128; it also scales with threads where the NCHW kernel does not), and each transpose
    of a 128x128x256 map costs as much as a Resize. Here the Transposes go, the Resizes work on NHWC
    (an identity Resize is dropped), the per-channel ops after the Sum broadcast over the last axis,
    and the 1x1 conv becomes a MatMul whose narrow output (the classes) is transposed back: exact in
    float. onnxruntime's own layout transformer only does this for its NHWC-capable int8 kernels.
    Patterns that do not match are left alone; the caller verifies the result numerically.
    """

    anchor = "Sum"
    key = "channels_last_tails"

    def match(
        self, g: Graph, s: onnx.NodeProto
    ) -> tuple[list[Branch], list[onnx.NodeProto], onnx.NodeProto] | None:
        branches = [self._branch(g, t) for t in s.input]
        found = self._tail(g, s.output[0])
        if found is None or any(b is None for b in branches):
            return None
        return branches, *found  # type: ignore[return-value]

    @staticmethod
    def _branch(g: Graph, t: str) -> Branch | None:
        """(Resize or None, Transpose NHWC->NCHW) feeding the Sum input `t`."""
        n = g.producer.get(t)
        if n is None or g.sole_consumer(t) is None:
            return None
        if _to_nhwc(n):
            return None, n
        if n.op_type != "Resize" or not linear_resize(n):
            return None
        if _opt(n, 1) and (r := g.const(n.input[1])) is not None and r.size:
            return None  # a region of interest (tf_crop_and_resize) is laid out NCHW
        sizes = g.const(n.input[3]) if _opt(n, 3) else None
        scales = g.const(n.input[2]) if _opt(n, 2) else None
        if not ((sizes is not None and sizes.shape == (4,)) or (scales is not None and scales.shape == (4,))):
            return None
        if scales is not None and sizes is None and tuple(scales[:2]) != (1.0, 1.0):
            return None
        t_node = g.producer.get(n.input[0])
        if t_node is None or not _to_nhwc(t_node) or g.sole_consumer(n.input[0]) is None:
            return None
        return n, t_node

    @staticmethod
    def _tail(g: Graph, t: str) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
        """Per-channel elementwise nodes after the Sum, then the 1x1 Conv they lead to."""
        chain = []
        while True:
            n = g.sole_consumer(t)
            if n is None:
                return None
            if n.op_type == "Conv":
                w = g.const(n.input[1])
                a = node_attrs(n)
                plain = (
                    w is not None
                    and w.ndim == 4
                    and w.shape[2:] == (1, 1)
                    and plain_pointwise(a)
                    and a.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")
                    and (not _opt(n, 2) or n.input[2] in g.inits)
                )
                return (chain, n) if plain else None
            if n.op_type in TAIL_UNARY and all(i in g.inits for i in n.input[1:] if i):
                pass
            elif n.op_type in TAIL_BINARY and len(n.input) == 2:
                c = g.const(n.input[1]) if n.input[0] == t else g.const(n.input[0])
                if c is None or not (c.size == 1 or c.shape in ((c.size, 1, 1), (1, c.size, 1, 1))):
                    return None
            else:
                return None
            chain.append(n)
            t = n.output[0]

    def apply(self, g: Graph, s: onnx.NodeProto, site: Any, k: int) -> None:
        branches, chain, conv = site
        for j, (resize, tr) in enumerate(branches):
            self._nhwc_branch(g, s, j, resize, tr)
        g.stale.add(s.output[0])
        for n in chain:
            g.stale.add(n.output[0])
            for j, i in enumerate(n.input):
                c = g.const(i) if i else None
                if c is not None and c.size > 1 and n.op_type in TAIL_BINARY:
                    n.input[j] = g.add_init(c.reshape(-1), f"{i}_vs_nhwc{k}")
        g.replace(conv, self._matmul(g, conv, chain[-1].output[0] if chain else s.output[0]))
        g.remove(conv)

    @staticmethod
    def _nhwc_branch(
        g: Graph, s: onnx.NodeProto, j: int, resize: onnx.NodeProto | None, tr: onnx.NodeProto
    ) -> None:
        """The Sum's j-th input read NHWC: the transpose goes, the Resize (if any) works channels-last."""
        src = tr.input[0]
        g.remove(tr)
        if resize is None:
            s.input[j] = src
            return
        sizes = g.const(resize.input[3]) if _opt(resize, 3) else None
        if sizes is not None and g.shapes.get(src, [None])[1:3] == [int(sizes[2]), int(sizes[3])]:
            g.remove(resize)  # resizes to its own size: a copy
            s.input[j] = src
            return
        resize.input[0] = src
        if sizes is not None:
            resize.input[3] = g.add_init(sizes[[0, 2, 3, 1]].astype(np.int64), f"{resize.name}_vs_nhwc_sizes")
        else:
            scales = g.const(resize.input[2])
            resize.input[2] = g.add_init(scales[[0, 2, 3, 1]], f"{resize.name}_vs_nhwc_scales")  # type: ignore[index]
        g.stale.add(resize.output[0])

    @staticmethod
    def _matmul(g: Graph, conv: onnx.NodeProto, x: str) -> list[onnx.NodeProto]:
        """The 1x1 conv as MatMul (+ bias Add) on the NHWC map, then the class map back to NCHW."""
        w = g.const(conv.input[1])[:, :, 0, 0]  # type: ignore[index]
        mm = f"{conv.output[0]}_vs_nhwc_mm"
        nodes = [
            helper.make_node("MatMul", [x, g.add_init(w.T.copy(), f"{conv.name}_vs_nhwc_w")], [mm], name=mm)
        ]
        if _opt(conv, 2):
            b = g.add_init(g.const(conv.input[2]), f"{conv.name}_vs_nhwc_b")  # type: ignore[arg-type]
            nodes.append(helper.make_node("Add", [mm, b], [mm + "_b"], name=mm + "_b"))
        nodes.append(
            helper.make_node(
                "Transpose",
                [nodes[-1].output[0]],
                [conv.output[0]],
                name=f"{conv.name}_vs_nchw",
                perm=[0, 3, 1, 2],
            )
        )
        return nodes

    def finish(self, g: Graph, done: int) -> dict[str, Any]:
        if not done:
            return {self.key: 0}
        g.commit()
        g.drop_value_info(lambda name: name in g.stale)  # NCHW shapes no longer hold for what runs NHWC
        return {self.key: done}
