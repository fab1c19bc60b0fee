"""The paper's student (UperNet + MobileViT) vs the demo's SegFormer student, at the same distillation budget.

Both are distilled from the demo's segmentation teacher (UperNet-Swin, cached by `vitshrink demo`, else
trained here) with the demo's schedule (epochs, losses, lr, batch, augmentation), then exported and
scored on the aerial test split. Latency: one interleaved onnxruntime run of both students (and the
teacher), so the ratio is measured within one run; run that part alone on the machine.

    python benchmarks/paper_student.py [--quick] [--epochs N] [--json out.json] [--skip-bench]
    python benchmarks/paper_student.py --bench-only out.json   # re-time the ONNX files of a run

Prints and writes {students: {name: {miou, dice, distill_s, params, size_mb, latency_ms}}, ratios}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from vitshrink.bench import bench_many
from vitshrink.demo import configs, ensure_teacher
from vitshrink.distill import distill
from vitshrink.evaluate import evaluate
from vitshrink.export import export_onnx

# name -> (preset, overrides): the demo's student and the paper's one at the size the demo can afford
STUDENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "segformer": ("segformer-micro", {"decoder_hidden_size": 32}),
    "paper": ("upernet-mobilevit-micro", {}),
}


def run(quick: bool, tmp: Path, epochs: int | None = None, seed: int = 0) -> dict[str, Any]:
    spec = configs(quick)["segmentation"]
    teacher = ensure_teacher(spec, quiet=True)
    t_onnx, _ = export_onnx(teacher, tmp / "teacher.onnx")
    ev = {"limit": spec.eval_limit, "quiet": True, "data_options": spec.data_options}
    d = spec.stage("distill")  # the demo's schedule; only the student differs
    for k in ("student", "student_options", "cache_teacher"):
        d.pop(k, None)
    d["epochs"] = epochs or d["epochs"]
    res: dict[str, Any] = {
        "quick": quick,
        "epochs": d["epochs"],
        "teacher": {"miou": evaluate(t_onnx, spec.data, **ev)["miou"], "onnx": str(t_onnx)},
        "students": {},
    }
    for name, (preset, overrides) in STUDENTS.items():
        t0 = time.perf_counter()
        out, m = distill(
            teacher,
            preset,
            spec.data,
            out=tmp / name,
            cache_teacher=True,  # the demo's choice on CPUs without native bf16; the same for both
            seed=seed,
            quiet=True,
            data_options=spec.data_options,
            **d,
            **overrides,
        )
        wall = time.perf_counter() - t0
        onnx, r = export_onnx(out, tmp / f"{name}.onnx")
        t = evaluate(onnx, spec.data, **ev)
        res["students"][name] = {
            "preset": preset,
            "miou": t["miou"],
            "dice": t["dice"],
            "distill_s": round(wall, 1),
            "params": r["params"],
            "macs": r["macs"],
            "size_mb": round(onnx.stat().st_size / 2**20, 3),
            "onnx": str(onnx),
        }
        print(f"{name:10s} ({preset}): test mIoU {t['miou']:.4f}  distilled in {wall:.0f} s", flush=True)
    return res


def bench(res: dict[str, Any]) -> None:
    names = list(res["students"])
    files = [res["students"][n]["onnx"] for n in names] + [res["teacher"]["onnx"]]
    rows = bench_many(files, runs=30, rounds=3, batch=8)
    for n, b in zip(names, rows):
        res["students"][n]["latency_ms"] = round(b["latency_ms"]["p50"], 3)
    res["teacher"]["latency_ms"] = round(rows[-1]["latency_ms"]["p50"], 3)
    seg, paper = res["students"]["segformer"], res["students"]["paper"]
    res["ratios"] = {
        "paper_vs_segformer_latency": round(paper["latency_ms"] / seg["latency_ms"], 3),
        "paper_vs_segformer_size": round(paper["size_mb"] / seg["size_mb"], 3),
        "paper_minus_segformer_miou": round(paper["miou"] - seg["miou"], 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick demo's data and schedule")
    ap.add_argument("--epochs", type=int, help="distillation epochs (default: the demo's)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-bench", action="store_true", help="train and score only (time later)")
    ap.add_argument("--bench-only", type=Path, metavar="JSON", help="time the ONNX files of a earlier run")
    ap.add_argument("--workdir", type=Path, help="keep the models here (default: a temporary folder)")
    args = ap.parse_args()
    if args.bench_only:
        res = json.loads(args.bench_only.read_text())
        bench(res)
        args.json = args.json or args.bench_only
    else:
        with tempfile.TemporaryDirectory() as t:
            tmp = args.workdir or Path(t)
            tmp.mkdir(parents=True, exist_ok=True)
            res = run(args.quick, tmp, args.epochs)
            if not args.skip_bench:
                bench(res)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
