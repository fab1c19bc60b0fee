"""Joining a shared study (`compress --storage URL --study NAME`): the first worker creates it and
plans; the others wait for the plan and check that they run the same search; `--finish` only reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..context import Context
from ..devices import DeviceProfile
from ..plan import Plan
from ..runner import _rebase, shared_teacher
from .run import SearchRun
from .shared import (
    SharedOptions,
    SharedStoreError,
    Worker,
    create_or_join,
    fetch_trial,
    open_artifacts,
    open_storage,
    wait_for_plan,
)
from .space import Space
from .study_setup import _Clock, _pruner, check_config, load_or_make_plan, search_config


def _sampler() -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=0)  # every trial is enqueued: the sampler only records


def join_shared(
    ctx: Context,
    out: Path,
    space: Space | None,
    shared: SharedOptions,
    *,
    budget: dict[str, float] | None,
    profile: DeviceProfile,
    split: str,
    eval_limit: int | None,
    user: dict[str, Any],
    time_budget: float,
    trials: int | None,
    t_start: float,
    teacher_eval_s: float,
) -> tuple[Any, Space, _Clock, Plan, Worker | None, dict[str, float]]:
    """(study, space, clock, plan, worker, budget); space None: --finish (read from the study)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR if ctx.quiet else optuna.logging.WARNING)
    storage = open_storage(shared.storage, shared.heartbeat_s)
    if space is None:
        return _finish_study(storage, shared, t_start)
    assert budget is not None
    study, created = create_or_join(storage, shared.study, _sampler(), _pruner(space.pruner))
    config = {**search_config(ctx, space, profile, split, eval_limit), "budget": budget}
    clock = _Clock(study, t_start, shared=True)
    where = f"study {shared.study} in {shared.storage}"
    if created:
        check_config(study, config, where)
        plan = load_or_make_plan(
            ctx, study, space, user, time_budget, trials, eval_limit, clock, teacher_eval_s
        )
    else:
        wait_for_plan(study, ctx.log)
        check_config(study, config, where)
        plan = Plan.from_json(study.user_attrs["plan"])
        ctx.log(f"joined study {shared.study}: {plan.line()}")
    worker = Worker(study, out, shared.heartbeat_s)
    worker.start()
    worker.beat(time_budget_s=time_budget)
    ctx.log(f"worker {worker.id} ({'planned the search' if created else 'joined'})")
    return study, space, clock, plan, worker, budget


def _finish_study(
    storage: Any, shared: SharedOptions, t_start: float
) -> tuple[Any, Space, _Clock, Plan, None, dict[str, float]]:
    import optuna

    try:
        study = optuna.load_study(storage=storage, study_name=shared.study, sampler=_sampler())
    except KeyError:
        raise SharedStoreError(f"--finish: no study {shared.study} in {shared.storage}") from None
    config = study.user_attrs.get("config")
    if config is None or "plan" not in study.user_attrs:
        raise SharedStoreError(f"--finish: study {shared.study} was never planned (no worker started it)")
    d = config["space"]
    space = Space(
        students=d["students"],
        prune_ratios=d["prune_ratios"],
        quant_modes=d["quant_modes"],
        distill=dict(d["distill"]),
        prune=dict(d["prune"]),
        quantize=dict(d["quantize"]),
        pruner=d["pruner"],
        resolutions=d.get("resolutions", [None]),
        base_size=d.get("base_size"),
    )
    plan = Plan.from_json(study.user_attrs["plan"])
    return study, space, _Clock(study, t_start, shared=True), plan, None, dict(config["budget"])


def local_root(run: SearchRun, chosen: dict[str, Any], artifacts: str | None) -> Path:
    """The chosen trial's folder on this machine: this worker's own, or downloaded from the artifact
    store (its stage ONNX files; the teacher is this worker's own export)."""
    root = Path(chosen["root"])
    mine = run.worker is not None and chosen.get("worker") == run.worker.id
    if mine or (artifacts is None and (root / "state.json").is_file()):
        return root
    t = run.study.trials[chosen["number"]]
    uploads = t.user_attrs.get("uploads")
    if not uploads or artifacts is None:
        raise SharedStoreError(
            f"the chosen trial {chosen['number']} ran on worker {chosen.get('worker')} and its files are not "
            "here: give every worker the same --artifacts store"
        )
    dest = run.out / "trials" / f"{chosen['number']:03d}-{chosen.get('worker')}"
    fetch_trial(open_artifacts(artifacts), uploads, dest)
    from ...artifacts import read_json, write_json

    state = read_json(dest / "state.json")
    tdir = run.out / "teacher"
    state["stages"][0] = _rebase(shared_teacher(run.ctx, tdir), tdir, dest)
    write_json(dest / "state.json", state)
    run.ctx.log(f"chosen trial {chosen['number']} fetched from the artifact store into {dest}")
    return dest
