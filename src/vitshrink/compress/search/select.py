"""Selection and summary: the chosen candidate, the Pareto front, what bound the result, each family's
best, what the extra time bought."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...artifacts import read_json
from ...errors import VitshrinkError
from ..context import Context
from ..devices import DeviceProfile
from ..plan import Plan
from ..schedule import distance
from .measure import _pareto, _pareto_front, violations
from .space import BUDGET_KEYS, Space


def _student_families(ctx: Context, space: Space) -> dict[str, str]:
    """Family name of each student label ('none': the teacher's own, marked as the teacher)."""
    from ...models.families import find_family
    from ...models.presets import PRESETS

    out: dict[str, str] = {}
    for label, opts in space.students.items():
        if opts is None:
            out[label] = f"{ctx.meta.get('family') or 'teacher'} (the teacher)"
            continue
        name = str(opts["student"])
        if name in PRESETS:
            out[label] = PRESETS[name].family
        else:
            cfg = Path(name) / "config.json"
            fam = find_family(read_json(cfg).get("model_type", "")) if cfg.is_file() else None
            out[label] = fam.name if fam is not None else "custom"
    return out


def _family_verdict(
    rows: list[dict[str, Any]], families: dict[str, str], chosen: dict[str, Any]
) -> dict[str, Any]:
    """Each family's best candidate (meeting the budget first, then the closest) and the margin by
    which the chosen one's family beat the next family."""

    def rank(r: dict[str, Any]) -> tuple[bool, float, float]:
        return (not r["feasible"], r["distance"] if not r["feasible"] else 0.0, -r["metric"])

    best: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=rank):
        best.setdefault(families.get(r["params"]["student"], "custom"), r)
    by_family = {
        f: {k: r[k] for k in ("number", "params", "metric", "p50", "size_mb", "feasible")}
        for f, r in best.items()
    }
    winner = families.get(chosen["params"]["student"], "custom")
    others = [r for f, r in best.items() if f != winner]
    line = f"{winner} won (trial {chosen['number']}: {chosen['metric']:.4f}, {chosen['p50']:.2f} ms, {chosen['size_mb']:.2f} MB)"
    if others:
        r = min(others, key=rank)
        f = families.get(r["params"]["student"], "custom")
        line += (
            f"; next best family {f} (trial {r['number']}: {r['metric']:.4f}, {r['p50']:.2f} ms, "
            f"{r['size_mb']:.2f} MB{'' if r['feasible'] else ', over budget'}): "
            f"{(chosen['metric'] - r['metric']) * 100:+.2f} pt"
        )
    else:
        line += "; no other family was measured"
    return {"winner": winner, "by_family": by_family, "line": line}


def _extra_time(finished: list[dict[str, Any]], measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the extra-time runs bought: each one's metric against the candidate it re-trained."""
    metric = {r["number"]: r for r in measured}
    out = []
    for r in finished:
        base = r.get("extends")
        if base is None:
            continue
        before = metric.get(base, {}).get("metric")
        after = r.get("metric") if r.get("state") == "complete" else None
        item = {
            "trial": r["number"],
            "extends": base,
            "factor": r["params"].get("extend"),
            "seconds": r.get("seconds"),
            "metric_before": before,
            "metric_after": after,
        }
        if after is None:
            item["line"] = (
                f"trial {r['number']} (trial {base}'s candidate on {r['params'].get('extend')}x the planned "
                f"training) was stopped: {r.get('reason', 'no result')}"
            )
        elif before is not None:
            item["line"] = (
                f"trial {r['number']}: trial {base}'s candidate on {r['params'].get('extend')}x the planned "
                f"training in "
                f"{(r.get('seconds') or 0) / 60:.1f} min: {before:.4f} -> {after:.4f} ({(after - before) * 100:+.2f} pt)"
            )
        out.append(item)
    return out


def _int8_choice(root: Path) -> dict[str, Any] | None:
    """The chosen recipe's int8 stage: every variant it built and why one was kept (mode int8 only)."""
    state = root / "state.json"
    if not state.is_file():
        return None
    for r in read_json(state).get("stages", []):
        m = r.get("train_metrics") or {}
        if r.get("kind") == "quantize" and r.get("options", {}).get("mode") == "int8" and m.get("candidates"):
            return {"kept": m.get("chosen"), "why": m.get("kept_because"), "variants": m["candidates"]}
    return None


def _binding(
    chosen: dict[str, Any],
    summary: dict[str, Any],
    plan: Plan,
    cap: int | None,
    stopped: str,
    planned_subset: bool,
) -> dict[str, str]:
    """What held the result back: limits that more accurate candidates broke (or the chosen one
    misses), and the time budget (or the trial cap) where it cut the search short."""
    out: dict[str, str] = {}
    better = [r for r in summary["trials"] if r["metric"] > chosen["metric"]]
    for k in list(BUDGET_KEYS) + ["memory_mb"]:
        if chosen["violations"].get(k, 0) > 0:
            out[k] = f"not met: over by {chosen['violations'][k]:.4g}"
            continue
        n = sum(1 for r in better if r["violations"].get(k, 0) > 0)
        if n:
            out[k] = f"{n} more accurate candidate{'s' if n > 1 else ''} over the limit"
    why = []
    untried = len(summary.get("untried", []))
    if stopped == "time":
        why.append(f"stopped after {summary['trials_run']} trials with {untried} candidates untried")
    if planned_subset and plan.subset < plan.n_train:
        why.append(f"trained on {plan.subset} of {plan.n_train} training images")
    if why:
        out["time_budget"] = "; ".join(why)
    if stopped == "trials":
        out["trials"] = f"the --trials cap ({cap}) ended the search with {untried} candidates untried"
    return out


def _select(
    study: Any,
    budget: dict[str, float],
    teacher_metric: float,
    profile: DeviceProfile,
    split: str,
    space: Space,
    interrupted: list[int] | None = None,
) -> dict[str, Any]:
    import optuna

    rows, failed, pruned, finished = [], [], [], 0
    skip = set(interrupted or [])
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    for t in study.get_trials(deepcopy=False):
        if t.number in skip:
            continue
        finished += t.state in done
        # the search's accounting: time, why it ran, which stages it reused, what it re-trained
        acct = {
            k: t.user_attrs[k]
            for k in ("seconds", "why", "stages", "extends", "duplicate_of", "worker", "latency_source")
            if k in t.user_attrs
        }
        if t.state == optuna.trial.TrialState.FAIL and "error" in t.user_attrs:
            failed.append({"number": t.number, "params": t.params, "error": t.user_attrs["error"], **acct})
        if t.state == optuna.trial.TrialState.PRUNED:
            p = t.user_attrs.get("pruned", {})
            pruned.append({"number": t.number, "params": t.params, "state": "pruned", **p, **acct})
        m = t.user_attrs.get("measured")
        if t.state != optuna.trial.TrialState.COMPLETE or m is None or "duplicate_of" in t.user_attrs:
            continue
        v = violations(m, budget, teacher_metric, profile.memory_mb)
        rows.append(
            {
                "number": t.number,
                "params": t.params,
                "state": "complete",
                **m,
                **acct,
                "violations": v,
                "feasible": all(x <= 0 for x in v.values()),
                "distance": distance(v, budget, profile.memory_mb),
            }
        )
    if not rows:
        first = failed[0]["error"] if failed else "no trial finished"
        raise VitshrinkError(
            f"budget search: no candidate was measured ({len(failed)} failed, {len(pruned)} pruned; first: {first})"
        )
    feasible = [r for r in rows if r["feasible"]]
    pareto = _pareto(feasible)
    if pareto:
        chosen = max(pareto, key=lambda r: (r["metric"], -r["p50"]))
    else:
        chosen = min(rows, key=lambda r: (r["distance"], -r["metric"]))
    front = [
        {k: r[k] for k in ("number", "params", "metric", "p50", "size_mb", "feasible")}
        for r in sorted(_pareto_front(rows), key=lambda r: -r["metric"])
    ]
    return {
        "chosen": chosen,
        "met": bool(pareto),
        "summary": {
            "budget": budget,
            "met": bool(pareto),
            "chosen_trial": chosen["number"],
            "chosen_params": chosen["params"],
            "search_split": split,
            "teacher_metric_search_split": teacher_metric,
            "pareto_trials": [r["number"] for r in pareto],
            "pareto_front": front,
            "trials_run": finished,
            "trials": rows,
            "pruned_trials": pruned,
            "failed_trials": failed,
            "interrupted_trials": sorted(skip),
            "space": space.describe(),
        },
    }


def describe_miss(chosen: dict[str, Any], budget: dict[str, float], metric: str, n: int) -> str:
    """One line: which limits the closest candidate misses and by how much."""
    parts = []
    for k, x in chosen["violations"].items():
        if x > 0:
            if k == "max_drop":
                parts.append(f"{metric} drop {x + budget['max_drop']:.4f} > {budget['max_drop']:g}")
            elif k == "latency_ms":
                parts.append(f"p50 {chosen['p50']:.2f} ms > {budget['latency_ms']:g}")
            elif k == "size_mb":
                parts.append(f"size {chosen['size_mb']:.2f} MB > {budget['size_mb']:g}")
            else:
                parts.append(f"peak RSS {chosen['peak_rss_mb']:.0f} MB over the device's memory")
    p = chosen["params"]
    more = f", {p['extend']}x training" if p.get("extend") else ""
    return (
        f"no recipe met the budget in {n} trials; closest: trial {chosen['number']} "
        f"(student {p['student']}, prune {p['prune_ratio']}, quant {p['quant']}{more}): {', '.join(parts)}"
    )
