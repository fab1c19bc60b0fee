"""Depth or width? Pick the split of a pruning budget that runs fastest (`prune`'s default, and
`--depth-ratio auto`).

At high ratios uniform width pruning leaves the op count unchanged while every op shrinks, so fixed
per-op costs dominate: DeiT-S at width 0.75 runs 7.0x faster for 13.9x fewer MACs (ONNX Runtime, 2
threads), while dropping half its blocks and half its widths reaches 10.7x for 14.6x fewer MACs
(benchmarks/prune_speed.py). For a budget (parameters or MACs), each candidate depth ratio gets the
width ratio that meets the same budget; candidates are timed on this machine and the fastest kept
(near ties go to the candidate with fewer blocks removed, which keeps more of the trained network;
so the default stays widths-only unless dropping blocks measures faster at the same MACs). Written here because
Torch-Pruning prunes channels, not layers, and has no notion of a latency-optimal shape.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from ..bench.timing import within_speed_tie
from ..errors import VitshrinkError
from ..models.families import GRANULARITIES
from .core import count_macs, count_params
from .depth import drop_blocks
from .target import fill_budget, pruned_architecture, ratio_for_target

DEPTH_CANDIDATES = (0.0, 0.25, 0.5)
OVERSHOOT = 0.9  # a depth cut alone may not remove more than the budget asks (10% slack)


def choose_shape(
    model: PreTrainedModel,
    example_inputs: torch.Tensor,
    samples: Sequence[torch.Tensor],
    latencies_ms: Callable[[list[PreTrainedModel]], list[float]],
    *,
    target_params: int | None = None,
    target_macs: int | None = None,
    depths: Sequence[float] = DEPTH_CANDIDATES,
    granularity: Sequence[str] = GRANULARITIES,
    round_to: int = 8,
    ratio: float | None = None,
) -> tuple[float, float, float, list[dict[str, Any]]]:
    """(depth_ratio, width_ratio, mlp_ratio, candidates table) meeting the one budget, fastest first.

    `samples` rank blocks for depth pruning (real images where available); `latencies_ms` times the
    candidate architectures together (randomly initialised from their configs: speed does not depend
    on weights; timed in turn, so drift cannot pick the winner).
    `ratio`: the width ratio the budget came from; the depth-0 candidate is exactly that width cut.
    Nothing is timed when only depth 0 remains (a stage too shallow to lose a block).
    """
    if (target_params is None) == (target_macs is None):
        raise VitshrinkError("depth_ratio='auto' needs exactly one of a parameter or a MAC budget")
    measure = count_params if target_params is not None else (lambda m: count_macs(m, example_inputs))
    target = target_params if target_params is not None else target_macs
    budget_key = "params" if target_params is not None else "macs"
    budget = {"target_params": target_params, "target_macs": target_macs}

    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, ...]] = set()
    for d in depths:
        shallow = copy.deepcopy(model)
        kept = drop_blocks(shallow, d, samples)["kept"]  # depth 0: every stage's full depth
        key = tuple(kept)
        if key in seen:  # e.g. 0.25 of 2-block stages keeps both: the same network as depth 0
            continue
        seen.add(key)
        if measure(shallow) < OVERSHOOT * target:
            continue  # dropping blocks alone already removes far more than asked
        if d == 0 and ratio is not None:
            w = m = ratio
        else:
            try:
                w = ratio_for_target(
                    shallow, example_inputs, **budget, granularity=granularity, round_to=round_to
                )
            except VitshrinkError:
                continue  # this depth cannot reach the budget by widths alone
            m = fill_budget(shallow, w, example_inputs, **budget, granularity=granularity, round_to=round_to)
        arch = pruned_architecture(shallow, w, granularity=granularity, round_to=round_to, ratio_mlp=m)
        rows.append(
            {
                "depth_ratio": d,
                "width_ratio": round(w, 4),
                "mlp_ratio": m,
                "kept_depths": kept,
                "params": count_params(arch),
                "macs": count_macs(arch, example_inputs),
                "arch": arch,
            }
        )
    if not rows:
        raise VitshrinkError(f"no depth/width split reaches the budget {target:,}")
    archs = [r.pop("arch") for r in rows]
    times = latencies_ms(archs) if len(rows) > 1 else [None]  # timed only when there is a choice
    for r, t in zip(rows, times):
        r["latency_ms"] = round(t, 3) if t is not None else None
    if len(rows) == 1:
        return rows[0]["depth_ratio"], rows[0]["width_ratio"], rows[0]["mlp_ratio"], rows
    # a candidate that stays well under the budget is not at the same size: it would win on speed
    # by being smaller, so it competes only when no candidate fills the budget
    full = [r for r in rows if r[budget_key] >= OVERSHOOT * target] or rows
    fastest = min(r["latency_ms"] for r in full)
    best = min(
        (r for r in full if within_speed_tie(r["latency_ms"], fastest)), key=lambda r: r["depth_ratio"]
    )
    rows.sort(key=lambda r: r["latency_ms"])
    return best["depth_ratio"], best["width_ratio"], best["mlp_ratio"], rows
