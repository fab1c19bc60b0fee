"""One factory for deployed models: an `.onnx` file (or optimum-style ONNX folder) opens with
onnxruntime, an OpenVINO IR (`.xml`, or a folder holding `model.xml`) with OpenVINO; both behind the
`DeployModel` interface, so callers never branch on the runtime."""

from __future__ import annotations

import os
from typing import Any

from ._base import DeployModel
from .ov_runtime import OpenVinoModel, is_openvino
from .runtime import OnnxModel


def open_model(path: str | os.PathLike, threads: int | None = None, **kwargs: Any) -> DeployModel:
    """The deployed model at `path` with the runtime its format needs (keywords: see OnnxModel)."""
    cls = OpenVinoModel if is_openvino(path) else OnnxModel
    return cls(path, threads=threads, **kwargs)


def runtime_of(path: str | os.PathLike) -> str:
    """ "openvino" or "onnxruntime": which runtime `open_model` would use for `path`."""
    return OpenVinoModel.runtime if is_openvino(path) else OnnxModel.runtime
