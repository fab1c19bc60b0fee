"""The budget loop: set the search up, run the next candidate that fits the time left (or the extra
training once nothing is left), and summarise the study."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ...errors import VitshrinkError
from ..context import Context
from ..devices import DeviceProfile
from ..plan import Plan, fmt_minutes
from ..runner import shared_teacher
from ..schedule import Tried, extension, key, queue
from .join import join_shared, local_root
from .measure import _EvalCache
from .objective import Objective
from .progress import Progress, _print_summary
from .run import SearchRun
from .select import _binding, _extra_time, _family_verdict, _int8_choice, _select, _student_families
from .shared import (
    SharedOptions,
    alive_workers,
    claimed,
    fail_orphans,
    fail_stale,
    is_last,
    open_artifacts,
    trained_node,
    workers,
)
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
    budget: dict[str, float] | None,
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
    shared: SharedOptions | None = None,
    finish_only: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the Optuna search within `time_budget` seconds (counted from `t_start`, plus
    what earlier runs of the same study spent), at most `trials` trials when given; returns
    {"chosen", "met", "summary", "budget", "last"} (see compress).

    shared: join the study shared by several workers (each with its own OUT and time budget); "last"
    says whether this worker finished last (the one that ships the model). finish_only (with shared):
    run nothing, select from the study as it stands (budget and space read from it)."""
    if trials is not None and trials < 1:
        raise VitshrinkError(f"--trials must be >= 1, got {trials}")
    t_start = now() if t_start is None else t_start
    space = None if finish_only else build_space(ctx, profile, search, budget)
    evals = _EvalCache(out / "evals.json")
    teacher_onnx = _teacher_onnx(ctx, out)
    t_eval = now()
    teacher_metric = evals.get(teacher_onnx, ctx, split, eval_limit, threads)[ctx.metric]
    teacher_eval_s = now() - t_eval  # ~0 when cached: then the plan is stored already, or rates stand in
    worker, interrupted, resume_first = None, [], []
    if shared is None:
        assert space is not None and budget is not None
        study = open_study(out, space, ctx.quiet)
        check_config(study, search_config(ctx, space, profile, split, eval_limit), str(out / "search.db"))
        clock = _Clock(study, t_start)
        study.set_user_attr("time_budget_s", time_budget)
        plan = load_or_make_plan(
            ctx, study, space, search or {}, time_budget, trials, eval_limit, clock, teacher_eval_s
        )
        interrupted, resume_first = _fail_interrupted(study)
    else:
        study, space, clock, plan, worker, budget = join_shared(
            ctx,
            out,
            space,
            shared,
            budget=budget,
            profile=profile,
            split=split,
            eval_limit=eval_limit,
            user=search or {},
            time_budget=time_budget,
            trials=trials,
            t_start=t_start,
            teacher_eval_s=teacher_eval_s,
        )
    ctx.log(f"teacher {ctx.metric} {teacher_metric:.4f} on the {split} split; budget {budget}")
    _apply_plan(space, plan, search or {})
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
        worker=worker,
        artifacts=open_artifacts(shared.artifacts) if shared is not None else None,
        latency_wait_s=shared.latency_wait_s if shared is not None else 600.0,
    )
    return _search(run, trials, resume_first, search, finish_only, shared)


def _search(
    run: SearchRun,
    trials: int | None,
    resume_first: list[dict[str, Any]],
    search: dict[str, Any] | None,
    finish_only: bool,
    shared: SharedOptions | None,
) -> dict[str, Any]:
    """The loop (unless finish_only), then the summary; a shared study's worker also says whether it
    finished last, and the last one fails the trials of workers that died (none stays RUNNING)."""
    run.progress = Progress(run.ctx, run.clock, run.time_budget, trials, len(run.counted()))
    stopped = "finish"
    if not finish_only:
        try:
            stopped = _loop(run, Objective(run), trials, resume_first)
        finally:
            run.clock.save()
            run.progress.close()
            if run.worker is not None:
                run.worker.stop()
    last = True
    if shared is not None:
        others = alive_workers(run.study)
        last = finish_only or (run.worker is not None and is_last(run.study, run.worker.id))
        if last:
            lost = fail_orphans(run.study)
            if lost:
                run.ctx.log(f"trials {lost} were left RUNNING by workers that stopped: marked failed")
        else:
            run.ctx.log(f"{len(others)} other worker(s) still searching, or one finished after this one")
    found = _summarise(run, stopped, trials, search)
    found["budget"], found["last"] = run.budget, last
    if shared is not None:
        found["summary"]["workers"] = _workers_summary(run)
        if last:
            found["chosen"]["root"] = str(local_root(run, found["chosen"], shared.artifacts))
    return found


def _workers_summary(run: SearchRun) -> dict[str, Any]:
    """Each worker of the shared study: where it ran, its state and the trials it ran."""
    out: dict[str, Any] = {}
    for w, info in workers(run.study).items():
        ran = [t.number for t in run.study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == w]
        out[w] = {k: info.get(k) for k in ("host", "out", "state", "time_budget_s")} | {"trials": ran}
    return out


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


def _others_running(run: SearchRun) -> bool:
    """A shared study: trials other workers are running (with heartbeats, until they finish or the
    heartbeat fails them; a journal file has none: only those of workers still beating)."""
    import optuna
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if run.worker is None:
        return False
    running = run.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    others = [t for t in running if t.user_attrs.get("worker") != run.worker.id]
    if is_heartbeat_enabled(run.study._storage):
        return bool(others)
    live = alive_workers(run.study)
    return any(t.user_attrs.get("worker") in live for t in others)


def _retries_waiting(study: Any) -> bool:
    import optuna

    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return any("failed_trial" in t.system_attrs for t in waiting)


def _unclaimed(run: SearchRun, todo: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A shared study: leave out candidates other workers run or wait to run, and try what this
    worker's stage cache holds before what another worker builds or built (stage caches are per
    worker): first the trained models (student, prune ratio, extra training) nobody else has, then
    the students nobody else has."""
    if run.worker is None:
        return todo
    me = run.worker.id
    keys, busy = claimed(run.study, me)
    mine, theirs = set(), set(busy)
    for t in run.counted():
        if t.params:
            (mine if t.user_attrs.get("worker") == me else theirs).add(trained_node(t.params))
    free = ("none", 0.0, 0)  # the teacher itself: nothing to train
    nodes = (theirs - mine) - {free}
    students = {n[0] for n in nodes} - {n[0] for n in mine} - {"none"}
    return sorted(
        (p for p in todo if key(p) not in keys),
        key=lambda p: (trained_node(p) in nodes, p["student"] in students),
    )


def _next_candidate(run: SearchRun, resume_first: list[dict[str, Any]]) -> dict[str, Any] | str:
    """The next candidate to run (run.pending says why), or why the search stops ('time', 'exhausted')."""
    tried = run.history()
    left = run.left()
    done = {key(t.params) for t in tried}
    q = _queue(run, tried)
    todo = _unclaimed(run, [p for p in resume_first if key(p) not in done] + q.todo)
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
        if run.worker is not None:
            fail_stale(run.study)  # a dead worker's trial: failed and enqueued once more (a retry)
            if _retries_waiting(run.study) and run.left() > 0:
                run.pending.clear()
                run.study.optimize(objective, n_trials=1, catch=(Exception,))  # pops the oldest waiting
                run.progress.update()
                continue
        pick = _next_candidate(run, resume_first)
        if pick == "exhausted" and _others_running(run) and run.left() > 0:
            # another worker's trial may still fail and come back as a retry: wait for it
            time.sleep(run.worker.heartbeat_s)
            continue
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
    found = _select(run.study, run.budget, run.teacher_metric, run.profile, run.split, sp, run.lost())
    summary = found["summary"]
    left_queue = _queue(run, run.history())
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


def _queue(run: SearchRun, tried: list[Tried]) -> Any:
    """What is left to try in order (and what cannot win), given what was tried."""
    sp = run.space
    return queue(
        list(sp.students),
        sp.prune_ratios,
        sp.quant_modes,
        run.budget,
        run.teacher_metric,
        run.sizes,
        tried,
        resolutions=sp.resolutions,
    )
