"""Which widths to cut? Pick the pruning axes by measured damage (`prune --granularity auto`).

A uniform ratio over every axis is not equally harmful everywhere: on the aerial demo's SegFormer
student, cutting the 32-wide MLP decoder to 24 holds 1 % of the parameters but most of the one-shot
loss. For a parameter budget, each admissible subset of axes gets the ratio that meets it; each
candidate is pruned one-shot (magnitude importance: Taylor would need gradients per candidate) and
scored by the KL divergence of its
outputs from the unpruned model's on sample images; the least damaging subset wins. Written here
because Torch-Pruning's global pruning ranks single channels, not the per-layer-uniform widths a
`from_pretrained`-loadable config needs.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..errors import VitshrinkError
from .core import GRANULARITIES, count_params, family_for, prune_model
from .target import ratio_for_target

OVERSHOOT = 0.85  # a subset may remove at most 15% more parameters than the budget asks


def axis_groups(model: PreTrainedModel) -> list[tuple[str, ...]]:
    """Independently selectable axes; heads and embed are one where the head size derives from width."""
    if family_for(model).coupled_heads_embed:
        return [("heads", "embed"), ("mlp",), ("channels",)]
    return [("heads",), ("mlp",), ("embed",), ("channels",)]


@torch.no_grad()
def _logits(model: PreTrainedModel, x: torch.Tensor) -> torch.Tensor:
    return family_for(model).model_logits(model, x).float()


def _distortion(ref: list[torch.Tensor], model: PreTrainedModel, samples: Sequence[torch.Tensor]) -> float:
    """Mean KL(unpruned || pruned) over samples (per pixel for segmentation maps)."""
    model.eval()
    total = 0.0
    for r, x in zip(ref, samples):
        p = _logits(model, x)
        if p.shape != r.shape:  # segmentation maps at another size: compare at the reference's
            p = F.interpolate(p, size=r.shape[-2:], mode="bilinear", align_corners=False)
        log_r, log_p = F.log_softmax(r, dim=1), F.log_softmax(p, dim=1)
        total += float((log_r.exp() * (log_r - log_p)).sum(dim=1).mean())
    return total / max(1, len(samples))


def choose_axes(
    model: PreTrainedModel,
    example_inputs: torch.Tensor,
    samples: Sequence[torch.Tensor],
    *,
    target_params: int,
    importance: str = "magnitude",
    round_to: int = 8,
) -> tuple[tuple[str, ...], float, list[dict[str, Any]]]:
    """(granularity, ratio, candidates table): the least damaging axis subset meeting `target_params`."""
    groups = axis_groups(model)
    ref = [_logits(model.eval(), x) for x in samples]
    rows: list[dict[str, Any]] = []
    for k in range(1, len(groups) + 1):
        for combo in itertools.combinations(groups, k):
            gran = tuple(a for g in combo for a in g)
            try:
                r = ratio_for_target(
                    model, example_inputs, target_params=target_params, granularity=gran, round_to=round_to
                )
            except VitshrinkError:
                continue  # these axes alone cannot reach the budget
            pruned = prune_model(
                copy.deepcopy(model),
                ratio=r,
                granularity=gran,
                importance="magnitude" if importance == "taylor" else importance,
                round_to=round_to,
                example_inputs=example_inputs,
            )
            n = count_params(pruned)
            if n < OVERSHOOT * target_params:
                continue
            rows.append(
                {
                    "granularity": list(gran),
                    "ratio": round(r, 4),
                    "params": n,
                    "kl": round(_distortion(ref, pruned, samples), 5),
                }
            )
    if not rows:
        raise VitshrinkError(f"no set of pruning axes reaches the budget of {target_params:,} parameters")
    rows.sort(key=lambda row: row["kl"])
    best = rows[0]
    return tuple(best["granularity"]), best["ratio"], rows


__all__ = ["GRANULARITIES", "axis_groups", "choose_axes"]
