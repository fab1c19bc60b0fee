"""A batch on its way through a model, shared by train, evaluate, distill, prune and quantize: the device,
the distributed rank and sums, the model-ready input (`prepare`) and the segmentation loss.

Kept apart from `train` so that `evaluate` (which `train.fit` calls) needs nothing from `train`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from .data import normalize, resize_images
from .errors import VitshrinkError
from .labels import IGNORE_INDEX


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the process group in place (a no-op for one process)."""
    if dist_info()[1] > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def prepare(images: torch.Tensor, meta: dict[str, Any], device: torch.device) -> torch.Tensor:
    """uint8 batch → the float input a model with this `meta` expects (size, channels, mean/std)."""
    pre = meta["preprocess"]
    x = images.to(device, non_blocking=True)
    c = pre["channels"]
    if x.shape[1] != c:
        if x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = (
                (x.float() * torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1))
                .sum(1, keepdim=True)
                .round()
                .to(torch.uint8)
            )
        else:
            raise VitshrinkError(f"model expects {c} input channels, data has {x.shape[1]}")
    x = resize_images(x, tuple(pre["size"]))
    return normalize(x, pre["mean"], pre["std"])


def segmentation_ce(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, K, h, w) logit maps against (B, H, W) class-id masks.

    Maps are resized to the masks bilinearly (align_corners=False, as HF segmentation heads do);
    IGNORE_INDEX pixels are skipped and the rest averaged (0, not NaN, when every pixel is ignored).
    """
    masks = masks.long()
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / (masks != IGNORE_INDEX).sum().clamp_min(1)
