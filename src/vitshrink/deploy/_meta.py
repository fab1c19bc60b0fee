"""The "vitshrink" metadata of an ONNX model, read, written and checked without onnx, onnxruntime or torch.

The one owner of that entry: export writes it, quantize updates it, bench, the runtime (through
onnxruntime's map) and the TensorRT recipe (through onnx's protobuf) read it, so all of them preprocess
identically and fail alike: absent -> {}, corrupt -> ModelError.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..artifacts import ONNX_META_KEY
from ..errors import ModelError
from ..options import parse_image_size  # noqa: F401  (re-exported; options owns the parsing)
from ..tasks import TASKS

META_KEY = ONNX_META_KEY

# Used only when a model carries no metadata: the ImageNet statistics every HF ViT checkpoint uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Single-channel models without metadata: the mean of the ImageNet channel statistics.
GREY_MEAN = (0.449,)
GREY_STD = (0.226,)
DEFAULT_SIZE = (224, 224)


def parse_meta(text: str | None, where: str) -> dict[str, Any]:
    """Decode the JSON string stored under metadata_props["vitshrink"]; {} when absent."""
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{where}: corrupt 'vitshrink' metadata ({e})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{where}: 'vitshrink' metadata is not a JSON object")
    return meta


def read_meta_props(props: Iterable[Any] | Mapping[str, str], where: str) -> dict[str, Any]:
    """The vitshrink metadata among an ONNX model's metadata_props (onnx protobuf entries, or
    onnxruntime's key -> value map); {} when absent, ModelError when corrupt."""
    if isinstance(props, Mapping):
        return parse_meta(props.get(META_KEY), where)
    return parse_meta(next((p.value for p in props if p.key == META_KEY), None), where)


def read_onnx_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The vitshrink metadata of the ONNX file at `path` (its weights stay on disk; onnx imported here
    only): {} when absent, ModelError when the file is no ONNX model or the entry is corrupt."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise ModelError(f"not a valid ONNX file: {path} ({type(e).__name__})") from None
    return read_meta_props(proto.metadata_props, str(path))


def write_meta_props(props: Any, meta: dict[str, Any]) -> None:
    """Store `meta` as the vitshrink entry of an onnx model's metadata_props, replacing any."""
    text = json.dumps(meta, default=_json_default)
    for p in props:
        if p.key == META_KEY:
            p.value = text
            return
    entry = props.add()
    entry.key, entry.value = META_KEY, text


def _json_default(o: Any) -> Any:
    if hasattr(o, "item") and callable(o.item):  # numpy scalars, without importing numpy
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def resolve_preprocess(
    meta: dict[str, Any], graph_channels: int | None, graph_size: tuple[int | None, int | None], where: str
) -> tuple[int, tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """(channels, (H, W), mean, std) from the metadata, checked against the graph's static input dims.

    Falls back to the graph dims, then to 3 channels / 224x224 / ImageNet statistics.
    """
    pre = meta.get("preprocess") or {}
    if not isinstance(pre, dict):
        raise ModelError(f"{where}: metadata 'preprocess' is not an object")

    channels = pre.get("channels", graph_channels if graph_channels is not None else 3)
    if not isinstance(channels, int) or isinstance(channels, bool):
        raise ModelError(f"{where}: metadata channels must be an integer, got {channels!r}")
    if graph_channels is not None and channels != graph_channels:
        raise ModelError(
            f"{where}: metadata says {channels} channels but the model input takes {graph_channels}"
        )
    if channels not in (1, 3):
        # Images are grey or RGB; anything else (RGBA, multispectral) needs a custom loader.
        raise ModelError(
            f"{where}: model takes {channels}-channel input; only 1 (grey) or 3 (RGB) is supported"
        )

    size = pre.get("size")
    if size is None:
        gh, gw = graph_size
        size = (gh or DEFAULT_SIZE[0], gw or DEFAULT_SIZE[1])
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ModelError(f"{where}: metadata size must be [height, width] in pixels, got {size!r}")
    size = (int(size[0]), int(size[1]))
    for axis, want, have in (("height", size[0], graph_size[0]), ("width", size[1], graph_size[1])):
        if have is not None and want != have:
            raise ModelError(f"{where}: metadata input {axis} {want} does not match the model's fixed {have}")

    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
    mean = _stat(pre.get("mean", default_mean), channels, "mean", where)
    std = _stat(pre.get("std", default_std), channels, "std", where)
    if any(s <= 0 for s in std):
        raise ModelError(f"{where}: metadata std must be positive, got {list(std)}")
    return channels, size, mean, std


def _stat(value: Any, channels: int, name: str, where: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise ModelError(f"{where}: metadata {name} must be a list of numbers, got {value!r}")
    if len(value) == 1 and channels > 1:
        value = list(value) * channels
    if len(value) != channels:
        raise ModelError(f"{where}: metadata {name} has {len(value)} values for a {channels}-channel input")
    return tuple(float(v) for v in value)


def resolve_task(meta: dict[str, Any], output_rank: int | None, where: str) -> str:
    task = meta.get("task")
    if task is None:
        # Without metadata, the output rank tells: (B, K) scores or (B, K, H, W) maps.
        task = {2: "classification", 4: "segmentation"}.get(output_rank or 0)
        if task is None:
            raise ModelError(f"{where}: cannot tell the task: no metadata and output rank {output_rank}")
    if task not in TASKS:
        raise ModelError(f"{where}: unknown task {task!r} in metadata (expected one of {', '.join(TASKS)})")
    return task


def resolve_class_names(meta: dict[str, Any], num_classes: int | None, where: str) -> list[str] | None:
    """Class names from the metadata; None means "name them class_<i> once the count is known"."""
    names = meta.get("class_names")
    if names is None:
        return [f"class_{i}" for i in range(num_classes)] if num_classes else None
    if not isinstance(names, list) or not names:
        raise ModelError(f"{where}: metadata class_names must be a non-empty list")
    names = [str(n) for n in names]
    if num_classes is not None and len(names) != num_classes:
        raise ModelError(
            f"{where}: metadata lists {len(names)} class names but the model outputs {num_classes}"
        )
    return names


def dynamic_size_problem(pre: Mapping[str, Any], hw: Iterable[int]) -> str | None:
    """Why a dynamic-size graph (preprocess with `size_multiple`, optional `size_min`) cannot run at
    height/width `hw`, or None when it can. One rule for the runtime, tiling and calibration."""
    m = pre.get("size_multiple")
    if not isinstance(m, int) or m <= 0:
        return "the graph has a fixed size"
    h, w = (int(v) for v in hw)
    lo = pre.get("size_min") if isinstance(pre.get("size_min"), int) else 1
    if h % m or w % m:
        return f"height and width must be multiples of {m} px; {h}x{w} is not"
    if min(h, w) < max(lo, 1):
        return f"height and width must be at least {lo} px; {h}x{w} is smaller"
    return None
