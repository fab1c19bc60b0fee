"""Exact, export-friendly replacements for modules that the ONNX exporters cannot handle or run slowly.

Families pick the patches their models need (`Family.make_exportable`); nothing here knows a family.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class StaticAdaptiveAvgPool2d(nn.Module):
    """Adaptive average pooling unrolled for a fixed input size.

    Hand-written because neither torch exporter handles adaptive pooling to bins that do not divide
    the map (UperNet's PSP module pools a 16x16 map to 1/2/3/6 bins at 512 px). With the input size
    known at trace time, PyTorch's own bin edges (floor(i*H/b), ceil((i+1)*H/b)) become constant
    slices, so the result is bit-for-bit the same operation.
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        oh, ow = self.output_size
        if h % oh == 0 and w % ow == 0:
            return F.avg_pool2d(x, kernel_size=(h // oh, w // ow))
        rows = []
        for i in range(oh):
            y0, y1 = (i * h) // oh, -(-((i + 1) * h) // oh)
            cols = [
                x[..., y0:y1, (j * w) // ow : -(-((j + 1) * w) // ow)].mean(dim=(-2, -1), keepdim=True)
                for j in range(ow)
            ]
            rows.append(torch.cat(cols, dim=-1))
        return torch.cat(rows, dim=-2)


# Swin's shifted-window mask is -100 in transformers; after softmax those weights are ~e^-100 ~ 4e-44,
# float32 subnormals, and x86 subnormal arithmetic is microcoded: on onnxruntime CPU the probs @ V
# MatMul of every shifted block ran 10-35x slower than the same MatMul in a plain block (Swin-T: 13 of
# 59 ms). At -1e4 they underflow to exact zeros; the kept weights differ by < 1e-40 (and -1e4 still
# fits float16 for TensorRT / fp16 exports).
SHIFT_MASK_FILL = -1e4


def _zero_underflow_mask(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    mask = type(self).get_attn_mask(self, *args, **kwargs)
    return None if mask is None else mask.masked_fill(mask < 0, SHIFT_MASK_FILL)


def zero_underflow_shift_masks(model: nn.Module) -> nn.Module:
    """Shifted-window blocks (those with `get_attn_mask`) mask with SHIFT_MASK_FILL instead (in place)."""
    for mod in model.modules():
        # bound per instance, so deepcopy and pickle follow the module
        if callable(getattr(type(mod), "get_attn_mask", None)) and "get_attn_mask" not in vars(mod):
            mod.get_attn_mask = types.MethodType(_zero_underflow_mask, mod)
    return model


def unroll_adaptive_pooling(model: nn.Module) -> nn.Module:
    """Every nn.AdaptiveAvgPool2d becomes a StaticAdaptiveAvgPool2d (in place)."""
    swapped: dict[int, nn.Module] = {}

    def static(pool: nn.AdaptiveAvgPool2d) -> nn.Module:
        return swapped.setdefault(id(pool), StaticAdaptiveAvgPool2d(pool.output_size))

    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                setattr(mod, cname, static(child))
        # UperNet's PSP blocks also keep their layers in a plain list that forward() iterates.
        for attr, val in list(vars(mod).items()):
            if isinstance(val, list) and any(
                id(v) in swapped or isinstance(v, nn.AdaptiveAvgPool2d) for v in val
            ):
                setattr(mod, attr, [static(v) if isinstance(v, nn.AdaptiveAvgPool2d) else v for v in val])
    return model
