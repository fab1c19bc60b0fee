"""Demo stages after distillation (prune, quantize), each `(cfg, out, model_dir, onnx, **ctx) -> (dir, onnx, records)`."""

from __future__ import annotations

from typing import Any

STAGES: list[Any] = []
