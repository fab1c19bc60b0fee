"""What every fusion is: find a site from an anchor node (`match`), rewrite it (`apply`), tidy up (`finish`)."""

from __future__ import annotations

from typing import Any

import onnx

from ..graph import Graph


class Fusion:
    """One exact graph rewrite, run on a copy of the model: `fusion(model) -> (model, info)`.

    `__call__` walks the nodes in graph order; for each node of type `anchor` (every node when None)
    `match` returns what `apply` needs, or None to leave it alone. `apply` rewrites in place or records
    node edits on the Graph; `finish` applies them (by default: commit when anything was rewritten)
    and returns the report entry.
    """

    anchor: str | None = None
    key: str = ""  # report entry: how many sites were rewritten
    ort_only = False  # writes onnxruntime-only (com.microsoft) ops: int8 for CPU only

    def match(self, g: Graph, node: onnx.NodeProto) -> Any | None:
        raise NotImplementedError

    def apply(self, g: Graph, node: onnx.NodeProto, site: Any, k: int) -> None:
        """Rewrite the `k`-th site found (k numbers new names)."""
        raise NotImplementedError

    def finish(self, g: Graph, done: int) -> dict[str, Any]:
        if done:
            g.commit()
        return {self.key: done}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
        g = Graph.copy_of(model)
        done = 0
        for node in list(g.nodes):
            if self.anchor is not None and node.op_type != self.anchor:
                continue
            site = self.match(g, node)
            if site is not None:
                self.apply(g, node, site, done)
                done += 1
        return g.model, self.finish(g, done)
