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
from typing import Any

import torch
from torch import Tensor, nn

from vitshrink.errors import VitshrinkError
from vitshrink.labels import IGNORE_INDEX

from ._common import (
    Outputs,
    infer_grid,
    pair_layers,
    resize_map,
    tokens_to_map,
)
from .features import AttentionLoss, CWDLoss, FeatureLoss
from .logits import CELoss, DistillLoss, HardDistillLoss, KDLoss, MSELogitLoss

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
