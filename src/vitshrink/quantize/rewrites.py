"""Graph rewrites around quantization: ORT pre-processing, Gemm -> MatMul, verified smoothing, metadata."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..cpu import reduce_range_for
from ..deploy._meta import write_meta_props
from ._common import Ctx, compare, copy_metadata, input_spec, ort_quiet, read_meta, rel_error, run
from .smooth import smooth_model

SMOOTH_ALPHA = 0.5


def _set_nodes(g: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Replace the graph's nodes and drop the initializers no node reads any more."""
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


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
    _set_nodes(g, nodes)
    return model, count


def preprocess(
    src: Path, dst: Path, original: onnx.ModelProto, say: Callable[[str], None]
) -> onnx.ModelProto:
    """onnxruntime's quant_pre_process (symbolic shape inference + basic graph optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    scratch = dst.parent / "pre-cwd"
    scratch.mkdir(exist_ok=True)
    for skip_symbolic in (False, True):
        try:
            # When symbolic shape inference gives up (dynamic-size graphs), onnxruntime dumps
            # sym_shape_infer_temp.onnx and a <uuid>.data file into the current directory: the user's.
            with ort_quiet(), contextlib.chdir(scratch):
                quant_pre_process(str(src.resolve()), str(dst.resolve()), skip_symbolic_shape=skip_symbolic)
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


# Ops that move or resample each channel on its own, so a per-pixel channel mix (1x1 conv / Linear)
# commutes with them: a bilinear / nearest Resize is linear per channel and keeps constants constant.
_CHANNEL_WISE = {"Reshape", "Transpose", "Resize"}


def fold_concat_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Fold a 1x1 Conv over a channel Concat into the Linear layers that feed the Concat.

    SegFormer's all-MLP decoder projects each stage with a Linear, upsamples to 1/4 size, concatenates
    (4 x 256 channels) and mixes with a 1x1 Conv (1024 -> 256): at 512 px that conv is 4.3 of the
    model's ~8 GMACs, on 128x128 maps. Linear maps commute with the per-channel Resize / layout ops in
    between, so W_fuse[:, slice_i] @ W_i becomes stage i's Linear (same size as before, at the stage's
    own resolution) and Concat + Conv become a Sum plus the conv's bias: exact in float, the conv
    disappears. onnxruntime has no such fusion. Patterns that do not match are left alone; the caller
    verifies the result numerically.
    """
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731

    def only_use(t: str) -> bool:
        return len(consumers.get(t, [])) == 1 and t not in outputs

    def linear_source(t: str) -> tuple[onnx.NodeProto, onnx.NodeProto | None] | None:
        """(MatMul with a constant weight, optional constant-bias Add) behind channel-wise ops."""
        while True:
            n = producer.get(t)
            if n is None or not only_use(t):
                return None
            if n.op_type == "Resize" and attrs(n).get("mode", b"nearest") not in (b"linear", b"nearest"):
                return None
            if n.op_type not in _CHANNEL_WISE:
                break
            t = n.input[0]
        add = None
        if n.op_type == "Add" and n.input[1] in inits:
            add, n = n, producer.get(n.input[0])
            if n is None or not only_use(add.input[0]):
                return None
        if n.op_type == "Gemm":  # onnxslim's Linear: A @ B(^T) + C, plain alpha/beta only
            a = attrs(n)
            plain = a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0)
            bias_ok = len(n.input) < 3 or not n.input[2] or n.input[2] in inits
            if add is not None or not plain or not bias_ok or n.input[1] not in inits:
                return None
        elif n.op_type != "MatMul" or n.input[1] not in inits:
            return None
        return n, add

    def out_width(mm: onnx.NodeProto) -> int:
        dims = inits[mm.input[1]].dims
        return dims[0] if mm.op_type == "Gemm" and attrs(mm).get("transB", 0) else dims[-1]

    def mix(name: str, arr: np.ndarray, tag: str) -> str:
        new = f"{name}_vs_fold{tag}"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr.astype(np.float32)), new))
        return new

    removed: set[str] = set()
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    folded = 0
    for conv in list(g.node):
        if conv.op_type != "Conv" or conv.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float32)
        a = attrs(conv)
        cat = producer.get(conv.input[0])
        if (
            w.shape[2:] != (1, 1)
            or a.get("group", 1) != 1
            or any(s != 1 for s in a.get("strides", [1, 1]))
            or any(p != 0 for p in a.get("pads", [0, 0, 0, 0]))
            or cat is None
            or cat.op_type != "Concat"
            or attrs(cat).get("axis") != 1
            or not only_use(cat.output[0])
        ):
            continue
        sources = [linear_source(t) for t in cat.input]
        if any(s is None for s in sources):
            continue
        widths = [out_width(mm) for mm, _ in sources]  # type: ignore[index]
        # the layout ops in between hold the channel count in their shapes: it must not change
        if sum(widths) != w.shape[1] or any(width != w.shape[0] for width in widths):
            continue
        out_ch, start = w.shape[0], 0
        for (mm, add), width in zip(sources, widths):  # type: ignore[misc]
            f = w[:, start : start + width, 0, 0]  # (out, width)
            start += width
            wm = numpy_helper.to_array(inits[mm.input[1]]).astype(np.float32)
            trans_b = mm.op_type == "Gemm" and attrs(mm).get("transB", 0)
            mm.input[1] = mix(mm.input[1], f @ wm if trans_b else wm @ f.T, str(folded))
            bias_in = (
                add.input if add is not None else (mm.input if len(mm.input) > 2 and mm.input[2] else None)
            )
            if bias_in is not None:
                b = numpy_helper.to_array(inits[bias_in[-1]]).astype(np.float32)
                bias_in[-1] = mix(bias_in[-1], b @ f.T, str(folded))
        bias = (
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float32)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(out_ch, np.float32)
        )
        bname = f"{conv.name}_vs_fold_bias"
        g.initializer.append(numpy_helper.from_array(bias.reshape(1, out_ch, 1, 1), bname))
        summed = f"{conv.output[0]}_vs_sum"
        new_nodes[cat.name] = [
            helper.make_node("Sum", list(cat.input), [summed], name=f"{conv.name}_vs_sum"),
            helper.make_node("Add", [summed, bname], [conv.output[0]], name=f"{conv.name}_vs_bias"),
        ]
        removed.add(conv.name)
        folded += 1
    if not folded:
        return model, {"folded": 0}
    nodes = []
    for n in g.node:
        if n.name in new_nodes:
            nodes.extend(new_nodes[n.name])
        elif n.name not in removed:
            nodes.append(n)
    _set_nodes(g, nodes)
    return model, {"folded": folded}
