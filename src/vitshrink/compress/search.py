"""Budget mode: search recipes (student, prune ratio, quant mode) with Optuna and keep what meets the budget.

Each Optuna trial is one candidate recipe run end to end under DIR/trials/NNN, its stage outputs shared
through DIR/cache (a student distilled once serves every trial that differs only later in the chain),
and its final artifact measured, not estimated: the task metric on the validation split (the test
split is kept for the final report) and the p50 latency, file size and peak RSS from `bench`. The
study maximises the metric with the budget as Optuna constraints (single-objective, so Optuna's
pruners apply; latency and size are measured for every candidate and form the Pareto front), stored
in sqlite:///DIR/search.db so an interrupted search resumes. Feasibility is recomputed from the
stored measurements at the end, so re-running with another budget re-selects without re-training.

Order (`schedule`): a trained student's cheap variants (every quant mode, then the prune ratios with
recovery) run before another student is distilled, ordered by the budget's binding constraint; every
candidate is enqueued, so none runs twice (a repeat is answered from the study). Students come from
every family the registry has for the task, the CNN included (`auto_students`).

Time budget: before the first trial the search measures throughput here and plans the distillation
subset and epochs to fit (`plan`); the plan, the time spent so far and every trial live in the study,
so a search killed and started again continues the same plan on the same clock. The time budget ends
the search, not a trial count (`trials` is an optional cap): the next candidate starts while its
estimated time fits, and once nothing is left to try, the time left re-trains the most promising
candidate on more images (`schedule.extension`). A trial that runs past the budget is stopped at its
next epoch once some candidate exists. Every training epoch reports the validation metric to the
pruner (successive halving by default), which stops trials that do worse than smaller candidates at
the same step. The teacher's logits on the distillation subset (both views) are computed once into
DIR/cache/teacher-logits and read by every distillation and recovery.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import read_json, sha256_file, write_json
from ..errors import VitshrinkError
from ..options import key_value_pairs
from .devices import DeviceProfile
from .plan import MAX_EPOCHS, Plan, Throughput, fmt_minutes, measure_throughput, plan_search
from .recipe import Stage, validate_stage
from .runner import Context, evaluate_artifact, run_stages, shared_teacher, teacher_key
from .schedule import MAX_EXTEND, QUANT_BYTES, Tried, distance, extension, key, node_of, queue

BUDGET_KEYS = ("latency_ms", "size_mb", "max_drop")
SEARCH_KEYS = (
    "students",
    "prune_ratios",
    "quant_modes",
    "resolutions",
    "distill",
    "prune",
    "quantize",
    "pruner",
)
# v3: every trial enqueued by the scheduler, with an `extend` parameter; older studies are left alone.
STUDY_NAME = "vitshrink-compress-3"
PRUNERS = ("asha", "hyperband", "none")
PLAN_TRIALS = 8  # trials the plan sizes the distillation for when --trials sets no cap
FINAL_OVERHEAD_S = 30.0  # after the search: one bench of up to 4 ONNX files, results.json, the report
# Base options of the searched stages; override with compress(search={"distill": {...}, ...}).
DEFAULT_DISTILL: dict[str, Any] = {"epochs": 2}
DEFAULT_PRUNE: dict[str, Any] = {"recover_epochs": 1}
DEFAULT_RATIOS = (0.0, 0.25, 0.5)
STUDENT_SHARE = 0.7  # an automatic student has fewer than this share of the teacher's parameters
_now = time.time  # the search's clock (tests replace it)


class BudgetNotMetError(VitshrinkError):
    """No searched recipe met the budget; `.result` holds the closest one's results (also on disk)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def parse_budget(budget: str | dict[str, Any]) -> dict[str, float]:
    """`latency_ms=..,size_mb=..,max_drop=..` (or a dict) -> validated floats."""
    if isinstance(budget, str):
        try:
            budget = {k: v.strip() for k, v in key_value_pairs(budget, skip_empty=True)}
        except ValueError as e:
            raise VitshrinkError(f"budget: {e}") from None
    if not isinstance(budget, dict) or not budget:
        raise VitshrinkError(f"budget needs at least one of {', '.join(BUDGET_KEYS)}")
    out: dict[str, float] = {}
    for k, v in budget.items():
        if k not in BUDGET_KEYS:
            raise VitshrinkError(f"unknown budget key '{k}' (choose from {', '.join(BUDGET_KEYS)})")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise VitshrinkError(f"budget {k} must be a number, got {v!r}") from None
        if isinstance(v, bool) or not math.isfinite(f) or f < 0 or (f == 0 and k != "max_drop"):
            raise VitshrinkError(f"budget {k} must be a positive number, got {v!r}")
        out[k] = f
    return out


# ---------------------------------------------------------------------------------------- the space


@dataclass
class Space:
    students: dict[str, dict[str, Any] | None]  # label -> distill student options (None: no distill)
    prune_ratios: list[float]
    quant_modes: list[str]
    distill: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)
    quantize: dict[str, Any] = field(default_factory=dict)
    pruner: str = "asha"
    int8_targets: dict[str, float] = field(default_factory=dict)  # size_mb / latency_ms for mode int8
    n_train: int | None = None  # training images (an extended distillation grows its subset up to it)
    # Sizes the network runs at inside the deployed graph (segmentation; `export --resolution`): None is
    # the model's own. With more than one, "resolution" is a trial parameter like "quant".
    resolutions: list[Any] = field(default_factory=lambda: [None])

    def describe(self) -> dict[str, Any]:
        return {
            "students": self.students,
            "prune_ratios": self.prune_ratios,
            "quant_modes": self.quant_modes,
            **({"resolutions": self.resolutions} if self.resolutions != [None] else {}),
            "distill": self.distill,
            "prune": self.prune,
            "quantize": self.quantize,
            "pruner": self.pruner,
        }

    def stages(self, params: dict[str, Any]) -> list[Stage]:
        out = []
        student = self.students[params["student"]]
        k = int(params.get("extend", 0))
        if student is not None:
            d = {**self.distill, **student}
            if k:
                d.update(self.more_training(d, k))
            out.append(validate_stage({"distill": d}, "search distill"))
        if params["prune_ratio"] > 0:
            pr = {**self.prune, "ratio": params["prune_ratio"]}
            if k and student is None:  # the teacher has no distillation: extra time goes to recovery
                pr["recover_epochs"] = min(MAX_EPOCHS, max(1, int(pr.get("recover_epochs", 0))) * k)
            out.append(validate_stage({"prune": pr}, "search prune"))
        res = params.get("resolution")
        if params["quant"] != "none":
            q = {**self.quantize, "mode": params["quant"]}
            if params["quant"] == "int8":
                q.update(self.int8_targets)
            if res is not None:  # quantize re-exports the stage's model to run at `res` inside
                q["resolution"] = res
            out.append(validate_stage({"quantize": q}, "search quantize"))
        elif res is not None:
            out.append(validate_stage({"export": {"resolution": res}}, "search export"))
        return out

    def more_training(self, d: dict[str, Any], k: int) -> dict[str, Any]:
        """Distillation options for k x the planned images: a larger subset first (up to the whole
        training split), then more epochs (up to MAX_EPOCHS)."""
        n, e = int(d.get("limit") or self.n_train or 0), int(d.get("epochs", 1))
        if not n:
            return {"epochs": min(MAX_EPOCHS, e * k)}
        n2 = min(self.n_train or n * k, n * k)
        return {"limit": n2, "epochs": min(MAX_EPOCHS, max(e, round(n * e * k / n2)))}


def auto_students(ctx: Context, budget: dict[str, float] | None = None) -> dict[str, dict[str, Any] | None]:
    """'none' plus one preset per registered family for the task (the CNN included: logit KD works
    across families), the largest with under STUDENT_SHARE of the teacher's parameters. Order: those
    whose int8 weights fit the size budget first, then the larger (more capacity) first."""
    import torch

    from ..models import build_model, count_params, load_model
    from ..models.families import families

    task, pre = ctx.meta["task"], ctx.meta["preprocess"]
    teacher, _ = load_model(ctx.teacher, verify=False)
    t_params = count_params(teacher)
    best: dict[str, tuple[int, str]] = {}
    for fam in families():
        for name, p in fam.presets.items():
            if task not in p.tasks or name == ctx.meta.get("preset"):
                continue
            try:
                with torch.device("meta"):  # parameter count only: nothing allocated
                    net, _ = build_model(
                        name,
                        task=task,
                        image_size=pre["size"][0],
                        num_channels=pre["channels"],
                        class_names=ctx.meta["class_names"],
                    )
                n = count_params(net)
            except Exception:  # noqa: BLE001 - a preset that cannot take this input size is simply not a candidate
                continue
            if n < STUDENT_SHARE * t_params and n > best.get(fam.name, (0, ""))[0]:
                best[fam.name] = (n, name)
    limit = (budget or {}).get("size_mb", math.inf) * 2**20  # int8: about one byte per parameter
    chosen = sorted(best.values(), key=lambda x: (x[0] > limit, -x[0]))
    return {"none": None, **{name: {"student": name} for _, name in chosen}}


def build_space(
    ctx: Context,
    profile: DeviceProfile,
    search: dict[str, Any] | None,
    budget: dict[str, float] | None = None,
) -> Space:
    search = dict(search or {})
    unknown = [k for k in search if k not in SEARCH_KEYS]
    if unknown:
        raise VitshrinkError(f"unknown search option '{unknown[0]}' (allowed: {', '.join(SEARCH_KEYS)})")
    if "students" in search:
        students: dict[str, dict[str, Any] | None] = {}
        for s in search["students"]:
            if s in (None, "none"):
                students["none"] = None
            elif isinstance(s, str):
                students[s] = {"student": s}
            elif isinstance(s, dict) and "student" in s:
                label = s.get("label") or f"{s['student']}{_short(s.get('student_options'))}"
                students[str(label)] = {k: v for k, v in s.items() if k != "label"}
            else:
                raise VitshrinkError(
                    f"search students: expected a preset/directory or {{student: ..}}, got {s!r}"
                )
    else:
        students = auto_students(ctx, budget)
    try:
        from ..prune import prune  # noqa: F401

        ratios = [float(r) for r in search.get("prune_ratios", DEFAULT_RATIOS)]
    except ImportError:
        ratios = [0.0]
    modes = list(search.get("quant_modes", profile.quant_modes))
    # [H, W] pairs as "HxW": optuna's categorical choices are scalars
    resolutions = [
        "x".join(map(str, r)) if isinstance(r, (list, tuple)) else r
        for r in search.get("resolutions", [None])
    ]
    if not resolutions:
        raise VitshrinkError("search resolutions: give at least one (null: the model's own size)")
    if any(r is not None for r in resolutions) and ctx.meta["task"] != "segmentation":
        raise VitshrinkError(
            "search resolutions apply to segmentation (the network resized inside the graph)"
        )
    for r in resolutions:
        if r is not None:
            validate_stage({"export": {"resolution": r}}, "search resolutions")
    pruner = search.get("pruner", "asha")
    if pruner not in PRUNERS:
        raise VitshrinkError(f"search pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    space = Space(
        students=students,
        prune_ratios=ratios,
        quant_modes=modes,
        distill={**DEFAULT_DISTILL, **search.get("distill", {})},
        prune={**DEFAULT_PRUNE, **search.get("prune", {})},
        quantize=dict(search.get("quantize", {})),
        pruner=pruner,
        # int8 keeps the variant that fits the budget's size / latency best, not only the fastest
        int8_targets={k: budget[k] for k in ("size_mb", "latency_ms") if k in (budget or {})},
        resolutions=resolutions,
    )
    # Validate every option now, not an hour into the search.
    for st in students.values():
        if st is not None:
            validate_stage({"distill": {**space.distill, **st}}, "search distill")
    for r in ratios:
        if r > 0:
            validate_stage({"prune": {**space.prune, "ratio": r}}, "search prune")
    for m in modes:
        if m != "none":
            validate_stage({"quantize": {**space.quantize, "mode": m}}, "search quantize")
    return space


def _short(opts: dict[str, Any] | None) -> str:
    return "" if not opts else "(" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) + ")"


# ------------------------------------------------------------------------------------ measurement


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


# ------------------------------------------------------------------------------------------- search


class _Clock:
    """Search time across sessions: what earlier (killed or finished) runs spent, kept in the study,
    plus this run's since it started; saved at every epoch and trial, so a kill loses at most one epoch."""

    def __init__(self, study: Any, t_start: float) -> None:
        self.study, self.t_start = study, t_start
        self.before = float(study.user_attrs.get("elapsed_s", 0.0))

    def elapsed(self) -> float:
        return self.before + _now() - self.t_start

    def save(self) -> None:
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

    from ..models import build_model, count_params, load_model

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
    from ..distill.losses import build_losses

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
    import optuna

    from ..bench import bench_many

    if trials is not None and trials < 1:
        raise VitshrinkError(f"--trials must be >= 1, got {trials}")
    t_start = _now() if t_start is None else t_start
    space = build_space(ctx, profile, search, budget)
    evals = _EvalCache(out / "evals.json")
    teacher_onnx = _teacher_onnx(ctx, out)
    t_eval = _now()
    teacher_metric = evals.get(teacher_onnx, ctx, split, eval_limit, threads)[ctx.metric]
    teacher_eval_s = _now() - t_eval  # ~0 when cached: then the plan is stored already, or rates stand in
    ctx.log(f"teacher {ctx.metric} {teacher_metric:.4f} on the {split} split; budget {budget}")

    def record(trial: optuna.Trial, measured: dict[str, Any]) -> dict[str, float]:
        # Constraints guide the sampler; the final choice recomputes them under the current budget.
        trial.set_user_attr("measured", measured)
        v = violations(measured, budget, teacher_metric, profile.memory_mb)
        for k in BUDGET_KEYS + ("memory_mb",):
            trial.set_constraint(k, v.get(k, 0.0))
        return v

    optuna.logging.set_verbosity(optuna.logging.ERROR if ctx.quiet else optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            storage=f"sqlite:///{(out / 'search.db').resolve()}",
            study_name=STUDY_NAME,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=0),
            pruner=_pruner(space.pruner),
            load_if_exists=True,
        )
    config = {
        "teacher": teacher_key(ctx.teacher),
        "data": ctx.data,
        "data_options": ctx.data_options,
        "device": profile.name,
        "split": split,
        "eval_limit": eval_limit,
        "space": space.describe(),
    }
    prev = study.user_attrs.get("config")
    if prev is None:
        study.set_user_attr("config", config)
    elif prev != config:
        changed = sorted(k for k in config if prev.get(k) != config[k])
        raise VitshrinkError(
            f"{out / 'search.db'} belongs to another search (different {', '.join(changed)}); "
            "use a new --out directory or delete it"
        )
    clock = _Clock(study, t_start)
    study.set_user_attr("time_budget_s", time_budget)
    if "plan" in study.user_attrs:  # resumed: the same plan, so finished stages keep their keys
        plan = Plan.from_json(study.user_attrs["plan"])
        ctx.log(
            f"resuming the search after {fmt_minutes(clock.before)} of {fmt_minutes(time_budget)}: {plan.line()}"
        )
    else:
        plan, tp = _make_plan(
            ctx, space, search or {}, time_budget, trials or PLAN_TRIALS, eval_limit, clock, teacher_eval_s
        )
        study.set_user_attr("plan", plan.to_json())
        study.set_user_attr("throughput", dataclasses.asdict(tp))
        ctx.log(f"plan: {plan.line()}")
        if not plan.fits:  # a warning, shown under --quiet too: the budget will be overrun
            print(
                f"warning: running the smallest search: {plan.line()}",
                file=sys.stderr,
                flush=True,
            )
    _apply_plan(space, plan, search or {})
    sizes = _predicted_params(ctx, space)
    rates = study.user_attrs.get("throughput") or {}

    # Trials left RUNNING by a killed run: mark failed (not counted) and run their candidates first.
    interrupted = list(study.user_attrs.get("interrupted", []))
    resume_first: list[dict[str, Any]] = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        resume_first.append({"extend": 0, **t.params})
        interrupted.append(t.number)
    study.set_user_attr("interrupted", interrupted)
    states = (
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.FAIL,
    )

    def counted() -> list[Any]:
        return [t for t in study.get_trials(deepcopy=False, states=states) if t.number not in interrupted]

    def has_candidate() -> bool:
        return any("measured" in t.user_attrs for t in study.get_trials(deepcopy=False, states=states[:1]))

    def history() -> list[Tried]:
        return [_tried(t, budget, teacher_metric, profile.memory_mb) for t in counted() if t.params]

    reserve = plan.final_s  # the final test-split measurement and report after the search
    distill_steps = int(space.distill.get("epochs", plan.epochs))
    bar = _bar(trials, len(counted()), quiet=ctx.quiet)

    def say(line: str) -> None:
        if ctx.quiet:
            return
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def took(t0: float) -> str:
        """This trial's time and the search's so far."""
        return (
            f"{fmt_minutes(_now() - t0)} (search {clock.elapsed() / 60:.1f}/{time_budget / 60:.1f} min, "
            f"{fmt_minutes(max(0.0, time_budget - clock.elapsed()))} left)"
        )

    def mean_seconds(kind: str, default: float) -> float:
        """The last three trials' mean time whose dearest stage was `kind`, or the default."""
        xs = [t.user_attrs["seconds"] for t in counted() if t.user_attrs.get("cost_kind") == kind][-3:]
        return statistics.fmean(xs) if xs else default

    def estimate(p: dict[str, Any], tried: list[Tried]) -> float:
        """Seconds candidate p should take: its variant (quantize, or prune + recovery) plus a
        distillation when its student is not trained yet."""
        same_node = [t for t in tried if node_of(t.params) == node_of(p)]
        cost = mean_seconds("quantize", float(rates.get("trial_overhead_s", plan.trial_s)))
        if p["prune_ratio"] > 0 and not any(
            t.params["prune_ratio"] == p["prune_ratio"] and t.state != "failed" for t in same_node
        ):
            cost = mean_seconds("prune", plan.trial_s)
        trained = (
            p["student"] == "none" and not p.get("extend") or any(t.state != "failed" for t in same_node)
        )
        if not trained:
            cost += _distill_estimate(p, space, plan, rates, tried)
        return cost

    pending: dict[str, Any] = {}  # why the next trial runs (and the trial it extends)

    def objective(trial: optuna.Trial) -> float:
        t0 = _now()
        params = {
            "student": trial.suggest_categorical("student", list(space.students)),
            "prune_ratio": trial.suggest_categorical("prune_ratio", space.prune_ratios),
            "quant": trial.suggest_categorical("quant", space.quant_modes),
            "extend": trial.suggest_int("extend", 0, MAX_EXTEND),
        }
        if len(space.resolutions) > 1:  # only then a parameter: studies without it are unchanged
            params["resolution"] = trial.suggest_categorical("resolution", space.resolutions)
        trial.set_user_attr("why", pending.get("why", "queued"))
        if "extends" in pending:
            trial.set_user_attr("extends", pending["extends"])
        label = f"trial {trial.number} {_params_label(params)}"
        owners: dict[str, int] = {}  # stage key -> the trial that ran it
        for t in counted():
            if t.number == trial.number:
                continue
            for st in t.user_attrs.get("stages", []):
                if "reused_from" not in st:
                    owners.setdefault(st["key"], t.number)
            if key(t.params) != key(params) or "duplicate_of" in t.user_attrs:
                continue
            # The same candidate again: answered from the study, so the sampler sees its value again.
            trial.set_user_attr("duplicate_of", t.number)
            trial.set_user_attr("seconds", 0.0)
            if t.state == optuna.trial.TrialState.COMPLETE and "measured" in t.user_attrs:
                record(trial, t.user_attrs["measured"])
                say(f"{label}  same as trial {t.number}, measured already")
                return t.values[0]
            why = f"same candidate as trial {t.number}, which {'was stopped early' if t.state == optuna.trial.TrialState.PRUNED else 'failed'}"
            trial.set_user_attr("pruned", {"stage": None, "reason": why})
            raise optuna.TrialPruned(why)
        bytes_per = QUANT_BYTES.get(params["quant"], 1.0)
        trial.set_user_attr(
            "predicted_mb", sizes.get(params["student"], 0) * (1 - params["prune_ratio"]) * bytes_per / 2**20
        )

        def on_epoch(kind: str, rec: dict[str, Any]) -> None:
            value = (rec.get("val") or {}).get(ctx.metric)
            clock.save()
            if value is None:
                return
            # 1-based: successive halving's first rung is at step min_resource=1, i.e. right after the
            # first distillation epoch; recovery epochs follow the distillation epochs.
            step = rec["epoch"] + (distill_steps if kind != "distill" else 0)
            trial.report(value, step)
            if bar is not None:
                bar.set_postfix_str(
                    f"trial {trial.number}: {kind} epoch {rec['epoch']}, {ctx.metric} {value:.4f}"
                )
            why = None
            if clock.elapsed() > time_budget - reserve and has_candidate():
                why = "time budget"
            # An extra-time run trains longer than its peers at every step: it is judged at the end.
            elif not params["extend"] and trial.should_prune():
                why = f"{ctx.metric} {value:.4f} after {kind} epoch {rec['epoch']}, below smaller candidates"
            if why is not None:
                trial.set_user_attr(
                    "pruned", {"stage": kind, "epoch": rec["epoch"], "value": value, "reason": why}
                )
                raise optuna.TrialPruned(why)

        tdir = out / "trials" / f"{trial.number:03d}"
        tctx = dataclasses.replace(
            ctx, quiet=True, logits_dir=out / "cache" / "teacher-logits", epoch_hook=on_epoch
        )
        try:
            recs = run_stages(
                space.stages(params), tctx, tdir, cache_dir=out / "cache", teacher_dir=out / "teacher"
            )
            trial.set_user_attr("stages", _stage_accounting(recs, owners))
            trial.set_user_attr("cost_kind", _cost_kind(recs))
            train = next(
                (
                    r
                    for r in recs
                    if r["kind"] == ("distill" if space.students[params["student"]] else "prune")
                ),
                None,
            )
            if train is not None and not train.get("reused"):
                trial.set_user_attr("train_s", train.get("seconds"))
            final = (tdir / recs[-1]["artifact"]).resolve()
            metric = evals.get(final, ctx, split, eval_limit, threads)[ctx.metric]
            b = bench_many(
                [final], threads=threads, runs=bench_runs, rounds=bench_rounds, device=profile.bench_device
            )[0]
        except optuna.TrialPruned as e:
            trial.set_user_attr("seconds", round(_now() - t0, 1))
            say(f"{label}  pruned: {e}  {took(t0)}")
            raise
        except Exception as e:  # noqa: BLE001 - one failed candidate must not end the search; it is recorded
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            trial.set_user_attr("error", f"{type(e).__name__}: {msg}")
            trial.set_user_attr("seconds", round(_now() - t0, 1))
            say(f"{label}  failed: {msg}  {took(t0)}")
            raise
        measured = {
            "metric": metric,
            "p50": b["latency_ms"]["p50"],
            "size_mb": b["size_mb"],
            "peak_rss_mb": b.get("peak_rss_mb"),
            "artifact": str(final),
            "root": str(tdir.resolve()),
        }
        v = record(trial, measured)
        trial.set_user_attr("seconds", round(_now() - t0, 1))
        write_json(tdir / "trial.json", {"params": params, "measured": measured, "violations": v})
        ok = all(x <= 0 for x in v.values())
        say(
            f"{label}  done  {took(t0)}  {ctx.metric} {metric:.4f}  "
            f"{measured['size_mb']:.2f} MB  p50 {measured['p50']:.2f} ms  {'feasible' if ok else 'over budget'}"
        )
        return metric

    stopped = "exhausted"
    try:
        while True:
            if trials is not None and len(counted()) >= trials:
                stopped = "trials"
                break
            tried = history()
            left = time_budget - reserve - clock.elapsed()
            done = {key(t.params) for t in tried}
            q = queue(
                list(space.students),
                space.prune_ratios,
                space.quant_modes,
                budget,
                teacher_metric,
                sizes,
                tried,
                resolutions=space.resolutions,
            )
            todo = [p for p in resume_first if key(p) not in done] + q.todo
            pick = next((p for p in todo if estimate(p, tried) <= left), None)
            pending.clear()
            pending["why"] = "queued: " + (
                "resumed after a kill" if pick in resume_first else "next in order that fits the time left"
            )
            if pick is None and not has_candidate() and (todo or q.skipped):
                # nothing measured yet: the first candidate runs whatever the clock says (a skipped one
                # when every candidate misses the budget: the closest is still the answer)
                pick = (todo or [p for p, _ in q.skipped])[0]
                pending["why"] = "nothing measured yet"
            elif pick is None and todo:
                stopped = "time"
                say(
                    f"time budget: {fmt_minutes(max(0.0, left))} left, the next candidate takes "
                    f"~{fmt_minutes(estimate(todo[0], tried))}; stopping after {len(counted())} trials"
                )
                break
            elif pick is None:
                quant_s = mean_seconds("quantize", float(rates.get("trial_overhead_s", plan.trial_s)))
                ext = extension(tried, budget, left, quant_s, profile.memory_mb)
                if ext is None:
                    break  # every candidate tried or skipped, and no extra training fits
                pick, pending["why"], pending["extends"] = ext
                say(f"extra time: {pending['why']}")
            study.enqueue_trial(pick)
            study.optimize(objective, n_trials=1, catch=(Exception,))
            clock.save()
            if bar is not None:
                bar.update(1)
    finally:
        clock.save()
        if bar is not None:
            bar.close()
    found = _select(study, budget, teacher_metric, profile, split, space, interrupted)
    summary = found["summary"]
    tried = history()
    left_queue = queue(
        list(space.students),
        space.prune_ratios,
        space.quant_modes,
        budget,
        teacher_metric,
        sizes,
        tried,
        resolutions=space.resolutions,
    )
    untried_why = {"trials": "the --trials cap", "time": "the time budget ran out"}.get(stopped, "")
    summary["skipped"] = [{"params": p, "reason": r} for p, r in left_queue.skipped]
    summary["untried"] = [{"params": p, "reason": untried_why} for p in left_queue.todo]
    summary["families"] = _family_verdict(summary["trials"], _student_families(ctx, space), found["chosen"])
    summary["extra_time"] = _extra_time(summary["trials"] + summary["pruned_trials"], summary["trials"])
    summary["int8_variants"] = _int8_choice(Path(found["chosen"]["root"]))
    summary["time"] = {
        "budget_s": time_budget,
        "elapsed_s": round(clock.elapsed(), 1),
        "unused_s": round(max(0.0, time_budget - reserve - clock.elapsed()), 1),
        "stopped": stopped,
        "plan": plan.to_json(),
        "throughput": study.user_attrs.get("throughput"),
    }
    planned_subset = "limit" not in (search or {}).get("distill", {})
    summary["binding"] = _binding(found["chosen"], summary, plan, trials, stopped, planned_subset)
    _print_summary(ctx, summary, found["chosen"])
    return found


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


_COST_ORDER = ("distill", "prune", "quantize")


def _stage_accounting(recs: list[dict[str, Any]], owners: dict[str, int]) -> list[dict[str, Any]]:
    """Per stage of a trial: its key, the seconds this trial paid, and the trial it was reused from."""
    out = []
    for r in recs[1:]:
        item: dict[str, Any] = {"kind": r["kind"], "key": r["key"]}
        if r.get("reused"):
            item.update(seconds=0.0, reused_from=owners.get(r["key"], "an earlier run"))
        else:
            item["seconds"] = r.get("seconds")
        out.append(item)
    return out


def _cost_kind(recs: list[dict[str, Any]]) -> str:
    """The dearest stage this trial ran itself (its time estimates the next trial of that kind)."""
    ran = {r["kind"] for r in recs[1:] if not r.get("reused")}
    return next((k for k in _COST_ORDER if k in ran), "measure")


def _student_families(ctx: Context, space: Space) -> dict[str, str]:
    """Family name of each student label ('none': the teacher's own, marked as the teacher)."""
    from ..models.families import find_family
    from ..models.presets import PRESETS

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
    from ..data import load_dataset

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


def _bar(total: int | None, initial: int, *, quiet: bool) -> Any:
    if quiet or os.environ.get("VITSHRINK_QUIET") == "1":
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="search", unit="trial", dynamic_ncols=True, file=sys.stderr
    )


def _params_label(p: dict[str, Any]) -> str:
    more = f", {p['extend']}x training" if p.get("extend") else ""
    more += f", at {p['resolution']} inside" if p.get("resolution") is not None else ""
    return f"[{p['student']}, prune {p['prune_ratio']:g}, {p['quant']}{more}]"


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


def _print_summary(ctx: Context, summary: dict[str, Any], chosen: dict[str, Any]) -> None:
    t = summary["time"]
    ctx.log(
        f"search: {summary['trials_run']} trials ({len(summary['trials'])} measured, "
        f"{len(summary['pruned_trials'])} pruned, {len(summary['failed_trials'])} failed) in "
        f"{fmt_minutes(t['elapsed_s'])} of {fmt_minutes(t['budget_s'])}"
        + {"time": "; stopped by the time budget", "trials": "; stopped by the --trials cap"}.get(
            t["stopped"], ""
        )
        + (
            f"; {fmt_minutes(t['unused_s'])} unused: nothing left worth trying"
            if t["stopped"] == "exhausted"
            else ""
        )
    )
    for e in summary.get("extra_time", []):
        ctx.log(f"extra time: {e.get('line', e)}")
    if summary.get("families"):
        ctx.log(f"families: {summary['families']['line']}")
    q = summary.get("int8_variants")
    if q:
        ctx.log(f"int8: kept {q['kept']} ({q['why']})")
    bound = summary["binding"]
    ctx.log(
        "bound by: "
        + ("; ".join(f"{k} ({v})" for k, v in bound.items()) if bound else "nothing (all limits slack)")
    )
    ctx.log(f"Pareto front ({ctx.metric} / p50 / size):")
    for r in summary["pareto_front"]:
        mark = "*" if r["number"] == chosen["number"] else " "
        ctx.log(
            f" {mark} trial {r['number']} {_params_label(r['params'])}: {r['metric']:.4f}  {r['p50']:.2f} ms  "
            f"{r['size_mb']:.2f} MB  {'feasible' if r['feasible'] else 'over budget'}"
        )


def _teacher_onnx(ctx: Context, out: Path) -> Path:
    rec = shared_teacher(ctx, out / "teacher")
    return (out / "teacher" / rec["artifact"]).resolve()


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
            for k in ("seconds", "why", "stages", "extends", "duplicate_of")
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
