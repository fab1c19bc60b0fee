"""Write an optimum-style ONNX folder (`vitshrink.onnx_folder` names the layout) from a vitshrink ONNX
file: its metadata (read through `_meta`) carries the HF config, class names and preprocessing.

Here, beside `_meta`, so the layout module below the deploy floor never imports back up into it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..artifacts import atomic_dir, write_json
from ..errors import ModelError
from ..onnx_folder import MODEL_FILE, preprocessor_config
from ._meta import read_onnx_meta


def write_onnx_folder(src: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Lay out `src` (a vitshrink ONNX file) as an optimum-style folder at `folder` (atomically)."""
    src = Path(src)
    meta = read_onnx_meta(src)
    if not meta:
        raise ModelError(f"{src} has no vitshrink metadata, so its config.json cannot be written")
    config = meta.get("hf_config")
    if not isinstance(config, dict):
        raise ModelError(
            f"{src} carries no Hugging Face config (exported by an older vitshrink?); re-export it"
        )
    config = dict(config)
    names = meta.get("class_names") or []
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    sidecar = {k: v for k, v in meta.items() if k != "hf_config"}
    with atomic_dir(Path(folder)) as tmp:
        shutil.copyfile(src, tmp / MODEL_FILE)
        write_json(tmp / "config.json", config)
        write_json(tmp / "preprocessor_config.json", preprocessor_config(meta))
        write_json(tmp / "vitshrink.json", sidecar)
    return Path(folder)
