"""`vitshrink demo`: the whole pipeline on embedded data, on a CPU, in minutes.

classification: Fashion-MNIST (Debian package) — ViT teacher → distilled ViT student → pruned → fp16/int8.
segmentation: generated aerial scenes — UperNet-Swin teacher → SegFormer student (the paper's
UperNet-MobileViT student is a preset too; from scratch it is too slow to start for a CPU demo) →
pruned → fp16/int8.

Trained teachers are cached (``$VITSHRINK_CACHE`` or ``~/.cache/vitshrink/demo``) keyed by their
config, so a second run reuses them. Every stage's artifact is exported to ONNX and all are benchmarked
in ONE interleaved onnxruntime run (same machine, same threads), then scored on the test split.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import atomic_dir, atomic_file, write_json
from .errors import VitshrinkError


@dataclass
class TaskConfig:
    task: str
    data: str
    data_options: dict[str, Any]
    teacher: str
    teacher_overrides: dict[str, Any]
    teacher_epochs: int
    teacher_limit: int | None
    teacher_lr: float
    student: str
    student_overrides: dict[str, Any]
    distill_epochs: int
    distill_limit: int | None
    distill_losses: dict[str, float]
    distill_lr: float
    prune_ratio: float
    prune_recover_epochs: float
    test_limit: int | None
    batch_size: int
    augment: bool = True
    teacher_amp: str = "auto"  # "on": bf16 teacher training on CPU (train.amp_dtype_for)
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        # Only what determines the teacher: reuse a cached one whenever these match.
        t = {
            k: getattr(self, k)
            for k in (
                "task",
                "data",
                "data_options",
                "teacher",
                "teacher_overrides",
                "teacher_epochs",
                "teacher_limit",
                "teacher_lr",
                "batch_size",
            )
        }
        if self.augment:  # absent when off, so the keys of teachers cached before it existed still match
            t["augment"] = True
        if self.teacher_amp != "auto":
            t["teacher_amp"] = self.teacher_amp
        return hashlib.sha1(json.dumps(t, sort_keys=True).encode()).hexdigest()[:10]


def configs(quick: bool) -> dict[str, TaskConfig]:
    """Budgets sized for 2 CPU cores: quick < 5 min for both tasks, full < 30 min."""
    from .train import native_bf16_cpu

    # Patch 7 on 28x28 gives 16 tokens: 3x cheaper than patch 4 at similar accuracy for this budget.
    teacher_vit = {
        "hidden_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "patch_size": 7,
    }
    student_vit = {
        "hidden_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 3,
        "intermediate_size": 384,
        "patch_size": 7,
    }
    cls = TaskConfig(
        task="classification",
        data="fashion-mnist",
        data_options={},
        teacher="vit-mini",
        teacher_overrides=teacher_vit,
        teacher_epochs=1 if quick else 3,
        teacher_limit=10000 if quick else 25000,
        teacher_lr=1e-3,
        student="vit-micro",
        student_overrides=student_vit,
        distill_epochs=2 if quick else 6,
        distill_limit=10000 if quick else 25000,
        distill_losses={"kd": 1.0},
        distill_lr=2e-3,
        prune_ratio=0.25,
        prune_recover_epochs=1,
        test_limit=2000 if quick else None,
        batch_size=64,
        # Short CPU schedules: augmentation costs more than it gives, and without it the teacher's
        # logits can be cached, so distillation epochs cost only the student's passes.
        augment=False,
    )
    seg_n = {
        "size": 128,
        "n_train": 240 if quick else 800,
        "n_val": 40 if quick else 100,
        "n_test": 40 if quick else 100,
    }
    seg = TaskConfig(
        task="segmentation",
        data="aerial",
        data_options=seg_n,
        teacher="upernet-swin-micro",
        # A 160-wide UperNet head: 24 augmented epochs reach 0.55+ test mIoU (measured with the 128-wide
        # head: 8 plain epochs 0.42, 24 augmented 0.56). A teacher no better than its student has
        # nothing to teach (benchmarks/distill_gain.py); the wider head also costs 1.45x the latency.
        teacher_overrides={"hidden_size": 160},
        teacher_epochs=3 if quick else 24,
        teacher_limit=None,
        teacher_lr=2e-3,
        # bf16 mixed precision trains this 3M-param teacher 2.5x faster where the CPU has native bf16
        # (AMX / AVX512-BF16); emulated bf16 elsewhere would be slower than fp32.
        teacher_amp="on" if native_bf16_cpu() else "auto",
        # The paper's student is UperNet + MobileViT (preset upernet-mobilevit-*, used by
        # recipes/uav-segmentation.yaml). From scratch it predicts a single class for its first 2-3
        # epochs on this data (measured), which a CPU demo cannot afford; SegFormer-micro learns from
        # the first epoch at 7x fewer MACs than the teacher.
        student="segformer-micro",
        # A 32-wide decoder: at 128 px the student is overhead-bound, and the MLP decoder's fuse at
        # 1/4 resolution is its largest cost (measured: 1.88 -> 1.57 ms for 6% fewer params).
        student_overrides={"decoder_hidden_size": 32},
        # The student's epochs are cheap (4 s + the teacher's bf16 forward): a long, consistent schedule
        # (teacher and student see the same augmented view) lets it match its teacher (measured with
        # the 128-wide teacher: 80 epochs 0.5578 vs teacher 0.5574; 50 epochs 0.034 below it; 25
        # cached-logit epochs 0.4433).
        distill_epochs=4 if quick else 80,
        distill_limit=None,
        distill_losses={"kd": 1.0},
        distill_lr=3e-3,
        prune_ratio=0.25,
        prune_recover_epochs=1 if quick else 6,
        test_limit=None,
        batch_size=16,
        augment=True,
        # Axes picked by one-shot output KL (MLP only here: the 32-wide decoder is the most sensitive)
        # and recovery from teacher *and* labels at prune()'s segmentation temperature (T=1):
        # benchmarks/prune_recovery.py measured 0.5639 vs 0.5583 at T=4 and 0.5486 for all axes with
        # KD alone (2 seeds, 6 epochs).
        extra={"prune_lr": 1e-3, "prune_granularity": "auto", "prune_recover_losses": {"kd": 1.0, "ce": 1.0}},
    )
    return {"classification": cls, "segmentation": seg}


def _fast_teacher() -> bool:
    import torch

    from .train import native_bf16_cpu

    return torch.cuda.is_available() or native_bf16_cpu()


def cache_root() -> Path:
    return Path(os.environ.get("VITSHRINK_CACHE", Path.home() / ".cache" / "vitshrink")) / "demo"


def _stage_record(
    name: str, model_dir: Path | None, onnx: Path, metrics: dict[str, Any], task: str, notes: str = ""
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "name": name,
        "artifact": str(onnx),
        "model_dir": str(model_dir) if model_dir else None,
    }
    if task == "classification":
        rec["accuracy"] = metrics["accuracy"]
    else:
        rec["miou"], rec["dice"] = metrics["miou"], metrics["dice"]
        rec["per_class_iou"] = metrics.get("per_class_iou")
    if notes:
        rec["notes"] = notes
    return rec


def ensure_teacher(cfg: TaskConfig, *, quiet: bool = True, log: Any = print) -> Path:
    """The demo's trained teacher for `cfg`, trained once and cached by its config key."""
    from .train import train

    cached = cache_root() / f"{cfg.task}-teacher-{cfg.key()}"
    if not (cached / "config.json").exists():
        log(f"training teacher {cfg.teacher} ({cfg.teacher_epochs} epochs)")
        train(
            cfg.teacher,
            cfg.data,
            out=cached,
            epochs=cfg.teacher_epochs,
            limit=cfg.teacher_limit,
            lr=cfg.teacher_lr,
            batch_size=cfg.batch_size,
            augment=cfg.augment,
            amp=cfg.teacher_amp,
            resume=True,  # an interrupted demo continues the teacher from its last epoch
            quiet=quiet,
            data_options=cfg.data_options,
            **cfg.teacher_overrides,
        )
    else:
        log(f"reusing cached teacher {cached}")
    return cached


def run_task(cfg: TaskConfig, out: Path, *, quick: bool, quiet: bool, threads: int | None) -> Path:
    from .bench import bench_many, stage_fields
    from .distill import distill
    from .evaluate import evaluate
    from .export import export_onnx

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)

    def log(*a: Any) -> None:  # stage lines stay on with --quiet, which only silences progress bars
        print(f"[{cfg.task} {time.time() - t_start:6.0f}s]", *a, flush=True)

    ev = {"limit": cfg.test_limit, "quiet": True, "data_options": cfg.data_options, "threads": threads}
    stages: list[dict[str, Any]] = []

    # 1. teacher (cached by config)
    cached = ensure_teacher(cfg, quiet=quiet, log=log)
    teacher_dir = out / "teacher"
    with atomic_dir(teacher_dir) as tmp:  # a killed demo keeps the previous copy, never half of one
        shutil.copytree(cached, tmp, dirs_exist_ok=True)
    teacher_onnx, _ = export_onnx(teacher_dir, out / "teacher.onnx")
    m = evaluate(teacher_onnx, cfg.data, **ev)
    log(f"teacher: {_fmt(m)}")
    stages.append(_stage_record("teacher", teacher_dir, teacher_onnx, m, cfg.task))

    # 2. distillation into the student
    student_dir = out / "distill"
    log(f"distilling into {cfg.student} ({cfg.distill_epochs} epochs, losses {cfg.distill_losses})")
    distill(
        teacher_dir,
        cfg.student,
        cfg.data,
        out=student_dir,
        epochs=cfg.distill_epochs,
        losses=cfg.distill_losses,
        limit=cfg.distill_limit,
        lr=cfg.distill_lr,
        batch_size=cfg.batch_size,
        augment=cfg.augment,
        # Online teacher when augmenting and its forward pass is cheap (CUDA, or bf16 on a CPU with
        # native bf16: 7.4 s/epoch): a cache that follows flips and shifts is faster still (4.4 s vs
        # 12.6 s online in fp32) but its student ended 0.016 mIoU lower (0.5385 vs 0.5548, 80 epochs),
        # so it is only the fallback that keeps the full demo under 30 minutes on other CPUs.
        cache_teacher=not cfg.augment or not _fast_teacher(),
        quiet=quiet,
        data_options=cfg.data_options,
        **cfg.student_overrides,
    )
    student_onnx, _ = export_onnx(student_dir, out / "distill.onnx")
    m = evaluate(student_onnx, cfg.data, **ev)
    log(f"distill: {_fmt(m)}")
    stages.append(_stage_record("distill", student_dir, student_onnx, m, cfg.task))

    final_dir, final_onnx = student_dir, student_onnx
    for extra in _later_stages():
        final_dir, final_onnx, recs = extra(
            cfg, out, final_dir, final_onnx, teacher_dir=teacher_dir, quick=quick, quiet=quiet, log=log, ev=ev
        )
        stages.extend(recs)

    # Benchmark every ONNX artifact in one interleaved run.
    log("benchmarking all stages (onnxruntime, interleaved)")
    bench = bench_many(
        [s["artifact"] for s in stages],
        threads=threads,
        runs=10 if quick else 30,
        rounds=2 if quick else 3,
        batch=8,
    )
    for s, b in zip(stages, bench):
        s.update(stage_fields(b))
    from .report.examples import publish_final, write_examples

    results = {
        "task": cfg.task,
        "metric": "accuracy" if cfg.task == "classification" else "miou",
        "data": cfg.data,
        "class_names": _class_names(teacher_dir),
        "device": _device_info(threads),
        "config": asdict(cfg),
        "quick": quick,
        "stages": stages,
        "examples": write_examples(out, cfg.data, cfg.data_options, cfg.task, stages),
        "final": str(publish_final(out, stages[-1]["artifact"])),
        "final_source": stages[-1]["artifact"],
        "seconds": round(time.time() - t_start, 1),
    }
    write_json(out / "results.json", results)
    from .report import report

    report(out, quiet=True)
    _write_summary(out, results)
    log(f"done: {out / 'results.json'}")
    return out / "results.json"


def _later_stages() -> list[Any]:
    """Prune and quantize stages (see `demo_stages`), appended in pipeline order."""
    from .demo_stages import STAGES

    return STAGES


def _fmt(m: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))


def _class_names(model_dir: Path) -> list[str]:
    return json.loads((model_dir / "vitshrink.json").read_text())["class_names"]


def _device_info(threads: int | None) -> dict[str, Any]:
    import platform

    import onnxruntime as ort

    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads or "onnxruntime default (one per core)",
        "onnxruntime": ort.__version__,
        "runtime": "onnxruntime CPU, batch 1",
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
) -> dict[str, Path]:
    """Run the pipeline for one or both tasks; returns {task: results.json path}."""
    cfgs = configs(quick)
    tasks = list(cfgs) if task == "all" else [task]
    for t in tasks:
        if t not in cfgs:
            raise VitshrinkError(f"unknown demo task '{t}' (classification, segmentation, all)")
    out = Path(out)
    res = {}
    for t in tasks:
        res[t] = run_task(cfgs[t], out / t, quick=quick, quiet=quiet, threads=threads)
        if not quiet:
            print((out / t / "summary.txt").read_text(), end="")
    return res


from ._callable import install as _install  # noqa: E402

_install(__name__, "demo")
