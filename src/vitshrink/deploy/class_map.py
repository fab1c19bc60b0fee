"""Segmentation graphs that end in a class map: ArgMax over the classes + Cast to uint8.

The device then copies H x W bytes out instead of K x H x W floats, and does no argmax itself (LPCV
2023's fastest UAV entries did this). Appended at the ONNX level, so one rule serves `export --argmax`
(fp32) and `quantize --argmax` (int8 graphs, which are calibrated and scored on their logits first).
Only `onnx` is needed, imported lazily, like the rest of the deploy path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ._meta import read_meta_props, write_meta_props

CLASS_IDS = "class_ids"  # the output name of a class-map graph; metadata "output" says the same


def is_class_map(proto: Any) -> bool:
    """Whether the graph's (first) output is already a uint8 class map."""
    import onnx

    outs = list(proto.graph.output)
    return bool(outs) and outs[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def append_argmax(proto: Any, where: str = "model") -> None:
    """End a segmentation graph's `logits` (N, K, H, W) in ArgMax(axis=1) + Cast(uint8) -> `class_ids`
    (N, H, W), in place; the metadata records `"output": "class_ids"`. ModelError for other graphs."""
    import onnx
    from onnx import TensorProto, helper

    if is_class_map(proto):
        raise ModelError(f"{where} already ends in a class map (ArgMax)")
    meta = read_meta_props(proto.metadata_props, where)
    if meta.get("task", "segmentation") != "segmentation":
        raise ModelError(
            f"--argmax is for segmentation; {where} is a {meta['task']} model (its output is K scores)"
        )
    outs = list(proto.graph.output)
    out = next((o for o in outs if o.name == "logits"), outs[0] if outs else None)
    dims = list(out.type.tensor_type.shape.dim) if out is not None else []
    if out is None or len(dims) != 4 or out.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelError(f"{where}: --argmax needs a float (N, K, H, W) logits output")
    if int(meta.get("num_classes") or len(meta.get("class_names") or [])) > 255:
        raise ModelError(f"{where}: more than 255 classes do not fit a uint8 class map")
    ids64 = f"{out.name}_argmax"
    proto.graph.node.extend(
        [
            # select_last_index=0: ties go to the lowest class, as numpy's and torch's argmax do
            helper.make_node("ArgMax", [out.name], [ids64], axis=1, keepdims=0, name="class_map_argmax"),
            helper.make_node("Cast", [ids64], [CLASS_IDS], to=TensorProto.UINT8, name="class_map_cast"),
        ]
    )
    vi = helper.make_tensor_value_info(CLASS_IDS, TensorProto.UINT8, None)
    for d in (dims[0], dims[2], dims[3]):
        vi.type.tensor_type.shape.dim.add().CopyFrom(d)
    del proto.graph.output[:]
    proto.graph.output.append(vi)
    write_meta_props(proto.metadata_props, {**meta, "output": CLASS_IDS})
    onnx.checker.check_model(proto)


def append_argmax_file(path: str | os.PathLike) -> None:
    """`append_argmax` on an ONNX file, rewritten through a temp file (a failure leaves it as it was)."""
    import onnx

    from ..artifacts import atomic_path

    path = Path(path)
    proto = onnx.load(str(path))
    append_argmax(proto, str(path))
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
