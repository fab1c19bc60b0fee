"""Model zoo and artifacts: build from a preset, load any local HF directory, save with `vitshrink.json`.

A saved model is a plain Hugging Face directory (``config.json`` + ``model.safetensors`` +
``preprocessor_config.json``) that ``transformers`` reloads by itself, plus ``vitshrink.json`` holding
task, class names, preprocessing, lineage (stages, options, metrics) and checksums verified on load.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from torch import nn

from .. import __version__
from ..artifacts import META_FORMAT, META_NAME, atomic_dir, read_json, sha256_file, write_json
from ..errors import ModelError
from ..hub import resolve_model
from .families import Family, family_for
from .presets import PRESETS, get_preset

# transformers' own progress bars and load reports would interleave with ours on every save/load.
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

__all__ = [
    "PRESETS",
    "Family",
    "family_for",
    "check_finite",
    "build_model",
    "load_model",
    "save_model",
    "is_model_dir",
    "count_params",
]

DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.5


def build_model(
    preset: str,
    *,
    task: str | None = None,
    image_size: int = 224,
    num_channels: int = 3,
    num_labels: int | None = None,
    class_names: list[str] | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    seed: int | None = 0,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a randomly initialised model from a named preset; returns (model, meta)."""
    p = get_preset(preset)
    task = task or p.tasks[0]
    if task not in p.tasks:
        raise ModelError(f"preset '{preset}' does not support task '{task}' (supports: {', '.join(p.tasks)})")
    if class_names is None:
        if num_labels is None:
            raise ModelError("build_model needs num_labels or class_names")
        class_names = [f"class_{i}" for i in range(num_labels)]
    num_labels = len(class_names)
    if seed is not None:
        torch.manual_seed(seed)
    model = family_for(p.family).build(p, task, image_size, num_channels, num_labels, **overrides).eval()
    model.config.id2label = dict(enumerate(class_names))
    model.config.label2id = {n: i for i, n in enumerate(class_names)}
    meta = {
        "format": META_FORMAT,
        "task": task,
        "family": p.family,
        "preset": preset,
        "class_names": list(class_names),
        "preprocess": {
            "mean": list(mean) if mean else [DEFAULT_MEAN] * num_channels,
            "std": list(std) if std else [DEFAULT_STD] * num_channels,
            "size": [image_size, image_size],
            "channels": num_channels,
        },
        "history": [{"stage": "build", "options": {"preset": preset, "task": task, **_jsonable(overrides)}}],
    }
    return model, meta


def is_model_dir(path: str | os.PathLike) -> bool:
    """A local model directory, or a Hugging Face Hub id (`org/name[@rev]`) that resolves to one."""
    p = resolve_model(path)
    return p.is_dir() and (p / "config.json").exists()


def load_model(
    path: str | os.PathLike, *, verify: bool = True, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load an HF model directory (ours or any transformers one) or Hub id (`org/name[@rev]`, resolved
    through the Hugging Face cache); returns (model in eval mode, meta)."""
    path = resolve_model(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    if not path.is_dir():
        raise ModelError(f"expected a model directory (config.json + weights), got a file: {path}")
    if not (path / "config.json").exists():
        raise ModelError(f"not a model directory (no config.json): {path}")
    cfg = read_json(path / "config.json")
    meta_path = path / META_NAME
    if meta_path.exists():
        meta = read_json(meta_path)
        _check_meta(meta, meta_path)
    else:
        meta = _meta_from_hf(path, cfg)
    if verify:
        _verify_checksums(path, meta)
    family = family_for(cfg.get("model_type", ""))
    family.before_load()
    cls = family.model_class(meta["task"])
    arch = (cfg.get("architectures") or [None])[0]
    if (
        arch
        and isinstance(getattr(transformers, arch, None), type)
        and arch.startswith(cls.__name__.split("For")[0])
    ):
        cls = getattr(transformers, arch)  # e.g. DeiTForImageClassificationWithTeacher
    weights = [p for p in ("model.safetensors", "pytorch_model.bin") if (path / p).exists()]
    if not weights:
        raise ModelError(f"no weights (model.safetensors) in {path}")
    try:
        # safetensors only by default; legacy .bin goes through transformers' weights_only loader.
        model = cls.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot load model from {path}: {msg}") from None
    meta.setdefault("family", family.name)
    return model.to(device).eval(), meta


def save_model(
    model: nn.Module,
    meta: dict[str, Any],
    out: str | os.PathLike,
    *,
    stage: str | None = None,
    options: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    parent: str | os.PathLike | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Save atomically as an HF directory + `vitshrink.json`; append the stage to the history."""
    out = Path(out)
    meta = copy.deepcopy(meta)
    if stage:
        entry: dict[str, Any] = {
            "stage": stage,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if options:
            entry["options"] = _jsonable(options)
        if metrics:
            entry["metrics"] = _jsonable(metrics)
        if parent is not None:
            entry["parent"] = str(parent)
            pm = Path(parent) / META_NAME
            if pm.exists():
                entry["parent_checksums"] = read_json(pm).get("checksums", {})
        entry["version"] = __version__
        meta.setdefault("history", []).append(entry)
    meta["vitshrink_version"] = __version__
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        pre = meta["preprocess"]
        write_json(
            tmp / "preprocessor_config.json",
            {
                "image_processor_type": "ViTImageProcessor",
                "do_resize": True,
                "size": {"height": pre["size"][0], "width": pre["size"][1]},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": pre["mean"],
                "image_std": pre["std"],
                "num_channels": pre["channels"],
            },
        )
        for name, obj in (extra_files or {}).items():
            write_json(tmp / name, obj)
        # Weights and every config (an edited config.json would rebuild a different network around
        # the same weights); vitshrink.json itself holds the digests.
        meta["checksums"] = {
            p.name: sha256_file(p)
            for p in sorted(tmp.iterdir())
            if p.suffix in (".safetensors", ".json") and p.name != META_NAME
        }
        write_json(tmp / META_NAME, meta)
    return out


def check_finite(model: nn.Module, where: str | os.PathLike) -> None:
    """Raise ModelError when any parameter or buffer holds NaN/Inf (every output would be garbage)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"model {where} has NaN or infinite values in {name}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_meta(meta: Any, where: Path) -> None:
    """Reject a damaged or hand-edited vitshrink.json before its values reach preprocessing.

    JSON allows NaN, so a bad mean/std would otherwise turn every input into NaN without an error.
    """

    def bad(msg: str) -> None:
        raise ModelError(f"invalid {where}: {msg}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(meta, dict):
        bad("not a JSON object")
    if meta.get("task") not in ("classification", "segmentation"):
        bad(f"unknown task {meta.get('task')!r}")
    if not isinstance(meta.get("class_names"), list) or not meta["class_names"]:
        bad("class_names must be a non-empty list")
    pre = meta.get("preprocess")
    if not isinstance(pre, dict):
        bad("'preprocess' must be an object")
    c, size = pre.get("channels"), pre.get("size")
    if not is_int(c) or c < 1:
        bad(f"preprocess channels must be a positive integer, got {c!r}")
    if not isinstance(size, list) or len(size) != 2 or not all(is_int(v) and v > 0 for v in size):
        bad(f"preprocess size must be [height, width] in pixels, got {size!r}")
    for key in ("mean", "std"):
        v = pre.get(key)
        if (
            not isinstance(v, list)
            or len(v) not in (1, c)
            or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        ):
            bad(f"preprocess {key} must be {c} finite numbers, got {v!r}")
    if any(x <= 0 for x in pre["std"]):
        bad(f"preprocess std must be positive, got {pre['std']!r}")


def _verify_checksums(path: Path, meta: dict[str, Any]) -> None:
    from ..safeio import inside

    for name, digest in (meta.get("checksums") or {}).items():
        f = path / name
        if not inside(f, path) or f.resolve() == path.resolve():  # "../x" or "/etc/x" in a hostile sidecar
            raise ModelError(
                f"invalid {path / META_NAME}: checksum entry {name!r} is outside the model directory"
            )
        if not f.exists():
            raise ModelError(f"model file missing: {f}")
        if not f.is_file():
            raise ModelError(f"model file {f} is not a regular file")
        if sha256_file(f) != digest:
            raise ModelError(f"checksum mismatch for {f}: the file is corrupt or was modified")


def _meta_from_hf(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Meta for a plain transformers directory, honouring its preprocessor_config.json."""
    family = family_for(cfg.get("model_type", ""))
    task = family.task_of(cfg)
    bb = cfg.get("backbone_config") or {}
    channels = int(cfg.get("num_channels", bb.get("num_channels", 3)))
    # Only a top-level image_size fixes the input (ViT position embeddings, MobileViT); a backbone's
    # (Swin's serialised default 224) says nothing about the size an UperNet was trained at.
    size = cfg.get("image_size")
    size_from = "config" if size is not None else None
    size = size if size is not None else bb.get("image_size", 224)
    mean, std = [0.5] * channels, [0.5] * channels
    shortest_edge = None
    pp = path / "preprocessor_config.json"
    if pp.exists():
        pre = read_json(pp)
        mean = _per_channel(pre.get("image_mean", mean), channels)
        std = _per_channel(pre.get("image_std", std), channels)
        s = pre.get("size") or pre.get("crop_size")
        crop = pre.get("crop_size")
        if pre.get("do_center_crop") and isinstance(crop, dict | int):
            # DeiT/ConvNeXt-style: resize the shortest edge (256), then centre-crop the input (224)
            edge = s.get("shortest_edge") if isinstance(s, dict) else s if isinstance(s, int) else None
            s = crop
            if edge:
                shortest_edge = int(edge)
        if isinstance(s, dict) and any(k in s for k in ("height", "width", "shortest_edge")):
            size = [
                s.get("height", s.get("shortest_edge", size)),
                s.get("width", s.get("shortest_edge", size)),
            ]
            size_from = "preprocessor_config"
        elif isinstance(s, int):
            size, size_from = s, "preprocessor_config"
        if pre.get("do_normalize") is False:
            mean, std = [0.0] * channels, [1.0] * channels
    if isinstance(size, int):
        size = [size, size]
    id2label = cfg.get("id2label") or {}
    names = [id2label.get(str(i), f"class_{i}") for i in range(len(id2label))] if id2label else []
    if not names:
        names = [f"class_{i}" for i in range(int(cfg.get("num_labels", 2)))]
    return {
        "format": META_FORMAT,
        "task": task,
        "family": family.name,
        "class_names": names,
        "preprocess": {
            "mean": mean,
            "std": std,
            "size": [int(size[0]), int(size[1])],
            "channels": channels,
            **({"shortest_edge": shortest_edge} if shortest_edge else {}),
        },
        # size_from None: the size above is a guess that export refuses to use without --image-size
        "history": [{"stage": "import", "options": {"source": str(path), "size_from": size_from}}],
    }


def _per_channel(v: Any, channels: int) -> list[float]:
    v = [float(x) for x in (v if isinstance(v, list | tuple) else [v])]
    return v * channels if len(v) == 1 else v[:channels]


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))
