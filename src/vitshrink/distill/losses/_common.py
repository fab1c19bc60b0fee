"""Shared pieces of the distillation losses: layer pairing, token <-> map reshapes, checks and the
learned student -> teacher projections."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitshrink.batch import segmentation_ce
from vitshrink.errors import VitshrinkError
from vitshrink.labels import IGNORE_INDEX

Outputs = Mapping[str, Any]

# --------------------------------------------------------------------------------------------- helpers


def pair_layers(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Pair layers by relative depth: ``min(n_student, n_teacher)`` pairs, the last layers always paired.

    Pair k joins the layers that end the k-th of ``n`` equal slices of each network, e.g. 4 vs 12
    layers -> ``[(0, 2), (1, 5), (2, 8), (3, 11)]``.
    """
    if n_student < 1 or n_teacher < 1:
        raise VitshrinkError(f"cannot pair layers: student has {n_student}, teacher has {n_teacher}")
    n = min(n_student, n_teacher)
    # Integer round-half-up of (k+1)*n_x/n, minus one for 0-based indices.
    return [
        (((k + 1) * n_student * 2 + n) // (2 * n) - 1, ((k + 1) * n_teacher * 2 + n) // (2 * n) - 1)
        for k in range(n)
    ]


def infer_grid(num_tokens: int) -> tuple[int, int]:
    """Square patch grid of a token sequence with 0, 1 (CLS) or 2 (CLS + DeiT dist) leading tokens."""
    # For N >= 3 at most one of N, N-1, N-2 is a perfect square, so the prefix count is unambiguous.
    for prefix in (0, 1, 2):
        side = math.isqrt(max(num_tokens - prefix, 0))
        if side > 0 and side * side == num_tokens - prefix:
            return side, side
    raise VitshrinkError(
        f"cannot infer a square patch grid from {num_tokens} tokens (with 0-2 leading CLS/dist tokens); "
        "pass the grid (h, w) explicitly"
    )


def tokens_to_map(tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
    """``(B, N, D)`` tokens -> ``(B, D, h, w)`` patch map, dropping leading CLS/dist tokens."""
    b, n, d = tokens.shape
    h, w = grid if grid is not None else infer_grid(n)
    prefix = n - h * w
    if prefix < 0:
        raise VitshrinkError(f"grid {h}x{w} needs {h * w} tokens but the sequence has {n}")
    return tokens[:, prefix:].transpose(1, 2).reshape(b, d, h, w)


def resize_map(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``size`` (align_corners=False, as HF seg heads do)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _as_float(x: Tensor) -> Tensor:
    # Softmax/KL in half precision under- and overflows; keep float64 for gradcheck.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _require(out: Outputs, key: str, loss: str, who: str) -> Any:
    value = out.get(key) if isinstance(out, Mapping) else None
    if value is None:
        hint = {
            "features": " (run the model with output_hidden_states=True)",
            "attentions": " (run the model with output_attentions=True and eager attention)",
        }.get(key, "")
        raise VitshrinkError(f"loss '{loss}' needs '{key}' in the {who} outputs{hint}")
    return value


def _check_logits(s: Tensor, t: Tensor, loss: str) -> None:
    if s.dim() not in (2, 4) or s.dim() != t.dim():
        raise VitshrinkError(
            f"loss '{loss}': logits must both be (B, K) or (B, K, H, W); got student {tuple(s.shape)} "
            f"and teacher {tuple(t.shape)}"
        )
    if s.shape[:2] != t.shape[:2]:
        raise VitshrinkError(
            f"loss '{loss}': student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in "
            "batch size or number of classes; logit distillation needs the same label set"
        )


def _seg_targets(targets: Tensor, logits: Tensor) -> Tensor:
    if targets.dim() == 4 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.dim() != 3 or targets.shape[0] != logits.shape[0]:
        raise VitshrinkError(
            f"segmentation targets must be (B, H, W) masks matching logits {tuple(logits.shape)}; "
            f"got {tuple(targets.shape)}"
        )
    return targets.long()


def _valid_mask(targets: Tensor | None, size: Sequence[int]) -> Tensor | None:
    """Pixels at ``size`` whose (nearest-resized) label is not ignore; None means all valid."""
    if targets is None:
        return None
    t = targets
    if tuple(t.shape[-2:]) != tuple(size):
        # nearest-exact samples pixel centres; plain "nearest" is shifted by half a pixel.
        t = F.interpolate(t[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()
    return t != IGNORE_INDEX


def _masked_mean(per_pixel: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return per_pixel.mean()
    # Sum / count rather than indexing keeps the graph and gives 0 (not NaN) when all are ignored.
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1)


def _ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Hard-label CE; segmentation upsamples the student map to the mask and ignores 255."""
    logits = _as_float(logits)
    if logits.dim() == 2:
        return F.cross_entropy(logits, targets if targets.is_floating_point() else targets.long())
    return segmentation_ce(logits, _seg_targets(targets, logits))


def _distill_logits(out: Outputs, loss: str) -> Tensor:
    dist = out.get("dist_logits")
    return _as_float(dist if dist is not None else _require(out, "logits", loss, "student"))


def _check_unit(value: float, name: str, loss: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise VitshrinkError(f"loss '{loss}': {name} must be in [0, 1], got {value}")
    return value


def _check_temperature(value: float, loss: str) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise VitshrinkError(f"loss '{loss}': temperature must be > 0, got {value}")
    return value


def _channels_last(x: Tensor) -> Tensor:
    return x.movedim(1, -1) if x.dim() == 4 else x


class _Projections(nn.Module):
    """Learned linear maps student width -> teacher width, one per (student, teacher) layer pair.

    A per-position ``nn.Linear`` on channels-last data is exactly a 1x1 conv on maps; one module type
    keeps state-dict keys the same whether a layer yields tokens or maps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()

    def build(self, pairs: Sequence[tuple[int, int]], s_dims: Sequence[int], t_dims: Sequence[int]) -> None:
        for i, j in pairs:
            if s_dims[i] != t_dims[j]:
                self.layers[f"{i}_{j}"] = nn.Linear(int(s_dims[i]), int(t_dims[j]))

    def forward(self, key: tuple[int, int], x: Tensor, t_dim: int, loss: str) -> Tensor:
        """Project channels-last ``x`` (..., D_s) to (..., t_dim), creating the layer on first use."""
        name = f"{key[0]}_{key[1]}"
        s_dim = x.shape[-1]
        proj = self.layers._modules.get(name)  # ModuleDict has no .get()
        if proj is None:
            if s_dim == t_dim:
                return x
            dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            proj = nn.Linear(s_dim, t_dim, device=x.device, dtype=dtype)
            self.layers[name] = proj
        if proj.in_features != s_dim or proj.out_features != t_dim:
            raise VitshrinkError(
                f"loss '{loss}': projection for layer pair {key} maps {proj.in_features}->{proj.out_features} "
                f"but the features are {s_dim}->{t_dim} wide"
            )
        return proj(x.to(proj.weight.dtype))


def _select_pairs(
    pairs: Sequence[tuple[int, int]] | None, n_s: int, n_t: int, loss: str
) -> list[tuple[int, int]]:
    chosen = [(int(i), int(j)) for i, j in pairs] if pairs is not None else pair_layers(n_s, n_t)
    for i, j in chosen:
        if not (-n_s <= i < n_s and -n_t <= j < n_t):
            raise VitshrinkError(
                f"loss '{loss}': layer pair ({i}, {j}) out of range for {n_s} student / {n_t} teacher layers"
            )
    # Normalise negative indices so projection names are stable.
    return [(i % n_s, j % n_t) for i, j in chosen]
