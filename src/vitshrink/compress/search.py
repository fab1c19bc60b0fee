"""Budget mode: search recipes (student, prune ratio, quant mode) with Optuna and keep what meets the budget.

Each Optuna trial is one candidate recipe run end to end under DIR/trials/NNN, its stage outputs shared
through DIR/cache (a student distilled once serves every trial that differs only later in the chain),
and its final artifact measured, not estimated: the task metric on the validation split (the test
split is kept for the final report) and the p50 latency, file size and peak RSS from `bench`. The
study maximises the metric with the budget as Optuna constraints (single-objective, so Optuna's
pruners apply; latency and size are measured for every candidate and form the Pareto front), stored
in sqlite:///DIR/search.db so an interrupted search resumes. Feasibility is recomputed from the
stored measurements at the end, so re-running with another budget re-selects without re-training.

Time budget: before the first trial the search measures throughput here and plans the distillation
subset, epochs and trial count to fit (`plan`); the plan, the time spent so far and every trial live
in the study, so a search killed and started again continues the same plan on the same clock. A
trial starts only while the budget has room for one more; one that runs past the budget is stopped
at its next epoch once some candidate exists. Every training epoch reports the validation metric to
the pruner (successive halving by default), which stops trials that do worse than smaller
candidates at the same step. The teacher's logits on the distillation subset (both views) are
computed once into DIR/cache/teacher-logits and read by every distillation and recovery.
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
from .devices import DeviceProfile
from .plan import Plan, Throughput, fmt_minutes, measure_throughput, plan_search
from .recipe import Stage, validate_stage
from .runner import Context, evaluate_artifact, run_stages, shared_teacher, teacher_key

BUDGET_KEYS = ("latency_ms", "size_mb", "max_drop")
SEARCH_KEYS = ("students", "prune_ratios", "quant_modes", "distill", "prune", "quantize", "pruner")
# v2: single-objective (pruners need it); a v1 study in an old search.db is left alone.
STUDY_NAME = "vitshrink-compress-2"
PRUNERS = ("asha", "hyperband", "none")
QUANT_BYTES = {"none": 4.0, "fp16": 2.0}  # bytes per parameter of the final file (int8 modes: 1)
# Base options of the searched stages; override with compress(search={"distill": {...}, ...}).
DEFAULT_DISTILL: dict[str, Any] = {"epochs": 2}
DEFAULT_PRUNE: dict[str, Any] = {"recover_epochs": 1}
DEFAULT_RATIOS = (0.0, 0.25, 0.5)
MAX_AUTO_STUDENTS = 2


class BudgetNotMetError(VitshrinkError):
    """No searched recipe met the budget; `.result` holds the closest one's results (also on disk)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def parse_budget(budget: str | dict[str, Any]) -> dict[str, float]:
    """`latency_ms=..,size_mb=..,max_drop=..` (or a dict) -> validated floats."""
    if isinstance(budget, str):
        items: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in budget.split(","))):
            if "=" not in part:
                raise VitshrinkError(f"budget: expected key=value, got '{part}'")
            k, v = part.split("=", 1)
            items[k.strip()] = v.strip()
        budget = items
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

    def describe(self) -> dict[str, Any]:
        return {
            "students": self.students,
            "prune_ratios": self.prune_ratios,
            "quant_modes": self.quant_modes,
            "distill": self.distill,
            "prune": self.prune,
            "quantize": self.quantize,
            "pruner": self.pruner,
        }

    def stages(self, params: dict[str, Any]) -> list[Stage]:
        out = []
        student = self.students[params["student"]]
        if student is not None:
            out.append(validate_stage({"distill": {**self.distill, **student}}, "search distill"))
        if params["prune_ratio"] > 0:
            out.append(
                validate_stage({"prune": {**self.prune, "ratio": params["prune_ratio"]}}, "search prune")
            )
        if params["quant"] != "none":
            out.append(
                validate_stage({"quantize": {**self.quantize, "mode": params["quant"]}}, "search quantize")
            )
        return out


def auto_students(ctx: Context) -> dict[str, dict[str, Any] | None]:
    """'none' plus up to two presets for the task, smaller than the teacher, from efficient families."""
    import torch

    from ..models import build_model, count_params, load_model
    from ..models.families import efficient_families
    from ..models.presets import PRESETS

    task, pre = ctx.meta["task"], ctx.meta["preprocess"]
    teacher, _ = load_model(ctx.teacher, verify=False)
    t_params = count_params(teacher)
    families = {ctx.meta.get("family")} | set(efficient_families(task))
    sized = []
    for name, p in PRESETS.items():
        if task not in p.tasks or p.family not in families or name == ctx.meta.get("preset"):
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
        if n < 0.7 * t_params:
            sized.append((n, name))
    chosen = [name for _, name in sorted(sized, reverse=True)[:MAX_AUTO_STUDENTS]]
    return {"none": None, **{name: {"student": name} for name in chosen}}


def build_space(ctx: Context, profile: DeviceProfile, search: dict[str, Any] | None) -> Space:
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
        students = auto_students(ctx)
    try:
        from ..prune import prune  # noqa: F401

        ratios = [float(r) for r in search.get("prune_ratios", DEFAULT_RATIOS)]
    except ImportError:
        ratios = [0.0]
    modes = list(search.get("quant_modes", profile.quant_modes))
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


def _distance(v: dict[str, float], budget: dict[str, float], memory_mb: int | None) -> float:
    """Total excess relative to each limit: how far a candidate is from meeting the budget."""
    scale = {**budget, "memory_mb": memory_mb or 1}
    scale["max_drop"] = max(budget.get("max_drop", 0.0), 0.01)
    return sum(max(0.0, x) / max(scale[k], 1e-9) for k, x in v.items())


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
        return self.before + time.time() - self.t_start

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
    trials: int,
    search: dict[str, Any] | None,
    eval_limit: int | None,
    bench_runs: int,
    bench_rounds: int,
    split: str = "val",
    time_budget: float = 1800.0,
    t_start: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) the Optuna search within `time_budget` seconds (counted from `t_start`, plus
    what earlier runs of the same study spent); returns {"chosen", "met", "summary"} (see compress)."""
    import optuna

    from ..bench import bench_many

    if trials < 1:
        raise VitshrinkError(f"--trials must be >= 1, got {trials}")
    t_start = time.time() if t_start is None else t_start
    space = build_space(ctx, profile, search)
    evals = _EvalCache(out / "evals.json")
    teacher_onnx = _teacher_onnx(ctx, out)
    teacher_metric = evals.get(teacher_onnx, ctx, split, eval_limit, threads)[ctx.metric]
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
        for params in _seeds(space):
            study.enqueue_trial(params)
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
        plan, tp = _make_plan(ctx, space, search or {}, time_budget, trials, eval_limit, clock)
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

    # Trials left RUNNING by a killed run: mark failed (not counted) and queue their candidates again.
    interrupted = list(study.user_attrs.get("interrupted", []))
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params)
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

    reserve = plan.final_s  # the final test-split measurement and report after the search
    distill_steps = int(space.distill.get("epochs", plan.epochs))
    # The plan's trial count is what surely fits; faster trials than planned leave room for more, up to
    # the requested number, as long as the clock allows.
    cap = max(plan.trials, trials)
    bar = _bar(cap, len(counted()), quiet=ctx.quiet)

    def say(line: str) -> None:
        if ctx.quiet:
            return
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def estimate() -> float:
        """The next trial's expected time: the last finished trials' mean, or the plan's average."""
        took = [t.user_attrs["seconds"] for t in counted() if "seconds" in t.user_attrs][-3:]
        return statistics.fmean(took) if took else plan.per_trial_s

    def took(t0: float) -> str:
        """This trial's time, the search's so far, and the ETA of the whole run (search + final)."""
        left_trials = max(0, cap - len(counted()) - 1)
        eta = min(max(0.0, time_budget - reserve - clock.elapsed()), left_trials * estimate()) + reserve
        return (
            f"{fmt_minutes(time.time() - t0)} (search {clock.elapsed() / 60:.1f}/{time_budget / 60:.1f} min, "
            f"ETA ~{fmt_minutes(eta)})"
        )

    def objective(trial: optuna.Trial) -> float:
        t0 = time.time()
        params = {
            "student": trial.suggest_categorical("student", list(space.students)),
            "prune_ratio": trial.suggest_categorical("prune_ratio", space.prune_ratios),
            "quant": trial.suggest_categorical("quant", space.quant_modes),
        }
        label = f"trial {trial.number} {_params_label(params)}"
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.params == params and "measured" in t.user_attrs:  # same candidate: measured already
                record(trial, t.user_attrs["measured"])
                trial.set_user_attr("duplicate_of", t.number)
                say(f"{label}  same as trial {t.number}, measured already")
                return t.values[0]
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
            elif trial.should_prune():
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
            final = (tdir / recs[-1]["artifact"]).resolve()
            metric = evals.get(final, ctx, split, eval_limit, threads)[ctx.metric]
            b = bench_many(
                [final], threads=threads, runs=bench_runs, rounds=bench_rounds, device=profile.bench_device
            )[0]
        except optuna.TrialPruned as e:
            trial.set_user_attr("seconds", round(time.time() - t0, 1))
            say(f"{label}  pruned: {e}  {took(t0)}")
            raise
        except Exception as e:  # noqa: BLE001 - one failed candidate must not end the search; it is recorded
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            trial.set_user_attr("error", f"{type(e).__name__}: {msg}")
            trial.set_user_attr("seconds", round(time.time() - t0, 1))
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
        trial.set_user_attr("seconds", round(time.time() - t0, 1))
        write_json(tdir / "trial.json", {"params": params, "measured": measured, "violations": v})
        ok = all(x <= 0 for x in v.values())
        say(
            f"{label}  done  {took(t0)}  {ctx.metric} {metric:.4f}  "
            f"{measured['size_mb']:.2f} MB  p50 {measured['p50']:.2f} ms  {'feasible' if ok else 'over budget'}"
        )
        return metric

    stopped = "trials"
    try:
        while len(counted()) < cap:
            left = time_budget - reserve - clock.elapsed()
            if has_candidate() and estimate() > left:
                stopped = "time"
                say(
                    f"time budget: {fmt_minutes(max(0.0, left))} left, a trial takes ~{fmt_minutes(estimate())}; "
                    f"stopping after {len(counted())} trials ({plan.trials} planned)"
                )
                break
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
    summary["time"] = {
        "budget_s": time_budget,
        "elapsed_s": round(clock.elapsed(), 1),
        "stopped": stopped,
        "plan": plan.to_json(),
        "throughput": study.user_attrs.get("throughput"),
    }
    planned_subset = "limit" not in (search or {}).get("distill", {})
    summary["binding"] = _binding(found["chosen"], summary, plan, trials, stopped, planned_subset)
    _print_summary(ctx, summary, found["chosen"])
    return found


def _make_plan(
    ctx: Context,
    space: Space,
    user: dict[str, Any],
    time_budget: float,
    trials: int,
    eval_limit: int | None,
    clock: _Clock,
) -> tuple[Plan, Throughput]:
    from ..data import load_dataset

    d = space.distill
    # Batches of at most 32: per-image rates a little above those of the real 128-image batches
    # (a conservative plan) for a quarter of the measuring time (~15 s for issue 14's teacher).
    tp = measure_throughput(ctx, space.students, batch_size=min(32, int(d.get("batch_size", 128))))
    n = {
        sp: len(load_dataset(ctx.data, sp, data_options=ctx.data_options)) for sp in ("train", "val", "test")
    }
    worst_eval = max(tp.eval_s.values(), default=tp.teacher_s)
    teacher_eval = tp.eval_s.get("none", tp.teacher_s)
    # Final measurement: the teacher and the chosen recipe's (up to 3) stages on the test split, one
    # interleaved bench of them all, the report.
    final_s = min(n["test"], eval_limit or n["test"]) * (teacher_eval + 3 * worst_eval) + 60.0
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


def _bar(total: int, initial: int, *, quiet: bool) -> Any:
    if quiet or os.environ.get("VITSHRINK_QUIET") == "1":
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="search", unit="trial", dynamic_ncols=True, file=sys.stderr
    )


def _params_label(p: dict[str, Any]) -> str:
    return f"[{p['student']}, prune {p['prune_ratio']:g}, {p['quant']}]"


def _binding(
    chosen: dict[str, Any],
    summary: dict[str, Any],
    plan: Plan,
    requested_trials: int,
    stopped: str,
    planned_subset: bool,
) -> dict[str, str]:
    """What held the result back: limits that more accurate candidates broke (or the chosen one
    misses), and the time budget where it cut the search short."""
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
    if stopped == "time":
        why.append(f"stopped after {summary['trials_run']} of {requested_trials} trials")
    elif summary["trials_run"] < requested_trials and plan.trials < requested_trials:
        why.append(f"planned {plan.trials} of {requested_trials} trials")
    if planned_subset and plan.subset < plan.n_train:
        why.append(f"trained on {plan.subset} of {plan.n_train} training images")
    if why:
        out["time_budget"] = "; ".join(why)
    return out


def _print_summary(ctx: Context, summary: dict[str, Any], chosen: dict[str, Any]) -> None:
    t = summary["time"]
    ctx.log(
        f"search: {summary['trials_run']} trials ({len(summary['trials'])} measured, "
        f"{len(summary['pruned_trials'])} pruned, {len(summary['failed_trials'])} failed) in "
        f"{fmt_minutes(t['elapsed_s'])} of {fmt_minutes(t['budget_s'])}"
        + ("; stopped by the time budget" if t["stopped"] == "time" else "")
    )
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


def _seeds(space: Space) -> list[dict[str, Any]]:
    """First candidates: a moderate one and an aggressive one, so even 2-3 trials span the range."""
    students = list(space.students)
    trained = [s for s in students if space.students[s] is not None]
    quants = [q for q in space.quant_modes if q != "none"] or space.quant_modes
    ratios = sorted(space.prune_ratios)
    moderate = {
        "student": trained[0] if trained else students[0],
        "prune_ratio": ratios[len(ratios) // 2] if len(ratios) > 2 else ratios[0],
        "quant": quants[0],
    }
    aggressive = {
        "student": trained[-1] if trained else students[0],
        "prune_ratio": ratios[-1],
        "quant": quants[0],
    }
    return [moderate] + ([aggressive] if aggressive != moderate else [])


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
        if t.state == optuna.trial.TrialState.FAIL and "error" in t.user_attrs:
            failed.append({"number": t.number, "params": t.params, "error": t.user_attrs["error"]})
        if t.state == optuna.trial.TrialState.PRUNED:
            p = t.user_attrs.get("pruned", {})
            pruned.append({"number": t.number, "params": t.params, "state": "pruned", **p})
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
                "seconds": t.user_attrs.get("seconds"),
                "violations": v,
                "feasible": all(x <= 0 for x in v.values()),
                "distance": _distance(v, budget, profile.memory_mb),
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
    return (
        f"no recipe met the budget in {n} trials; closest: trial {chosen['number']} "
        f"(student {p['student']}, prune {p['prune_ratio']}, quant {p['quant']}): {', '.join(parts)}"
    )
