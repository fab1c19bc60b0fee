"""Does `vitshrink compress --budget` use its `--time-budget` and find what meets the budget, on more than one teacher?

Issue 14's setting: a 6-layer 192-d ViT teacher (vit-tiny with 6 blocks, ~2.7 M params) trained on the
full Fashion-MNIST training split with `vitshrink train` (fixed seed); issue 27 adds teachers trained
with another seed or width. For every teacher and every time budget:

    vitshrink compress TEACHER --data fashion-mnist --out OUT --budget size_mb=1.5,max_drop=0.01 \
        --time-budget 30m

timed from the outside. Reported per run: met or not, the chosen recipe and the family that won, time
used (and why the search stopped, what extra time bought), the final ONNX file's size, its top-1 on the
10k test split against the teacher's, and its batch-1 latency against the teacher's fp32 ONNX
(onnxruntime, same threads, one interleaved `bench_many` run), each with the issue's target.

    python benchmarks/compress_time.py [--teacher seed=0 --teacher seed=1 --teacher hidden=256]
        [--time-budget 30m 10m] [--teacher-epochs 3] [--threads N] [--work DIR] [--json out.json]
    python benchmarks/compress_time.py --quick     # a 2-block 64-d teacher on 3k images, 2 min budget

A teacher SPEC is key=value pairs: seed (default 0), hidden (width, default 192; 64 with --quick) and
layers (default 6; 2 with --quick). Each teacher is trained once into WORK/teacher-SPEC and reused
(delete it to retrain); every run compresses into a fresh WORK/run-SPEC-BUDGET. Run it alone on the
machine: the search sizes its distillation from throughput measured at the start, and other load
slows the search after that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"wall_ratio": 1.1, "size_mb": 1.5, "drop": 0.01, "speedup": 3.0}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitshrink.cli", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def parse_teacher(spec: str) -> dict[str, int]:
    """'seed=1,hidden=256' -> {'seed': 1, 'hidden': 256}; one line naming the bad part otherwise."""
    out: dict[str, int] = {}
    for part in filter(None, spec.split(",")):
        k, _, v = part.partition("=")
        if k not in ("seed", "hidden", "layers") or not v.isdigit():
            raise SystemExit(f"--teacher: expected seed=N, hidden=N or layers=N, got '{part}'")
        out[k] = int(v)
    return out


def build_teacher(work: Path, spec: dict[str, int], *, quick: bool, epochs: int) -> Path:
    """An untrained model directory of the teacher's shape, then `vitshrink train` on it."""
    from vitshrink.data import load_dataset
    from vitshrink.models import build_model, save_model
    from vitshrink.train import channel_stats

    seed = spec.get("seed", 0)
    teacher = work / f"teacher-{_slug(spec)}"
    if (teacher / "config.json").exists():
        return teacher
    ds = load_dataset("fashion-mnist", "train", limit=2000, seed=seed)
    mean, std = channel_stats(ds)
    hidden = spec.get("hidden", 64 if quick else 192)  # vit-tiny: 192-d, 3 heads, MLP 4x
    shape = {
        "hidden_size": hidden,
        "num_hidden_layers": spec.get("layers", 2 if quick else 6),
        "intermediate_size": 4 * hidden if not quick else 2 * hidden,
        "num_attention_heads": 3 if hidden % 3 == 0 else 4,
    }
    net, meta = build_model(
        "vit-tiny",
        task="classification",
        image_size=28,
        num_channels=1,
        class_names=ds.class_names,
        mean=mean,
        std=std,
        **shape,
    )
    init = save_model(
        net, meta, work / f"{teacher.name}-init", stage="build", options={"preset": "vit-tiny", **shape}
    )
    cmd = _cli(
        "train",
        "--model",
        str(init),
        "--data",
        "fashion-mnist",
        "--out",
        str(teacher),
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--lr",
        "1e-3",
        "--batch-size",
        "128",
        "--quiet",
    )
    if quick:
        cmd += ["--limit", "3000"]
    print("training the teacher:", " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=_env())
    print(f"teacher trained in {(time.time() - t0) / 60:.1f} min", flush=True)
    return teacher


def _slug(spec: dict[str, int]) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(spec.items())) or "seed0"


def compress_run(
    teacher: Path, out: Path, budget: str, time_budget: str, trials: int | None
) -> tuple[float, int]:
    if out.exists():
        shutil.rmtree(out)
    cmd = _cli(
        "compress",
        str(teacher),
        "--data",
        "fashion-mnist",
        "--out",
        str(out),
        "--budget",
        budget,
        "--time-budget",
        time_budget,
    ) + (["--trials", str(trials)] if trials else [])
    print("running:", " ".join(cmd[2:]), flush=True)
    t0 = time.monotonic()
    rc = subprocess.run(cmd, env=_env()).returncode  # 2: budget not met (results still written)
    return time.monotonic() - t0, rc


def measure(out: Path, threads: int | None, runs: int, rounds: int) -> dict:
    from vitshrink.bench import bench_many
    from vitshrink.evaluate import evaluate

    results = json.loads((out / "results.json").read_text())
    teacher_onnx, final = Path(results["stages"][0]["artifact"]), Path(results["final"])
    acc = {
        name: evaluate(p, "fashion-mnist", split="test", threads=threads, quiet=True)["accuracy"]
        for name, p in (("teacher", teacher_onnx), ("final", final))
    }
    b = bench_many([teacher_onnx, final], threads=threads, runs=runs, rounds=rounds, batch=1)
    p50 = [x["latency_ms"]["p50"] for x in b]
    search = results.get("search", {})
    return {
        "final": str(final),
        "recipe": results.get("recipe"),
        "size_mb": final.stat().st_size / 2**20,
        "teacher_size_mb": teacher_onnx.stat().st_size / 2**20,
        "teacher_accuracy": acc["teacher"],
        "accuracy": acc["final"],
        "drop": acc["teacher"] - acc["final"],
        "teacher_p50_ms": p50[0],
        "p50_ms": p50[1],
        "speedup": p50[0] / p50[1],
        "met": search.get("met"),
        "chosen": search.get("chosen_params"),
        "binding": search.get("binding"),
        "plan": (search.get("time") or {}).get("plan"),
        "search_s": (search.get("time") or {}).get("elapsed_s"),
        "stopped": (search.get("time") or {}).get("stopped"),
        "trials": search.get("trials_run"),
        "pruned": len(search.get("pruned_trials", [])),
        "families": (search.get("families") or {}).get("line"),
        "extra_time": [e.get("line") for e in search.get("extra_time") or []],
        "int8": search.get("int8_variants"),
    }


def run_one(teacher: Path, out: Path, a: argparse.Namespace, time_budget: str) -> dict | None:
    """One compress run, scored on the test split, with the issue's checks printed."""
    from vitshrink.compress import parse_duration

    wall, rc = compress_run(teacher, out, a.budget, time_budget, a.trials)
    if not (out / "results.json").exists():
        print(f"compress failed (exit {rc}) before writing results", file=sys.stderr)
        return None
    runs, rounds = (10, 2) if a.quick else (50, 5)
    res = {
        "teacher": str(teacher),
        "time_budget": time_budget,
        "budget": a.budget,
        "wall_s": wall,
        "exit_code": rc,
        "threads": a.threads,
        **measure(out, a.threads, runs, rounds),
    }
    limit_s = parse_duration(time_budget)
    checks = {
        f"wall {wall / 60:.1f} min <= {TARGETS['wall_ratio'] * limit_s / 60:.1f}": wall
        <= TARGETS["wall_ratio"] * limit_s,
        f"size {res['size_mb']:.2f} MB <= {TARGETS['size_mb']}": res["size_mb"] <= TARGETS["size_mb"],
        f"top-1 {res['accuracy']:.4f} vs teacher {res['teacher_accuracy']:.4f} (drop {res['drop'] * 100:.2f} pt) "
        f"<= {TARGETS['drop'] * 100:.1f} pt": res["drop"] <= TARGETS["drop"],
        f"latency {res['p50_ms']:.3f} vs {res['teacher_p50_ms']:.3f} ms ({res['speedup']:.2f}x) "
        f">= {TARGETS['speedup']:g}x": res["speedup"] >= TARGETS["speedup"],
    }
    res["checks"] = checks
    print(
        f"\n{teacher.name}: compress --budget {a.budget} --time-budget {time_budget}: "
        f"met {res['met']}, {res['trials']} trials ({res['pruned']} pruned), stopped: {res['stopped']}"
    )
    print(f"chosen: {res['chosen']}")
    print(f"families: {res['families']}")
    for line in res["extra_time"]:
        print(f"extra time: {line}")
    print(f"bound by: {res['binding']}")
    for text, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISS'}] {text}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny teacher and data, 2 min budget")
    ap.add_argument(
        "--teacher",
        action="append",
        metavar="SPEC",
        help="a teacher to train and compress, e.g. seed=1 or hidden=256 (repeat; default seed=0)",
    )
    ap.add_argument(
        "--time-budget", nargs="+", help="compress --time-budget values (default 30m, 2m with --quick)"
    )
    ap.add_argument("--budget", default="size_mb=1.5,max_drop=0.01")
    ap.add_argument("--trials", type=int, help="compress --trials cap (default: none)")
    ap.add_argument("--teacher-epochs", type=int, help="default 3 (1 with --quick)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime threads for both models")
    ap.add_argument("--work", type=Path, help="default: ./compress-time-work (quick: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    a = ap.parse_args(argv)
    budgets = a.time_budget or (["2m"] if a.quick else ["30m"])
    specs = [parse_teacher(t) for t in a.teacher or ["seed=0"]]
    work = a.work or (
        Path(os.environ.get("TMPDIR", "/tmp")) / "compress-time-quick"
        if a.quick
        else Path("compress-time-work")
    )
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    rows = []
    for spec in specs:
        teacher = build_teacher(work, spec, quick=a.quick, epochs=a.teacher_epochs or (1 if a.quick else 3))
        for time_budget in budgets:
            res = run_one(teacher, work / f"run-{_slug(spec)}-{time_budget}", a, time_budget)
            if res is None:
                return 1
            rows.append(res)
    print("\n| teacher | time budget | met | chosen | time used | size MB | test top-1 (teacher) | p50 ms |")
    print("|---|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {Path(r['teacher']).name} | {r['time_budget']} | {'yes' if r['met'] else 'no'} | {r['chosen']} | "
            f"{r['wall_s'] / 60:.1f} min ({r['stopped']}) | {r['size_mb']:.2f} | "
            f"{r['accuracy']:.4f} ({r['teacher_accuracy']:.4f}) | {r['p50_ms']:.3f} |"
        )
    if a.json:
        from vitshrink.artifacts import write_json

        write_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
