"""The pipeline's steps around quantization: ORT pre-processing, the exact rewrites (verified), smoothing
(verified), the int8 target in the metadata. The rewrites themselves live in `fusions/`."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..cpu import reduce_range_for
from ..deploy._meta import write_meta_props
from .context import Ctx
from .files import copy_metadata, read_meta
from .fusions import FUSIONS
from .graph import input_spec, weight_macs
from .measure import compare, ort_quiet, rel_error, run
from .smooth import smooth_model

SMOOTH_ALPHA = 0.5


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


FOLD_TOL = 1e-4  # relative output change allowed for an exact-in-float rewrite (float rounding only)


def exact_rewrites(
    pre: Path, batches: Sequence[np.ndarray], say: Callable[[str], None], *, ort_ops: bool = False
) -> dict[str, Any]:
    """The graph rewrites of `fusions.FUSIONS`, in that order, in place in `pre`, kept only if the float
    output stays the same (they are exact in float); the onnxruntime-only ones (attention and GELU as
    onnxruntime's MultiHeadAttention and Gelu) only with `ort_ops`."""
    model = onnx.load(str(pre))
    new, counts = model, {}
    for fusion in FUSIONS:
        if ort_ops or not fusion.ort_only:
            new, info = fusion(new)
            counts.update(info)
    counts["concat_conv_folded"] = counts.pop("folded")
    if not any(counts.values()):
        return {}
    probe = [batches[0][:1]] if batches else random_input(model)
    if probe is None:
        return {**dict.fromkeys(counts, 0), "rejected": "input size not fixed and no data: cannot verify"}
    path = pre.with_name("rewritten.onnx")
    onnx.save(new, str(path))
    try:
        err = rel_error(run(pre, probe), run(path, probe))
    except Exception as e:  # noqa: BLE001 - a pattern that matched but is not what it looked like
        return {**dict.fromkeys(counts, 0), "rejected": f"{type(e).__name__}: {str(e)[:120]}"}
    if not err <= FOLD_TOL:
        return {**dict.fromkeys(counts, 0), "rejected": f"float output changed by {err:.2e}"}
    macs_before, macs_after = sum(weight_macs(model).values()), sum(weight_macs(new).values())
    os.replace(path, pre)
    if counts["concat_conv_folded"]:
        say(
            f"folded {counts['concat_conv_folded']} 1x1 conv(s) over a concat into the linears before it "
            f"({macs_before / 1e9:.2f} -> {macs_after / 1e9:.2f} GMAC in weight layers, exact in float)"
        )
    if counts["channels_last_tails"]:
        say("decoder upsample-and-sum tail runs channels-last (no 256-channel transposes, exact in float)")
    if counts.get("attention_fused"):
        say(
            f"{counts['attention_fused']} attention block(s) as onnxruntime's MultiHeadAttention (exact in float)"
        )
    if counts["token_map_transposes"]:
        say(f"{counts['token_map_transposes']} token <-> map conversions rewritten as 4-D transposes")
    return {
        **counts,
        "float_rel_error": err,
        "weight_gmacs_before": macs_before / 1e9,
        "weight_gmacs_after": macs_after / 1e9,
    }
