"""The base class and the logit losses: cross-entropy, KD (soft targets), MSE on logits, hard distillation."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from vitshrink.batch import segmentation_ce
from vitshrink.errors import VitshrinkError
from vitshrink.labels import IGNORE_INDEX

from ._common import (
    Outputs,
    _as_float,
    _ce,
    _check_logits,
    _check_temperature,
    _check_unit,
    _distill_logits,
    _masked_mean,
    _require,
    _seg_targets,
    _valid_mask,
    resize_map,
)

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
