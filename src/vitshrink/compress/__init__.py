"""`vitshrink compress`: run a recipe of stages, or search recipes under a device budget.

- recipe mode: `compress(MODEL, DATA, out=DIR, recipe="recipe.yaml")` runs the stages in order
  (distill, prune, quantize, export; see `recipe`), each writing its artifact under DIR/stages and
  recording it in DIR/state.json, so an interrupted run resumes after the last finished stage.
- budget mode: `compress(..., budget="latency_ms=20,size_mb=5,max_drop=0.01", time_budget="30m")`
  searches students (one per model family, the CNN included), prune ratios and quant modes with
  Optuna (`search`, in the order `schedule` gives: a trained student's cheap variants first),
  measuring every candidate, and keeps the Pareto-optimal ones that meet the budget;
  BudgetNotMetError names the closest otherwise. The time budget ends the search (`trials` is an
  optional cap); the distillation is planned from throughput measured here (`plan`), weak trials
  stop early, time left at the end re-trains the most promising candidate on more images, and a
  killed search resumes on the same clock.

Both end with DIR/results.json (teacher first; the last stage's artifact is the deployable ONNX),
DIR/report.md/.html, and for `device="jetson-nano"` an fp16 TensorRT recipe in DIR/trt.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import read_json
from ..errors import VitshrinkError
from .context import Context, make_context
from .devices import PROFILES, DeviceProfile, get_profile, threads_for, width_rule
from .plan import DEFAULT_TIME_BUDGET, Plan, Throughput, fmt_minutes, parse_duration, plan_search
from .recipe import SCHEMA, Recipe, RecipeError, Stage, load_recipe, parse_recipe, validate_stage
from .runner import finish, measure, run_stages
from .search import BudgetNotMetError, describe_miss, parse_budget, search_budget
from .stages import KINDS

__all__ = [
    "PROFILES",
    "SCHEMA",
    "KINDS",
    "DEFAULT_TIME_BUDGET",
    "BudgetNotMetError",
    "DeviceProfile",
    "Plan",
    "Recipe",
    "RecipeError",
    "Stage",
    "Throughput",
    "compress",
    "get_profile",
    "load_recipe",
    "parse_budget",
    "parse_duration",
    "parse_recipe",
    "plan_search",
    "validate_stage",
]


def compress(
    model: str | os.PathLike,
    data: str,
    *,
    out: str | os.PathLike,
    recipe: str | os.PathLike | list[Any] | dict[str, Any] | Recipe | None = None,
    budget: str | dict[str, Any] | None = None,
    device: str = "cpu",
    trials: int | None = None,
    quiet: bool = False,
    data_options: dict[str, Any] | None = None,
    threads: int | None = None,
    eval_limit: int | None = None,
    search: dict[str, Any] | None = None,
    bench_runs: int = 20,
    bench_rounds: int = 3,
    time_budget: str | float | None = None,
    storage: str | None = None,
    study: str | None = None,
    artifacts: str | None = None,
    finish_only: bool = False,
    heartbeat: int | None = None,
) -> dict[str, Any]:
    """Compress MODEL (the teacher, a model directory) on DATA into OUT; exactly one of recipe / budget.

    threads: intra-op threads for evaluation and benchmarks (capped by the device profile).
    eval_limit: score each artifact on this many samples (default: the whole split).
    search: budget mode only: {"students": [...], "prune_ratios": [...], "quant_modes": [...],
    "distill": {...}, "prune": {...}, "quantize": {...}, "pruner": "asha" | "hyperband" | "none"}
    (stage options as in a recipe; distill limit/epochs given here are kept, not planned).
    time_budget: budget mode only: the whole run's wall time, "30m", "2h", "90s" or seconds
    (default 30m); a resumed search counts the time earlier runs spent. It ends the search;
    trials: at most this many trials (default: no cap).
    storage, study: budget mode: join the Optuna study NAME in storage URL (postgresql://, mysql://,
    sqlite:///, or journal:PATH on a shared folder), shared by every worker that names it; each keeps
    its own OUT and time budget, and the last to finish writes the model (see README, "Search on
    several machines"). artifacts: an artifact store (folder or s3://bucket/prefix) for the trials'
    files. finish_only (--finish): write OUT from the shared study as it stands (no --budget: it is read from the
    study). heartbeat: seconds between a worker's heartbeats (a trial is failed after 3 missed).
    Returns {"final": deployable ONNX, "results": results.json, "report": report.html, "trt": dir or
    None, "stages": results.json stages, "met": budget met (budget mode)}.
    """
    _check_modes(recipe, budget, search, time_budget, storage, artifacts, finish_only)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VitshrinkError(f"--out must be a directory: {out}")
    profile = get_profile(device)
    run = _Ship(out, profile, threads_for(profile, threads), bench_runs, bench_rounds, time.time())
    if recipe is not None:
        rec = load_recipe(recipe)
        limit = eval_limit if eval_limit is not None else rec.eval_limit
        ctx = make_context(model, data, {**rec.data_options, **(data_options or {})}, quiet)
        out.mkdir(parents=True, exist_ok=True)
        evaluate = {"split": "test", "limit": limit, "threads": run.threads}
        records = run_stages(device_widths(rec.stages, profile), ctx, out, evaluate=evaluate)
        extra = {"recipe": rec.to_json(), "recipe_source": rec.source, "description": rec.description}
        res = run.ship(ctx, out, records, limit, extra)
        ctx.log(f"final artifact: {res['final']}")
        return res

    shared = None
    if storage is not None:
        from .search.shared import HEARTBEAT_S, SharedOptions

        shared = SharedOptions(storage, study or "", artifacts, heartbeat or HEARTBEAT_S)
    bud = None if finish_only else parse_budget(budget)  # type: ignore[arg-type]
    seconds = parse_duration(DEFAULT_TIME_BUDGET if time_budget is None else time_budget)
    ctx = make_context(model, data, dict(data_options or {}), quiet)
    ctx.log(
        f"time budget {fmt_minutes(seconds)}"
        + (" (the default; set it with --time-budget)" if time_budget is None else "")
    )
    out.mkdir(parents=True, exist_ok=True)
    search = dict(search or {})
    cpu = search.get("quantize", {}).get("target_cpu", "auto")
    search["prune"] = {"round_to": width_rule(profile, cpu)[0], **search.get("prune", {})}
    found = search_budget(
        ctx,
        out,
        budget=bud,
        profile=profile,
        threads=run.threads,
        trials=trials,
        search=search,
        eval_limit=eval_limit,
        bench_runs=bench_runs,
        bench_rounds=bench_rounds,
        time_budget=seconds,
        t_start=run.t_start,
        shared=shared,
        finish_only=finish_only,
    )
    return _ship_search(run, ctx, found, eval_limit)


@dataclass(frozen=True)
class _Ship:
    """How a run's artifacts are measured and written: the same for a recipe and a search's choice."""

    out: Path
    profile: DeviceProfile
    threads: int | None
    runs: int
    rounds: int
    t_start: float

    def ship(
        self,
        ctx: Context,
        root: Path,
        records: list[dict[str, Any]],
        limit: int | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        """Measure every artifact of `records` (under root) in one benchmark; results.json and the report."""
        kw = {"profile": self.profile, "threads": self.threads, "split": "test"}
        stages = measure(records, ctx, root, limit=limit, runs=self.runs, rounds=self.rounds, **kw)
        return finish(self.out, ctx, stages, extra=extra, t_start=self.t_start, **kw)


def _ship_search(run: _Ship, ctx: Context, found: dict[str, Any], eval_limit: int | None) -> dict[str, Any]:
    from ..artifacts import write_json

    chosen, summary, bud = found["chosen"], found["summary"], found["budget"]
    out = run.out
    if not found["last"]:  # a shared study's other workers are still searching: the last one ships
        write_json(out / "search.json", summary)
        ctx.log("this worker is done; the last worker (or compress --finish) writes the model")
        return {"final": None, "met": found["met"], "search": str(out / "search.json"), "shipped": False}
    root = Path(chosen["root"])
    records = read_json(root / "state.json")["stages"]
    write_json(out / "search.json", summary)
    extra = {"search": summary, "recipe": [s.to_json() for s in _chosen_stages(records)]}
    res = run.ship(ctx, root, records, eval_limit, extra)
    res["met"] = found["met"]
    if not found["met"]:
        n = summary["trials_run"]
        raise BudgetNotMetError(
            f"{describe_miss(chosen, bud, ctx.metric, n)}; its results are in {out / 'results.json'}", res
        )
    ctx.log(f"chosen trial {chosen['number']} {chosen['params']}: final artifact {res['final']}")
    return res


def _check_modes(
    recipe: Any,
    budget: Any,
    search: dict[str, Any] | None,
    time_budget: Any,
    storage: str | None,
    artifacts: str | None,
    finish_only: bool,
) -> None:
    """One line for every combination of modes that cannot run together, before anything starts."""
    if finish_only and (storage is None or recipe is not None or budget is not None):
        raise VitshrinkError("--finish needs --storage and --study, and no --recipe or --budget")
    if (storage is not None or artifacts is not None) and recipe is not None:
        raise VitshrinkError("--storage/--artifacts apply to budget mode only")
    if artifacts is not None and storage is None:
        raise VitshrinkError("--artifacts needs --storage (the study the workers share)")
    if (recipe is None) == (budget is None) and not finish_only:
        raise VitshrinkError("compress needs exactly one of --recipe or --budget")
    if recipe is not None and search:
        raise VitshrinkError("search options apply to budget mode only (a recipe fixes every stage)")
    if recipe is not None and time_budget is not None:
        raise VitshrinkError("--time-budget applies to budget mode only (a recipe fixes every stage)")


def device_widths(stages: list[Stage], profile: DeviceProfile) -> list[Stage]:
    """Prune stages without their own round_to get the device's width multiple (`devices.width_rule`;
    for a CPU, that of the recipe's quantize target_cpu). Set before the stage keys are computed, so a
    stage cached for another device is not reused."""
    cpu = next((s.options["target_cpu"] for s in stages if "target_cpu" in s.options), "auto")
    multiple = width_rule(profile, cpu)[0]
    return [
        Stage(s.kind, {**s.options, "round_to": multiple}, s.name)
        if s.kind == "prune" and s.options.get("round_to") is None
        else s
        for s in stages
    ]


def _chosen_stages(records: list[dict[str, Any]]) -> list[Stage]:
    return [Stage(r["kind"], r["options"]) for r in records if r["kind"] != "teacher"]


from vitshrink._callable import install as _install; _install(__name__, "compress")  # noqa: E402, E702, I001  # fmt: skip
