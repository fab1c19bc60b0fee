"""Does distillation beat training on labels alone, at the same budget?

The same student (same preset, epochs, seed, data subset, lr, batch) is trained twice: from labels only
(`vitshrink.train`) and from the teacher (`vitshrink.distill`). Run on Fashion-MNIST and on the aerial
scenes. The teacher is the demo's cached one when present (run `vitshrink demo` first), else trained here.

    python benchmarks/distill_gain.py [--quick] [--task classification|segmentation|all] [--json out.json]
        [--reuse-demo DEMO_OUT]

--reuse-demo takes the distilled student from a finished `vitshrink demo --out DEMO_OUT` run instead of
distilling again, when its recorded options (epochs, lr, seed, limit, losses, augmentation) are this
benchmark's; only the labels-only student is trained then.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vitshrink.demo import configs, ensure_teacher, stage_dirs
from vitshrink.distill import distill
from vitshrink.evaluate import evaluate
from vitshrink.tasks import TASK_METRIC
from vitshrink.train import train


def _demo_student(demo_out: Path | None, task: str, losses, common: dict) -> Path | None:
    """The demo's distilled student when it was trained exactly as this benchmark would train it."""
    if demo_out is None or not (demo_out / task / "results.json").exists():
        return None
    d = stage_dirs(demo_out / task)["distill"]["model_dir"]
    if d is None or not (d / "vitshrink.json").exists():
        return None
    meta = json.loads((d / "vitshrink.json").read_text())
    opts = meta["history"][-1]["options"]
    want = {k: common[k] for k in ("epochs", "limit", "lr", "seed", "batch_size")}
    want |= {"losses": losses, "augment": True}  # the benchmark's distill runs augmented
    return d if all(opts.get(k) == v for k, v in want.items()) else None


def run(
    task: str,
    quick: bool,
    tmp: Path,
    demo_out: Path | None = None,
    epochs: int | None = None,
    seed: int = 0,
) -> dict:
    cfg = configs(quick)[task]
    teacher = ensure_teacher(cfg, quiet=True)
    dist = cfg.stage("distill")  # the demo's distillation settings
    student, losses = dist["student"], dist["losses"]
    common = dict(
        epochs=epochs or dist["epochs"],
        limit=dist.get("limit"),
        lr=dist["lr"],
        batch_size=dist["batch_size"],
        seed=seed,
        quiet=True,
        data_options=cfg.data_options,
        **dist.get("student_options", {}),
    )
    ev = dict(limit=cfg.eval_limit, quiet=True, data_options=cfg.data_options)
    metric = TASK_METRIC[task]
    t0 = time.time()
    labels_dir, _ = train(student, cfg.data, out=tmp / f"{task}-labels", **common)
    t_labels = time.time() - t0
    t0 = time.time()
    kd_dir = _demo_student(demo_out, task, losses, common)
    if kd_dir is None:
        kd_dir, _ = distill(teacher, student, cfg.data, out=tmp / f"{task}-kd", losses=losses, **common)
    t_kd = time.time() - t0
    res = {
        "task": task,
        "metric": metric,
        "student": student,
        "epochs": common["epochs"],
        "teacher": evaluate(teacher, cfg.data, **ev)[metric],
        "labels_only": evaluate(labels_dir, cfg.data, **ev)[metric],
        "distilled": evaluate(kd_dir, cfg.data, **ev)[metric],
        "seconds": {"labels_only": round(t_labels, 1), "distilled": round(t_kd, 1)},
    }
    res["gain"] = res["distilled"] - res["labels_only"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="all", choices=["classification", "segmentation", "all"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    ap.add_argument("--epochs", type=int, help="student epochs for both runs (default: the demo's)")
    ap.add_argument("--seed", type=int, default=0, help="data order / init seed of both runs")
    ap.add_argument("--reuse-demo", type=Path, help="a finished demo's --out: reuse its distilled students")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tasks = ["classification", "segmentation"] if a.task == "all" else [a.task]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in tasks:
            rows.append(run(t, a.quick, Path(tmp), a.reuse_demo, a.epochs, a.seed))
    print("| task | metric | epochs | teacher | student, labels only | student, distilled | gain |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['task']} | {r['metric']} | {r['epochs']} | {r['teacher']:.4f} | {r['labels_only']:.4f} | "
            f"{r['distilled']:.4f} | {r['gain']:+.4f} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
