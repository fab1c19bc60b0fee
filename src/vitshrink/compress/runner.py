"""Run a recipe stage by stage, resumably, then measure every artifact and write results.json + report.

Layout of a run directory DIR::

    DIR/state.json                      finished stages: key, artifact, checksums, metrics
    DIR/stages/00-teacher/model.onnx    the teacher (MODEL) exported, the reference row
    DIR/stages/NN-KIND/model[.onnx]     each stage's model directory and/or ONNX file
    DIR/results.json, report.md/.html   written by `finish`

Every stage has a key: a hash of its input's key and its own options, rooted in the teacher's files and
the data. A stage is skipped on resume when state.json lists it with the same key and its files still
match their checksums; otherwise it and everything after it run again. Within a stage, distillation
resumes from its per-epoch checkpoint. In budget search (`cache_dir` set) stage outputs live in
CACHE/KIND-KEY instead, so trials that share a prefix (same student, different prune ratio or quant
mode) reuse it.

The same runner runs `vitshrink demo` (its recipes are vitshrink/recipes/demo-*.yaml). A new stage kind
is its options in `recipe.SCHEMA` and its function in `STAGE_RUNNERS`; a kind whose output does not
feed the next stage (quantize: siblings from the same fp32 model) is also listed in `BRANCH_KINDS`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import read_json, sha256_file, write_json
from ..errors import ModelError, VitshrinkError
from ..report.examples import publish_final, write_examples
from ..tasks import TASK_METRIC
from .devices import DeviceProfile, device_info
from .recipe import Stage, stage_key

STATE_NAME = "state.json"
STATE_FORMAT = 1


@dataclass
class Context:
    teacher: Path
    data: str
    data_options: dict[str, Any]
    meta: dict[str, Any]  # the teacher's meta (task, class names, preprocessing)
    quiet: bool = False
    # Budget search only: where teacher logits are shared between stages and trials, and a callback
    # fed each training epoch's record (stage kind, {"epoch", "val"}) so weak trials can stop early;
    # stages reused from the cache replay their stored epochs through it.
    logits_dir: Path | None = None
    epoch_hook: Callable[[str, dict[str, Any]], None] | None = None
    logger: Callable[..., None] | None = None  # where log() lines go (default: stderr, "[compress]")
    # Seconds each finished stage of this run took, by label (a baseline stage's time budget)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def log(self, *msg: Any) -> None:
        # Stage lines and summaries print even under --quiet, which silences progress bars and the
        # per-trial progress lines only: a quiet run still says what it did.
        if self.logger is not None:
            self.logger(*msg)
        else:
            print("[compress]", *msg, file=sys.stderr, flush=True)

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """The data folder's content key (names, sizes, mtimes), walked once per run, not per trial."""
        from ..data import fingerprint

        return fingerprint(self.data)

    @property
    def metric(self) -> str:
        return TASK_METRIC[self.meta["task"]]


def make_context(model: str | os.PathLike, data: str, data_options: dict[str, Any], quiet: bool) -> Context:
    """Check the teacher and the data agree before anything long starts."""
    from ..data import describe
    from ..hub import resolve_model
    from ..models import is_model_dir, load_model

    teacher = resolve_model(model)
    if not is_model_dir(teacher):
        if teacher.suffix == ".onnx":
            raise VitshrinkError(
                f"compress needs the teacher as a model directory, not an ONNX file: {teacher}"
            )
        raise VitshrinkError(f"teacher model directory not found (no config.json): {teacher}")
    _, meta = load_model(teacher)  # also verifies checksums and honours preprocessor_config.json
    info = describe(data, data_options=data_options)
    if info["task"] != meta["task"]:
        raise VitshrinkError(f"the teacher is a {meta['task']} model but data '{data}' is {info['task']}")
    if len(info["class_names"]) != len(meta["class_names"]):
        raise VitshrinkError(
            f"the teacher has {len(meta['class_names'])} classes but data '{data}' has {len(info['class_names'])}"
        )
    return Context(
        teacher=teacher.resolve(), data=str(data), data_options=data_options, meta=meta, quiet=quiet
    )


@dataclass
class Current:
    """The latest full-precision model: what distill/prune/export/quantize take as input."""

    model_dir: Path
    onnx: Path
    key: str


# ------------------------------------------------------------------------------------------ identity


def teacher_key(teacher: Path) -> str:
    """Hash of the teacher's config, preprocessing and weights: a changed teacher invalidates every stage."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(teacher)):
        p = teacher / name
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or name.endswith("config.json")):
            h.update(name.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()[:16]


def root_key(tkey: str, data: str, data_options: dict[str, Any], data_fingerprint: str | None = None) -> str:
    """Cache key of a run's first stage; `data_fingerprint` (default: walked now) is the data folder's
    content (names, sizes, mtimes): a changed data folder must not reuse old stages."""
    if data_fingerprint is None:
        from ..data import fingerprint

        data_fingerprint = fingerprint(data)
    blob = json.dumps([tkey, str(data), data_options, data_fingerprint], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _checksums(paths: list[Path], root: Path) -> dict[str, str]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix == ".safetensors")
        else:
            files.append(p)
    return {os.path.relpath(f, root): sha256_file(f) for f in files}


def _verified(rec: dict[str, Any] | None, key: str, root: Path) -> bool:
    if not rec or rec.get("key") != key or not rec.get("checksums"):
        return False
    for rel, digest in rec["checksums"].items():
        f = root / rel
        if not f.is_file() or sha256_file(f) != digest:
            return False
    return True


def _abs(root: Path, rel: str) -> Path:
    return (root / rel).resolve()


# ---------------------------------------------------------------------------------------- the stages

StageResult = dict[str, Any]  # {"model_dir": Path | None, "artifact": Path, "train_metrics": dict}


def _export(model_dir: Path, out: Path, **kw: Any) -> Path:
    from ..export import export_onnx

    path, _ = export_onnx(model_dir, out, **kw)
    return path


def _build_student(preset: str, overrides: dict[str, Any], ctx: Context, out: Path, size: int | None) -> Path:
    """A preset student with config overrides, normalised like the teacher (distill takes presets as is)."""
    from ..models import build_model, save_model

    pre = ctx.meta["preprocess"]
    try:
        net, meta = build_model(
            preset,
            task=ctx.meta["task"],
            image_size=size or pre["size"][0],
            num_channels=pre["channels"],
            class_names=ctx.meta["class_names"],
            mean=pre["mean"],
            std=pre["std"],
            **overrides,
        )
    except TypeError as e:
        raise VitshrinkError(f"bad student_options for '{preset}': {str(e).splitlines()[0]}") from None
    return save_model(net, meta, out, stage="build", options={"preset": preset, **overrides})


def run_distill(stage: Stage, ctx: Context, cur: Current, sdir: Path) -> StageResult:
    from ..distill import distill

    opts = dict(stage.options)
    student = opts.pop("student")
    overrides = opts.pop("student_options", None)
    if overrides:
        student = str(_build_student(student, overrides, ctx, sdir / "student-init", opts.get("image_size")))
        opts.pop("image_size", None)  # the built student carries its size
    # The teacher is the latest full-precision model (MODEL itself when distill comes first).
    out, m = distill(
        cur.model_dir,
        student,
        ctx.data,
        out=sdir / "model",
        resume=True,  # an interrupted distillation continues from its last epoch
        quiet=ctx.quiet,
        data_options=ctx.data_options,
        teacher_cache_dir=ctx.logits_dir if opts.get("cache_teacher") else None,
        on_epoch_end=_epoch_hook(ctx, "distill"),
        **opts,
    )
    return {"model_dir": out, "artifact": _export(out, sdir / "model.onnx"), "train_metrics": m}


def run_prune(stage: Stage, ctx: Context, cur: Current, sdir: Path) -> StageResult:
    try:
        from ..prune import prune
    except ImportError:
        raise VitshrinkError("the prune stage is not available in this installation") from None
    opts = dict(stage.options)
    if isinstance(opts.get("granularity"), str):
        opts["granularity"] = tuple(p.strip() for p in opts["granularity"].split(","))
    elif "granularity" in opts:
        opts["granularity"] = tuple(opts["granularity"])
    if opts.get("recover_epochs"):
        opts["teacher"] = str(ctx.teacher)  # recovery learns from MODEL, the strongest model in the run
    if opts.get("recover_epochs") or opts.get("importance") == "taylor" or opts.get("depth_ratio"):
        # depth pruning ranks blocks on real images when it has them
        opts.update(data=ctx.data, data_options=ctx.data_options)
    if opts.get("recover_epochs"):
        opts.update(teacher_cache_dir=ctx.logits_dir, on_epoch_end=_epoch_hook(ctx, "prune"))
    out, m = prune(cur.model_dir, sdir / "model", quiet=ctx.quiet, **opts)
    return {"model_dir": Path(out), "artifact": _export(Path(out), sdir / "model.onnx"), "train_metrics": m}


def _epoch_hook(ctx: Context, kind: str) -> Callable[[int, dict[str, Any]], None] | None:
    hook = ctx.epoch_hook
    if hook is None:
        return None
    return lambda epoch, rec: hook(kind, {k: rec[k] for k in ("epoch", "val") if k in rec})


def replay_epochs(ctx: Context, rec: dict[str, Any]) -> None:
    """Feed a reused stage's stored epochs to ctx.epoch_hook, as if it had just trained them."""
    if ctx.epoch_hook is None:
        return
    m = rec.get("train_metrics") or {}
    for r in m.get("history") or m.get("recovery_history") or []:
        ctx.epoch_hook(rec["kind"], r)


def run_quantize(stage: Stage, ctx: Context, cur: Current, sdir: Path) -> StageResult:
    from ..quantize import quantize

    opts = dict(stage.options)
    mode = opts.pop("mode")
    calibrate = opts.pop("calibrate", mode in ("int8", "int8-static", "int8-mixed") or "max_drop" in opts)
    # At a resolution inside the graph the stage's model is re-exported: the ONNX it has runs at its own
    src = cur.model_dir if opts.get("resolution") is not None and cur.model_dir is not None else cur.onnx
    out, rep = quantize(
        src,
        sdir / "model.onnx",
        mode=mode,
        calib_data=ctx.data if calibrate else None,
        # calibrate on the run's data as configured (e.g. the aerial scenes' size and counts)
        data_options=ctx.data_options if calibrate else None,
        quiet=ctx.quiet,
        **opts,
    )
    return {"model_dir": None, "artifact": Path(out), "train_metrics": rep}


def run_baseline(stage: Stage, ctx: Context, cur: Current, sdir: Path) -> StageResult:
    from ..baseline import train_baseline

    opts = dict(stage.options)
    budget = opts.pop("budget", "distill")
    if isinstance(budget, str):
        if budget not in ctx.stage_seconds:
            raise VitshrinkError(
                f"baseline: budget '{budget}' names no earlier stage of this run "
                f"(stages: {', '.join(ctx.stage_seconds) or 'none'}); give a stage label or seconds"
            )
        budget = ctx.stage_seconds[budget]
    pre = ctx.meta["preprocess"]
    out, m = train_baseline(
        ctx.data,
        out=sdir / "model",
        budget_s=float(budget),
        task=ctx.meta["task"],
        preset=opts.pop("model", None),
        image_size=pre["size"][0],
        data_options=ctx.data_options,
        quiet=ctx.quiet,
        **opts,
    )
    return {"model_dir": out, "artifact": _export(out, sdir / "model.onnx"), "train_metrics": m}


def run_export(stage: Stage, ctx: Context, cur: Current, sdir: Path) -> StageResult:
    path = _export(cur.model_dir, sdir / "model.onnx", **stage.options)
    return {"model_dir": cur.model_dir, "artifact": path, "train_metrics": {}}


STAGE_RUNNERS: dict[str, Callable[[Stage, Context, Current, Path], StageResult]] = {
    "distill": run_distill,
    "prune": run_prune,
    "quantize": run_quantize,
    "export": run_export,
    "baseline": run_baseline,
}


# Kinds whose output is a leaf: the stage after one starts from the same full-precision model.
BRANCH_KINDS: frozenset[str] = frozenset({"quantize", "baseline"})


def stage_label(stage: Stage) -> str:
    if stage.name:
        return stage.name
    return f"quantize-{stage.options['mode']}" if stage.kind == "quantize" else stage.kind


# -------------------------------------------------------------------------------------------- running


def evaluate_artifact(
    path: Path, ctx: Context, *, split: str, limit: int | None, threads: int | None
) -> dict[str, Any]:
    from ..evaluate import evaluate

    m = evaluate(
        path, ctx.data, split=split, limit=limit, threads=threads, quiet=True, data_options=ctx.data_options
    )
    keep = ("accuracy",) if ctx.meta["task"] == "classification" else ("miou", "dice", "per_class_iou")
    return {k: m[k] for k in keep if k in m}


def prepare_teacher(ctx: Context, sdir: Path, root: Path, prev: dict[str, Any] | None) -> dict[str, Any]:
    """The teacher's ONNX export (reused while the teacher's files are unchanged) as record 0."""
    key = teacher_key(ctx.teacher)
    if prev is not None and _verified(prev, key, root):
        return dict(prev)
    t0 = time.time()
    ctx.log(f"exporting the teacher {ctx.teacher}")
    onnx = _export(ctx.teacher, sdir / "model.onnx")
    return {
        "name": "teacher",
        "kind": "teacher",
        "options": {"model": str(ctx.teacher)},
        "key": key,
        "model_dir": str(ctx.teacher.resolve()),
        "artifact": os.path.relpath(onnx, root),
        "checksums": _checksums([onnx], root),
        "seconds": round(time.time() - t0, 1),
    }


def shared_teacher(ctx: Context, teacher_dir: Path) -> dict[str, Any]:
    """The teacher record kept in teacher_dir/stage.json (paths relative to teacher_dir)."""
    prev = read_json(teacher_dir / "stage.json") if (teacher_dir / "stage.json").exists() else None
    rec = prepare_teacher(ctx, teacher_dir, teacher_dir, prev)
    if rec != prev:
        write_json(teacher_dir / "stage.json", rec)
    return rec


def run_stages(
    stages: list[Stage],
    ctx: Context,
    root: Path,
    *,
    cache_dir: Path | None = None,
    teacher_dir: Path | None = None,
    evaluate: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) `stages` under `root`; returns the records, teacher first, as in root/state.json.

    evaluate: {"split", "limit", "threads"} scores each artifact when it is made (and keeps the score);
    None leaves metrics to the caller. cache_dir: share stage outputs by key (budget search).
    teacher_dir: where the teacher's ONNX goes (default root/stages/00-teacher).
    """
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / STATE_NAME
    old: list[dict[str, Any]] = []
    if state_path.exists():
        try:
            old = list(read_json(state_path).get("stages") or [])
        except (VitshrinkError, AttributeError):
            ctx.log(f"ignoring unreadable {state_path}; starting over")
    if teacher_dir is not None:
        trec = _rebase(shared_teacher(ctx, teacher_dir), teacher_dir, root)
    else:
        trec = prepare_teacher(ctx, root / "stages" / "00-teacher", root, old[0] if old else None)
    trec = _with_metrics(trec, ctx, root, evaluate)
    records = [trec]
    if not old or trec != old[0]:
        # Later entries stay listed (their keys decide whether they still apply): a kill here loses none.
        _write_state(state_path, ctx, records + old[1:])

    cur = Current(
        ctx.teacher,
        _abs(root, trec["artifact"]),
        root_key(trec["key"], ctx.data, ctx.data_options, ctx.data_fingerprint),
    )
    for i, stage in enumerate(stages, start=1):
        key = stage_key(cur.key, stage)
        label = stage_label(stage)
        if cache_dir is not None:
            sdir = cache_dir / f"{stage.kind}-{key}"
            cached = read_json(sdir / "stage.json") if (sdir / "stage.json").exists() else None
            prev = _rebase(cached, sdir, root) if cached else None
            ok = cached is not None and _verified(cached, key, sdir)
        else:
            sdir = root / "stages" / f"{i:02d}-{stage.kind}"
            prev = old[i] if i < len(old) else None
            ok = _verified(prev, key, root)
        if ok and prev is not None:
            ctx.log(f"stage {i} ({label}): finished earlier, skipping")
            rec = {**prev, "name": label}  # a renamed stage keeps its outputs
            if cache_dir is not None:
                rec["reused"] = True  # the search's accounting: this trial did not pay for it
            replay_epochs(ctx, rec)
        else:
            old = []  # after a re-run stage, nothing later can be reused
            rec = _run_one(stage, i, label, key, ctx, cur, sdir, cache_dir, root)
        rec = _with_metrics(rec, ctx, root, evaluate)
        records.append(rec)
        if rec.get("seconds") is not None:
            ctx.stage_seconds[label] = float(rec["seconds"])
        if rec != prev or cache_dir is not None:
            _write_state(state_path, ctx, records + old[len(records) :])
        if rec.get("model_dir") and stage.kind not in BRANCH_KINDS:
            cur = Current(_abs(root, rec["model_dir"]), _abs(root, rec["artifact"]), key)
    if len(old) > len(records):
        _write_state(state_path, ctx, records)  # the recipe got shorter: forget stages it no longer has
    return records


def _run_one(
    stage: Stage,
    i: int,
    label: str,
    key: str,
    ctx: Context,
    cur: Current,
    sdir: Path,
    cache_dir: Path | None,
    root: Path,
) -> dict[str, Any]:
    pending = sdir / "pending.json"
    # A partial stage directory is resumable only if it was started with the same inputs and options.
    if sdir.exists() and not (pending.exists() and read_json(pending).get("key") == key):
        shutil.rmtree(sdir)
    sdir.mkdir(parents=True, exist_ok=True)
    write_json(pending, {"key": key})
    ctx.log(f"stage {i} ({label}): running with {json.dumps(stage.options, default=str)}")
    t0 = time.time()
    res = STAGE_RUNNERS[stage.kind](stage, ctx, cur, sdir)
    model_dir = Path(res["model_dir"]) if res.get("model_dir") else None
    artifact = Path(res["artifact"])
    base = sdir if cache_dir is not None else root
    own = [artifact] + ([model_dir] if model_dir is not None and model_dir != cur.model_dir else [])
    rec = {
        "name": label,
        "kind": stage.kind,
        "options": stage.options,
        "key": key,
        "model_dir": os.path.relpath(model_dir, base) if model_dir is not None else None,
        "artifact": os.path.relpath(artifact, base),
        "checksums": _checksums(own, base),
        "train_metrics": _jsonable(res.get("train_metrics") or {}),
        "seconds": round(time.time() - t0, 1),
    }
    if cache_dir is not None:
        write_json(sdir / "stage.json", rec)
        rec = _rebase(rec, sdir, root)
    pending.unlink(missing_ok=True)
    ctx.log(f"stage {i} ({label}): done in {rec['seconds']}s -> {artifact}")
    return rec


def _rebase(rec: dict[str, Any], frm: Path, to: Path) -> dict[str, Any]:
    """Paths in a record made relative to `frm`, re-expressed relative to `to`."""

    def re(p: str | None) -> str | None:
        if p is None or os.path.isabs(p):
            return p
        return os.path.relpath((frm / p).resolve(), to.resolve())

    out = dict(rec)
    out["artifact"] = re(rec["artifact"])
    out["model_dir"] = re(rec.get("model_dir"))
    out["checksums"] = {re(k): v for k, v in (rec.get("checksums") or {}).items()}
    return out


def _with_metrics(
    rec: dict[str, Any], ctx: Context, root: Path, evaluate: dict[str, Any] | None
) -> dict[str, Any]:
    if evaluate is None:
        return rec
    how = {"split": evaluate["split"], "limit": evaluate.get("limit"), "data": ctx.data, **ctx.data_options}
    if rec.get("metrics") and rec.get("evaluated_on") == how:
        return rec
    m = evaluate_artifact(
        _abs(root, rec["artifact"]),
        ctx,
        split=evaluate["split"],
        limit=evaluate.get("limit"),
        threads=evaluate.get("threads"),
    )
    ctx.log(f"{rec['name']}: {ctx.metric} {m[ctx.metric]:.4f} ({evaluate['split']} split)")
    return {**rec, "metrics": m, "evaluated_on": how}


def _write_state(path: Path, ctx: Context, records: list[dict[str, Any]]) -> None:
    write_json(
        path,
        {
            "format": STATE_FORMAT,
            "teacher": str(ctx.teacher),
            "data": ctx.data,
            "data_options": ctx.data_options,
            "stages": records,
        },
    )


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


# -------------------------------------------------------------------------------------------- results


def measure(
    records: list[dict[str, Any]],
    ctx: Context,
    root: Path,
    *,
    profile: DeviceProfile,
    threads: int | None,
    split: str,
    limit: int | None,
    runs: int,
    rounds: int,
) -> list[dict[str, Any]]:
    """results.json stage entries: metrics on `split` plus one interleaved benchmark of all artifacts."""
    from ..bench import bench_many, stage_fields

    records = [
        _with_metrics(r, ctx, root, {"split": split, "limit": limit, "threads": threads}) for r in records
    ]
    paths = [_abs(root, r["artifact"]) for r in records]
    ctx.log(f"benchmarking {len(paths)} artifacts ({profile.name} profile, threads {threads or 'all'})")
    bench = bench_many(list(paths), threads=threads, runs=runs, rounds=rounds, device=profile.bench_device)
    names: dict[str, int] = {}
    out = []
    for rec, path, b in zip(records, paths, bench):
        n = names[rec["name"]] = names.get(rec["name"], 0) + 1
        entry: dict[str, Any] = {
            "name": rec["name"] if n == 1 else f"{rec['name']}-{n}",
            "kind": rec["kind"],
            "artifact": str(path),
            "model_dir": str(_abs(root, rec["model_dir"])) if rec.get("model_dir") else None,
            "options": rec.get("options", {}),
            **rec["metrics"],
            **stage_fields(b),
            "seconds": rec.get("seconds"),
        }
        if rec["kind"] == "quantize":
            chosen = (rec.get("train_metrics") or {}).get("chosen")
            mode = rec["options"]["mode"]
            entry["notes"] = f"{mode} ONNX" + (f" ({chosen})" if chosen and chosen != mode else "")
        out.append(entry)
    return out


def finish(
    out: Path,
    ctx: Context,
    stages: list[dict[str, Any]],
    *,
    profile: DeviceProfile,
    threads: int | None,
    split: str,
    extra: dict[str, Any] | None = None,
    t_start: float | None = None,
) -> dict[str, Any]:
    """Device extras (memory check, TensorRT recipe), results.json and the report; returns paths."""
    final = next(s for s in reversed(stages) if s.get("kind") != "baseline")  # the pipeline's, not the CNN
    notes: list[str] = []
    device = device_info(profile, threads)
    if profile.memory_mb is not None and final.get("peak_rss_mb"):
        ok = final["peak_rss_mb"] <= profile.memory_mb
        device["memory_check"] = (
            f"peak RSS {final['peak_rss_mb']:.0f} MB {'within' if ok else 'OVER'} the "
            f"{profile.memory_mb} MB left of the 4 GB shared memory"
        )
        if not ok:
            notes.append(device["memory_check"])
            ctx.log(f"warning: {device['memory_check']}")
    trt_dir = None
    if profile.trt:
        fp32_dir = next(Path(s["model_dir"]) for s in reversed(stages) if s.get("model_dir"))
        trt_dir = jetson_recipe(out, fp32_dir, profile, ctx)
        device["tensorrt_recipe"] = str(trt_dir)
    if profile.disclaimer:
        ctx.log(f"note: {profile.disclaimer}")
    results = {
        "task": ctx.meta["task"],
        "metric": ctx.metric,
        "split": split,
        "data": ctx.data,
        "data_options": ctx.data_options,
        "teacher": str(ctx.teacher),
        "class_names": ctx.meta["class_names"],
        "device": device,
        "stages": stages,
        "final": str(publish_final(out, final["artifact"])),
        "final_source": final["artifact"],
        "examples": _examples(out, ctx, stages),
        "notes": notes,
        **(extra or {}),
    }
    if t_start is not None:
        results["seconds"] = round(time.time() - t_start, 1)
    write_json(out / "results.json", results)
    from ..report import report

    rep = report(out, quiet=True)
    return {
        "final": Path(results["final"]),
        "results": out / "results.json",
        "report": rep.get("html"),
        "trt": trt_dir,
        "stages": stages,
    }


def _examples(out: Path, ctx: Context, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Example predictions for the report; a report without them beats no report at all."""
    if len(stages) < 2 or not all(
        str(s.get("artifact", "")).endswith(".onnx") for s in (stages[0], stages[-1])
    ):
        return []
    try:
        return write_examples(out, ctx.data, ctx.data_options, ctx.meta["task"], stages)
    except VitshrinkError as e:
        ctx.log(f"warning: no example predictions in the report ({e})")
        return []


def jetson_recipe(out: Path, model_dir: Path, profile: DeviceProfile, ctx: Context) -> Path:
    """fp16 TensorRT recipe for the final full-precision model, exported at opset 16 for TensorRT 8.2."""
    from ..artifacts import atomic_file
    from ..deploy.trt import trt_recipe

    trt_dir = out / "trt"
    try:
        # TensorRT 8.2 (the Nano's last) has no LayerNormalization parser; below opset 17 it is decomposed.
        src = _export(model_dir, trt_dir / "model.onnx", opset=16)
    except ModelError as e:
        ctx.log(f"opset-16 export failed ({e}); the recipe uses the opset-17 model")
        src = _export(model_dir, trt_dir / "model.onnx")
    trt_recipe(src, trt_dir, fp16=True, device="jetson-nano")
    readme = trt_dir / "README.txt"
    text = readme.read_text() if readme.exists() else ""
    with atomic_file(readme, "w") as f:
        f.write(f"NOTE: {profile.disclaimer}.\n\n{text}")
    return trt_dir
