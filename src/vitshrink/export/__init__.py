"""ONNX export: `pixel_values -> logits` with preprocessing, labels and stats in the file's metadata.

The deploy runtime (`vitshrink.deploy`) needs nothing but the ONNX file: metadata_props["vitshrink"]
holds the same JSON as `vitshrink.json` plus params/MACs. The graph is simplified with onnxslim
(constant folding, shape inference, dead-node removal) and checked against PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..artifacts import atomic_path
from ..deploy._meta import write_meta_props
from ..errors import ModelError, VitshrinkError
from .patches import SHIFT_MASK_FILL, StaticAdaptiveAvgPool2d

__all__ = [
    "SHIFT_MASK_FILL",
    "StaticAdaptiveAvgPool2d",
    "count_macs",
    "export",
    "export_onnx",
    "make_exportable",
    "parity",
]

DEFAULT_OPSET = 17


def make_exportable(model: nn.Module) -> nn.Module:
    """Swap modules the exporters cannot handle, or run slowly, for exact equivalents (in place).

    Which swaps a model needs is its family's call (`Family.make_exportable`, tools in `patches`).
    """
    from ..models import family_for

    return family_for(model).make_exportable(model)


def count_macs(module: Callable[[torch.Tensor], Any], example: torch.Tensor) -> int:
    """MACs of one forward pass from torch's own FLOP counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(example)
    return int(fc.get_total_flops() // 2)


def export_onnx(
    model: str | os.PathLike | nn.Module,
    out: str | os.PathLike,
    *,
    meta: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    simplify: bool = True,
    check: bool = True,
    quiet: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Export a model directory (or in-memory model + meta) to ONNX; returns (path, parity metrics)."""
    from ..models import count_params, family_for, load_model

    if isinstance(model, nn.Module):
        if meta is None:
            raise VitshrinkError("export_onnx needs meta for an in-memory model")
        net = model.eval()
    else:
        net, meta = load_model(model)
    out = Path(out)
    if out.suffix != ".onnx":
        raise VitshrinkError(f"output must end in .onnx: {out}")
    pre = meta["preprocess"]
    example = torch.randn(1, pre["channels"], *pre["size"])
    family = family_for(net)
    wrapper = family.export_wrapper(family.make_exportable(net)).eval().cpu()
    with torch.no_grad():
        ref = wrapper(example).numpy()
    stats = {"params": count_params(net), "macs": count_macs(wrapper, example)}
    full_meta = {**meta, "stats": stats}
    with atomic_path(out) as tmp:
        _torch_export(wrapper, example, tmp, opset=opset, dynamic_batch=dynamic_batch, quiet=quiet)
        import onnx

        proto = onnx.load(str(tmp))
        if simplify:
            proto = _simplify(proto)
        del proto.metadata_props[:]
        write_meta_props(proto.metadata_props, full_meta)
        onnx.save(proto, str(tmp))
    result: dict[str, Any] = {"artifact": str(out), **stats, "size_mb": out.stat().st_size / 2**20}
    if check:
        result.update(parity(out, wrapper, example.shape, ref_first=ref))
    return out, result


def _torch_export(
    wrapper: nn.Module, example: torch.Tensor, path: Path, *, opset: int, dynamic_batch: bool, quiet: bool
) -> None:
    dyn = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["pixel_values"],
                output_names=["logits"],
                dynamic_axes=dyn,
                do_constant_folding=True,
            )
        except Exception as legacy_err:  # noqa: BLE001 - fall back to the dynamo exporter, report both
            try:
                dshapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(path),
                    dynamo=True,
                    opset_version=max(opset, 18),
                    input_names=["pixel_values"],
                    output_names=["logits"],
                    dynamic_shapes=dshapes,
                    external_data=False,
                )
            except Exception as e:  # noqa: BLE001
                raise ModelError(
                    f"ONNX export failed: {str(legacy_err).splitlines()[0]} / dynamo: {str(e).splitlines()[0]}"
                ) from None


def _simplify(proto: Any) -> Any:
    try:
        import onnxslim

        return onnxslim.slim(proto)
    except Exception as e:  # noqa: BLE001 - simplification is an optimisation; the exported graph is valid
        warnings.warn(f"onnxslim could not simplify the graph ({e}); keeping the exported one", stacklevel=2)
        return proto


def parity(
    path: str | os.PathLike,
    wrapper: nn.Module,
    shape: tuple[int, ...],
    *,
    ref_first: np.ndarray | None = None,
    n: int = 4,
) -> dict[str, Any]:
    """Max abs difference and argmax agreement between ONNX Runtime and PyTorch on random inputs."""
    import onnxruntime as ort

    from ..deploy.runtime import session_options

    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    max_diff, agree, total = 0.0, 0, 0
    for _ in range(n):
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = wrapper(x).numpy()
        got = sess.run(None, {"pixel_values": x.numpy()})[0]
        max_diff = max(max_diff, float(np.abs(got - ref).max()))
        a, b = got.argmax(1), ref.argmax(1)
        agree += int((a == b).sum())
        total += a.size
    return {"max_abs_diff": max_diff, "argmax_agreement": agree / max(total, 1)}


def export(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    simplify: bool = True,
    quiet: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """CLI/API stage: model directory -> ONNX file, with a parity report."""
    return export_onnx(model, out, opset=opset, dynamic_batch=dynamic_batch, simplify=simplify, quiet=True)


from .._callable import install as _install  # noqa: E402

_install(__name__, "export")
