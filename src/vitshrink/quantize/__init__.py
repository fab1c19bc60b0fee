"""Quantization stage: fp16 / int8 ONNX models that keep their accuracy, plus a PyTorch-side path.

- `quantize(model, out, mode=...)`: the stage (CLI `vitshrink quantize`): model dir or ONNX in,
  ONNX out, calibration/evaluation data from a data SPEC.
- `quantize_onnx(src, dst, ...)`: the ONNX engine (calibration batches + optional metric callback).
- `smooth_layernorm_outliers(src, dst, calib)`: SmoothQuant-style outlier migration on its own.
- `quantize_torch(model, mode)`: fp16 / dynamic int8 for in-memory PyTorch models.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from ..cpu import TARGET_CPUS
from ..errors import VitshrinkError
from ..outputs import temp_dir
from ..tasks import TASK_METRIC
from .onnx_quant import CALIB_METHODS, DEFAULT_MAX_DROP, MODES, Mode, quantize_onnx
from .smooth import smooth_layernorm_outliers
from .torch_quant import quantize_torch

CALIB_SAMPLES = 256  # calibration subset of the validation split
EVAL_SAMPLES = 1000  # validation samples scored per candidate when guaranteeing max_drop

__all__ = [
    "CALIB_METHODS",
    "DEFAULT_MAX_DROP",
    "MODES",
    "TARGET_CPUS",
    "quantize",
    "quantize_onnx",
    "quantize_torch",
    "smooth_layernorm_outliers",
]


def quantize(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: Mode = "int8",
    calib_data: str | None = None,
    calib_method: str = "percentile",
    max_drop: float | None = None,
    quiet: bool = False,
    data_options: dict[str, Any] | None = None,
    target_cpu: str = "auto",
    format: str = "auto",
    image_size: str | int | tuple[int, int] | None = None,
    dynamic_size: bool = False,
    size_mb: float | None = None,
    latency_ms: float | None = None,
    runtime: str = "auto",
    argmax: bool = False,
    resolution: str | float | tuple[int, int] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Quantize a model directory (or Hub id), ONNX file or ONNX folder into `out`; returns (path, report).

    calib_data: a data SPEC (e.g. "fashion-mnist"); its validation split calibrates int8 and scores
    every candidate with the task metric (accuracy / mIoU), so `max_drop` is a drop of that metric.
    Modes "int8-static" and "int8-mixed" need it; without it "int8" builds the dynamic variant and
    compares it with fp32 on generated inputs.
    target_cpu: "auto" (this machine), "avx2", "vnni" or "arm64": the CPU the int8 model is for
    (x86 without VNNI gets 7-bit weights; see `vitshrink.cpu`).
    format: "file" (`out` is one .onnx file), "dir" (an optimum-style folder: model.onnx, config.json,
    preprocessor_config.json) or "auto" ("dir" when `out` does not end in .onnx).
    image_size / dynamic_size: a model directory is exported at this size (see `export_onnx`), so
    calibration runs at the deployed size; an ONNX input must already take it (fixed size) or be
    dynamic-size, which is then calibrated at `image_size`.
    size_mb / latency_ms: "int8" keeps the most accurate variant meeting these (file MB, 1-thread ms)
    instead of the fastest (see `quantize_onnx`).
    runtime: "onnxruntime", "openvino" (OpenVINO IR through NNCF, a folder) or "auto": for "int8" with
    calibration data and a folder output, both are built and the faster here (at equal accuracy) is
    kept; other modes, a .onnx output or another --target-cpu keep onnxruntime (the report says why).
    argmax / resolution (segmentation): the graph ends in a uint8 class map (calibrated and scored on
    its logits first); a model directory is exported to run at `resolution` inside (see `export_onnx`).
    The class map is an ONNX rewrite, so argmax keeps onnxruntime (runtime "openvino" is refused).
    """
    from ..deploy.folder import write_onnx_folder
    from ..hub import resolve_model
    from ..onnx_folder import onnx_file, wants_folder

    path = onnx_file(resolve_model(model))
    if not path.exists():
        raise VitshrinkError(f"model not found: {path}")
    try:
        folder = wants_folder(out, format)
    except ValueError as e:
        raise VitshrinkError(str(e)) from None
    final = Path(out)
    _check_input(path, resolution)
    if argmax and runtime == "openvino":
        raise VitshrinkError(
            "--argmax ends the ONNX graph in a class map: use --runtime onnxruntime (or auto)"
        )
    runtime = "onnxruntime" if argmax else runtime  # the class map is appended to the ONNX file
    with temp_dir("quant-export") as tmp:
        if folder:
            out = Path(tmp) / "quantized.onnx"
        sizes = {"image_size": image_size, "dynamic_size": dynamic_size, "resolution": resolution}
        src, meta = _source(path, Path(tmp), sizes, quiet, need_meta=calib_data is not None)
        calib, eval_fn = (None, None)
        if calib_data is not None:
            calib, eval_fn = _data(calib_data, meta, src, data_options)
        report = quantize_onnx(
            src,
            out,
            mode=mode,
            calib=calib,
            calib_method=calib_method,
            max_drop=max_drop,
            eval_fn=eval_fn,
            target_cpu=target_cpu,
            quiet=quiet,
            image_size=meta["preprocess"]["size"] if image_size is not None and meta is not None else None,
            size_mb=size_mb,
            latency_ms=latency_ms,
            runtime=runtime,
            openvino_out=final if folder else None,
        )
        if argmax:  # calibrated and scored on the logits; the class map comes after
            _append_argmax(out, report)
        if folder and report["runtime"] == "onnxruntime":
            write_onnx_folder(out, final)
            report["path"] = str(final)
    if calib_data is not None:
        report["metric_name"] = TASK_METRIC[meta["task"]]
        report["data"] = calib_data
    return final, report


def _source(
    path: Path, tmp: Path, sizes: dict[str, Any], quiet: bool, *, need_meta: bool
) -> tuple[Path, dict[str, Any] | None]:
    """The ONNX to quantize (a model directory exported first, at `sizes`) and its metadata when
    calibration or a new image size needs it."""
    from .files import load_onnx, read_meta

    image_size = sizes["image_size"]
    if path.is_dir():
        from ..export import export_onnx

        src, _ = export_onnx(path, tmp / "model.onnx", quiet=quiet, **sizes)
    else:
        src = path
    meta = read_meta(load_onnx(src)) if need_meta or image_size is not None else None
    if image_size is not None and not path.is_dir():
        meta = _onnx_at_size(meta, image_size, src)
    if need_meta and meta is None:
        raise VitshrinkError(
            f"{path} has no vitshrink metadata, so calibration data cannot be prepared for it"
        )
    return src, meta


def _check_input(path: Path, resolution: Any) -> None:
    """--resolution re-exports, so it needs the model directory; a graph that already ends in a class
    map has no logits to calibrate or score on."""
    if resolution is not None and not path.is_dir():
        raise VitshrinkError(
            f"--resolution needs the model directory (it re-exports the network); {path} is ONNX: "
            "export it with --resolution, then quantize that file"
        )
    if path.is_dir() or path.suffix != ".onnx":
        return
    from ..deploy.class_map import is_class_map
    from .files import load_onnx

    if is_class_map(load_onnx(path)):
        raise VitshrinkError(
            f"{path} ends in a class map (exported with --argmax): quantize the logits export and pass "
            "--argmax to quantize instead"
        )


def _append_argmax(out: Path, report: dict[str, Any]) -> None:
    from ..deploy.class_map import CLASS_IDS, append_argmax_file

    append_argmax_file(out)
    report["output"] = CLASS_IDS


def _onnx_at_size(meta: dict[str, Any] | None, image_size: Any, src: Path) -> dict[str, Any] | None:
    """Meta with the size calibration runs at; an ONNX file cannot be re-exported, so it must take it."""
    from ..export import parse_image_size

    size = list(parse_image_size(image_size))
    pre = (meta or {}).get("preprocess") or {}
    if pre.get("size") == size:
        return meta
    m = pre.get("size_multiple")
    if not m:
        raise VitshrinkError(
            f"{src} takes {pre.get('size', 'its fixed size')} only: re-export the model with --image-size "
            f"{size[0]}x{size[1]} (or --dynamic-size)"
        )
    from ..deploy._meta import dynamic_size_problem

    problem = dynamic_size_problem(pre, size)
    if problem:
        raise VitshrinkError(f"{src}: {problem}")
    return {**meta, "preprocess": {**pre, "size": size}}  # type: ignore[dict-item]


def _data(
    spec: str, meta: dict[str, Any], src: Path, data_options: dict[str, Any] | None = None
) -> tuple[Iterator[np.ndarray], Any]:
    """Calibration batches (normalised like the runtime does) and a metric callback on the val split."""
    import torch

    from ..evaluate import eval_dataset, evaluate_onnx
    from ..train import prepare
    from .calib import batch_size_for

    pre = meta["preprocess"]
    ds = eval_dataset(spec, "val", meta, limit=EVAL_SAMPLES, data_options=data_options)
    if ds.task != meta["task"]:
        raise VitshrinkError(f"{src} is a {meta['task']} model but {spec} is {ds.task} data")
    calib_ds = ds.subset(CALIB_SAMPLES, seed=1)
    # Pixels per batch held constant (3 images at 512 px): calibration and scoring memory does not
    # grow with the image size, and batches are normalised one at a time, never all at once.
    bs = batch_size_for([None, pre["channels"], *pre["size"]])

    def batches() -> Iterator[np.ndarray]:
        # the model-input view (streamed photos resized as eval does, masks unused)
        for b in calib_ds.batches(bs, view="fixed"):
            yield prepare(b.images, meta, torch.device("cpu")).numpy()

    key = TASK_METRIC[meta["task"]]

    def eval_fn(p: str) -> float:
        return float(evaluate_onnx(p, ds, batch_size=bs, quiet=True)[key])

    return batches(), eval_fn


from vitshrink._callable import install as _install  # noqa: E402

_install(__name__, "quantize")
