"""ONNX files in and out of the quantize stage: loading with one-line errors, the vitshrink metadata."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from .. import __version__
from ..deploy._meta import read_meta_props, write_meta_props
from ..errors import ModelError


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file or raise a one-line ModelError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"ONNX model not found: {p}")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # noqa: BLE001 - protobuf raises several unrelated types on garbage input
        raise ModelError(f"not a valid ONNX file: {p} ({type(e).__name__})") from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise ModelError(f"not a valid ONNX model (empty graph): {p}")
    return model


def read_meta(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The vitshrink metadata (deploy._meta decides: ModelError when corrupt); None when absent."""
    return read_meta_props(model.metadata_props, "model") or None


def copy_metadata(
    src: onnx.ModelProto,
    dst: onnx.ModelProto,
    history: dict[str, Any] | None = None,
    size: Sequence[int] | None = None,
) -> None:
    """Copy all metadata_props from src to dst; append `history` to the vitshrink meta when present.
    `size`: the (H, W) a dynamic-size graph was calibrated at, recorded as the size it is deployed at."""
    del dst.metadata_props[:]
    for prop in src.metadata_props:
        entry = dst.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    meta = read_meta(src)
    if meta is not None and history is not None:
        write_meta_props(dst.metadata_props, with_history(meta, history, size))


def with_history(
    meta: dict[str, Any] | None, history: dict[str, Any], size: Sequence[int] | None = None
) -> dict[str, Any] | None:
    """`meta` (changed in place) with `history` appended and, for a dynamic-size graph calibrated at
    `size`, that size as the deployed one; None stays None (a model without vitshrink metadata)."""
    if meta is None:
        return None
    if size is not None and isinstance(meta.get("preprocess"), dict):
        meta["preprocess"] = {**meta["preprocess"], "size": [int(v) for v in size]}
    meta.setdefault("history", []).append({**history, "version": __version__})
    meta["vitshrink_version"] = __version__
    return meta


def file_size(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size
