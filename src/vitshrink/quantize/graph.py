"""One view of an ONNX graph for every rewrite: who makes and who reads each tensor, constants, shapes,
new initializers, node edits; plus the graph queries the quantization paths share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelError


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def shape_dims(g: onnx.GraphProto) -> dict[str, list[int | None]]:
    """Dims shape inference recorded per tensor (None where symbolic)."""
    return {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in list(g.value_info) + list(g.input) + list(g.output)
        if v.type.tensor_type.HasField("shape")
    }


def inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with shape inference's value_info, or the model as is where inference fails
    (> 2 GB or odd graphs: what the graph declares is all there is)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - onnx raises several unrelated types
        return model


class Graph:
    """A model's graph with the lookups rewrites share.

    `producer` / `uses` (the readers of each tensor) are built on first use and kept until `refresh()` (a rewrite that
    reads them after moving edges asks for fresh ones); `inits` follows `add_init`. Node edits are
    recorded with `replace` / `remove` and applied together by `commit`.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.proto = model.graph
        self.inits = {i.name: i for i in self.proto.initializer}
        self.outputs = {o.name for o in self.proto.output}
        self._uses: dict[str, list[tuple[onnx.NodeProto, int]]] | None = None
        self._producer: dict[str, onnx.NodeProto] | None = None
        self._shapes: dict[str, list[int | None]] | None = None
        # by id, with the node held: protobuf hands out one wrapper per element only while it lives
        self._replace: dict[int, tuple[onnx.NodeProto, list[onnx.NodeProto]]] = {}
        self._removed: dict[int, onnx.NodeProto] = {}
        self.stale: set[str] = set()  # tensors whose recorded shape a rewrite changed

    @classmethod
    def copy_of(cls, model: onnx.ModelProto) -> Graph:
        """A Graph over a deep copy of `model` (rewrites never touch their input)."""
        return cls(onnx.ModelProto.FromString(model.SerializeToString()))

    # -- links -------------------------------------------------------------------------------------
    @property
    def nodes(self) -> Any:
        return self.proto.node

    def refresh(self) -> None:
        self._uses = self._producer = None

    @property
    def producer(self) -> dict[str, onnx.NodeProto]:
        if self._producer is None:
            self._producer = {o: n for n in self.proto.node for o in n.output}
        return self._producer

    @property
    def uses(self) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
        """(node, input position) of every read of each tensor, in graph order."""
        if self._uses is None:
            self._uses = {}
            for n in self.proto.node:
                for k, i in enumerate(n.input):
                    self._uses.setdefault(i, []).append((n, k))
        return self._uses

    def readers(self, t: str) -> list[onnx.NodeProto]:
        return [n for n, _ in self.uses.get(t, [])]

    def sole_consumer(self, t: str) -> onnx.NodeProto | None:
        """The one node reading `t`, or None if several do or `t` is also a graph output."""
        c = self.readers(t)
        return c[0] if len(c) == 1 and t not in self.outputs else None

    # -- constants and shapes ----------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        """The initializer's value, None for a computed tensor."""
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def scalar(self, name: str) -> float | None:
        c = self.const(name)
        return float(c.reshape(())) if c is not None and c.size == 1 else None

    def add_init(self, arr: np.ndarray, name: str) -> str:
        """Append `arr` as a new initializer named `name` (made unique if taken); returns its name."""
        new, k = name, 0
        while new in self.inits:
            k += 1
            new = f"{name}_{k}"
        self.proto.initializer.append(numpy_helper.from_array(arr, new))
        self.inits[new] = self.proto.initializer[-1]
        return new

    @property
    def shapes(self) -> dict[str, list[int | None]]:
        """Dims per tensor as the graph records them (value_info, inputs, outputs); None where symbolic."""
        if self._shapes is None:
            self._shapes = shape_dims(self.proto)
        return self._shapes

    def drop_value_info(self, drop: Callable[[str], bool]) -> None:
        """Forget the recorded shapes of the tensors `drop` names (runtimes re-infer them)."""
        keep = [v for v in self.proto.value_info if not drop(v.name)]
        del self.proto.value_info[:]
        self.proto.value_info.extend(keep)

    # -- edits -------------------------------------------------------------------------------------
    def replace(self, node: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
        """Put `nodes` where `node` stands (at `commit`)."""
        self._replace[id(node)] = (node, nodes)

    def remove(self, node: onnx.NodeProto) -> None:
        self._removed[id(node)] = node

    def edited(self) -> list[onnx.NodeProto]:
        """The node list with the recorded replacements and removals applied (the graph is unchanged)."""
        out: list[onnx.NodeProto] = []
        for n in self.proto.node:
            if id(n) in self._replace:
                out.extend(self._replace[id(n)][1])
            elif id(n) not in self._removed:
                out.append(n)
        return out

    def commit(self, *, prune: bool = True) -> None:
        """Apply the recorded edits; with `prune`, drop the initializers no node reads any more."""
        self.set_nodes(self.edited(), prune=prune)
        self._replace, self._removed = {}, {}

    def set_nodes(self, nodes: list[onnx.NodeProto], *, prune: bool = True) -> None:
        """Replace the graph's nodes."""
        del self.proto.node[:]
        self.proto.node.extend(nodes)
        self.refresh()
        if prune:
            self.prune_initializers()

    def prune_initializers(self, keep: Iterable[str] = ()) -> None:
        """Drop the initializers no node reads (those named in `keep` stay)."""
        used = {i for n in self.proto.node for i in n.input} | set(keep)
        kept = [i for i in self.proto.initializer if i.name in used]
        del self.proto.initializer[:]
        self.proto.initializer.extend(kept)
        self.inits = {i.name: i for i in self.proto.initializer}

    def drop_dead(
        self, nodes: list[onnx.NodeProto], removable: Callable[[onnx.NodeProto], bool], *, repeat: bool = True
    ) -> list[onnx.NodeProto]:
        """`nodes` less the `removable` ones whose outputs nothing reads (repeated until none is left)."""
        while True:
            read = {i for n in nodes for i in n.input} | self.outputs
            keep = [n for n in nodes if any(o in read for o in n.output) or not removable(n)]
            if len(keep) == len(nodes) or not repeat:
                return keep
            nodes = keep

    def topological(self) -> None:
        """Put the nodes back in an order where each reads only what earlier ones made."""
        order, ready, pending = (
            [],
            {i.name for i in self.proto.input} | set(self.inits),
            list(self.proto.node),
        )
        ready |= {""}
        while pending:
            rest = []
            for n in pending:
                if all(i in ready for i in n.input):
                    order.append(n)
                    ready.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                raise ModelError("a graph rewrite broke the graph order")
            pending = rest
        self.set_nodes(order, prune=False)

    def use_domain(self, domain: str) -> None:
        """Declare an operator set the rewrite's new nodes come from (once)."""
        if not any(o.domain == domain for o in self.model.opset_import):
            self.model.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def input_spec(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """Name and shape (None for symbolic dims) of the model's first real (non-initializer) input."""
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name not in inits:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
            return inp.name, dims
    raise ModelError("ONNX model has no input")


def weight_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul / Gemm / Conv nodes whose weight is a constant: the ones worth int8 (memory + compute)."""
    inits = {i.name for i in model.graph.initializer}
    return [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1 and n.input[1] in inits
    ]


def weight_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-adds per sample of the constant-weight MatMul / Gemm / Conv nodes, by op type, from the
    output shapes shape inference recorded (nodes without a known shape are left out; 2-D outputs,
    tokens folded into the batch dim, count whole, which assumes batch 1 there)."""
    macs: dict[str, int] = {}
    types = {n.name: n.op_type for n in weight_nodes(model)}
    for name, m in node_macs(model).items():
        macs[types[name]] = macs.get(types[name], 0) + m
    return macs


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-adds per sample of each constant-weight node with a known output shape (see weight_macs)."""
    shapes = {
        vi.name: [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        for vi in (*model.graph.value_info, *model.graph.output)
    }
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    macs: dict[str, int] = {}
    for n in weight_nodes(model):
        out, w = shapes.get(n.output[0]), inits[n.input[1]]
        if not out or not all(out[1:]):
            continue
        per_out = int(np.prod(w[1:])) if n.op_type == "Conv" else w[0]  # Cin/group*kh*kw, or K
        if n.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            per_out = w[1] if trans_b else w[0]
        rows = out if len(out) == 2 else out[1:]  # a 2-D Gemm / MatMul holds batch x tokens in dim 0
        macs[n.name] = int(np.prod(rows)) * per_out
    return macs
