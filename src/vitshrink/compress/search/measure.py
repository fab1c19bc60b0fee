"""Measurement of one candidate: cached metrics, budget violations, Pareto fronts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...artifacts import read_json, sha256_file, write_json
from ..context import Context
from ..runner import evaluate_artifact


class _EvalCache:
    """Metrics per (artifact checksum, split, limit) in DIR/evals.json: resume never re-scores."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = read_json(path) if path.exists() else {}

    def get(self, artifact: Path, ctx: Context, split: str, limit: int | None, threads: int | None) -> dict:
        key = f"{sha256_file(artifact)}|{split}|{limit}"
        if key not in self.data:
            self.data[key] = evaluate_artifact(artifact, ctx, split=split, limit=limit, threads=threads)
            write_json(self.path, self.data)
        return self.data[key]


def violations(
    measured: dict[str, Any], budget: dict[str, float], teacher_metric: float, memory_mb: int | None
) -> dict[str, float]:
    """Per-constraint excess (<= 0 means met)."""
    v: dict[str, float] = {}
    if "latency_ms" in budget:
        v["latency_ms"] = measured["p50"] - budget["latency_ms"]
    if "size_mb" in budget:
        v["size_mb"] = measured["size_mb"] - budget["size_mb"]
    if "max_drop" in budget:
        v["max_drop"] = (teacher_metric - measured["metric"]) - budget["max_drop"]
    if memory_mb is not None and measured.get("peak_rss_mb"):
        v["memory_mb"] = measured["peak_rss_mb"] - memory_mb
    return v


def _pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def dominated(a: dict[str, Any]) -> bool:
        return any(
            b["metric"] >= a["metric"]
            and b["p50"] <= a["p50"]
            and (b["metric"] > a["metric"] or b["p50"] < a["p50"])
            for b in rows
        )

    return [r for r in rows if not dominated(r)]


def _pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates no other beats on metric, latency and size at once (feasible or not)."""

    def beats(b: dict[str, Any], a: dict[str, Any]) -> bool:
        ge = b["metric"] >= a["metric"] and b["p50"] <= a["p50"] and b["size_mb"] <= a["size_mb"]
        return ge and (b["metric"] > a["metric"] or b["p50"] < a["p50"] or b["size_mb"] < a["size_mb"])

    return [a for a in rows if not any(beats(b, a) for b in rows)]
