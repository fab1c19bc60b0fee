"""Find the pruning ratio that meets a budget: parameters, MACs or latency.

A pruned model's architecture is fully determined by its rewritten config (``prune_model`` checks
that), so candidates are measured on models built from the candidate config, not on pruned deep
copies: same shapes, same MACs, same latency, no weight copies and no graph surgery per step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import PreTrainedModel

from ..errors import VitshrinkError
from ..models.families import GRANULARITIES
from .core import count_macs, count_params, pruned_config

LatencyTable = str | os.PathLike | Mapping[str | float, float]


def pruned_architecture(
    model: PreTrainedModel,
    ratio: float,
    *,
    granularity: Sequence[str] = GRANULARITIES,
    round_to: int = 8,
    device: str | torch.device = "cpu",
    ratio_mlp: float | None = None,
) -> PreTrainedModel:
    """A randomly initialised model with the architecture `prune_model(model, ratio=...)` produces."""
    cfg = pruned_config(model, ratio, granularity=granularity, round_to=round_to, ratio_mlp=ratio_mlp)
    with torch.device(device):
        return type(model)(cfg).eval()


def load_latency_table(table: LatencyTable) -> list[tuple[float, float]]:
    """(ratio, latency_ms) pairs sorted by ratio, from a JSON file or a mapping {"0.5": 12.3, ...}."""
    if not isinstance(table, Mapping):
        from ..safeio import read_json_limited

        # bounded: a regular file of at most 1 MiB (`--latency-table /dev/zero` must fail, not fill memory)
        table = read_json_limited(table, what="latency table", max_bytes=1 << 20)
    try:
        pts = sorted((float(r), float(ms)) for r, ms in table.items())
    except (TypeError, ValueError, AttributeError):
        raise VitshrinkError(
            'latency table must map ratio -> latency_ms, e.g. {"0.0": 40.1, "0.5": 22.0}'
        ) from None
    if len(pts) < 2:
        raise VitshrinkError("latency table needs at least two ratios")
    return pts


def ratio_from_latency_table(table: LatencyTable, target_latency_ms: float) -> float:
    """Smallest ratio whose linearly interpolated latency is <= target (measured on another device)."""
    pts = load_latency_table(table)
    if pts[0][1] <= target_latency_ms:
        return pts[0][0]
    for (r0, l0), (r1, l1) in zip(pts, pts[1:]):
        if l1 <= target_latency_ms < l0:
            return r0 + (r1 - r0) * (l0 - target_latency_ms) / (l0 - l1)
    best = min(ms for _, ms in pts)
    raise VitshrinkError(
        f"target latency {target_latency_ms} ms is below every entry of the latency table (best {best} ms)"
    )


def ratio_for_target(
    model: PreTrainedModel,
    example_inputs: torch.Tensor,
    target_params: int | None = None,
    target_macs: int | None = None,
    measure_latency_ms: Callable[[PreTrainedModel], float] | None = None,
    target_latency_ms: float | None = None,
    *,
    latency_table: LatencyTable | None = None,
    granularity: Sequence[str] = GRANULARITIES,
    round_to: int = 8,
    max_ratio: float = 0.95,
    tol: float = 0.005,
) -> float:
    """Smallest pruning ratio whose pruned model meets the one budget given.

    Budgets: `target_params`, `target_macs`, or `target_latency_ms` with either `measure_latency_ms`
    (called on candidate models, e.g. ONNX Runtime or torch timing) or `latency_table` (JSON
    {"ratio": latency_ms} measured on the deployment device; interpolated, no model is built).
    Bisection on the ratio; widths move in steps, so the answer is the left edge of the first step
    that fits, within `tol`.
    """
    given = [t is not None for t in (target_params, target_macs, target_latency_ms)]
    if sum(given) != 1:
        raise VitshrinkError("give exactly one of target_params, target_macs, target_latency_ms")
    if target_latency_ms is not None:
        if latency_table is not None:
            return ratio_from_latency_table(latency_table, target_latency_ms)
        if measure_latency_ms is None:
            raise VitshrinkError("target_latency_ms needs measure_latency_ms or a latency_table")

    def metric(ratio: float) -> float:
        if target_params is not None:  # shapes only: build on the meta device, no memory, no init cost
            return count_params(
                pruned_architecture(model, ratio, granularity=granularity, round_to=round_to, device="meta")
            )
        cand = pruned_architecture(
            model, ratio, granularity=granularity, round_to=round_to, device=example_inputs.device
        )
        if target_macs is not None:
            return count_macs(cand, example_inputs)
        return float(measure_latency_ms(cand))

    target = next(t for t in (target_params, target_macs, target_latency_ms) if t is not None)
    if metric(0.0) <= target:
        return 0.0
    if metric(max_ratio) > target:
        raise VitshrinkError(
            f"budget {target} is out of reach: even ratio {max_ratio} gives {metric(max_ratio):.4g}"
        )
    return _smallest_fitting(lambda r: metric(r) <= target, max_ratio, tol)


def _smallest_fitting(fits: Callable[[float], bool], hi: float, tol: float) -> float:
    """Bisection on [0, hi] where fits(0) is False and fits(hi) is True: the left edge of the first
    step that fits, within `tol`, rounded up to 1e-4 so it stays on the side that fits."""
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return math.ceil(hi * 1e4) / 1e4


def fill_budget(
    model: PreTrainedModel,
    ratio: float,
    example_inputs: torch.Tensor,
    *,
    target_params: int | None = None,
    target_macs: int | None = None,
    granularity: Sequence[str] = GRANULARITIES,
    round_to: int = 8,
    tol: float = 0.005,
) -> float:
    """The smallest MLP ratio (<= `ratio`) that keeps the model pruned at `ratio` within the budget.

    Heads go in whole heads (Swin-T's 3 stage-0 heads: widths 96, 64 or 32 only), so the uniform ratio
    that first meets a budget can land far below it: at depths [1, 1, 3, 1] a 2.85M budget gives
    2.36M. MLP widths move in steps of `round_to`, so giving part of the cut back to them fills the
    budget (2.85M: MLP ratio 0.33 instead of 0.5) and keeps more of the trained network.
    """
    if "mlp" not in granularity or ratio <= 0:
        return ratio
    if (target_params is None) == (target_macs is None):
        raise VitshrinkError("fill_budget needs exactly one of target_params, target_macs")

    def fits(r_mlp: float) -> bool:
        arch = pruned_architecture(
            model,
            ratio,
            granularity=granularity,
            round_to=round_to,
            ratio_mlp=r_mlp,
            device="meta" if target_params is not None else example_inputs.device,
        )
        if target_params is not None:
            return count_params(arch) <= target_params
        return count_macs(arch, example_inputs) <= target_macs

    if fits(0.0):
        return 0.0
    return min(ratio, _smallest_fitting(fits, ratio, tol))  # fits(ratio) holds: it met the budget
