"""One search's shared state: the study and its trials as the scheduler sees them, and the time
estimates that decide whether the next candidate fits."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..context import Context
from ..devices import DeviceProfile
from ..plan import Plan
from ..schedule import Tried, node_of
from .measure import _EvalCache, violations
from .progress import Progress
from .space import BUDGET_KEYS, Space
from .study_setup import _Clock


@dataclass
class SearchRun:
    """Everything a trial and the budget loop share."""

    ctx: Context
    out: Path
    study: Any
    space: Space
    plan: Plan
    clock: _Clock
    progress: Progress
    budget: dict[str, float]
    teacher_metric: float
    profile: DeviceProfile
    threads: int | None
    split: str
    eval_limit: int | None
    bench_runs: int
    bench_rounds: int
    time_budget: float
    evals: _EvalCache
    sizes: dict[str, int]
    rates: dict[str, Any]
    interrupted: list[int]
    pending: dict[str, Any] = field(default_factory=dict)  # why the next trial runs (and what it extends)
    worker: Any = None  # shared.Worker in a shared study (compress --storage), else None
    artifacts: Any = None  # an Optuna artifact store (compress --artifacts), else None
    latency_wait_s: float = 600.0  # how long a trial waits for a measure-worker's latency

    def lost(self) -> list[int]:
        """Trials that do not count: left RUNNING by a killed run (marked failed on resume), or, in a
        shared study, failed by the heartbeat (their candidate was enqueued once more)."""
        import optuna

        if self.worker is None:
            return list(self.interrupted)
        fail = (optuna.trial.TrialState.FAIL,)
        stale = [
            t.number
            for t in self.study.get_trials(deepcopy=False, states=fail)
            if "error" not in t.user_attrs and "duplicate_of" not in t.user_attrs
        ]
        return sorted(set(self.interrupted) | set(stale))

    @property
    def reserve(self) -> float:
        return self.plan.final_s  # the final test-split measurement and report after the search

    def counted(self) -> list[Any]:
        """Finished trials, those a killed run left behind excluded."""
        import optuna

        states = (
            optuna.trial.TrialState.COMPLETE,
            optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.FAIL,
        )
        skip = set(self.lost())
        return [t for t in self.study.get_trials(deepcopy=False, states=states) if t.number not in skip]

    def has_candidate(self) -> bool:
        import optuna

        done = (optuna.trial.TrialState.COMPLETE,)
        return any("measured" in t.user_attrs for t in self.study.get_trials(deepcopy=False, states=done))

    def history(self) -> list[Tried]:
        m = self.profile.memory_mb
        return [_tried(t, self.budget, self.teacher_metric, m) for t in self.counted() if t.params]

    def mean_seconds(self, kind: str, default: float) -> float:
        """The last three trials' mean time whose dearest stage was `kind`, or the default."""
        xs = [t.user_attrs["seconds"] for t in self.counted() if t.user_attrs.get("cost_kind") == kind][-3:]
        return statistics.fmean(xs) if xs else default

    def quant_seconds(self) -> float:
        return self.mean_seconds("quantize", float(self.rates.get("trial_overhead_s", self.plan.trial_s)))

    def estimate(self, p: dict[str, Any], tried: list[Tried]) -> float:
        """Seconds candidate p should take: its variant (quantize, or prune + recovery) plus a
        distillation when its student is not trained yet."""
        same_node = [t for t in tried if node_of(t.params) == node_of(p)]
        cost = self.quant_seconds()
        if p["prune_ratio"] > 0 and not any(
            t.params["prune_ratio"] == p["prune_ratio"] and t.state != "failed" for t in same_node
        ):
            cost = self.mean_seconds("prune", self.plan.trial_s)
        trained = (
            p["student"] == "none" and not p.get("extend") or any(t.state != "failed" for t in same_node)
        )
        if not trained:
            cost += _distill_estimate(p, self.space, self.plan, self.rates, tried)
        return cost

    def left(self) -> float:
        """Seconds left for trials (the final measurement's reserve kept)."""
        return self.time_budget - self.reserve - self.clock.elapsed()

    def record(self, trial: Any, measured: dict[str, Any]) -> dict[str, float]:
        """Store a candidate's measurements; constraints guide the sampler, the final choice recomputes
        them under the current budget."""
        trial.set_user_attr("measured", measured)
        v = violations(measured, self.budget, self.teacher_metric, self.profile.memory_mb)
        for k in BUDGET_KEYS + ("memory_mb",):
            trial.set_constraint(k, v.get(k, 0.0))
        return v


def _tried(t: Any, budget: dict[str, float], teacher_metric: float, memory_mb: int | None) -> Tried:
    """An Optuna trial as the scheduler sees it."""
    import optuna

    state = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned"}.get(
        t.state, "failed"
    )
    m = t.user_attrs.get("measured")
    pruned = t.user_attrs.get("pruned") or {}
    return Tried(
        number=t.number,
        params={"extend": 0, **t.params},
        state=state,
        metric=m["metric"] if m else pruned.get("value"),
        violations=violations(m, budget, teacher_metric, memory_mb) if m and state == "complete" else {},
        stage=pruned.get("stage") if state == "pruned" else t.user_attrs.get("error"),
        train_s=t.user_attrs.get("train_s"),
    )


def _distill_estimate(
    p: dict[str, Any], space: Space, plan: Plan, rates: dict[str, Any], tried: list[Tried]
) -> float:
    """Seconds to distil p's student: the planned epochs over the subset at the measured rates (the
    first one also computes the teacher's logits); an extra-time run scales the student's last one."""
    k = int(p.get("extend", 0))
    if k:
        base = [
            t.train_s
            for t in tried
            if t.params["student"] == p["student"] and t.train_s and not t.params["extend"]
        ]
        if base:
            return k * base[0]
    train, ev = rates.get("train_s") or {}, rates.get("eval_s") or {}
    d = space.distill
    n, e, v = d.get("limit", plan.subset), d.get("epochs", plan.epochs), d.get("val_limit", plan.val_limit)
    mean_train = statistics.fmean(train.values()) if train else 0.0
    mean_eval = statistics.fmean(ev.values()) if ev else 0.0
    s = p["student"]
    first = not any(t.train_s for t in tried if t.params["student"] != "none")
    return max(1, k) * e * (n * train.get(s, mean_train) + v * ev.get(s, mean_eval)) + (
        plan.teacher_cache_s if first else 0.0
    )
