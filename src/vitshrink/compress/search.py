"""Budget mode: search recipes (student, prune ratio, quant mode) with Optuna and keep what meets the budget.

Each Optuna trial is one candidate recipe run end to end under DIR/trials/NNN, its stage outputs shared
through DIR/cache (a student distilled once serves every trial that differs only later in the chain),
and its final artifact measured, not estimated: the task metric on the validation split (the test
split is kept for the final report) and the p50 latency, file size and peak RSS from `bench`. The
study is multi-objective (metric up, latency down) with the budget as Optuna constraints, stored in
sqlite:///DIR/search.db so an interrupted search resumes. Feasibility is recomputed from the stored
measurements at the end, so re-running with another budget re-selects without re-training.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import read_json, sha256_file, write_json
from ..errors import VitshrinkError
from .devices import DeviceProfile
from .recipe import Stage, validate_stage
from .runner import Context, evaluate_artifact, run_stages, shared_teacher, teacher_key

BUDGET_KEYS = ("latency_ms", "size_mb", "max_drop")
SEARCH_KEYS = ("students", "prune_ratios", "quant_modes", "distill", "prune", "quantize")
STUDY_NAME = "vitshrink-compress"
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

    def describe(self) -> dict[str, Any]:
        return {
            "students": self.students,
            "prune_ratios": self.prune_ratios,
            "quant_modes": self.quant_modes,
            "distill": self.distill,
            "prune": self.prune,
            "quantize": self.quantize,
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
    space = Space(
        students=students,
        prune_ratios=ratios,
        quant_modes=modes,
        distill={**DEFAULT_DISTILL, **search.get("distill", {})},
        prune={**DEFAULT_PRUNE, **search.get("prune", {})},
        quantize=dict(search.get("quantize", {})),
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


# ------------------------------------------------------------------------------------------- search


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
) -> dict[str, Any]:
    """Run (or resume) the Optuna search; returns {"chosen", "met", "summary", ...} (see compress)."""
    import optuna

    from ..bench import bench_many

    if trials < 1:
        raise VitshrinkError(f"--trials must be >= 1, got {trials}")
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
        sampler = optuna.samplers.TPESampler(seed=0)
        study = optuna.create_study(
            storage=f"sqlite:///{(out / 'search.db').resolve()}",
            study_name=STUDY_NAME,
            directions=["maximize", "minimize"],
            sampler=sampler,
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
    # Trials left RUNNING by an interrupted run: mark failed and queue their candidates again.
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params)
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    ]
    remaining = trials - len(done)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = {
            "student": trial.suggest_categorical("student", list(space.students)),
            "prune_ratio": trial.suggest_categorical("prune_ratio", space.prune_ratios),
            "quant": trial.suggest_categorical("quant", space.quant_modes),
        }
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.params == params and "measured" in t.user_attrs:  # same candidate: measured already
                record(trial, t.user_attrs["measured"])
                trial.set_user_attr("duplicate_of", t.number)
                return t.values[0], t.values[1]
        ctx.log(f"trial {trial.number}: {params}")
        tdir = out / "trials" / f"{trial.number:03d}"
        try:
            recs = run_stages(
                space.stages(params), ctx, tdir, cache_dir=out / "cache", teacher_dir=out / "teacher"
            )
            final = (tdir / recs[-1]["artifact"]).resolve()
            metric = evals.get(final, ctx, split, eval_limit, threads)[ctx.metric]
            b = bench_many(
                [final], threads=threads, runs=bench_runs, rounds=bench_rounds, device=profile.bench_device
            )[0]
        except Exception as e:  # noqa: BLE001 - one failed candidate must not end the search; it is recorded
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            trial.set_user_attr("error", f"{type(e).__name__}: {msg}")
            ctx.log(f"trial {trial.number} failed: {msg}")
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
        write_json(tdir / "trial.json", {"params": params, "measured": measured, "violations": v})
        ctx.log(
            f"trial {trial.number}: {ctx.metric} {metric:.4f}  p50 {measured['p50']:.2f} ms  "
            f"{measured['size_mb']:.2f} MB  {'meets the budget' if all(x <= 0 for x in v.values()) else 'over budget'}"
        )
        return metric, measured["p50"]

    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=(Exception,))
    return _select(study, budget, teacher_metric, profile, split, space)


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
) -> dict[str, Any]:
    import optuna

    rows, failed, finished = [], [], 0
    for t in study.get_trials(deepcopy=False):
        finished += t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        if t.state == optuna.trial.TrialState.FAIL and "error" in t.user_attrs:
            failed.append({"number": t.number, "params": t.params, "error": t.user_attrs["error"]})
        m = t.user_attrs.get("measured")
        if t.state != optuna.trial.TrialState.COMPLETE or m is None or "duplicate_of" in t.user_attrs:
            continue
        v = violations(m, budget, teacher_metric, profile.memory_mb)
        rows.append(
            {
                "number": t.number,
                "params": t.params,
                **m,
                "violations": v,
                "feasible": all(x <= 0 for x in v.values()),
                "distance": _distance(v, budget, profile.memory_mb),
            }
        )
    if not rows:
        first = failed[0]["error"] if failed else "no trial finished"
        raise VitshrinkError(f"budget search: all {len(failed)} trials failed (first: {first})")
    feasible = [r for r in rows if r["feasible"]]
    pareto = _pareto(feasible)
    if pareto:
        chosen = max(pareto, key=lambda r: (r["metric"], -r["p50"]))
    else:
        chosen = min(rows, key=lambda r: (r["distance"], -r["metric"]))
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
            "trials_run": finished,
            "trials": rows,
            "failed_trials": failed,
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
