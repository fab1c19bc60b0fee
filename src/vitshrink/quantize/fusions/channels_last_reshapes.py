"""Token <-> map conversions as 4-D transposes that onnxruntime can cancel."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..graph import Graph, node_attrs
from .base import Fusion


def _perm(n: onnx.NodeProto) -> list[int]:
    return list(node_attrs(n).get("perm", [])) if n.op_type == "Transpose" else []


def _set_perm(n: onnx.NodeProto, p: list[int]) -> None:
    del n.attribute[:]
    n.attribute.append(helper.make_attribute("perm", p))


class ChannelsLastReshapes(Fusion):
    """Turn token <-> map conversions into 4-D transposes that onnxruntime can cancel.

    Vision transformers with convolutions (SegFormer's Mix-FFN depthwise conv, sequence-reduction and
    patch-embedding convs) go from tokens [B, N, C] to a map [B, C, H, W] by Transpose(0,2,1) +
    Reshape, and back by Reshape + Transpose(0,2,1). onnxruntime runs its int8 convs (and its blocked
    float convs' reorders) channels-last and wraps them in 4-D transposes, which its transpose
    optimizer cannot cancel against a 3-D transpose behind a Reshape: each conv costs four full copies
    of its map. Written as Reshape to [B, H, W, C] + Transpose(0,3,1,2) (and Transpose(0,2,3,1) +
    Reshape on the way back), the same values come out and the transposes meet and cancel; back-to-back
    transposes that compose to the identity are removed here. Only constant reshape targets with known
    dims are touched.
    """

    key = "token_map_transposes"

    @staticmethod
    def _target(g: Graph, n: onnx.NodeProto) -> np.ndarray | None:
        if n.op_type != "Reshape" or n.input[1] not in g.inits or node_attrs(n).get("allowzero", 0):
            return None
        return g.const(n.input[1]).astype(np.int64)  # type: ignore[union-attr]

    def match(self, g: Graph, n: onnx.NodeProto) -> tuple[str, onnx.NodeProto, list[int]] | None:
        if n.output[0] in g.outputs:
            return None
        if _perm(n) == [0, 2, 1]:
            return self._tokens_to_map(g, n)
        s = self._target(g, n)
        return self._map_to_tokens(g, n, s) if s is not None and len(s) == 3 else None

    def _tokens_to_map(self, g: Graph, n: onnx.NodeProto) -> tuple[str, onnx.NodeProto, list[int]] | None:
        """Transpose(0,2,1) + Reshape [B,C,H,W]: the new Reshape target [B,H,W,C]."""
        x = g.shapes.get(n.input[0])
        cons = g.readers(n.output[0])
        s = self._target(g, cons[0]) if len(cons) == 1 else None
        if x is None or len(x) != 3 or None in x or s is None or len(s) != 4 or 0 in s:
            return None
        B, N, C = x
        if s[0] != B or s[1] != C or -1 in s[:2]:
            return None
        h, w = s[2], s[3]
        h = N // w if h == -1 else h  # type: ignore[operator]
        w = N // h if w == -1 else w  # type: ignore[operator]
        if h * w != N:
            return None
        return "to_map", cons[0], [B, h, w, C]  # type: ignore[list-item]

    def _map_to_tokens(
        self, g: Graph, n: onnx.NodeProto, s: np.ndarray
    ) -> tuple[str, onnx.NodeProto, list[int]] | None:
        """Reshape [B,C,N] + Transpose(0,2,1): the new Reshape target [B,N,C]."""
        x = g.shapes.get(n.input[0])
        cons = g.readers(n.output[0])
        if x is None or len(x) != 4 or None in x or len(cons) != 1 or _perm(cons[0]) != [0, 2, 1]:
            return None
        B, C, H, W = x
        if 0 in s or s[0] != B or s[1] != C or s[2] not in (-1, H * W):  # type: ignore[operator]
            return None
        return "to_tokens", cons[0], [B, H * W, C]  # type: ignore[operator]

    def apply(self, g: Graph, n: onnx.NodeProto, site: tuple[str, onnx.NodeProto, list[int]], k: int) -> None:
        way, other, shape = site
        # the two nodes swap places: the Reshape reads the tokens (or the map after a 4-D transpose)
        r, t = (other, n) if way == "to_map" else (n, other)
        r.input[1] = g.add_init(np.array(shape, np.int64), f"{r.name}_vs_nhwc_shape")
        if way == "to_map":
            # Transpose(0,2,1) + Reshape [B,C,H,W]  =>  Reshape [B,H,W,C] + Transpose(0,3,1,2)
            r.input[0], t.input[0] = t.input[0], r.output[0]
            tmp = f"{t.output[0]}_vs_nhwc"
            r.output[0], t.output[0] = tmp, r.output[0]
            t.input[0] = tmp
            _set_perm(t, [0, 3, 1, 2])
        else:
            # Reshape [B,C,N] + Transpose(0,2,1)  =>  Transpose(0,2,3,1) + Reshape [B,N,C]
            tmp = f"{t.output[0]}_vs_nhwc"
            t.input[0], r.input[0] = r.input[0], tmp
            t.output[0], r.output[0] = tmp, t.output[0]
            _set_perm(t, [0, 2, 3, 1])
        g.refresh()

    def finish(self, g: Graph, done: int) -> dict[str, Any]:
        cancelled = 0
        if done:  # the nodes swapped places: restore topological order
            g.topological()
            cancelled = self._cancel_pairs(g)
            produced = {o for n in g.nodes for o in n.output}
            g.drop_value_info(lambda name: name not in produced or name.endswith("_vs_nhwc"))
        return {self.key: done, "transposes_cancelled": cancelled}

    @staticmethod
    def _cancel_pairs(g: Graph) -> int:
        """Transpose(0,3,1,2) then Transpose(0,2,3,1) (or the reverse): read the first one's input."""
        alias: dict[str, str] = {}
        for n in g.nodes:
            p = g.producer.get(n.input[0]) if _perm(n) else None
            if p is not None and _perm(p) and len(_perm(p)) == len(_perm(n)):
                composed = [_perm(p)[i] for i in _perm(n)]
                if composed == list(range(len(composed))) and n.output[0] not in g.outputs:
                    alias[n.output[0]] = p.input[0]
        if alias:
            for n in g.nodes:
                for j, i in enumerate(n.input):
                    n.input[j] = alias.get(i, i)
            kept = [n for n in g.nodes if not (n.op_type == "Transpose" and n.output[0] in alias)]
            g.refresh()
            kept = [
                n
                for n in kept
                if n.op_type != "Transpose" or g.readers(n.output[0]) or n.output[0] in g.outputs
            ]
            g.set_nodes(kept)
        return len(alias)
