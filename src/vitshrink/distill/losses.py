"""Distillation losses: small `nn.Module`s in a registry, combined with weights by `build_losses`.

Every loss takes ``forward(student_out, teacher_out, targets) -> scalar Tensor`` where each ``*_out``
is a dict with ``"logits"`` (classification ``(B, K)`` or segmentation ``(B, K, H, W)``; student and
teacher maps may differ in H, W) and, when a loss needs them, ``"features"`` (list of token sequences
``(B, N, D)`` or maps ``(B, C, H, W)``), ``"attentions"`` (list of ``(B, heads, N, N)``) and
``"dist_logits"`` (the DeiT distillation-token head). ``targets`` are class ids ``(B,)`` or uint8
masks ``(B, H, W)`` with 255 = ignore; ``None`` runs the label-free part only.

Contract for the trainer:

* Teacher tensors are detached here, so no gradient ever reaches the teacher.
* ``feature``/``attention``/``cwd`` may own learned projections (student width -> teacher width).
  Pass ``student_dims``/``teacher_dims`` to create them at construction, or call
  ``CombinedLoss.prepare(student_out, teacher_out, targets)`` once on a sample batch; then build the
  optimiser over ``list(student.parameters()) + list(loss.parameters())`` and move the loss to the
  student's device with ``loss.to(device)``. Projections created lazily in a later forward would be
  missing from the optimiser, which is why ``prepare`` exists.
* For DeiT students pass the class-token head's output as ``"logits"`` and the distillation-token
  head's output as ``"dist_logits"`` (not the averaged inference logits): the teacher-matching terms
  use ``dist_logits`` when present, the hard-label cross-entropy always uses ``logits``.
* ``DistillLoss.requires`` names the output keys a loss reads, so the trainer knows when to run the
  models with ``output_hidden_states`` / ``output_attentions`` (the latter needs eager attention).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitshrink.batch import segmentation_ce
from vitshrink.errors import VitshrinkError
from vitshrink.labels import IGNORE_INDEX

Outputs = Mapping[str, Any]

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "AttentionLoss",
    "CELoss",
    "CWDLoss",
    "CombinedLoss",
    "DistillLoss",
    "FeatureLoss",
    "HardDistillLoss",
    "KDLoss",
    "MSELogitLoss",
    "build_loss",
    "build_losses",
    "infer_grid",
    "pair_layers",
    "parse_loss_spec",
    "resize_map",
    "tokens_to_map",
]


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


# ---------------------------------------------------------------------------------------------- losses


class DistillLoss(nn.Module):
    """Base class: ``forward(student_out, teacher_out, targets) -> scalar``; see the module docstring."""

    name: ClassVar[str] = ""

    @property
    def requires(self) -> frozenset[str]:
        """Output keys this loss reads (beyond ``logits`` for the student's own CE)."""
        return frozenset({"logits"})

    def forward(self, student_out: Outputs, teacher_out: Outputs, targets: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class CELoss(DistillLoss):
    """Plain supervised cross-entropy (segmentation: upsampled student map, 255 ignored).

    Useful next to label-free losses, e.g. ``"cwd,ce"``.
    """

    name = "ce"

    def forward(self, student_out: Outputs, teacher_out: Outputs, targets: Tensor | None = None) -> Tensor:
        if targets is None:
            raise VitshrinkError("loss 'ce' needs targets (labels)")
        return _ce(_require(student_out, "logits", self.name, "student"), targets)


class KDLoss(DistillLoss):
    """Hinton KD: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets)``.

    Segmentation: teacher maps are resized (bilinear) to the student's map size, KL is per pixel and
    averaged over pixels whose label (nearest-resized) is not 255. Without targets only the KD term.
    """

    name = "kd"

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature, self.name)
        self.alpha = _check_unit(alpha, "alpha", self.name)

    def forward(self, student_out: Outputs, teacher_out: Outputs, targets: Tensor | None = None) -> Tensor:
        s = _distill_logits(student_out, self.name)
        t = _as_float(_require(teacher_out, "logits", self.name, "teacher")).detach()
        _check_logits(s, t, self.name)
        temp = self.temperature
        if s.dim() == 2:
            kd = F.kl_div(
                F.log_softmax(s / temp, dim=1),
                F.log_softmax(t / temp, dim=1),
                reduction="batchmean",
                log_target=True,
            )
        else:
            t = resize_map(t, s.shape[-2:])
            log_t = F.log_softmax(t / temp, dim=1)
            per_pixel = (log_t.exp() * (log_t - F.log_softmax(s / temp, dim=1))).sum(dim=1)
            valid = _valid_mask(None if targets is None else _seg_targets(targets, s), s.shape[-2:])
            kd = _masked_mean(per_pixel, valid)
        kd = kd * temp**2
        if targets is None or self.alpha == 1.0:
            return kd
        ce = _ce(_require(student_out, "logits", self.name, "student"), targets)
        return self.alpha * kd + (1.0 - self.alpha) * ce


class MSELogitLoss(DistillLoss):
    """``alpha * MSE(student logits, teacher logits) + (1 - alpha) * CE``.

    Maps are compared at the student's resolution (teacher resized bilinearly), ignoring 255 pixels.
    """

    name = "mse"

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = _check_unit(alpha, "alpha", self.name)

    def forward(self, student_out: Outputs, teacher_out: Outputs, targets: Tensor | None = None) -> Tensor:
        s = _distill_logits(student_out, self.name)
        t = _as_float(_require(teacher_out, "logits", self.name, "teacher")).detach()
        _check_logits(s, t, self.name)
        if s.dim() == 2:
            mse = F.mse_loss(s, t)
        else:
            t = resize_map(t, s.shape[-2:])
            valid = _valid_mask(None if targets is None else _seg_targets(targets, s), s.shape[-2:])
            mse = _masked_mean((s - t).pow(2).mean(dim=1), valid)
        if targets is None or self.alpha == 1.0:
            return mse
        ce = _ce(_require(student_out, "logits", self.name, "student"), targets)
        return self.alpha * mse + (1.0 - self.alpha) * ce


class HardDistillLoss(DistillLoss):
    """DeiT hard distillation: ``CE(logits, targets) / 2 + CE(dist_logits or logits, teacher argmax) / 2``.

    Segmentation: teacher argmax at the student's map size; pixels labelled 255 are dropped from both
    terms so every loss agrees on which pixels count. Without targets only the teacher term.
    """

    name = "hard"

    def forward(self, student_out: Outputs, teacher_out: Outputs, targets: Tensor | None = None) -> Tensor:
        s = _distill_logits(student_out, self.name)
        t = _as_float(_require(teacher_out, "logits", self.name, "teacher")).detach()
        _check_logits(s, t, self.name)
        if s.dim() == 2:
            teacher_term = F.cross_entropy(s, t.argmax(dim=1))
        else:
            pseudo = resize_map(t, s.shape[-2:]).argmax(dim=1)
            if targets is not None:
                valid = _valid_mask(_seg_targets(targets, s), s.shape[-2:])
                pseudo = pseudo.masked_fill(~valid, IGNORE_INDEX)
            teacher_term = segmentation_ce(s, pseudo)  # pseudo-labels at the student's map size
        if targets is None:
            return teacher_term
        return 0.5 * _ce(_require(student_out, "logits", self.name, "student"), targets) + 0.5 * teacher_term


class FeatureLoss(DistillLoss):
    """Hint distillation on intermediate features, averaged over (student, teacher) layer pairs.

    Per pair: the student is projected to the teacher's width (learned linear / 1x1 conv, only when
    widths differ); equal-length token sequences are compared token by token (CLS included);
    otherwise leading CLS/dist tokens are dropped, tokens are laid out on their 2-D grid and the
    student is resized bilinearly to the teacher's grid (maps likewise to the teacher's H, W).

    ``normalize=True`` (default) standardises every token/pixel vector over channels on both sides
    (layer norm without affine parameters) before the MSE. Why: in pre-LN ViTs every consumer of the
    residual stream reads it through a LayerNorm, so per-token mean and scale carry little
    information, while their magnitudes (which grow with depth and include a few huge outlier
    channels) would dominate a plain MSE and make its scale depend on the layer and the teacher.
    ``normalize=False`` gives plain MSE.
    """

    name = "feature"

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]] | None = None,
        student_dims: Sequence[int] | None = None,
        teacher_dims: Sequence[int] | None = None,
        normalize: bool = True,
        student_grid: tuple[int, int] | None = None,
        teacher_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.pairs = None if pairs is None else [(int(i), int(j)) for i, j in pairs]
        self.normalize = bool(normalize)
        self.student_grid = student_grid
        self.teacher_grid = teacher_grid
        self.proj = _Projections()
        if (student_dims is None) != (teacher_dims is None):
            raise VitshrinkError(f"loss '{self.name}': give both student_dims and teacher_dims, or neither")
        if student_dims is not None and teacher_dims is not None:
            chosen = _select_pairs(self.pairs, len(student_dims), len(teacher_dims), self.name)
            self.proj.build(chosen, student_dims, teacher_dims)

    @property
    def requires(self) -> frozenset[str]:
        return frozenset({"features"})

    def _align(self, key: tuple[int, int], s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return channels-last student and teacher tensors of identical shape."""
        t_dim = t.shape[-1] if t.dim() == 3 else t.shape[1]
        if s.dim() == 3 and t.dim() == 3 and s.shape[1] == t.shape[1]:
            return self.proj(key, s, t_dim, self.name), t
        s_map = s if s.dim() == 4 else tokens_to_map(s, self.student_grid)
        t_map = t if t.dim() == 4 else tokens_to_map(t, self.teacher_grid)
        # Project before resizing: both are linear and commute (bilinear weights sum to 1), and the
        # student grid is usually the smaller one.
        s_last = self.proj(key, _channels_last(s_map), t_dim, self.name)
        s_map = resize_map(s_last.movedim(-1, 1), t_map.shape[-2:])
        return _channels_last(s_map), _channels_last(t_map)

    def forward(self, student_out: Outputs, teacher_out: Outputs, targets: Tensor | None = None) -> Tensor:
        s_feats = _require(student_out, "features", self.name, "student")
        t_feats = _require(teacher_out, "features", self.name, "teacher")
        chosen = _select_pairs(self.pairs, len(s_feats), len(t_feats), self.name)
        total: Tensor | None = None
        for i, j in chosen:
            s, t = _as_float(s_feats[i]), _as_float(t_feats[j]).detach()
            if s.dim() not in (3, 4) or t.dim() not in (3, 4) or s.shape[0] != t.shape[0]:
                raise VitshrinkError(
                    f"loss '{self.name}': features must be (B, N, D) or (B, C, H, W) with equal B; got "
                    f"student[{i}] {tuple(s.shape)} and teacher[{j}] {tuple(t.shape)}"
                )
            s, t = self._align((i, j), s, t)
            t = t.to(s.dtype)
            if self.normalize:
                s = F.layer_norm(s, s.shape[-1:], eps=1e-6)
                t = F.layer_norm(t, t.shape[-1:], eps=1e-6)
            term = F.mse_loss(s, t)
            total = term if total is None else total + term
        assert total is not None  # pair_layers always yields at least one pair
        return total / len(chosen)


class AttentionLoss(DistillLoss):
    """KL(teacher || student) between head-averaged attention maps, averaged over query rows and pairs.

    When N differs, leading CLS/dist rows and columns are dropped and the student's query and key
    axes are resampled bilinearly on the patch grid to the teacher's grid; rows are renormalised to
    sum to one on both sides. Head counts may differ (heads are averaged).
    """

    name = "attention"

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]] | None = None,
        student_grid: tuple[int, int] | None = None,
        teacher_grid: tuple[int, int] | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.pairs = None if pairs is None else [(int(i), int(j)) for i, j in pairs]
        self.student_grid = student_grid
        self.teacher_grid = teacher_grid
        self.eps = float(eps)

    @property
    def requires(self) -> frozenset[str]:
        return frozenset({"attentions"})

    @staticmethod
    def _patches(a: Tensor, grid: tuple[int, int] | None) -> tuple[Tensor, tuple[int, int]]:
        h, w = grid if grid is not None else infer_grid(a.shape[-1])
        p = a.shape[-1] - h * w
        if p < 0:
            raise VitshrinkError(f"grid {h}x{w} needs {h * w} tokens but the attention map has {a.shape[-1]}")
        return a[:, p:, p:], (h, w)

    @staticmethod
    def _resample(a: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
        """Resample (B, Nq, Nk) on the patch grid along keys, then queries."""
        b = a.shape[0]
        n_src, n_dst = src[0] * src[1], dst[0] * dst[1]
        a = resize_map(a.reshape(b * n_src, 1, *src), dst).reshape(b, n_src, n_dst)  # keys
        a = a.transpose(1, 2).reshape(b * n_dst, 1, *src)
        a = resize_map(a, dst).reshape(b, n_dst, n_dst)  # (B, keys, queries)
        return a.transpose(1, 2)

    def forward(self, student_out: Outputs, teacher_out: Outputs, targets: Tensor | None = None) -> Tensor:
        s_atts = _require(student_out, "attentions", self.name, "student")
        t_atts = _require(teacher_out, "attentions", self.name, "teacher")
        chosen = _select_pairs(self.pairs, len(s_atts), len(t_atts), self.name)
        total: Tensor | None = None
        for i, j in chosen:
            s, t = _as_float(s_atts[i]), _as_float(t_atts[j]).detach()
            if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
                raise VitshrinkError(
                    f"loss '{self.name}': attentions must be (B, heads, N, N) with equal B (Swin: equal "
                    f"window counts); got student[{i}] {tuple(s.shape)} and teacher[{j}] {tuple(t.shape)}"
                )
            s, t = s.mean(dim=1), t.mean(dim=1).to(s.dtype)
            if s.shape[-1] != t.shape[-1]:
                s, s_grid = self._patches(s, self.student_grid)
                t, t_grid = self._patches(t, self.teacher_grid)
                if s_grid != t_grid:
                    s = self._resample(s, s_grid, t_grid)
                s = s / s.sum(dim=-1, keepdim=True).clamp_min(self.eps)
                t = t / t.sum(dim=-1, keepdim=True).clamp_min(self.eps)
            rows = t.shape[0] * t.shape[1]
            term = F.kl_div(s.clamp_min(self.eps).log(), t, reduction="sum") / rows
            total = term if total is None else total + term
        assert total is not None
        return total / len(chosen)


class CWDLoss(DistillLoss):
    """Channel-wise distillation (Shu et al., ICCV 2021) for dense prediction.

    Each channel is turned into a distribution over spatial locations (softmax of map / T); the loss is
    ``T^2 * mean over (batch, channel) of KL(teacher || student)``. Teacher maps are resized to the
    student's size. ``on="logits"`` uses the logit maps; ``on="features"`` uses feature maps (tokens
    are laid out on their grid) paired by relative depth, with a learned 1x1 projection when channel
    counts differ. ``targets`` are not used.
    """

    name = "cwd"

    def __init__(
        self,
        temperature: float = 4.0,
        on: str = "logits",
        pairs: Sequence[tuple[int, int]] | None = None,
        student_dims: Sequence[int] | None = None,
        teacher_dims: Sequence[int] | None = None,
        student_grid: tuple[int, int] | None = None,
        teacher_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature, self.name)
        if on not in ("logits", "features"):
            raise VitshrinkError(f"loss '{self.name}': on must be 'logits' or 'features', got {on!r}")
        self.on = on
        self.pairs = None if pairs is None else [(int(i), int(j)) for i, j in pairs]
        self.student_grid = student_grid
        self.teacher_grid = teacher_grid
        self.proj = _Projections()
        if (student_dims is None) != (teacher_dims is None):
            raise VitshrinkError(f"loss '{self.name}': give both student_dims and teacher_dims, or neither")
        if student_dims is not None and teacher_dims is not None:
            chosen = _select_pairs(self.pairs, len(student_dims), len(teacher_dims), self.name)
            self.proj.build(chosen, student_dims, teacher_dims)

    @property
    def requires(self) -> frozenset[str]:
        return frozenset({"features"} if self.on == "features" else {"logits"})

    def _cwd(self, s: Tensor, t: Tensor) -> Tensor:
        t = resize_map(t, s.shape[-2:]).to(s.dtype)
        b, c = s.shape[:2]
        temp = self.temperature
        log_s = F.log_softmax(s.reshape(b * c, -1) / temp, dim=1)
        log_t = F.log_softmax(t.reshape(b * c, -1) / temp, dim=1)
        return F.kl_div(log_s, log_t, reduction="sum", log_target=True) / (b * c) * temp**2

    def forward(self, student_out: Outputs, teacher_out: Outputs, targets: Tensor | None = None) -> Tensor:
        if self.on == "logits":
            s = _as_float(_require(student_out, "logits", self.name, "student"))
            t = _as_float(_require(teacher_out, "logits", self.name, "teacher")).detach()
            if s.dim() != 4:
                raise VitshrinkError(
                    f"loss '{self.name}' needs segmentation logit maps (B, K, H, W); got {tuple(s.shape)}"
                )
            _check_logits(s, t, self.name)
            return self._cwd(s, t)
        s_feats = _require(student_out, "features", self.name, "student")
        t_feats = _require(teacher_out, "features", self.name, "teacher")
        chosen = _select_pairs(self.pairs, len(s_feats), len(t_feats), self.name)
        total: Tensor | None = None
        for i, j in chosen:
            s, t = _as_float(s_feats[i]), _as_float(t_feats[j]).detach()
            s = s if s.dim() == 4 else tokens_to_map(s, self.student_grid)
            t = t if t.dim() == 4 else tokens_to_map(t, self.teacher_grid)
            if s.shape[0] != t.shape[0]:
                raise VitshrinkError(f"loss '{self.name}': batch sizes differ ({s.shape[0]} vs {t.shape[0]})")
            s = self.proj((i, j), s.movedim(1, -1), t.shape[1], self.name).movedim(-1, 1)
            term = self._cwd(s, t)
            total = term if total is None else total + term
        assert total is not None
        return total / len(chosen)


# ------------------------------------------------------------------------------------ registry/combine

LOSSES: dict[str, type[DistillLoss]] = {
    "kd": KDLoss,
    "mse": MSELogitLoss,
    "hard": HardDistillLoss,
    "dist-token": HardDistillLoss,
    "feature": FeatureLoss,
    "attention": AttentionLoss,
    "cwd": CWDLoss,
    "ce": CELoss,
}


def _canonical(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def _lookup(name: str) -> tuple[str, type[DistillLoss]]:
    key = _canonical(name)
    if key not in LOSSES:
        raise VitshrinkError(f"unknown distillation loss '{name}' (valid: {', '.join(sorted(LOSSES))})")
    return key, LOSSES[key]


def _options(cls: type[DistillLoss]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p != "self"]


def build_loss(name: str, **kwargs: Any) -> DistillLoss:
    """Instantiate one registered loss; unknown names or options raise VitshrinkError."""
    key, cls = _lookup(name)
    valid = _options(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise VitshrinkError(
            f"loss '{key}' got unknown option(s) {', '.join(unknown)} (valid: {', '.join(valid) or 'none'})"
        )
    return cls(**kwargs)


def _weight(value: Any, name: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise VitshrinkError(f"loss weight for '{name}' must be a number, got {value!r}") from None
    if not (math.isfinite(w) and w >= 0):
        raise VitshrinkError(f"loss weight for '{name}' must be a finite number >= 0, got {value!r}")
    return w


def parse_loss_spec(spec: str | Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """``"kd"``, ``"kd,feature"``, ``"kd:1,feature:0.5"``, ``["kd", "cwd=2"]`` or ``{"kd": 1.0}`` -> weights.

    Names are case-insensitive (``_`` == ``-``); the default weight is 1.0.
    """
    items: list[tuple[str, Any]] = []
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        for part in parts:
            if not isinstance(part, str):
                raise VitshrinkError(f"loss spec entries must be strings, got {part!r}")
            if not part.strip():
                continue
            match = re.fullmatch(r"\s*([^:=]+?)\s*(?:[:=]\s*(.*?)\s*)?", part)
            if match is None:
                raise VitshrinkError(f"bad loss spec entry {part!r} (expected NAME or NAME:WEIGHT)")
            items.append((match.group(1), 1.0 if match.group(2) is None else match.group(2)))
    if not items:
        raise VitshrinkError(f"empty loss spec (valid losses: {', '.join(sorted(LOSSES))})")
    weights: dict[str, float] = {}
    for name, w in items:
        key, _ = _lookup(name)
        if key in weights:
            raise VitshrinkError(f"loss '{key}' is listed twice in the loss spec")
        weights[key] = _weight(w, key)
    return weights


class CombinedLoss(nn.Module):
    """Weighted sum of losses; ``forward`` returns ``(total, {name: unweighted float value})``."""

    def __init__(self, losses: Mapping[str, DistillLoss], weights: Mapping[str, float]) -> None:
        super().__init__()
        if set(losses) != set(weights):
            raise VitshrinkError("CombinedLoss: losses and weights must have the same names")
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = {k: float(weights[k]) for k in losses}

    @property
    def requires(self) -> frozenset[str]:
        return frozenset().union(*(loss.requires for loss in self.losses.values()))

    def forward(
        self, student_out: Outputs, teacher_out: Outputs, targets: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        total: Tensor | None = None
        parts: dict[str, float] = {}
        for name, loss in self.losses.items():
            value = loss(student_out, teacher_out, targets)
            parts[name] = float(value.detach())
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
        assert total is not None
        return total, parts

    @torch.no_grad()
    def prepare(
        self, student_out: Outputs, teacher_out: Outputs, targets: Tensor | None = None
    ) -> CombinedLoss:
        """Run once on a sample batch so lazily created projections exist before the optimiser is built."""
        self(student_out, teacher_out, targets)
        return self


def build_losses(spec: str | Sequence[str] | Mapping[str, float], **kwargs: Any) -> CombinedLoss:
    """Build a CombinedLoss from a spec (see `parse_loss_spec`).

    Shared options go to every listed loss that accepts them (``temperature=2`` reaches kd and cwd);
    per-loss options are given under the loss name, e.g. ``feature={"pairs": [(0, 1)]}``. An option no
    listed loss accepts raises VitshrinkError.
    """
    weights = parse_loss_spec(spec)
    per_loss: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}
    for key, value in kwargs.items():
        canon = _canonical(key)
        if canon in weights and isinstance(value, Mapping):
            per_loss[canon] = dict(value)
        else:
            shared[key] = value
    used: set[str] = set()
    losses: dict[str, DistillLoss] = {}
    for name in weights:
        accepted = set(_options(LOSSES[name]))
        opts = {k: v for k, v in shared.items() if k in accepted}
        used |= set(opts)
        losses[name] = build_loss(name, **{**opts, **per_loss.get(name, {})})
    unused = sorted(set(shared) - used)
    if unused:
        raise VitshrinkError(
            f"option(s) {', '.join(unused)} not accepted by any of the losses {', '.join(weights)}"
        )
    return CombinedLoss(losses, weights)
