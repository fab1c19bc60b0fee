"""Which candidate the budget search runs next: a trained student's cheap variants before a new student.

Pure (trial records in, ordered candidates out), so the order is unit-tested with fake metrics.

A candidate is (student, prune_ratio, quant, extend[, resolution]); a *node* is (student, extend), one trained
network: the teacher itself for 'none', and for extend k >= 2 the same student trained on k times the
planned images (`extension`). Stages cost very different amounts (a distillation minutes, a prune
recovery tens of seconds, a quantization seconds), so `queue` lists

1. the untried variants of every trained node, the most accurate node first: prune ratios ascending
   (ratio 0 needs no recovery) and, per ratio, the quant modes in the order the budget's binding
   constraint favours (`quant_order`);
2. then the first variant of each student not trained yet, in the space's order.

Variants that cannot win are skipped, each with its reason: weights alone over the size budget, a less
pruned variant of the same node already meeting the budget, a node or prune ratio far below the metric
`max_drop` needs, a student whose distillation was stopped early or failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Params = dict[str, Any]

# Bytes per parameter of a final file at least (int8 modes: 1); a lower bound, so a skip is safe.
QUANT_BYTES = {"none": 4.0, "fp16": 2.0}
# Per binding constraint, the quant modes to try first. A size budget favours the modes that make every
# weight int8 (static / mixed quantize the convs too; `int8` keeps the best fit of all three) and fp16
# weights; a latency budget the fastest (dynamic int8); accuracy alone the exact modes.
QUANT_ORDER = {
    "size_mb": ("int8", "int8-static", "int8-mixed", "fp16", "int8-dynamic", "none"),
    "latency_ms": ("int8", "int8-dynamic", "int8-mixed", "int8-static", "fp16", "none"),
    "max_drop": ("none", "fp16", "int8", "int8-static", "int8-mixed", "int8-dynamic"),
}
# A node (or prune ratio) whose best candidate is this far below what max_drop needs is not worth its
# other variants: quantizing or pruning it further does not add accuracy.
WEAK_MARGIN = 0.02
MAX_EXTEND = 8  # at most 8x the planned training for the extra-time run


@dataclass(frozen=True)
class Tried:
    """One finished trial as the scheduler sees it."""

    number: int
    params: Params
    state: str  # complete | pruned | failed
    metric: float | None = None  # measured (complete) or last reported (pruned)
    violations: dict[str, float] = field(default_factory=dict)
    stage: str | None = None  # pruned: the stage it was stopped in; failed: the error
    train_s: float | None = None  # seconds its own training stage took (None: reused or none)

    @property
    def feasible(self) -> bool:
        return self.state == "complete" and all(v <= 0 for v in self.violations.values())


@dataclass
class Queue:
    todo: list[Params]
    skipped: list[tuple[Params, str]]


def key(p: Params) -> tuple[str, float, str, int, Any]:
    return (p["student"], float(p["prune_ratio"]), p["quant"], int(p.get("extend", 0)), p.get("resolution"))


def node_of(p: Params) -> tuple[str, int]:
    return (p["student"], int(p.get("extend", 0)))


def distance(v: dict[str, float], budget: dict[str, float], memory_mb: float | None = None) -> float:
    """Total excess relative to each limit: how far a candidate is from meeting the budget."""
    scale = {**budget, "memory_mb": memory_mb or 1}
    scale["max_drop"] = max(budget.get("max_drop", 0.0), 0.01)
    return sum(max(0.0, x) / max(scale[k], 1e-9) for k, x in v.items())


def steering(budget: dict[str, float], tried: list[Tried]) -> str:
    """The constraint that orders the quant modes: the size or latency limit measured candidates miss
    most often, else the first such limit in the budget, else accuracy."""
    misses = {k: sum(t.violations.get(k, 0) > 0 for t in tried) for k in ("size_mb", "latency_ms")}
    if any(misses.values()):
        return max(misses, key=lambda k: misses[k])
    return next((k for k in ("size_mb", "latency_ms") if k in budget), "max_drop")


def quant_order(modes: list[str], budget: dict[str, float], tried: list[Tried]) -> list[str]:
    order = QUANT_ORDER[steering(budget, tried)]
    return sorted(modes, key=lambda m: order.index(m) if m in order else len(order))


def weights_mb(n_params: int, ratio: float, quant: str) -> float:
    """Lower bound of the file size: a width-pruned layer keeps at least (1 - ratio)^2 of its weights."""
    return n_params * (1 - ratio) ** 2 * QUANT_BYTES.get(quant, 1.0) / 2**20


def queue(
    students: list[str],
    ratios: list[float],
    modes: list[str],
    budget: dict[str, float],
    teacher_metric: float,
    n_params: dict[str, int],
    tried: list[Tried],
    *,
    resolutions: Sequence[Any] = (None,),
) -> Queue:
    """The candidates to run next, in order, and the ones skipped with why (see the module doc)."""
    done = {key(t.params) for t in tried}
    by_node: dict[tuple[str, int], list[Tried]] = {}
    for t in tried:
        by_node.setdefault(node_of(t.params), []).append(t)
    need = teacher_metric - budget["max_drop"] if "max_drop" in budget else None
    quants = quant_order(modes, budget, tried)
    todo: list[Params] = []
    skipped: list[tuple[Params, str]] = []

    teacher = {("none", 0)} if "none" in students else set()  # trained already, when it is a candidate

    def trained(n: tuple[str, int]) -> bool:
        ts = by_node.get(n, [])
        return n in teacher or any(
            t.state == "complete" or (t.state == "pruned" and t.stage not in (None, "distill")) for t in ts
        )

    def best(ts: list[Tried]) -> Tried | None:
        done_ts = [t for t in ts if t.state == "complete" and t.metric is not None]
        return max(done_ts, key=lambda t: t.metric or 0.0) if done_ts else None

    def variants(student: str, extend: int) -> list[Params]:
        rs = sorted(ratios)
        if student == "none" and extend:  # the teacher's extra time goes to recovery: pruned variants only
            rs = [r for r in rs if r > 0]
        base = [
            {"student": student, "prune_ratio": r, "quant": q, "extend": extend} for r in rs for q in quants
        ]
        if list(resolutions) == [None]:
            return base
        return [{**p, "resolution": res} for p in base for res in resolutions]

    def why_not(p: Params, ts: list[Tried]) -> str | None:
        """Why variant p of a node with trials ts cannot win (None: worth running)."""
        if "size_mb" in budget:
            mb = weights_mb(n_params.get(p["student"], 0), p["prune_ratio"], p["quant"])
            if mb > budget["size_mb"]:
                return f"its weights alone take at least {mb:.2f} MB > size_mb {budget['size_mb']:g}"
        for t in ts:
            if t.feasible and t.params["prune_ratio"] < p["prune_ratio"]:
                return f"the less pruned trial {t.number} (prune {t.params['prune_ratio']:g}) already meets the budget"
        if need is not None:
            b = best(ts)
            if b is not None and b.metric is not None and b.metric < need - WEAK_MARGIN:
                return f"this student's best, trial {b.number}, scores {b.metric:.4f}, far below the {need:.4f} max_drop needs"
            at = best(
                [t for t in ts if t.params["prune_ratio"] <= p["prune_ratio"] and t.params["prune_ratio"] > 0]
            )
            if at is not None and at.metric is not None and at.metric < need - WEAK_MARGIN:
                return f"prune {at.params['prune_ratio']:g} already loses too much (trial {at.number}: {at.metric:.4f})"
        return None

    nodes = sorted(
        teacher | {n for n in by_node if trained(n)},
        key=lambda n: -((best(by_node.get(n, [])) or Tried(-1, {}, "", teacher_metric)).metric or 0.0),
    )
    for n in nodes:
        ts = by_node.get(n, [])
        for p in variants(*n):
            if key(p) in done:
                continue
            reason = why_not(p, ts)
            if reason is None:
                todo.append(p)
            else:
                skipped.append((p, reason))
    for s in students:
        n = (s, 0)
        if s == "none" or trained(n):
            continue
        ts = by_node.get(n, [])
        stopped = next((t for t in ts if t.state in ("pruned", "failed")), None)
        first = next((p for p in variants(*n) if key(p) not in done), None)
        if first is None:
            continue
        if stopped is not None:
            what = "was stopped early" if stopped.state == "pruned" else f"failed ({stopped.stage})"
            skipped.append((first, f"its distillation {what} in trial {stopped.number}"))
            continue
        fits = next((p for p in variants(*n) if key(p) not in done and why_not(p, ts) is None), None)
        if fits is None:
            skipped.append((first, why_not(first, ts) or "no variant can meet the budget"))
        else:
            todo.append(fits)
    return Queue(todo, skipped)


def extension(
    tried: list[Tried],
    budget: dict[str, float],
    left_s: float,
    variant_s: float,
    memory_mb: float | None = None,
) -> tuple[Params, str, int] | None:
    """The most promising candidate's training again on k x the planned images, k as large as the
    time left allows (2..MAX_EXTEND): (params, why, that candidate's trial), or None when nothing
    trainable fits.

    Promise: candidates meeting the budget by metric, then the rest by how far they miss it. The
    teacher without pruning has nothing to train; its pruned variants extend their recovery instead.
    """
    done = [t for t in tried if t.state == "complete" and t.metric is not None]
    ranked = sorted(
        done, key=lambda t: (not t.feasible, distance(t.violations, budget, memory_mb), -(t.metric or 0.0))
    )
    for t in ranked:
        p = t.params
        if p["student"] == "none" and p["prune_ratio"] == 0:
            continue
        # the base training's seconds: the distillation (or the teacher's recovery) at extend 0
        same = [
            u
            for u in tried
            if u.params["student"] == p["student"]
            and (p["student"] != "none" or u.params["prune_ratio"] == p["prune_ratio"])
        ]
        base = [u.train_s for u in same if u.train_s and not u.params.get("extend")]
        if not base:
            continue
        k = min(MAX_EXTEND, int(max(0.0, left_s - variant_s) // base[0]))
        if k < 2 or k <= max(int(u.params.get("extend", 0)) for u in same):
            continue
        what = "distillation" if p["student"] != "none" else "prune recovery"
        return (
            {**p, "extend": k},
            f"trial {t.number} is the most promising candidate left; its {what} again on {k}x the "
            f"planned images ({base[0]:.0f} s at 1x)",
            t.number,
        )
    return None
