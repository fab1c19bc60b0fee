"""Unstructured (weight-level) sparsity, measured honestly.

Zeroing individual weights keeps every tensor dense: the model is exactly as large and as slow on a
dense runtime (PyTorch, ONNX Runtime CPU, TensorRT without sparse kernels). What it buys is a smaller
*compressed* file, so it is reported as such: the zero fraction, the dense safetensors size and the
gzip size before and after.
"""

from __future__ import annotations

import gzip
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..errors import VitshrinkError

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _sizes(model: nn.Module) -> tuple[int, int]:
    """(dense, gzip) bytes of the model's safetensors serialisation."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = safetensors_bytes(state)
    return len(blob), len(gzip.compress(blob, compresslevel=6))


def unstructured_sparsity(model: nn.Module, sparsity: float) -> dict[str, Any]:
    """Zero the `sparsity` fraction of smallest-magnitude Linear/Conv weights, globally, in place.

    Uses torch.nn.utils.prune (global L1) and then `prune.remove`, so the zeros are baked into the
    weights and no masks or hooks stay on the model. Returns the measured effect.
    """
    if not 0.0 <= sparsity < 1.0:
        raise VitshrinkError(f"sparsity must be in [0, 1), got {sparsity}")
    targets = [(m, "weight") for m in model.modules() if isinstance(m, _PRUNABLE)]
    if not targets:
        raise VitshrinkError("model has no Linear/Conv weights to sparsify")
    dense_before, gz_before = _sizes(model)
    if sparsity > 0:
        torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
        for m, name in targets:
            torch_prune.remove(m, name)
    dense_after, gz_after = _sizes(model)

    with torch.no_grad():
        w_zero = sum(int((m.weight == 0).sum()) for m, _ in targets)
        w_total = sum(m.weight.numel() for m, _ in targets)
        all_zero = sum(int((p == 0).sum()) for p in model.parameters())
        all_total = sum(p.numel() for p in model.parameters())
    return {
        "sparsity": sparsity,
        "zero_fraction": w_zero / w_total,  # of the Linear/Conv weights that were eligible
        "zero_fraction_all_params": all_zero / all_total,
        "dense_bytes": dense_after,
        "dense_bytes_before": dense_before,
        "gzip_bytes": gz_after,
        "gzip_bytes_before": gz_before,
        "gzip_ratio": gz_after / gz_before,
        "note": "zeros shrink the compressed file only; dense size and dense-runtime latency are unchanged",
    }
