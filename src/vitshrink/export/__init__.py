"""ONNX export: `pixel_values -> logits` with preprocessing, labels and stats in the file's metadata.

The deploy runtime (`vitshrink.deploy`) needs nothing but the ONNX file: metadata_props["vitshrink"]
holds the same JSON as `vitshrink.json` plus params/MACs. The graph is simplified with onnxslim
(constant folding, shape inference, dead-node removal) and checked against PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..artifacts import atomic_path
from ..deploy._meta import (
    parse_image_size,  # torch-free, re-exported
    write_meta_props,
)
from ..deploy.class_map import CLASS_IDS, append_argmax_file
from ..errors import ModelError, VitshrinkError
from ..options import DEFAULT_OPSET, OPSET  # declared once there (the CLI and recipes use them too)
from .patches import ResizedInside, StaticAdaptiveAvgPool2d

__all__ = [
    "StaticAdaptiveAvgPool2d",
    "count_macs",
    "export",
    "export_onnx",
    "make_exportable",
    "parity",
]


def make_exportable(model: nn.Module, *, dynamic_size: bool = False) -> nn.Module:
    """Swap modules the exporters cannot handle, or run slowly, for exact equivalents (in place).

    Which swaps a model needs is its family's call (`Family.make_exportable`, tools in `patches`);
    dynamic_size: adaptive pools compute their bins in the graph (any input size) instead of unrolled.
    """
    from ..models import family_for

    return family_for(model).make_exportable(model, dynamic_size=dynamic_size)


def count_macs(module: Callable[[torch.Tensor], Any], example: torch.Tensor) -> int:
    """MACs of one forward pass from torch's own FLOP counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(example)
    return int(fc.get_total_flops() // 2)


# Parity a dynamic-size graph must reach at its second check size; beyond this a shape-dependent value
# was frozen at the traced size and the graph is only right at that one size.
DYNAMIC_TOLERANCE = 1e-3


def size_multiple(net: nn.Module) -> int | None:
    """The multiple of which every height/width must be for a dynamic-size graph of `net` to be exact;
    None for families whose traced graphs keep the export size (the family decides: `size_multiple`)."""
    from ..models import family_for

    return family_for(net).size_multiple(net.config)


def size_floor(net: nn.Module) -> int:
    """The smallest height/width at which a dynamic-size graph of `net` is exact."""
    from ..models import family_for

    return family_for(net).size_floor(net.config)


def _family(net: nn.Module) -> str:
    cfg = getattr(net, "config", None)
    mt = getattr(cfg, "model_type", "model")
    bb = getattr(cfg, "backbone_config", None)
    return f"{mt}-{bb.model_type}" if bb is not None else str(mt)


def _resolve_size(
    meta: dict[str, Any], image_size: Any, net: nn.Module, dynamic_size: bool, where: str
) -> tuple[int, int]:
    pre = meta["preprocess"]
    # A plain HF directory straight from its import (nothing trained at a size since) may only have
    # the 224 default: refuse to guess instead of writing a graph that takes nothing else.
    history = meta.get("history") or []
    guessed = (
        len(history) == 1
        and history[0].get("stage") == "import"
        and (history[0].get("options") or {}).get("size_from", "") is None
    )
    if image_size is None and guessed:
        raise ModelError(
            f"{where}: no input size known (no preprocessor_config.json, no image_size in config.json): "
            "pass --image-size H[xW]"
        )
    size = parse_image_size(image_size) if image_size is not None else tuple(pre["size"])
    if dynamic_size:
        m = size_multiple(net)
        if m is None:
            raise ModelError(
                f"{where}: --dynamic-size is not supported for {_family(net)} (its graph keeps the traced "
                "size): export one file per deployed size with --image-size"
            )
        if size[0] % m or size[1] % m:
            raise ModelError(
                f"{where}: a dynamic-size {_family(net)} graph is exact at multiples of {m} px; "
                f"{size[0]}x{size[1]} is not"
            )
        lo = size_floor(net)
        if min(size) < lo:
            raise ModelError(
                f"{where}: a dynamic-size {_family(net)} graph is exact from {lo} px (multiples of {m}); "
                f"{size[0]}x{size[1]} is smaller: export at --image-size {lo} or a fixed size"
            )
    return size


def _second_size(size: tuple[int, int], m: int) -> tuple[int, int]:
    """A second, larger size for the dynamic parity check: 1.5x, rounded up to the multiple."""
    return tuple(-(-(s * 3 // 2) // m) * m for s in size)  # type: ignore[return-value]


def export_onnx(
    model: str | os.PathLike | nn.Module,
    out: str | os.PathLike,
    *,
    meta: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    image_size: str | int | tuple[int, int] | None = None,
    dynamic_size: bool = False,
    argmax: bool = False,
    resolution: str | float | tuple[int, int] | None = None,
    simplify: bool = True,
    check: bool = True,
    quiet: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Export a model directory (or in-memory model + meta) to ONNX; returns (path, parity metrics).

    image_size: H, (H, W) or "HxW" to export at instead of the model's preprocess size (needed for a
    plain HF directory that records no size). dynamic_size: symbolic height/width axes, for families
    whose graphs allow it (see `size_multiple`); parity is then checked at two sizes.
    argmax (segmentation): the graph ends in a uint8 class map `class_ids` (N, H, W) (`class_map`).
    resolution (segmentation): the network runs at this size (pixels, or a fraction of the deployed
    size) inside a graph that takes any size and returns outputs at it (`patches.ResizedInside`); the
    metadata's preprocess size stays the deployed one and `inner_size` records the network's.
    """
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
    if OPSET.reason(opset):  # the same bound and words as the CLI's --opset and the recipe's export stage
        raise VitshrinkError(OPSET.refusal(opset))
    from ..models import check_finite

    where = str(model if not isinstance(model, nn.Module) else "model")
    check_finite(net, model if not isinstance(model, nn.Module) else "the model")
    inner = _inner_size(net, resolution, argmax, meta, image_size, where)
    dynamic_size = dynamic_size or inner is not None  # a resized-inside graph takes any size
    size = _resolve_size(meta, image_size, net, dynamic_size and inner is None, where)
    meta = {**meta, "preprocess": _preprocess(meta, size, net, dynamic_size, inner is not None)}
    meta.update({"inner_size": list(inner)} if inner else {})
    pre = meta["preprocess"]
    example = torch.randn(1, pre["channels"], *pre["size"])
    family = family_for(net)
    wrapper = family.export_wrapper(family.make_exportable(net, dynamic_size=dynamic_size and inner is None))
    if inner is not None:
        wrapper = ResizedInside(wrapper, inner)
    wrapper = wrapper.eval().cpu()
    with torch.no_grad():
        try:
            ref = wrapper(example).numpy()
        except (ValueError, RuntimeError) as e:  # e.g. ViT position embeddings made for another size
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            run_at = inner or size
            raise ModelError(f"{_family(net)} cannot run at {run_at[0]}x{run_at[1]}: {msg}") from None
    if not np.isfinite(ref).all():
        raise ModelError("the model produces NaN or infinite outputs; refusing to export it")
    stats = {"params": count_params(net), "macs": count_macs(wrapper, example)}
    # The HF config rides along so the ONNX file alone can become an optimum-style folder (onnx_folder).
    full_meta = {**meta, "stats": stats, "vitshrink_version": __version__, "hf_config": _hf_config(net)}
    with atomic_path(out) as tmp:
        _torch_export(
            wrapper,
            example,
            tmp,
            opset=opset,
            dynamic_batch=dynamic_batch,
            dynamic_size=dynamic_size,
            quiet=quiet,
        )
        import onnx

        proto = onnx.load(str(tmp))
        if simplify:
            proto = _simplify(proto)
        del proto.metadata_props[:]
        write_meta_props(proto.metadata_props, full_meta)
        onnx.save(proto, str(tmp))
        # Validate the temporary file, not the destination: a file that does not load or disagrees
        # (at either size, for a dynamic-size graph) never replaces a good one.
        result: dict[str, Any] = {"artifact": str(out), **stats}
        if check:
            result.update(_check(tmp, wrapper, example, ref, pre, opset, out, dynamic_size, _family(net)))
        if argmax:  # appended after the logits parity check: the class map is checked on its own below
            append_argmax_file(tmp)
            if check:
                result["argmax_agreement"] = _class_map_agreement(tmp, wrapper, example.shape, out)
        result["size_mb"] = tmp.stat().st_size / 2**20
    result.update(image_size=list(size), dynamic_size=bool(dynamic_size))
    result.update({"inner_size": list(inner)} if inner else {}, **({"output": CLASS_IDS} if argmax else {}))
    return out, result


def _inner_size(
    net: nn.Module, resolution: Any, argmax: bool, meta: dict[str, Any], image_size: Any, where: str
) -> tuple[int, int] | None:
    """The size the network runs at inside a resized-inside graph (None: no --resolution): pixels, or
    a fraction of the deployed size rounded to the family's size multiple; refused for other tasks
    and where the family keeps its traced size."""
    from ..options import parse_resolution

    if (argmax or resolution is not None) and meta.get("task") != "segmentation":
        flag = "--argmax" if argmax else "--resolution"
        raise ModelError(f"{where}: {flag} is for segmentation models; this one is {meta.get('task')}")
    if resolution is None:
        return None
    m = size_multiple(net)
    if m is None:
        raise ModelError(
            f"{where}: --resolution needs a family whose graph runs at other sizes (SegFormer, MobileViT, "
            f"UperNet, Swin); {_family(net)} keeps the size it was traced at"
        )
    r = parse_resolution(resolution)
    if isinstance(r, float):
        base = parse_image_size(image_size) if image_size is not None else tuple(meta["preprocess"]["size"])
        r = tuple(max(m, round(b * r / m) * m) for b in base)
    lo = size_floor(net)
    if r[0] % m or r[1] % m or min(r) < lo:
        raise ModelError(
            f"{where}: {_family(net)} runs exactly at multiples of {m} px from {lo} px; "
            f"--resolution {r[0]}x{r[1]} is not one"
        )
    return (int(r[0]), int(r[1]))


def _preprocess(
    meta: dict[str, Any], size: tuple[int, int], net: nn.Module, dynamic_size: bool, resized_inside: bool
) -> dict[str, Any]:
    pre = {**meta["preprocess"], "size": list(size)}
    pre.pop("size_multiple", None)
    pre.pop("size_min", None)
    if resized_inside:
        pre["size_multiple"] = 1  # the graph's first op resizes: any photo size runs
    elif dynamic_size:
        pre["size_multiple"] = size_multiple(net)  # the runtime accepts any multiple (tiles, full frames)
        if size_floor(net) > pre["size_multiple"]:
            pre["size_min"] = size_floor(net)
    return pre


def _check(
    tmp: Path,
    wrapper: nn.Module,
    example: torch.Tensor,
    ref: np.ndarray,
    pre: dict[str, Any],
    opset: int,
    out: Path,
    dynamic_size: bool,
    family: str,
) -> dict[str, Any]:
    """Parity of the written graph with PyTorch: at the export size, and for a dynamic-size graph at a
    second, larger size too (where a frozen shape would show)."""
    result = parity(tmp, wrapper, example.shape, ref_first=ref, opset=opset, name=out)
    if not dynamic_size:
        return result
    size = pre["size"]
    other = _second_size(size, pre["size_multiple"])
    second = parity(tmp, wrapper, (1, pre["channels"], *other), n=2, opset=opset, name=out)
    result["parity_sizes"] = {
        f"{size[0]}x{size[1]}": {k: result[k] for k in ("max_abs_diff", "argmax_agreement")},
        f"{other[0]}x{other[1]}": second,
    }
    if second["max_abs_diff"] > DYNAMIC_TOLERANCE:
        raise ModelError(
            f"dynamic-size {family} graph differs from PyTorch at {other[0]}x{other[1]} "
            f"(max abs diff {second['max_abs_diff']:.2e}): export at a fixed --image-size instead"
        )
    result["max_abs_diff"] = max(result["max_abs_diff"], second["max_abs_diff"])
    result["argmax_agreement"] = min(result["argmax_agreement"], second["argmax_agreement"])
    return result


# Below this a class-map graph disagrees with PyTorch's argmax beyond near-tied pixels: refused.
CLASS_MAP_AGREEMENT = 0.999


def _class_map_agreement(path: Path, wrapper: nn.Module, shape: torch.Size, name: Path) -> float:
    """Share of pixels where the ONNX class map equals PyTorch's argmax of the logits."""
    from ..deploy.runtime import cpu_session

    sess = cpu_session(path, threads=None)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = wrapper(x).argmax(1).numpy()
    got = sess.run(None, {"pixel_values": x.numpy()})[0]
    agree = float((got.astype(np.int64) == want).mean())
    if got.shape != want.shape or agree < CLASS_MAP_AGREEMENT:
        raise ModelError(
            f"the exported class map disagrees with PyTorch's argmax ({agree:.4f} of pixels, shape "
            f"{got.shape} vs {want.shape}); nothing was written to {name}"
        )
    return agree


def _torch_export(
    wrapper: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    opset: int,
    dynamic_batch: bool,
    quiet: bool,
    dynamic_size: bool = False,
) -> None:
    axes = {**({0: "batch"} if dynamic_batch else {}), **({2: "height", 3: "width"} if dynamic_size else {})}
    dyn = {"pixel_values": axes, "logits": dict(axes)} if axes else None
    with warnings.catch_warnings(), _silenced() if quiet else contextlib.nullcontext():
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
                dims = {0: torch.export.Dim("batch", min=1, max=1024)} if dynamic_batch else {}
                if dynamic_size:
                    dims.update({2: torch.export.Dim("height", min=16), 3: torch.export.Dim("width", min=16)})
                dshapes = {"x": dims} if dims else None
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


@contextlib.contextmanager
def _silenced() -> Any:
    """Discard stdout/stderr at the descriptor level: a failing exporter dumps its whole graph from C++
    and logs through handlers bound to the original streams, which redirect_stdout cannot catch."""
    import logging
    import sys
    import tempfile

    saved = []
    with tempfile.TemporaryFile() as sink:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
            with contextlib.suppress(AttributeError, ValueError, OSError):
                fd = stream.fileno()
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
        logging.disable(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            logging.disable(logging.NOTSET)
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


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
    opset: int | None = None,
    name: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Max abs difference and argmax agreement between ONNX Runtime and PyTorch on random inputs.

    Raises ModelError when onnxruntime cannot load or run the file, or its outputs are not finite.
    """
    import onnxruntime as ort

    from ..deploy.runtime import session_options

    at = f" at opset {opset}" if opset is not None else ""
    try:
        sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
        why = _first_line(e).replace(str(path), str(name or path))
        raise ModelError(
            f"the exported ONNX{at} does not load in onnxruntime: {why}; nothing was written"
        ) from None
    g = torch.Generator().manual_seed(0)
    max_diff, agree, total = 0.0, 0, 0
    for _ in range(n):
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = wrapper(x).numpy()
        got = sess.run(None, {"pixel_values": x.numpy()})[0]
        if not np.isfinite(got).all():
            raise ModelError(f"the exported ONNX{at} produces NaN or infinite outputs; nothing was written")
        max_diff = max(max_diff, float(np.abs(got - ref).max()))
        a, b = got.argmax(1), ref.argmax(1)
        agree += int((a == b).sum())
        total += a.size
    return {"max_abs_diff": max_diff, "argmax_agreement": agree / max(total, 1)}


def _hf_config(net: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(net, "config", None)
    if cfg is None:
        return None
    try:
        return json.loads(cfg.to_json_string(use_diff=False))
    except (TypeError, ValueError):  # configs holding non-JSON values: the folder format is unavailable
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(e).__name__


def export(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    image_size: str | int | tuple[int, int] | None = None,
    dynamic_size: bool = False,
    argmax: bool = False,
    resolution: str | float | tuple[int, int] | None = None,
    simplify: bool = True,
    format: str = "auto",
) -> tuple[Path, dict[str, Any]]:
    """CLI/API stage: model directory (or Hub id) -> ONNX, with a parity report.

    format: "file" writes `out` as one .onnx file; "dir" writes an optimum-style folder (`model.onnx`,
    `config.json`, `preprocessor_config.json`, `vitshrink.json`); "auto" picks "dir" when `out` does not
    end in .onnx. The exporter's own warnings are always silenced (export draws no progress bars, so
    there is no quiet switch); what it found is in the returned report.
    """
    from ..deploy.folder import write_onnx_folder
    from ..onnx_folder import wants_folder
    from ..outputs import temp_dir

    try:
        folder = wants_folder(out, format)
    except ValueError as e:
        raise VitshrinkError(str(e)) from None
    kwargs = dict(
        opset=opset,
        dynamic_batch=dynamic_batch,
        image_size=image_size,
        dynamic_size=dynamic_size,
        argmax=argmax,
        resolution=resolution,
        simplify=simplify,
        quiet=True,
    )
    if not folder:
        return export_onnx(model, out, **kwargs)
    with temp_dir("export") as tmp:
        path, rep = export_onnx(model, Path(tmp) / "model.onnx", **kwargs)
        write_onnx_folder(path, out)
    rep["artifact"] = str(out)
    return Path(out), rep


from .._callable import install as _install  # noqa: E402

_install(__name__, "export")
