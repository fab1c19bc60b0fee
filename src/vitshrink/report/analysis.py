"""Numbers derived from the stages: ratios against the original, the LPCVC-style score, the Pareto front."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .results import StageResult


@dataclass(frozen=True)
class Comparison:
    """One stage measured against the original (first) stage; None where an input is missing."""

    speedup: float  # original p50 / stage p50
    size_reduction: float | None  # original size / stage size
    params_reduction: float | None  # original params / stage params
    metric_delta: float  # stage metric - original metric (fraction; x100 for points)
    dice_delta: float | None
    score: float  # metric / latency p50 in ms (LPCVC-style: accuracy per millisecond)
    score_ratio: float  # score / original score
    pareto: bool  # not dominated on (higher metric, lower latency)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def lpcvc_score(metric: float, latency_ms: float) -> float:
    """Metric per millisecond of p50 latency, the LPCVC ranking idea: accuracy that costs less time wins."""
    return metric / latency_ms


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of (latency, metric) points that no other point dominates.

    A point is dominated when another is at least as fast and at least as good, and strictly better in
    one of the two. Returned sorted by latency, the order in which the front is drawn. O(n^2) is fine:
    a run has a handful of stages.
    """

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def compare(stages: Sequence[StageResult]) -> list[Comparison]:
    """Compare every stage (the first included, all ratios 1) with the first stage."""
    ref = stages[0]
    ref_score = lpcvc_score(ref.metric, ref.p50)
    front = set(pareto_front([(s.p50, s.metric) for s in stages]))
    out = []
    for i, s in enumerate(stages):
        score = lpcvc_score(s.metric, s.p50)
        out.append(
            Comparison(
                speedup=ref.p50 / s.p50,
                size_reduction=_ratio(ref.size_mb, s.size_mb),
                params_reduction=_ratio(ref.params, s.params),
                metric_delta=s.metric - ref.metric,
                dice_delta=s.dice - ref.dice if s.dice is not None and ref.dice is not None else None,
                score=score,
                # A zero-metric original gives no meaningful ratio; report it as infinite gain instead
                # of crashing the whole report.
                score_ratio=score / ref_score if ref_score else float("inf"),
                pareto=i in front,
            )
        )
    return out
