"""Depth pruning: remove whole transformer blocks, least influential first.

Width pruning shrinks the matrix multiplies, but the per-block work that scales with tokens and heads
rather than width squared (softmax over attention maps, window partition / shift, LayerNorm, reshapes)
shrinks less, so at high ratios latency falls more slowly than MACs (Swin-T with 1 of 3 stage-0 heads
left: 10.6x fewer MACs, 4-5.5x faster on onnxruntime CPU). Removing a block removes all of its work, so
latency follows the MAC cut. Written here because Torch-Pruning prunes channels, not layers.

Blocks are ranked by Block Influence (ShortGPT, Men et al. 2024): 1 - cos(block input, block output)
of the residual stream, averaged over sample inputs; the blocks that change it least go. Swin alternates
plain and shifted-window blocks and `from_pretrained` gives block i a shift iff i is odd, so a stage
loses (plain, shifted) pairs, least influential first, plus its last block when an odd number must go:
every kept block keeps the shift it was trained with. A 2-block stage can thus keep only its plain
block (Swin-T at depth 0.5: [1, 1, 3, 1]); windows then mix only through the next patch merging, which
the recovery fine-tune has to absorb, but the high-resolution stages, where per-block work costs most,
can finally lose blocks: Swin-T at 2.4-2.9M params runs 1.5x faster with depths [1, 1, 3, 1] than with
[2, 2, 6, 2] (benchmarks/prune_speed.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..errors import UnsupportedFamilyError, VitshrinkError
from ..models.families import BlockStage, Family, family_names, find_family


def _stages(model: PreTrainedModel) -> tuple[list[BlockStage], bool]:
    """(block list, setter replacing it) per stage of `model`, and whether blocks come in shift pairs."""
    family = _depth_family(model)
    return family.depth_stages(model), family.paired_blocks


def _depth_family(model: PreTrainedModel) -> Family:
    family = find_family(model)
    if family is None or not family.depth_pruning:
        supported = family_names(lambda f: f.depth_pruning)
        raise UnsupportedFamilyError(model.config.model_type, "depth pruning", supported)
    return family


def kept_depth(depth: int, ratio: float) -> int:
    """Blocks a stage of `depth` keeps when `ratio` of them go (rounded, never below one)."""
    if ratio <= 0:
        return depth
    return min(depth, max(1, int(depth * (1.0 - ratio) + 0.5)))


@torch.no_grad()
def block_influence(model: PreTrainedModel, batches: Iterable[torch.Tensor]) -> list[list[float]]:
    """Per stage, per block: mean 1 - cos(input, output) of its hidden states over `batches`."""
    family = _depth_family(model)
    stages = [blocks for blocks, _ in family.depth_stages(model)]
    sums = [[0.0] * len(blocks) for blocks in stages]
    n = 0
    handles = []
    for s, blocks in enumerate(stages):
        for b, block in enumerate(blocks):

            def hook(mod, args, out, s=s, b=b):
                x = args[0]
                y = out[0] if isinstance(out, tuple) else out
                if x.shape != y.shape:  # a block that also resamples: not comparable, keep it
                    sums[s][b] += 1.0
                    return
                cos = F.cosine_similarity(x.flatten(1).float(), y.flatten(1).float(), dim=1)
                sums[s][b] += float((1.0 - cos).mean())

            handles.append(block.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            family.model_logits(model, x)  # the hooks record what each block does
            n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise VitshrinkError("depth pruning got no sample inputs")
    return [[v / n for v in stage] for stage in sums]


def drop_blocks(
    model: PreTrainedModel, ratio: float, batches: Iterable[torch.Tensor]
) -> dict[str, list[int]]:
    """Remove `ratio` of the blocks of every stage of `model` in place and rewrite its config.

    Returns {"kept": per-stage depths, "removed": per-stage indices removed}. The result reloads with
    ``from_pretrained`` from its saved directory (block lists and config depths agree).
    """
    if not 0.0 <= ratio < 1.0:
        raise VitshrinkError(f"depth ratio must be in [0, 1), got {ratio}")
    stages, paired = _stages(model)
    if ratio == 0:
        return {"kept": [len(b) for b, _ in stages], "removed": [[] for _ in stages]}
    influence = block_influence(model, batches)
    kept_depths, removed = [], []
    for (blocks, replace), scores in zip(stages, influence):
        depth = len(blocks)
        n_drop = depth - kept_depth(depth, ratio)
        if paired:
            # (plain, shifted) pairs ranked by the sum of their blocks' influence; an odd count also
            # takes the stage's last block, the only single removal that shifts no kept block's parity
            pairs = [[i, i + 1] for i in range(0, depth - 1, 2)]
            ranked = sorted(pairs, key=lambda g: scores[g[0]] + scores[g[1]])
            drop = {i for g in ranked[: n_drop // 2] for i in g}
            if n_drop % 2:
                drop.add(max(set(range(depth)) - drop))
        else:
            drop = set(sorted(range(depth), key=lambda i: scores[i])[:n_drop])
        kept = [blocks[i] for i in range(depth) if i not in drop]
        replace(nn.ModuleList(kept))
        kept_depths.append(len(kept))
        removed.append(sorted(drop))
    _rewrite_depths(model, kept_depths)
    return {"kept": kept_depths, "removed": removed}


def _rewrite_depths(model: PreTrainedModel, depths: list[int]) -> None:
    _depth_family(model).set_depths(model.config, depths)
