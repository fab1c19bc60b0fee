"""Graph rewrites around quantization: ORT pre-processing, Gemm -> MatMul, verified smoothing, metadata."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..cpu import reduce_range_for
from ..deploy._meta import write_meta_props
from ..errors import ModelError
from ._common import (
    Ctx,
    compare,
    copy_metadata,
    input_spec,
    node_attrs,
    ort_quiet,
    read_meta,
    rel_error,
    run,
)
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


def _splice(g: onnx.GraphProto, replace: dict[str, list[onnx.NodeProto]], removed: set[str]) -> None:
    """Put `replace[name]` where the node `name` stood, drop the nodes named in `removed`."""
    nodes = []
    for n in g.node:
        if n.name in replace:
            nodes.extend(replace[n.name])
        elif n.name not in removed:
            nodes.append(n)
    _set_nodes(g, nodes)


def _links(g: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """Producer of each tensor, consumers of each tensor."""
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _sole_consumer(
    t: str, consumers: dict[str, list[onnx.NodeProto]], outputs: set[str]
) -> onnx.NodeProto | None:
    """The one node reading `t`, or None if several do or `t` is also a graph output."""
    c = consumers.get(t, [])
    return c[0] if len(c) == 1 and t not in outputs else None


def _shapes(g: onnx.GraphProto) -> dict[str, list[int | None]]:
    """Dims shape inference recorded per tensor (None where symbolic)."""
    return {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in list(g.value_info) + list(g.input) + list(g.output)
        if v.type.tensor_type.HasField("shape")
    }


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite constant-weight Gemm(A, B, C) as MatMul(A, B') + Add(C') (exact; alpha/beta folded)."""
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes, count = [], 0
    for n in g.node:
        a = node_attrs(n) if n.op_type == "Gemm" else {}
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

    # When symbolic shape inference gives up (dynamic-size graphs), onnxruntime dumps
    # sym_shape_infer_temp.onnx and a <uuid>.data file into the current directory: the user's.
    # absolute before the chdir: a relative path would then name a file in the scratch folder
    src_abs, dst_abs = str(Path(src).resolve()), str(Path(dst).resolve())
    with tempfile.TemporaryDirectory(prefix=".pre-cwd-", dir=dst.parent) as scratch:
        for skip_symbolic in (False, True):
            try:
                with ort_quiet(), contextlib.chdir(scratch):
                    quant_pre_process(src_abs, dst_abs, skip_symbolic_shape=skip_symbolic)
                break
            except Exception as e:  # noqa: BLE001 - symbolic inference fails on some graphs; retry without it
                retry = "retrying without symbolic shapes" if not skip_symbolic else "using the model as is"
                say(f"pre-processing failed ({type(e).__name__}); {retry}")
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
    producer, consumers = _links(g)
    outputs = {o.name for o in g.output}

    def only_use(t: str) -> bool:
        return _sole_consumer(t, consumers, outputs) is not None

    def linear_source(t: str) -> tuple[onnx.NodeProto, onnx.NodeProto | None] | None:
        """(MatMul with a constant weight, optional constant-bias Add) behind channel-wise ops."""
        while True:
            n = producer.get(t)
            if n is None or not only_use(t):
                return None
            if n.op_type == "Resize" and node_attrs(n).get("mode", b"nearest") not in (b"linear", b"nearest"):
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
            a = node_attrs(n)
            plain = a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0)
            bias_ok = len(n.input) < 3 or not n.input[2] or n.input[2] in inits
            if add is not None or not plain or not bias_ok or n.input[1] not in inits:
                return None
        elif n.op_type != "MatMul" or n.input[1] not in inits:
            return None
        return n, add

    def out_width(mm: onnx.NodeProto) -> int:
        dims = inits[mm.input[1]].dims
        return dims[0] if mm.op_type == "Gemm" and node_attrs(mm).get("transB", 0) else dims[-1]

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
        a = node_attrs(conv)
        cat = producer.get(conv.input[0])
        if (
            w.shape[2:] != (1, 1)
            or a.get("group", 1) != 1
            or any(s != 1 for s in a.get("strides", [1, 1]))
            or any(p != 0 for p in a.get("pads", [0, 0, 0, 0]))
            or cat is None
            or cat.op_type != "Concat"
            or node_attrs(cat).get("axis") != 1
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
        carrier: Any = None  # the first stage bias (a node's input list) the conv bias can join
        for (mm, add), width in zip(sources, widths):  # type: ignore[misc]
            f = w[:, start : start + width, 0, 0]  # (out, width)
            start += width
            wm = numpy_helper.to_array(inits[mm.input[1]]).astype(np.float32)
            trans_b = mm.op_type == "Gemm" and node_attrs(mm).get("transB", 0)
            mm.input[1] = mix(mm.input[1], f @ wm if trans_b else wm @ f.T, str(folded))
            bias_in = (
                add.input if add is not None else (mm.input if len(mm.input) > 2 and mm.input[2] else None)
            )
            if bias_in is not None:
                b = numpy_helper.to_array(inits[bias_in[-1]]).astype(np.float32)
                bias_in[-1] = mix(bias_in[-1], b @ f.T, str(folded))
                carrier = carrier if carrier is not None else bias_in
        bias = (
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float32)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(out_ch, np.float32)
        )
        summed = f"{conv.output[0]}_vs_sum"
        if carrier is not None:
            # The conv's bias rides on one stage's Linear bias: a bilinear / nearest Resize keeps a
            # constant map constant, so the sum is the same and one full-size Add pass goes.
            init = next(i for i in g.initializer if i.name == carrier[-1])
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + bias, init.name))
            summed = conv.output[0]
        new_nodes[cat.name] = [helper.make_node("Sum", list(cat.input), [summed], name=f"{conv.name}_vs_sum")]
        if carrier is None:
            bname = f"{conv.name}_vs_fold_bias"
            g.initializer.append(numpy_helper.from_array(bias.reshape(1, out_ch, 1, 1), bname))
            new_nodes[cat.name].append(
                helper.make_node("Add", [summed, bname], [conv.output[0]], name=f"{conv.name}_vs_bias")
            )
        removed.add(conv.name)
        folded += 1
    if not folded:
        return model, {"folded": 0}
    _splice(g, new_nodes, removed)
    return model, {"folded": folded}


# Elementwise ops a channels-last tail may carry: unary, or binary with a per-channel constant.
_TAIL_UNARY = {"Relu", "Clip", "Sigmoid", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh", "Identity"}
_TAIL_BINARY = {"Add", "Mul", "Sub", "Div"}


def channels_last_tail(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Run a decoder's upsample-and-sum tail channels-last, up to its 1x1 classifier conv.

    After `fold_concat_conv`, SegFormer's decoder computes each stage's Linear token-major (NHWC),
    transposes the 256-channel map to NCHW, upsamples it to 1/4 size (one of them to its own size)
    and sums. onnxruntime's bilinear Resize is ~3.5x faster on NHWC than on NCHW maps (1 thread,
    256 x 128 x 128; it also scales with threads where the NCHW kernel does not), and each transpose
    of a 128x128x256 map costs as much as a Resize. Here the Transposes go, the Resizes work on NHWC
    (an identity Resize is dropped), the per-channel ops after the Sum broadcast over the last axis,
    and the 1x1 conv becomes a MatMul whose narrow output (the classes) is transposed back: exact in
    float. onnxruntime's own layout transformer only does this for its NHWC-capable int8 kernels.
    Patterns that do not match are left alone; the caller verifies the result numerically.
    """
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer, consumers = _links(g)
    outputs = {o.name for o in g.output}
    shapes = _shapes(g)

    def only_use(t: str) -> bool:
        return _sole_consumer(t, consumers, outputs) is not None

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def to_nhwc(n: onnx.NodeProto) -> bool:
        return n.op_type == "Transpose" and list(node_attrs(n).get("perm", [])) == [0, 3, 1, 2]

    def branch(t: str) -> tuple[onnx.NodeProto | None, onnx.NodeProto] | None:
        """(Resize or None, Transpose NHWC->NCHW) feeding the Sum input `t`."""
        n = producer.get(t)
        if n is None or not only_use(t):
            return None
        if to_nhwc(n):
            return None, n
        if n.op_type != "Resize" or node_attrs(n).get("mode", b"nearest") not in (b"linear", b"nearest"):
            return None
        if len(n.input) > 1 and n.input[1] and (r := const(n.input[1])) is not None and r.size:
            return None  # a region of interest (tf_crop_and_resize) is laid out NCHW
        sizes = const(n.input[3]) if len(n.input) > 3 and n.input[3] else None
        scales = const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if not ((sizes is not None and sizes.shape == (4,)) or (scales is not None and scales.shape == (4,))):
            return None
        if scales is not None and sizes is None and tuple(scales[:2]) != (1.0, 1.0):
            return None
        t_node = producer.get(n.input[0])
        if t_node is None or not to_nhwc(t_node) or not only_use(n.input[0]):
            return None
        return n, t_node

    def tail(t: str) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
        """Per-channel elementwise nodes after the Sum, then the 1x1 Conv they lead to."""
        chain = []
        while True:
            cons = consumers.get(t, [])
            if len(cons) != 1 or t in outputs:
                return None
            n = cons[0]
            if n.op_type == "Conv":
                w = const(n.input[1])
                a = node_attrs(n)
                plain = (
                    w is not None
                    and w.ndim == 4
                    and w.shape[2:] == (1, 1)
                    and a.get("group", 1) == 1
                    and all(s == 1 for s in a.get("strides", [1, 1]))
                    and all(p == 0 for p in a.get("pads", [0, 0, 0, 0]))
                    and a.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")
                    and (len(n.input) < 3 or not n.input[2] or n.input[2] in inits)
                )
                return (chain, n) if plain else None
            if n.op_type in _TAIL_UNARY and all(i in inits for i in n.input[1:] if i):
                pass
            elif n.op_type in _TAIL_BINARY and len(n.input) == 2:
                c = const(n.input[1]) if n.input[0] == t else const(n.input[0])
                if c is None or not (c.size == 1 or c.shape in ((c.size, 1, 1), (1, c.size, 1, 1))):
                    return None
            else:
                return None
            chain.append(n)
            t = n.output[0]

    def add_init(arr: np.ndarray, name: str) -> str:
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    removed: set[str] = set()
    added: dict[str, list[onnx.NodeProto]] = {}  # inserted after the node of that name
    touched: set[str] = set()
    done = 0
    for s in list(g.node):
        if s.op_type != "Sum":
            continue
        branches = [branch(t) for t in s.input]
        found = tail(s.output[0])
        if found is None or any(b is None for b in branches):
            continue
        chain, conv = found
        for k, (resize, tr) in enumerate(branches):  # type: ignore[misc]
            src = tr.input[0]
            removed.add(tr.name)
            if resize is None:
                s.input[k] = src
                continue
            sizes = const(resize.input[3]) if len(resize.input) > 3 and resize.input[3] else None
            if sizes is not None and shapes.get(src, [None])[1:3] == [int(sizes[2]), int(sizes[3])]:
                removed.add(resize.name)  # resizes to its own size: a copy
                s.input[k] = src
                continue
            resize.input[0] = src
            if sizes is not None:
                resize.input[3] = add_init(
                    sizes[[0, 2, 3, 1]].astype(np.int64), f"{resize.name}_vs_nhwc_sizes"
                )
            else:
                scales = const(resize.input[2])
                resize.input[2] = add_init(scales[[0, 2, 3, 1]], f"{resize.name}_vs_nhwc_scales")  # type: ignore[index]
            touched.add(resize.output[0])
        touched.add(s.output[0])
        for n in chain:
            touched.add(n.output[0])
            for j, i in enumerate(n.input):
                c = const(i) if i else None
                if c is not None and c.size > 1 and n.op_type in _TAIL_BINARY:
                    n.input[j] = add_init(c.reshape(-1), f"{i}_vs_nhwc{done}")
        w = const(conv.input[1])[:, :, 0, 0]  # type: ignore[index]
        x = chain[-1].output[0] if chain else s.output[0]
        mm = f"{conv.output[0]}_vs_nhwc_mm"
        nodes = [
            helper.make_node("MatMul", [x, add_init(w.T.copy(), f"{conv.name}_vs_nhwc_w")], [mm], name=mm)
        ]
        if len(conv.input) > 2 and conv.input[2]:
            b = const(conv.input[2])
            nodes.append(
                helper.make_node(
                    "Add", [mm, add_init(b, f"{conv.name}_vs_nhwc_b")], [mm + "_b"], name=mm + "_b"
                )  # type: ignore[arg-type]
            )
        nodes.append(
            helper.make_node(
                "Transpose",
                [nodes[-1].output[0]],
                [conv.output[0]],
                name=f"{conv.name}_vs_nchw",
                perm=[0, 3, 1, 2],
            )
        )
        removed.add(conv.name)
        added[conv.name] = nodes
        done += 1
    if not done:
        return model, {"channels_last_tails": 0}
    _splice(g, added, removed)
    # shapes recorded for NCHW no longer hold for what now runs NHWC
    keep = [v for v in g.value_info if v.name not in touched]
    del g.value_info[:]
    g.value_info.extend(keep)
    return model, {"channels_last_tails": done}


def channels_last_reshapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
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
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    shapes = _shapes(g)

    def perm(n: onnx.NodeProto) -> list[int]:
        return list(node_attrs(n).get("perm", [])) if n.op_type == "Transpose" else []

    def target(n: onnx.NodeProto) -> np.ndarray | None:
        if n.op_type != "Reshape" or n.input[1] not in inits or node_attrs(n).get("allowzero", 0):
            return None
        return numpy_helper.to_array(inits[n.input[1]]).astype(np.int64)

    def set_perm(n: onnx.NodeProto, p: list[int]) -> None:
        del n.attribute[:]
        n.attribute.append(helper.make_attribute("perm", p))

    def set_target(n: onnx.NodeProto, shape: list[int]) -> None:
        name = f"{n.name}_vs_nhwc_shape"
        g.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), name))
        inits[name] = g.initializer[-1]
        n.input[1] = name

    swapped = cancelled = 0
    producer, consumers = _links(g)
    for n in list(g.node):
        if perm(n) == [0, 2, 1] and n.output[0] not in outputs:
            # tokens -> map: Transpose(0,2,1) + Reshape [B,C,H,W]  =>  Reshape [B,H,W,C] + Transpose(0,3,1,2)
            x = shapes.get(n.input[0])
            cons = consumers.get(n.output[0], [])
            s = target(cons[0]) if len(cons) == 1 else None
            if x is None or len(x) != 3 or None in x or s is None or len(s) != 4 or 0 in s:
                continue
            B, N, C = x
            if s[0] != B or s[1] != C or -1 in s[:2]:
                continue
            h, w = s[2], s[3]
            h = N // w if h == -1 else h
            w = N // h if w == -1 else w
            if h * w != N:
                continue
            r = cons[0]
            set_target(r, [B, h, w, C])
            # swap the two nodes: the Reshape reads the tokens, the Transpose makes the map
            r.input[0], n.input[0] = n.input[0], r.output[0]
            tmp = f"{n.output[0]}_vs_nhwc"
            r.output[0], n.output[0] = tmp, r.output[0]
            n.input[0] = tmp
            set_perm(n, [0, 3, 1, 2])
            swapped += 1
            producer, consumers = _links(g)
        elif (s := target(n)) is not None and len(s) == 3 and n.output[0] not in outputs:
            # map -> tokens: Reshape [B,C,N] + Transpose(0,2,1)  =>  Transpose(0,2,3,1) + Reshape [B,N,C]
            x = shapes.get(n.input[0])
            cons = consumers.get(n.output[0], [])
            if x is None or len(x) != 4 or None in x or len(cons) != 1 or perm(cons[0]) != [0, 2, 1]:
                continue
            B, C, H, W = x
            if 0 in s or s[0] != B or s[1] != C or s[2] not in (-1, H * W):
                continue
            t = cons[0]
            set_target(n, [B, H * W, C])
            tmp = f"{t.output[0]}_vs_nhwc"
            t.input[0], n.input[0] = n.input[0], tmp
            t.output[0], n.output[0] = tmp, t.output[0]
            set_perm(t, [0, 2, 3, 1])
            swapped += 1
            producer, consumers = _links(g)
    if swapped:  # the nodes swapped places: restore topological order
        order, ready, pending = [], {i.name for i in g.input} | set(inits), list(g.node)
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
                raise ModelError("channels_last_reshapes broke the graph order")
            pending = rest
        del g.node[:]
        g.node.extend(order)
        # Transpose(0,3,1,2) then Transpose(0,2,3,1) (or the reverse): read the first one's input
        producer, consumers = _links(g)
        alias: dict[str, str] = {}
        for n in g.node:
            p = producer.get(n.input[0]) if perm(n) else None
            if p is not None and perm(p) and len(perm(p)) == len(perm(n)):
                composed = [perm(p)[i] for i in perm(n)]
                if composed == list(range(len(composed))) and n.output[0] not in outputs:
                    alias[n.output[0]] = p.input[0]
                    cancelled += 1
        if alias:
            for n in g.node:
                for j, i in enumerate(n.input):
                    n.input[j] = alias.get(i, i)
            kept = [n for n in g.node if not (n.op_type == "Transpose" and n.output[0] in alias)]
            _, consumers = _links(g)
            kept = [
                n
                for n in kept
                if n.op_type != "Transpose" or consumers.get(n.output[0]) or n.output[0] in outputs
            ]
            _set_nodes(g, kept)
        stale = {v.name for v in g.value_info} - {o for n in g.node for o in n.output}
        keep = [v for v in g.value_info if v.name not in stale and not v.name.endswith("_vs_nhwc")]
        del g.value_info[:]
        g.value_info.extend(keep)
    return model, {"token_map_transposes": swapped, "transposes_cancelled": cancelled}


def sums_to_adds(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Write each Sum of more than two inputs as a balanced tree of Adds.

    onnxruntime's variadic Sum runs on one thread, its Add on all of them: for the four 256 x 128 x 128
    maps of a folded SegFormer decoder the tree is faster at 1 thread (5.0 vs 5.9 ms) and twice as fast
    at 2. Same values up to the order of float additions.
    """
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    nodes, done = [], 0
    for n in g.node:
        if n.op_type != "Sum" or len(n.input) <= 2 or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        level, k = list(n.input), 0
        while len(level) > 1:
            nxt = []
            for i in range(0, len(level) - 1, 2):
                out = n.output[0] if len(level) == 2 else f"{n.output[0]}_vs_add{k}"
                nodes.append(helper.make_node("Add", level[i : i + 2], [out], name=f"{n.name}_vs_add{k}"))
                nxt.append(out)
                k += 1
            level = nxt + (level[-1:] if len(level) % 2 else [])
        done += 1
    if done:
        del g.node[:]
        g.node.extend(nodes)
    return model, {"sums_as_adds": done}


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Replace exported scaled-dot-product attention with onnxruntime's MultiHeadAttention (com.microsoft).

    The exporter writes attention as Reshape/Transpose of q, k, v, two scaling Muls, MatMul, Softmax,
    MatMul, Transpose/Reshape: the [heads, N, M] score matrix goes through memory three times. The
    fused CPU kernel computes it in tiles (SegFormer-B0 at 512 px, stage 1, 16384 queries x 256 keys:
    8.5 -> 6.8 ms at 1 thread). Exact up to float rounding, but onnxruntime-only: used for int8
    CPU models (which target onnxruntime), never for fp16 / TensorRT. onnxruntime's own fusion
    (onnxruntime.transformers) knows BERT-style self-attention only, not SegFormer's reduced keys.
    """
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer, consumers = _links(g)
    shapes = _shapes(g)
    outputs = {o.name for o in g.output}

    def single(t: str) -> onnx.NodeProto | None:
        return _sole_consumer(t, consumers, outputs)

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def head_split(t: str, perm: list[int]) -> tuple[str, int, int, float] | None:
        """(2-D or 3-D tokens, heads, head size, scale) behind [Mul(scale)] <- Transpose(perm) <- Reshape."""
        n, scale = producer.get(t), 1.0
        if n is not None and n.op_type == "Mul":
            c = const(n.input[1])
            if c is None or c.size != 1:
                return None
            scale, n = float(c.reshape(())), producer.get(n.input[0])
        if n is not None and n.op_type == "Reshape" and perm == [0, 2, 1, 3]:
            # one head: the optimiser wrote Reshape [1, N, 1, d] + Transpose as Reshape [1, 1, N, d]
            s = const(n.input[1])
            ok = s is not None and s.shape == (4,) and s[0] == 1 and s[1] == 1 and s[3] > 0
            return (n.input[0], 1, int(s[3]), scale) if ok else None  # type: ignore[index]
        if n is None or n.op_type != "Transpose" or list(node_attrs(n).get("perm", [])) != perm:
            return None
        r = producer.get(n.input[0])
        s = const(r.input[1]) if r is not None and r.op_type == "Reshape" else None
        if s is None or s.shape != (4,) or s[0] != 1 or s[3] <= 0:
            return None
        heads = int(s[2])
        if heads == -1:  # [1, N, -1, d]: the heads follow from the token width
            width = _width(r.input[0])
            heads = width // int(s[3]) if width and width % int(s[3]) == 0 else -1
        return r.input[0], heads, int(s[3]), scale

    def _width(t: str) -> int | None:
        """Last dim of a tensor: from shape inference, else from the constant of a bias Add / MatMul."""
        dims = shapes.get(t)
        if dims and dims[-1]:
            return dims[-1]
        n = producer.get(t)
        for i in n.input if n is not None and n.op_type in ("Add", "MatMul") else []:
            c = const(i)
            if c is not None and c.ndim in (1, 2):
                return int(c.shape[-1])
        return None

    fused: dict[str, list[onnx.NodeProto]] = {}  # nodes to insert before the Reshape of that name
    drop: set[str] = set()
    for sm in g.node:
        if sm.op_type != "Softmax" or node_attrs(sm).get("axis", -1) not in (-1, 3):
            continue
        qk = producer.get(sm.input[0])
        pv = single(sm.output[0])
        if (
            qk is None
            or qk.op_type != "MatMul"
            or pv is None
            or pv.op_type != "MatMul"
            or pv.input[0] != sm.output[0]
        ):
            continue
        q = head_split(qk.input[0], [0, 2, 1, 3])
        k = head_split(qk.input[1], [0, 2, 3, 1])
        v = head_split(pv.input[1], [0, 2, 1, 3])
        out_t = single(pv.output[0])
        if q is None or k is None or v is None or out_t is None:
            continue
        (qs, hq, dq, sq), (ks, hk, dk, sk), (vs, hv, dv, sv) = q, k, v
        if out_t.op_type == "Reshape" and hq == 1:  # one head: no transpose back either
            out_t, out_r = None, out_t
        else:
            out_r = single(out_t.output[0])
            if list(node_attrs(out_t).get("perm", [])) != [0, 2, 1, 3] or out_r is None:
                continue
        if out_r.op_type != "Reshape":
            continue
        if not (hq == hk == hv and dq == dk == dv and sv == 1.0) or hq <= 0:
            continue
        scale = sq * sk
        heads, width = hq, hq * dq
        name = f"{sm.name}_vs_mha"
        nodes = []
        ins = []
        for src, tag in ((qs, "q"), (ks, "k"), (vs, "v")):
            shape = f"{name}_{tag}_shape"
            g.initializer.append(numpy_helper.from_array(np.array([1, -1, width], np.int64), shape))
            nodes.append(helper.make_node("Reshape", [src, shape], [f"{name}_{tag}"], name=f"{name}_{tag}"))
            ins.append(f"{name}_{tag}")
        mha_out = f"{name}_out"
        kw: dict[str, Any] = {"num_heads": heads}
        if abs(scale - 1.0 / np.sqrt(dq)) > 1e-6 / np.sqrt(dq):
            kw["scale"] = scale
        nodes.append(
            helper.make_node("MultiHeadAttention", ins, [mha_out], name=name, domain="com.microsoft", **kw)
        )
        # the Reshape after the attention reads [1, N, width] where it read [1, N, heads, head size]
        out_r.input[0] = mha_out
        fused[out_r.name] = nodes
        drop.update({sm.name, qk.name, pv.name} | ({out_t.name} if out_t is not None else set()))
    if not fused:
        return model, {"attention_fused": 0}
    new = []
    for n in g.node:
        if n.name not in drop:
            new.extend(fused.get(n.name, []) + [n])
    # the q/k/v head splits and scaling Muls are no longer read: drop them (repeat until none)
    while True:
        read = {i for n in new for i in n.input} | outputs
        keep = [
            n
            for n in new
            if any(o in read for o in n.output) or n.op_type not in ("Reshape", "Transpose", "Mul")
        ]
        if len(keep) == len(new):
            break
        new = keep
    _set_nodes(g, new)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, {"attention_fused": len(fused)}


def residual_norms_2d(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Run a residual Add whose sum only feeds a LayerNormalization on [tokens, C] instead of [1, N, C].

    onnxruntime fuses a 3-D Add + LayerNormalization into SkipLayerNormalization; when the sum itself
    is not needed (a stage's last residual before its final norm), that kernel is 4x slower than the
    two ops it replaces (16384 x 32, SegFormer-B0's first stage at 512 px: 2.43 vs 0.56 ms at 1 thread,
    1.24 vs 0.38 at 2; onnxruntime 1.32). The fusion only matches 3-D inputs, so the pair runs on
    2-D views; a Reshape (a view, no copy) restores the shape after the norm. Exact.
    """
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer, consumers = _links(g)
    shapes = _shapes(g)
    outputs = {o.name for o in g.output}
    replace: dict[str, list[onnx.NodeProto]] = {}
    removed: set[str] = set()
    for ln in g.node:
        if ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx") or len(ln.output) != 1:
            continue
        add = producer.get(ln.input[0])
        if add is None or add.op_type != "Add" or _sole_consumer(add.output[0], consumers, outputs) is None:
            continue
        a, b = add.input
        dims = shapes.get(a)
        if (
            a in inits
            or b in inits
            or dims is None
            or len(dims) != 3
            or shapes.get(b) != dims
            or None in dims
            or node_attrs(ln).get("axis", -1) not in (-1, 2)
            or not (ln.name and add.name)  # spliced by name
        ):
            continue
        p = f"{ln.name}_vs_2d"
        flat, back = f"{p}_flat", f"{p}_shape"
        g.initializer.append(numpy_helper.from_array(np.array([-1, dims[2]], np.int64), flat))
        g.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), back))
        norm = helper.make_node(
            "LayerNormalization", [f"{p}_sum", *ln.input[1:]], [f"{p}_norm"], name=ln.name
        )
        norm.attribute.extend(
            at for at in ln.attribute if at.name != "axis"
        )  # epsilon, stash_type as they were
        norm.attribute.append(helper.make_attribute("axis", -1))
        removed.add(add.name)
        replace[ln.name] = [
            helper.make_node("Reshape", [a, flat], [f"{p}_a"], name=f"{p}_a"),
            helper.make_node("Reshape", [b, flat], [f"{p}_b"], name=f"{p}_b"),
            helper.make_node("Add", [f"{p}_a", f"{p}_b"], [f"{p}_sum"], name=f"{p}_sum"),
            norm,
            helper.make_node("Reshape", [f"{p}_norm", back], [ln.output[0]], name=f"{p}_back"),
        ]
    if replace:
        _splice(g, replace, removed)
    return model, {"residual_norms_2d": len(replace)}


def fuse_gelu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Write the exported erf GELU, x * 0.5 * (1 + erf(x / sqrt 2)), as onnxruntime's Gelu (com.microsoft).

    onnxruntime fuses the five ops itself, but only while x feeds exactly the Div and the Mul: a
    quantize pair in front (a static int8 depthwise conv before SegFormer's GELU) makes its QDQ
    pass duplicate the DequantizeLinear and the fusion fails, leaving five elementwise passes over the
    largest activation of the block. Fused before quantizing, the GELU stays one op. Exact (the same
    function); onnxruntime-only, like `fuse_attention`.
    """
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    producer, consumers = _links(g)
    outputs = {o.name for o in g.output}
    consts = {i.name: i for i in g.initializer}

    def scalar(name: str) -> float | None:
        if name not in consts:
            return None
        a = numpy_helper.to_array(consts[name])
        return float(a.reshape(())) if a.size == 1 else None

    def only(t: str) -> onnx.NodeProto | None:
        return _sole_consumer(t, consumers, outputs)

    def other(n: onnx.NodeProto, t: str) -> str:
        return n.input[1] if n.input[0] == t else n.input[0]

    replace: dict[str, list[onnx.NodeProto]] = {}
    removed: set[str] = set()
    for erf in g.node:
        if erf.op_type != "Erf":
            continue
        pre = producer.get(erf.input[0])
        if pre is None or only(pre.output[0]) is not erf:
            continue
        c = scalar(pre.input[1])
        if c is None or not (
            (pre.op_type == "Div" and abs(c - 2**0.5) < 1e-4)
            or (pre.op_type == "Mul" and abs(c - 2**-0.5) < 1e-4)
        ):
            continue
        x = pre.input[0]
        add = only(erf.output[0])
        if add is None or add.op_type != "Add" or scalar(other(add, erf.output[0])) != 1.0:
            continue
        mul = only(add.output[0])
        if mul is None or mul.op_type != "Mul" or other(mul, add.output[0]) != x:
            continue
        half = only(mul.output[0])
        if half is None or half.op_type != "Mul" or scalar(other(half, mul.output[0])) != 0.5:
            continue
        if not all(n.name for n in (pre, erf, add, mul, half)):  # spliced by name
            continue
        replace[half.name] = [
            helper.make_node(
                "Gelu", [x], [half.output[0]], name=f"{erf.name}_vs_gelu", domain="com.microsoft"
            )
        ]
        removed.update({pre.name, erf.name, add.name, mul.name})
    if replace:
        _splice(g, replace, removed)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, {"gelu_fused": len(replace)}
