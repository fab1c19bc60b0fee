"""Exact, export-friendly replacements for modules that the ONNX exporters cannot handle or run slowly.

Families pick the patches their models need (`Family.make_exportable`); nothing here knows a family.
"""

from __future__ import annotations

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


class ShapeAgnosticAdaptiveAvgPool2d(nn.Module):
    """Adaptive average pooling as two pooling-matrix products built from the input's shape at run time.

    StaticAdaptiveAvgPool2d freezes its bin edges at the traced size; a dynamic-size graph needs the
    edges (PyTorch's floor(i*H/b) .. ceil((i+1)*H/b)) computed in the graph. Same bins, so the same
    result up to float summation order.
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    @staticmethod
    def _matrix(line: torch.Tensor, bins: int) -> torch.Tensor:
        # positions 0..n-1 and n from tensor ops on the input, so the tracer keeps them symbolic
        ones = torch.ones_like(line)
        pos, n = ones.cumsum(0) - 1, ones.sum()
        i = torch.arange(bins, dtype=line.dtype, device=line.device)
        start = torch.floor(i * n / bins)
        end = torch.ceil((i + 1) * n / bins)
        m = ((pos[None] >= start[:, None]) & (pos[None] < end[:, None])).to(line.dtype)
        return m / m.sum(1, keepdim=True)  # (bins, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        oh, ow = self.output_size
        ph = self._matrix(x[0, 0, :, 0], oh)
        pw = self._matrix(x[0, 0, 0, :], ow)
        return torch.matmul(torch.matmul(ph, x), pw.transpose(0, 1))


def unroll_adaptive_pooling(model: nn.Module, *, dynamic_size: bool = False) -> nn.Module:
    """Every nn.AdaptiveAvgPool2d becomes a StaticAdaptiveAvgPool2d, or for a dynamic-size graph a
    ShapeAgnosticAdaptiveAvgPool2d that computes its bins in the graph (in place)."""
    swapped: dict[int, nn.Module] = {}
    pool_cls = ShapeAgnosticAdaptiveAvgPool2d if dynamic_size else StaticAdaptiveAvgPool2d

    def static(pool: nn.AdaptiveAvgPool2d) -> nn.Module:
        return swapped.setdefault(id(pool), pool_cls(pool.output_size))

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


class ResizedInside(nn.Module):
    """`net` (pixel_values -> segmentation logits at the input size) run at a fixed `size` inside the
    graph: the photo comes in at any size, is resized bilinearly to `size`, and the logits are resized
    back to the photo's size (bilinear, before any argmax, as evaluation upsamples them).

    Plain bilinear, not antialiased: the TorchScript exporter has no antialiased Resize. At ratios down
    to 0.5 every input pixel still contributes (0.5 is an exact 2x2 mean); the runtime shrinks photos
    larger than twice the deployed size on the host (antialiased) before they reach the graph.
    """

    def __init__(self, net: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        self.size = (int(size[0]), int(size[1]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(pixel_values, size=self.size, mode="bilinear", align_corners=False)
        logits = self.net(x)
        return F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
