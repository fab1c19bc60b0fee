"""Sensitivity analysis: rank weight nodes by the output error each causes when quantized alone, then
fall the most sensitive back to float until the metric drop holds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..progress import progress
from .builders import Builder
from .context import Ctx
from .measure import compare

MAX_SENSITIVITY_UNITS = 32  # above this many weight nodes, rank and fall back whole block parts
SENSITIVITY_SAMPLES = 32  # samples used to rank nodes; the final check uses all calibration data

_BLOCK = re.compile(r"(.*(?:layers?|blocks?|stages?)[._/]\d+(?:[._/]\d+)?)[/._]([A-Za-z_]+)")


def groups(names: list[str]) -> list[list[str]]:
    """Units of fallback: single nodes, or (for big models) the attention / MLP weights of one block,
    which keeps the number of one-at-a-time builds near 2x the depth."""
    if len(names) <= MAX_SENSITIVITY_UNITS:
        return [[n] for n in names]
    groups: dict[str, list[str]] = {}
    for n in names:
        m = _BLOCK.match(n)
        groups.setdefault(f"{m.group(1)}/{m.group(2)}" if m else n, []).append(n)
    return list(groups.values())


def rank_sensitivity(builder: Builder, ctx: Ctx) -> list[tuple[list[str], float]]:
    """(group, output error with only that group quantized), most sensitive first (calibration subset)."""
    scores = []
    for group in progress(groups(builder.candidates), desc="sensitivity", disable=ctx.quiet):
        path = builder.build(only=group)
        # streamed batch by batch: nothing but the running sums is kept per candidate
        scores.append((group, compare(path, ctx.batches, ctx.ref, SENSITIVITY_SAMPLES)["rel_error"]))
        path.unlink(missing_ok=True)
    return sorted(scores, key=lambda gs: gs[1], reverse=True)


def guarantee(builder: Builder, ctx: Ctx, max_drop: float, path: Path, metric: float) -> dict[str, Any]:
    """Fall back the most sensitive nodes to float until base - metric <= max_drop (fewest groups)."""
    base = ctx.base_metric
    ok = lambda m: m is not None and base - m <= max_drop + 1e-12  # noqa: E731
    result = {"path": path, "metric": metric, "fallback": {}}
    if ok(metric) or ctx.ref is None:
        return result
    ctx.say(
        f"{builder.kind}: drop {base - metric:.4f} > {max_drop}; ranking {len(builder.candidates)} nodes by sensitivity"
    )
    order = rank_sensitivity(builder, ctx)
    tried: dict[int, tuple[Path, float]] = {}

    def excluded(k: int) -> list[str]:
        return [n for group, _ in order[:k] for n in group]

    def attempt(k: int) -> bool:
        if k not in tried:
            p = builder.build(excluded=excluded(k))
            tried[k] = (p, ctx.metric(p))
        return ok(tried[k][1])

    # Exponential then binary search for the smallest k that holds; k = all means a float model.
    lo, hi, k = 0, len(order), 1
    while k < len(order):
        if attempt(k):
            hi = k
            break
        lo, k = k, k * 2
    if hi == len(order) and not attempt(hi):
        result["warning"] = "even the float model misses max_drop under eval_fn (noisy metric?)"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    p, m = tried[hi]
    fallback = {n: round(score, 5) for group, score in order[:hi] for n in group}
    result.update(path=p, metric=m, fallback=fallback)
    ctx.say(f"{builder.kind}: {len(fallback)} node(s) back to float -> drop {base - m:.4f}")
    return result
