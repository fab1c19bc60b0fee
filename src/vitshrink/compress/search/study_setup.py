"""Study set-up: the storage, sampler and pruner, the search's clock, and the plan stored in the study
(so a resumed search keeps the same subset and epochs, hence the same stage keys)."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ...errors import VitshrinkError
from ..context import Context
from ..devices import DeviceProfile
from ..plan import Plan, Throughput, fmt_minutes, measure_throughput, plan_search
from ..runner import teacher_key
from .space import Space

# v3: every trial enqueued by the scheduler, with an `extend` parameter; older studies are left alone.
STUDY_NAME = "vitshrink-compress-3"
PLAN_TRIALS = 8  # trials the plan sizes the distillation for when --trials sets no cap
FINAL_OVERHEAD_S = 30.0  # after the search: one bench of up to 4 ONNX files, results.json, the report
_now = time.time  # the search's clock (tests replace it)


def now() -> float:
    """The search's clock (reads `_now` at each call, so a test's replacement reaches every module)."""
    return _now()


class _Clock:
    """Search time across sessions: what earlier (killed or finished) runs spent, kept in the study,
    plus this run's since it started; saved at every epoch and trial, so a kill loses at most one epoch.
    A worker of a shared study (`shared=True`) keeps its own time budget: its clock starts at zero and
    is not stored (the other workers' time is theirs)."""

    def __init__(self, study: Any, t_start: float, shared: bool = False) -> None:
        self.study, self.t_start, self.shared = study, t_start, shared
        self.before = 0.0 if shared else float(study.user_attrs.get("elapsed_s", 0.0))

    def elapsed(self) -> float:
        return self.before + now() - self.t_start

    def save(self) -> None:
        if not self.shared:
            self.study.set_user_attr("elapsed_s", round(self.elapsed(), 1))


class _SmallerPeers:
    """Optuna pruner wrapper: a trial competes only with candidates predicted no larger than itself,
    so a small student is never stopped for trailing a bigger model that may miss the size budget.
    (Hyperband builds its bracket studies from the storage, so there every trial of the bracket competes.)"""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def prune(self, study: Any, trial: Any) -> bool:
        mine = trial.user_attrs.get("predicted_mb", math.inf)

        class View:  # the study as the inner pruner sees it: only the peers' trials
            def __getattr__(self, name: str) -> Any:
                return getattr(study, name)

            def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
                return [
                    t
                    for t in study.get_trials(deepcopy=deepcopy, states=states)
                    if t.number == trial.number or t.user_attrs.get("predicted_mb", math.inf) <= mine * 1.05
                ]

        return self.inner.prune(View(), trial)


def _pruner(name: str) -> Any:
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    inner = (
        optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
        if name == "hyperband"
        else optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    )
    base = optuna.pruners.BasePruner
    return type("SmallerPeersPruner", (_SmallerPeers, base), {})(inner)


def _predicted_params(ctx: Context, space: Space) -> dict[str, int]:
    """Parameter count of each candidate student (the teacher for 'none'), built without weights."""
    import torch

    from ...models import build_model, count_params, load_model

    pre = ctx.meta["preprocess"]
    out: dict[str, int] = {}
    for label, opts in space.students.items():
        try:
            if opts is None or os.path.isdir(str(opts["student"])):
                net, _ = load_model(ctx.teacher if opts is None else opts["student"], verify=False)
            else:
                with torch.device("meta"):
                    net, _ = build_model(
                        opts["student"],
                        task=ctx.meta["task"],
                        image_size=opts.get("image_size") or pre["size"][0],
                        num_channels=pre["channels"],
                        class_names=ctx.meta["class_names"],
                        **(opts.get("student_options") or {}),
                    )
            out[label] = count_params(net)
        except Exception:  # noqa: BLE001 - only steers pruning; the trial itself reports real errors
            out[label] = 0
    return out


def _apply_plan(space: Space, plan: Plan, user: dict[str, Any]) -> None:
    """Fill the options the user left open with the plan's (a changed subset changes stage keys,
    so this runs the same way on every resume, from the stored plan)."""
    from ...distill.losses import build_losses

    fixed_d, fixed_p = user.get("distill", {}), user.get("prune", {})
    d = space.distill
    for k, v in (("limit", plan.subset), ("epochs", plan.epochs), ("val_limit", plan.val_limit)):
        if k not in fixed_d:
            d[k] = v
    if (
        "cache_teacher" not in fixed_d
        and not {"features", "attentions"} & build_losses(d.get("losses", "kd")).requires
    ):
        d["cache_teacher"] = True  # logits once per search, not once per step
    space.n_train = plan.n_train or None
    if space.prune.get("recover_epochs") and "limit" not in fixed_p:
        # the distillation subset: recovery reads the same cached teacher logits
        space.prune["limit"] = d.get("limit", plan.subset)


def _make_plan(
    ctx: Context,
    space: Space,
    user: dict[str, Any],
    time_budget: float,
    trials: int,
    eval_limit: int | None,
    clock: _Clock,
    teacher_eval_s: float = 0.0,
) -> tuple[Plan, Throughput]:
    from ...data import load_dataset

    d = space.distill
    # Batches of at most 32: per-image rates a little above those of the real 128-image batches
    # (a conservative plan) for a quarter of the measuring time (~15 s for issue 14's teacher).
    tp = measure_throughput(ctx, space.students, batch_size=min(32, int(d.get("batch_size", 128))))
    n = {
        sp: len(load_dataset(ctx.data, sp, data_options=ctx.data_options)) for sp in ("train", "val", "test")
    }
    # Final measurement: the teacher and the chosen recipe's (up to 3) stages on the test split, one
    # interleaved bench of them all, the report. Per image at the teacher's ONNX rate, timed on the
    # validation split just before (PyTorch's rates, the fallback, overstate ONNX inference several
    # times: issue 27's 2-minute search kept 1.4 of its 2 minutes for a final step that took 10 s).
    scored_val = min(n["val"], eval_limit or n["val"])
    per_image = teacher_eval_s / scored_val if teacher_eval_s > 0 else tp.eval_s.get("none", tp.teacher_s)
    final_s = min(n["test"], eval_limit or n["test"]) * 4 * per_image + FINAL_OVERHEAD_S
    recover = int(space.prune.get("recover_epochs", 0)) if any(r > 0 for r in space.prune_ratios) else 0
    fixed = user.get("distill", {})
    plan = plan_search(
        time_budget,
        tp,
        n_train=n["train"],
        n_val=n["val"],
        max_trials=trials,
        students=[k for k, v in space.students.items() if v is not None],
        epochs=fixed.get("epochs"),
        subset=fixed.get("limit"),
        val_limit=fixed.get("val_limit"),
        recover_epochs=recover,
        views=2 if d.get("augment", True) else 1,
        eval_limit=eval_limit,
        setup_s=clock.elapsed(),
        final_s=final_s,
    )
    return plan, tp


def open_study(out: Path, space: Space, quiet: bool) -> Any:
    """The study in sqlite:///OUT/search.db (created, or loaded to resume)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR if quiet else optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.create_study(
            storage=f"sqlite:///{(out / 'search.db').resolve()}",
            study_name=STUDY_NAME,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=0),
            pruner=_pruner(space.pruner),
            load_if_exists=True,
        )


def search_config(
    ctx: Context, space: Space, profile: DeviceProfile, split: str, eval_limit: int | None
) -> dict[str, Any]:
    """What makes two runs the same search (a study belongs to one)."""
    return {
        "teacher": teacher_key(ctx.teacher),
        "data": ctx.data,
        "data_options": ctx.data_options,
        "device": profile.name,
        "split": split,
        "eval_limit": eval_limit,
        "space": space.describe(),
    }


def check_config(study: Any, config: dict[str, Any], where: str) -> None:
    """Store the search's config in a new study; refuse a study that holds another search."""
    prev = study.user_attrs.get("config")
    if prev is None:
        study.set_user_attr("config", config)
    elif prev != config:
        changed = sorted(k for k in config if prev.get(k) != config[k])
        raise VitshrinkError(
            f"{where} belongs to another search (different {', '.join(changed)}); "
            "use a new --out directory or delete it"
        )


def load_or_make_plan(
    ctx: Context,
    study: Any,
    space: Space,
    user: dict[str, Any],
    time_budget: float,
    trials: int | None,
    eval_limit: int | None,
    clock: _Clock,
    teacher_eval_s: float,
) -> Plan:
    """The plan stored in the study (a resumed search), or a new one measured here and stored."""
    if "plan" in study.user_attrs:  # resumed: the same plan, so finished stages keep their keys
        plan = Plan.from_json(study.user_attrs["plan"])
        ctx.log(
            f"resuming the search after {fmt_minutes(clock.before)} of {fmt_minutes(time_budget)}: {plan.line()}"
        )
        return plan
    plan, tp = _make_plan(
        ctx, space, user, time_budget, trials or PLAN_TRIALS, eval_limit, clock, teacher_eval_s
    )
    study.set_user_attr("plan", plan.to_json())
    study.set_user_attr("throughput", dataclasses.asdict(tp))
    ctx.log(f"plan: {plan.line()}")
    if not plan.fits:  # a warning, shown under --quiet too: the budget will be overrun
        print(f"warning: running the smallest search: {plan.line()}", file=sys.stderr, flush=True)
    return plan
