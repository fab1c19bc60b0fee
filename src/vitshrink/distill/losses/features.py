"""Losses on intermediate outputs: feature maps/tokens, attention maps, channel-wise distillation (CWD)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from vitshrink.errors import VitshrinkError

from ._common import (
    Outputs,
    _as_float,
    _channels_last,
    _check_logits,
    _check_temperature,
    _Projections,
    _require,
    _select_pairs,
    infer_grid,
    resize_map,
    tokens_to_map,
)
from .logits import DistillLoss


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
