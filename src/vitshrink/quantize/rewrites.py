"""Graph rewrites around quantization: ORT pre-processing, Gemm -> MatMul, verified smoothing, metadata."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ..cpu import reduce_range_for
from ..deploy._meta import write_meta_props
from ._common import compare, copy_metadata, input_spec, ort_quiet, read_meta, rel_error, run
from .smooth import smooth_model

if TYPE_CHECKING:
    from .builders import Ctx

SMOOTH_ALPHA = 0.5


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite constant-weight Gemm(A, B, C) as MatMul(A, B') + Add(C') (exact; alpha/beta folded)."""
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    nodes, count = [], 0
    for n in g.node:
        a = attrs(n) if n.op_type == "Gemm" else {}
        c_ok = len(n.input) < 3 or not n.input[2] or n.input[2] in inits
        if n.op_type != "Gemm" or a.get("transA", 0) or n.input[1] not in inits or not c_ok:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) * np.float32(a.get("alpha", 1.0))
        w = w.T if a.get("transB", 0) else w
        wname = f"{n.input[1]}_vs_mm{count}"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), wname))
        has_bias = len(n.input) > 2 and bool(n.input[2])
        mm_out = f"{n.output[0]}_vs_mm" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=n.name))
        if has_bias:
            bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32) * np.float32(
                a.get("beta", 1.0)
            )
            bname = f"{n.input[2]}_vs_mm{count}"
            g.initializer.append(numpy_helper.from_array(bias, bname))
            nodes.append(helper.make_node("Add", [mm_out, bname], [n.output[0]], name=f"{n.name}_bias"))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model, count


def preprocess(
    src: Path, dst: Path, original: onnx.ModelProto, say: Callable[[str], None]
) -> onnx.ModelProto:
    """onnxruntime's quant_pre_process (symbolic shape inference + basic graph optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            with ort_quiet():
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            break
        except Exception as e:  # noqa: BLE001 - symbolic inference fails on some graphs; retry without it
            say(
                f"pre-processing failed ({type(e).__name__}); {'retrying without symbolic shapes' if not skip_symbolic else 'using the model as is'}"
            )
    else:
        shutil.copyfile(src, dst)
    model = onnx.load(str(dst))
    # ORT's quantizers address nodes by name; make sure every node has a unique one.
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_vs{i}"
        seen.add(node.name)
    # Every candidate derives from this file; with the metadata, an eval_fn can read preprocessing
    # and class names from any of them.
    copy_metadata(original, model)
    onnx.save(model, str(dst))
    return model


def apply_smoothing(pre: Path, ctx: Ctx) -> tuple[Path, dict[str, Any]]:
    model = onnx.load(str(pre))
    # Generated probe inputs say nothing about real activation ranges: smooth from the weights then.
    calib = [] if ctx.generated else ctx.batches
    smoothed, info = smooth_model(model, calib, alpha=SMOOTH_ALPHA)
    if not info["smoothed"]:
        return pre, info
    path = ctx.work / "smoothed.onnx"
    onnx.save(smoothed, str(path))
    # The migration is exact in float; refuse it if something in the graph made it not so.
    probe = ctx.batches or random_input(model)
    if probe is None:
        info["rejected"] = "no calibration data and the input shape is not fixed: cannot verify"
        return pre, info
    if ctx.batches:
        err = compare(path, ctx.batches, ctx.ref)["rel_error"]
    else:
        err = rel_error(run(pre, probe), run(path, probe))
    info["float_rel_error"] = err
    if err > 1e-3:
        info["rejected"] = f"float output changed by {err:.2e}"
        return pre, info
    return path, info


def random_input(model: onnx.ModelProto) -> list[np.ndarray] | None:
    dims = input_spec(model)[1]
    if any(d is None for d in dims[1:]):
        return None
    return [np.random.default_rng(0).standard_normal([dims[0] or 2, *dims[1:]]).astype(np.float32)]


def record_int8_target(model: onnx.ModelProto, target_cpu: str) -> None:
    """Top-level `int8` entry of the vitshrink metadata: deploy checks it against the CPU it runs on."""
    meta = read_meta(model)
    if meta is not None:
        meta["int8"] = {"target_cpu": target_cpu, "reduce_range": reduce_range_for(target_cpu)}
        write_meta_props(model.metadata_props, meta)
