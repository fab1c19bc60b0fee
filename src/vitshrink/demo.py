"""`vitshrink demo`: the whole pipeline on embedded data, on a CPU, in minutes.

classification: Fashion-MNIST (Debian package) — ViT teacher → distilled ViT student → pruned → fp16/int8.
segmentation: generated aerial scenes — UperNet-Swin teacher → SegFormer student (the paper's
UperNet-MobileViT student is a preset too; from scratch it is too slow to start for a CPU demo) →
pruned → fp16/int8.

Each task is a recipe, ``vitshrink/recipes/demo-TASK.yaml``, run by the same runner as
``vitshrink compress --recipe`` (`compress.runner`): stages under OUT/TASK/stages, resumable through
OUT/TASK/state.json, every artifact scored on the test split and benchmarked in ONE interleaved
onnxruntime run (same machine, same threads), then results.json, report.md/.html and OUT/TASK/model.onnx.
What the demo adds around the recipe: its teacher, trained once and cached (``$VITSHRINK_CACHE`` or
``~/.cache/vitshrink/demo``) keyed by its config, so a second run reuses it; and a console summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .artifacts import atomic_dir, atomic_file, cache_root, read_json
from .compress.recipe import Recipe, RecipeError, parse_recipe
from .errors import VitshrinkError
from .tasks import TASKS

# Keys of a demo recipe besides the compress recipe's own.
DEMO_KEYS = ("task", "data", "teacher", "bench")
TEACHER_KEYS = ("model", "epochs", "lr", "batch_size", "options", "limit", "augment", "amp")


@dataclass(frozen=True)
class TeacherSpec:
    """How the demo trains its teacher (`train.train` arguments)."""

    model: str  # preset
    options: dict[str, Any]  # preset config overrides
    epochs: int
    limit: int | None
    lr: float
    batch_size: int
    augment: bool = True
    amp: str = "auto"


@dataclass(frozen=True)
class DemoSpec:
    """One task's demo: a compress recipe plus its data, teacher and benchmark settings."""

    task: str
    data: str
    teacher: TeacherSpec
    recipe: Recipe
    bench: dict[str, int] = field(default_factory=dict)  # bench_many runs / rounds
    quick: bool = False

    @property
    def data_options(self) -> dict[str, Any]:
        return self.recipe.data_options

    @property
    def eval_limit(self) -> int | None:
        return self.recipe.eval_limit

    def stage(self, kind: str) -> dict[str, Any]:
        """Options of the recipe's first stage of `kind` (benchmarks reuse the demo's settings)."""
        return dict(next(s.options for s in self.recipe.stages if s.kind == kind))

    def key(self) -> str:
        # Only what determines the teacher: reuse a cached one whenever these match. The names and
        # the optional entries are those of the demo before it became recipes, so its cached
        # teachers still match.
        t = self.teacher
        k: dict[str, Any] = {
            "task": self.task,
            "data": self.data,
            "data_options": self.data_options,
            "teacher": t.model,
            "teacher_overrides": t.options,
            "teacher_epochs": t.epochs,
            "teacher_limit": t.limit,
            "teacher_lr": t.lr,
            "batch_size": t.batch_size,
        }
        if t.augment:
            k["augment"] = True
        if t.amp != "auto":
            k["teacher_amp"] = t.amp
        return hashlib.sha1(json.dumps(k, sort_keys=True).encode()).hexdigest()[:10]


def _facts(quick: bool) -> dict[str, bool]:
    """What a demo recipe's conditional values may depend on: the budget and this machine."""
    import torch

    from .train import native_bf16_cpu

    bf16 = native_bf16_cpu()
    return {
        "quick": quick,
        "full": not quick,
        "native_bf16": bf16,
        "fast_teacher": torch.cuda.is_available() or bf16,
    }


def _choose(obj: Any, facts: dict[str, bool], where: str) -> Any:
    """Resolve conditional values: a mapping keyed by conditions (and `otherwise`) becomes the value of
    the first condition that holds, e.g. {quick: 2, full: 6}."""
    if isinstance(obj, list):
        return [_choose(v, facts, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    conds = set(facts) | {"otherwise"}
    if obj and all(isinstance(k, str) and k in conds for k in obj):
        for k, v in obj.items():
            if k == "otherwise" or facts[k]:
                return _choose(v, facts, where)
        raise RecipeError(f"{where}: no condition of {sorted(obj)} holds here (add 'otherwise')")
    return {k: _choose(v, facts, where) for k, v in obj.items()}


def recipe_path(task: str) -> Path:
    if task not in TASKS:
        raise VitshrinkError(f"unknown demo task '{task}' ({', '.join(TASKS)}, all)")
    return Path(str(resources.files("vitshrink") / "recipes" / f"demo-{task}.yaml"))


def load_demo(path: str | os.PathLike, *, quick: bool) -> DemoSpec:
    """Read a demo recipe (see vitshrink/recipes/demo-classification.yaml) for one budget."""
    from .safeio import load_yaml

    path = Path(path)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a demo recipe is a mapping with {', '.join(DEMO_KEYS)} and stages")
    doc = _choose(raw, _facts(quick), str(path))
    missing = [k for k in ("task", "data", "teacher") if k not in doc]
    if missing:
        raise RecipeError(f"{path}: a demo recipe needs '{missing[0]}'")
    teacher = doc.pop("teacher")
    task, data, bench = str(doc.pop("task")), str(doc.pop("data")), dict(doc.pop("bench", None) or {})
    if task not in TASKS:
        raise RecipeError(f"{path}: 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    if (
        not isinstance(teacher, dict)
        or set(teacher) - set(TEACHER_KEYS)
        or {"model", "epochs", "lr", "batch_size"} - set(teacher)
    ):
        raise RecipeError(
            f"{path}: 'teacher' takes model, epochs, lr, batch_size and optionally {', '.join(TEACHER_KEYS[4:])}"
        )
    amp = teacher.get("amp", "auto")
    amp = {True: "on", False: "off"}.get(amp, amp)  # YAML 1.1 reads a bare on/off as a boolean
    recipe = parse_recipe(doc, str(path))
    return DemoSpec(
        task=task,
        data=data,
        teacher=TeacherSpec(
            model=teacher["model"],
            options=dict(teacher.get("options") or {}),
            epochs=teacher["epochs"],
            limit=teacher.get("limit"),
            lr=teacher["lr"],
            batch_size=teacher["batch_size"],
            augment=teacher.get("augment", True),
            amp=amp,
        ),
        recipe=recipe,
        bench=bench,
        quick=quick,
    )


STUDENTS = ("default", "paper")
PAPER_STUDENT = "upernet-mobilevit-micro"  # the paper's student (UperNet + MobileViT) at the demo's size


def with_student(spec: DemoSpec, preset: str, options: dict[str, Any] | None = None) -> DemoSpec:
    """`spec` with its distillation student replaced (same schedule; preset options reset)."""
    stages = []
    for st in spec.recipe.stages:
        if st.kind == "distill":
            opts = {k: v for k, v in st.options.items() if k != "student_options"}
            opts["student"] = preset
            if options:
                opts["student_options"] = dict(options)
            st = replace(st, options=opts)
        stages.append(st)
    return replace(spec, recipe=replace(spec.recipe, stages=stages))


def configs(quick: bool) -> dict[str, DemoSpec]:
    """Both tasks' demos at the quick (< 5 min on 2 cores for both) or full (< 30 min) budget."""
    return {t: load_demo(recipe_path(t), quick=quick) for t in TASKS}


def demo_cache() -> Path:
    return cache_root() / "demo"


def ensure_teacher(spec: DemoSpec, *, quiet: bool = True, log: Any = print) -> Path:
    """The demo's trained teacher for `spec`, trained once and cached by its config key."""
    from .train import train

    t = spec.teacher
    cached = demo_cache() / f"{spec.task}-teacher-{spec.key()}"
    if not (cached / "config.json").exists():
        log(f"training teacher {t.model} ({t.epochs} epochs)")
        train(
            t.model,
            spec.data,
            out=cached,
            epochs=t.epochs,
            limit=t.limit,
            lr=t.lr,
            batch_size=t.batch_size,
            augment=t.augment,
            amp=t.amp,
            resume=True,  # an interrupted demo continues the teacher from its last epoch
            quiet=quiet,
            data_options=spec.data_options,
            **t.options,
        )
    else:
        log(f"reusing cached teacher {cached}")
    return cached


def run_task(spec: DemoSpec, out: Path, *, quiet: bool, threads: int | None) -> Path:
    """Teacher (cached), then the recipe's stages, the benchmark, results.json and the report."""
    from .compress.context import make_context
    from .compress.devices import get_profile
    from .compress.runner import finish, measure, run_stages

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)

    def log(*a: Any) -> None:  # stage lines stay on with --quiet, which only silences progress bars
        print(f"[{spec.task} {time.time() - t_start:6.0f}s]", *a, flush=True)

    cached = ensure_teacher(spec, quiet=quiet, log=log)
    teacher_dir = out / "teacher"
    with atomic_dir(teacher_dir) as tmp:  # a killed demo keeps the previous copy, never half of one
        shutil.copytree(cached, tmp, dirs_exist_ok=True)
    ctx = replace(make_context(teacher_dir, spec.data, spec.data_options, quiet), logger=log)
    how = {"split": "test", "limit": spec.eval_limit, "threads": threads}
    records = run_stages(spec.recipe.stages, ctx, out, evaluate=how)
    log("benchmarking all stages (onnxruntime, interleaved)")
    stages = measure(
        records,
        ctx,
        out,
        profile=get_profile("cpu"),
        threads=threads,
        split="test",
        limit=spec.eval_limit,
        runs=spec.bench.get("runs", 20),
        rounds=spec.bench.get("rounds", 3),
    )
    res = finish(
        out,
        ctx,
        stages,
        profile=get_profile("cpu"),
        threads=threads,
        split="test",
        extra={
            "quick": spec.quick,
            "description": spec.recipe.description,
            "recipe": spec.recipe.to_json(),
            "recipe_source": spec.recipe.source,
            "demo_teacher": {**vars(spec.teacher), "cache_key": spec.key()},
        },
        t_start=t_start,
    )
    _write_summary(out, read_json(res["results"]))
    log(f"done: {res['results']}")
    return Path(res["results"])


def stage_dirs(task_out: str | os.PathLike) -> dict[str, dict[str, Path | None]]:
    """A finished demo task's stages by name: {"model_dir", "artifact"} (benchmarks start from them)."""
    res = read_json(Path(task_out) / "results.json")
    return {
        s["name"]: {k: Path(s[k]) if s.get(k) else None for k in ("model_dir", "artifact")}
        for s in res["stages"]
    }


def _write_summary(out: Path, results: dict[str, Any]) -> None:
    """A short console summary; the full tables are in report.md / report.html."""
    metric = results["metric"]
    base = results["stages"][0]
    lines = [f"{results['task']}: {metric} / p50 latency / size vs teacher"]
    for s in results["stages"]:
        lines.append(
            f"  {s['name']:10s} {metric} {s[metric]:.4f} ({s[metric] - base[metric]:+.4f})  p50 {s['latency_ms']['p50']:.2f} ms "
            f"({base['latency_ms']['p50'] / s['latency_ms']['p50']:.1f}x faster)  {s['size_mb']:.2f} MB ({base['size_mb'] / s['size_mb']:.1f}x smaller)"
        )
    with atomic_file(out / "summary.txt", "w") as f:
        f.write("\n".join(lines) + "\n")


def demo(
    task: str = "all",
    out: str | os.PathLike = "demo-out",
    *,
    quick: bool = False,
    quiet: bool = False,
    threads: int | None = None,
    student: str = "default",
) -> dict[str, Path]:
    """Run the pipeline for one or both tasks; returns {task: results.json path}.

    student: "default" (the recipes' students) or "paper": the segmentation student becomes the
    method paper's UperNet + MobileViT (`PAPER_STUDENT`), trained with the same schedule.
    """
    if student not in STUDENTS:
        raise VitshrinkError(f"unknown demo student '{student}' (choose from {', '.join(STUDENTS)})")
    tasks = list(TASKS) if task == "all" else [task]
    specs = {t: load_demo(recipe_path(t), quick=quick) for t in tasks}  # all checked before any runs
    if student == "paper" and "segmentation" in specs:
        specs["segmentation"] = with_student(specs["segmentation"], PAPER_STUDENT)
    out = Path(out)
    res = {}
    for t in tasks:
        res[t] = run_task(specs[t], out / t, quiet=quiet, threads=threads)
        if not quiet:
            print((out / t / "summary.txt").read_text(), end="")
    return res


from ._callable import install as _install  # noqa: E402

_install(__name__, "demo")
