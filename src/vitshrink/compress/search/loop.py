"""The budget loop: set the search up, run the next candidate that fits the time left (or the extra
training once nothing is left), and summarise the study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import VitshrinkError
from ..devices import DeviceProfile
from ..plan import Plan, fmt_minutes
from ..runner import Context, shared_teacher
from ..schedule import extension, key, queue
from .measure import _EvalCache
from .objective import Objective
from .progress import Progress, _print_summary
from .run import SearchRun
from .select import _binding, _extra_time, _family_verdict, _int8_choice, _select, _student_families
from .space import build_space
from .study_setup import (
    _apply_plan,
    _Clock,
    _predicted_params,
    check_config,
    load_or_make_plan,
    now,
    open_study,
    search_config,
)


def search_budget(
    ctx: Context,
    out: Path,
    *,
    budget: dict[str, float],
    profile: DeviceProfile,
    threads: int | None,
    trials: int | None,
    search: dict[str, Any] | None,
    eval_limit: int | None,
    bench_runs: int,
    bench_rounds: int,
    split: str = "val",
    time_budget: float = 1800.0,
    t_start: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) the Optuna search within `time_budget` seconds (counted from `t_start`, plus
    what earlier runs of the same study spent), at most `trials` trials when given; returns
    {"chosen", "met", "summary"} (see compress)."""
    if trials is not None and trials < 1:
        raise VitshrinkError(f"--trials must be >= 1, got {trials}")
    t_start = now() if t_start is None else t_start
    space = build_space(ctx, profile, search, budget)
    evals = _EvalCache(out / "evals.json")
    teacher_onnx = _teacher_onnx(ctx, out)
    t_eval = now()
    teacher_metric = evals.get(teacher_onnx, ctx, split, eval_limit, threads)[ctx.metric]
    teacher_eval_s = now() - t_eval  # ~0 when cached: then the plan is stored already, or rates stand in
    ctx.log(f"teacher {ctx.metric} {teacher_metric:.4f} on the {split} split; budget {budget}")

    study = open_study(out, space, ctx.quiet)
    check_config(study, search_config(ctx, space, profile, split, eval_limit), str(out / "search.db"))
    clock = _Clock(study, t_start)
    study.set_user_attr("time_budget_s", time_budget)
    plan = load_or_make_plan(
        ctx, study, space, search or {}, time_budget, trials, eval_limit, clock, teacher_eval_s
    )
    _apply_plan(space, plan, search or {})
    interrupted, resume_first = _fail_interrupted(study)
    run = SearchRun(
        ctx=ctx,
        out=out,
        study=study,
        space=space,
        plan=plan,
        clock=clock,
        progress=None,  # type: ignore[arg-type]  # set below: the bar starts at the trials counted so far
        budget=budget,
        teacher_metric=teacher_metric,
        profile=profile,
        threads=threads,
        split=split,
        eval_limit=eval_limit,
        bench_runs=bench_runs,
        bench_rounds=bench_rounds,
        time_budget=time_budget,
        evals=evals,
        sizes=_predicted_params(ctx, space),
        rates=study.user_attrs.get("throughput") or {},
        interrupted=interrupted,
    )
    run.progress = Progress(ctx, clock, time_budget, trials, len(run.counted()))
    try:
        stopped = _loop(run, Objective(run), trials, resume_first)
    finally:
        clock.save()
        run.progress.close()
    return _summarise(run, stopped, trials, search)


def _teacher_onnx(ctx: Context, out: Path) -> Path:
    rec = shared_teacher(ctx, out / "teacher")
    return (out / "teacher" / rec["artifact"]).resolve()


def _fail_interrupted(study: Any) -> tuple[list[int], list[dict[str, Any]]]:
    """Trials left RUNNING by a killed run: mark failed (not counted) and run their candidates first."""
    import optuna

    interrupted = list(study.user_attrs.get("interrupted", []))
    resume_first: list[dict[str, Any]] = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        resume_first.append({"extend": 0, **t.params})
        interrupted.append(t.number)
    study.set_user_attr("interrupted", interrupted)
    return interrupted, resume_first


def _next_candidate(run: SearchRun, resume_first: list[dict[str, Any]]) -> dict[str, Any] | str:
    """The next candidate to run (run.pending says why), or why the search stops ('time', 'exhausted')."""
    tried = run.history()
    left = run.left()
    done = {key(t.params) for t in tried}
    sp = run.space
    q = queue(
        list(sp.students), sp.prune_ratios, sp.quant_modes, run.budget, run.teacher_metric, run.sizes, tried
    )
    todo = [p for p in resume_first if key(p) not in done] + q.todo
    pick = next((p for p in todo if run.estimate(p, tried) <= left), None)
    run.pending.clear()
    run.pending["why"] = "queued: " + (
        "resumed after a kill" if pick in resume_first else "next in order that fits the time left"
    )
    if pick is None and not run.has_candidate() and (todo or q.skipped):
        # nothing measured yet: the first candidate runs whatever the clock says (a skipped one
        # when every candidate misses the budget: the closest is still the answer)
        run.pending["why"] = "nothing measured yet"
        return (todo or [p for p, _ in q.skipped])[0]
    if pick is None and todo:
        run.progress.say(
            f"time budget: {fmt_minutes(max(0.0, left))} left, the next candidate takes "
            f"~{fmt_minutes(run.estimate(todo[0], tried))}; stopping after {len(run.counted())} trials"
        )
        return "time"
    if pick is None:
        ext = extension(tried, run.budget, left, run.quant_seconds(), run.profile.memory_mb)
        if ext is None:
            return "exhausted"  # every candidate tried or skipped, and no extra training fits
        pick, run.pending["why"], run.pending["extends"] = ext
        run.progress.say(f"extra time: {run.pending['why']}")
    return pick


def _loop(
    run: SearchRun, objective: Objective, trials: int | None, resume_first: list[dict[str, Any]]
) -> str:
    """Trials until the time budget, the cap or the candidates run out; returns why it stopped."""
    while True:
        if trials is not None and len(run.counted()) >= trials:
            return "trials"
        pick = _next_candidate(run, resume_first)
        if isinstance(pick, str):
            return pick
        run.study.enqueue_trial(pick)
        run.study.optimize(objective, n_trials=1, catch=(Exception,))
        run.clock.save()
        run.progress.update()


def _summarise(
    run: SearchRun, stopped: str, trials: int | None, search: dict[str, Any] | None
) -> dict[str, Any]:
    """Select the chosen candidate and add what the search left untried, the families, the extra
    time, the int8 choice, the clock and what bound the result; printed and returned."""
    ctx, sp, plan = run.ctx, run.space, run.plan
    found = _select(run.study, run.budget, run.teacher_metric, run.profile, run.split, sp, run.interrupted)
    summary = found["summary"]
    left_queue = queue(
        list(sp.students),
        sp.prune_ratios,
        sp.quant_modes,
        run.budget,
        run.teacher_metric,
        run.sizes,
        run.history(),
    )
    untried_why = {"trials": "the --trials cap", "time": "the time budget ran out"}.get(stopped, "")
    summary["skipped"] = [{"params": p, "reason": r} for p, r in left_queue.skipped]
    summary["untried"] = [{"params": p, "reason": untried_why} for p in left_queue.todo]
    summary["families"] = _family_verdict(summary["trials"], _student_families(ctx, sp), found["chosen"])
    summary["extra_time"] = _extra_time(summary["trials"] + summary["pruned_trials"], summary["trials"])
    summary["int8_variants"] = _int8_choice(Path(found["chosen"]["root"]))
    summary["time"] = _time_summary(run, stopped, plan)
    planned_subset = "limit" not in (search or {}).get("distill", {})
    summary["binding"] = _binding(found["chosen"], summary, plan, trials, stopped, planned_subset)
    _print_summary(ctx, summary, found["chosen"])
    return found


def _time_summary(run: SearchRun, stopped: str, plan: Plan) -> dict[str, Any]:
    return {
        "budget_s": run.time_budget,
        "elapsed_s": round(run.clock.elapsed(), 1),
        "unused_s": round(max(0.0, run.left()), 1),
        "stopped": stopped,
        "plan": plan.to_json(),
        "throughput": run.study.user_attrs.get("throughput"),
    }
