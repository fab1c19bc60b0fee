"""Compressed ViT vs a CNN baseline trained for the same wall-clock time, on both demo tasks.

For each task the demo's student is distilled from the demo's teacher (cached by `vitshrink demo`, else
trained here) with the demo's schedule, and timed; then the CNN baseline (`resnet-18-micro`,
`upernet-resnet-18-micro`; `vitshrink.baseline.train_baseline`) is trained from scratch on the labels
for that same wall-clock time. Both are exported and scored on the test split; latency comes from one
interleaved onnxruntime run of both (ratios within one run: run that part alone on the machine).

    python benchmarks/cnn_baseline.py [--quick] [--task classification|segmentation|all] [--json out.json]
        [--skip-bench] [--workdir DIR]
    python benchmarks/cnn_baseline.py --bench-only out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from vitshrink.baseline import train_baseline
from vitshrink.bench import bench_many
from vitshrink.demo import configs, ensure_teacher
from vitshrink.distill import distill
from vitshrink.evaluate import evaluate
from vitshrink.export import export_onnx
from vitshrink.tasks import TASK_METRIC


def _metric(task: str) -> str:
    return TASK_METRIC[task]


def run(task: str, quick: bool, tmp: Path, seed: int = 0) -> dict[str, Any]:
    spec = configs(quick)[task]
    teacher = ensure_teacher(spec, quiet=True)
    ev = {"limit": spec.eval_limit, "quiet": True, "data_options": spec.data_options}
    key = _metric(task)
    d = spec.stage("distill")
    student, overrides = d.pop("student"), d.pop("student_options", None) or {}
    d["cache_teacher"] = True  # the demo's choice on CPUs without native bf16

    t0 = time.perf_counter()
    s_dir, _ = distill(
        teacher,
        student,
        spec.data,
        out=tmp / f"{task}-vit",
        seed=seed,
        quiet=True,
        data_options=spec.data_options,
        **d,
        **overrides,
    )
    budget = time.perf_counter() - t0

    b = spec.stage("baseline") if any(s.kind == "baseline" for s in spec.recipe.stages) else {}
    b.pop("budget", None)
    b_dir, bm = train_baseline(
        spec.data,
        out=tmp / f"{task}-cnn",
        budget_s=budget,
        task=task,
        preset=b.pop("model", None),
        limit=d.get("limit"),
        data_options=spec.data_options,
        seed=seed,
        **{"batch_size": d["batch_size"], "augment": d.get("augment", True), **b},
    )
    rows: dict[str, Any] = {}
    for name, path, extra in (
        ("vit_student", s_dir, {"preset": student, "train_s": round(budget, 1)}),
        (
            "cnn_baseline",
            b_dir,
            {"preset": bm["preset"], "train_s": round(bm["wall_s"], 1), "epochs": bm["epochs"]},
        ),
    ):
        onnx, r = export_onnx(path, tmp / f"{task}-{name}.onnx")
        m = evaluate(onnx, spec.data, **ev)
        rows[name] = {
            **extra,
            key: m[key],
            "params": r["params"],
            "macs": r["macs"],
            "size_mb": round(onnx.stat().st_size / 2**20, 3),
            "onnx": str(onnx),
        }
        print(
            f"{task} {name:13s} {extra['preset']:24s} {key} {m[key]:.4f}  trained {extra['train_s']} s",
            flush=True,
        )
    return {"task": task, "metric": key, "quick": quick, "rows": rows}


def bench(res: dict[str, Any]) -> None:
    rows = res["rows"]
    out = bench_many([r["onnx"] for r in rows.values()], runs=30, rounds=3, batch=8)
    for r, b in zip(rows.values(), out):
        r["latency_ms"] = round(b["latency_ms"]["p50"], 3)
    vit, cnn = rows["vit_student"], rows["cnn_baseline"]
    key = res["metric"]
    res["cnn_vs_vit"] = {
        "latency": round(cnn["latency_ms"] / vit["latency_ms"], 3),
        "size": round(cnn["size_mb"] / vit["size_mb"], 3),
        f"{key}_diff": round(cnn[key] - vit[key], 4),
    }
    faster, better = cnn["latency_ms"] <= vit["latency_ms"], cnn[key] >= vit[key]
    res["winner"] = "cnn" if faster and better else "vit" if not faster and not better else "trade-off"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick demo's data and schedules")
    ap.add_argument("--task", default="all", choices=["classification", "segmentation", "all"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-bench", action="store_true", help="train and score only (time later)")
    ap.add_argument("--bench-only", type=Path, metavar="JSON", help="time the ONNX files of an earlier run")
    ap.add_argument("--workdir", type=Path, help="keep the models here (default: a temporary folder)")
    args = ap.parse_args()
    if args.bench_only:
        results = json.loads(args.bench_only.read_text())
        for res in results:
            bench(res)
        args.json = args.json or args.bench_only
    else:
        tasks = ["classification", "segmentation"] if args.task == "all" else [args.task]
        with tempfile.TemporaryDirectory() as t:
            tmp = args.workdir or Path(t)
            tmp.mkdir(parents=True, exist_ok=True)
            results = [run(task, args.quick, tmp) for task in tasks]
            if not args.skip_bench:
                for res in results:
                    bench(res)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
