"""optimum-style ONNX folders: `model.onnx` + `config.json` + `preprocessor_config.json` (+ `vitshrink.json`).

This is the layout optimum's `ORTModelForImageClassification` / `ORTModelForSemanticSegmentation` and
other Hugging Face tooling load, so a vitshrink model can be deployed with them as well as with
vitshrink's own runtime. The HF config travels inside the ONNX metadata (`hf_config`, written by
`export`), so a quantized file can be turned into a folder without its PyTorch directory.
Dependency-free, so the deploy path imports `onnx_file`; `deploy.folder.write_onnx_folder` writes the layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .options import ONNX_FORMATS as FORMATS

MODEL_FILE = "model.onnx"


def onnx_file(path: str | os.PathLike) -> Path:
    """The ONNX file a path names: the path itself, or `model.onnx` inside an ONNX folder."""
    p = Path(path)
    if p.is_dir() and (p / MODEL_FILE).is_file() and not (p / "model.safetensors").exists():
        return p / MODEL_FILE
    return p


def wants_folder(out: str | os.PathLike, fmt: str = "auto") -> bool:
    """'dir', or 'auto' with an output without extension; 'auto' refuses other extensions (x.txt)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    suffix = Path(out).suffix
    if fmt == "auto" and suffix not in ("", ".onnx"):
        raise ValueError(
            f"output must end in .onnx (one file) or have no extension (an optimum-style folder): {out}"
        )
    return fmt == "dir" or (fmt == "auto" and suffix == "")


def preprocessor_config(meta: dict[str, Any]) -> dict[str, Any]:
    """A transformers image-processor config equivalent to the vitshrink preprocessing."""
    pre = meta.get("preprocess", {})
    h, w = pre.get("size", [224, 224])
    channels = pre.get("channels", 3)
    mean = pre.get("mean", [0.5] * channels)
    std = pre.get("std", [0.5] * channels)
    seg = meta.get("task") == "segmentation"
    return {
        "image_processor_type": "SegformerImageProcessor" if seg else "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": int(h), "width": int(w)},
        "resample": 2,  # bilinear, as vitshrink's runtime resizes
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        **({"do_reduce_labels": False} if seg else {}),
    }
