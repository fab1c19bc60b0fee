"""Resolution x width x int8 frontier of the segmentation demo student at 512 px (issue 31).

The student is the demo's (segformer-micro with a 32-wide decoder, 14 aerial classes), trained here
from labels on 128 px tiles cut from 512 px renders at scales 1, 0.75 and 0.5, so it has seen objects
at the sizes a network run at 0.5-1x inside the graph sees them (no teacher at 512 px offline: not
distilled). Widths: the student and copies pruned by `--ratios` (fine-tuned on the same tiles for a
third of the training time). Every point is exported with `--resolution R --argmax` (the photo enters
at 512, the network runs at R inside, a uint8 class map comes out) and quantized with the int8 variant
today's pipeline chose for the full model at 512.

"today's chosen int8": `quantize --mode int8` with aerial calibration of the full-width model at 512,
logits out (the host takes the argmax: timed with it). Every variant's mIoU is on the test split at
512 through `vitshrink.evaluate` (what the deployed graph returns at the photo's size), its latency the
median batch-1 time of all variants interleaved round-robin in one process (onnxruntime CPU).
The chosen point: the fastest int8 point within 0.01 mIoU of today's chosen int8.

    PYTHONPATH=src nice -n 19 .venv/bin/python benchmarks/seg_frontier.py build    # no timing in it
    PYTHONPATH=src flock /tmp/vitshrink-bench.lock .venv/bin/python benchmarks/seg_frontier.py latency
    (data, models and artifacts are cached under runs/seg_frontier/ or --work; `all` does both in one
    process; `--n-train 384 --epochs 8 --work runs/seg_frontier_384` trains a stronger student)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SIZE, TILE = 512, 128
SCALES = (1.0, 0.75, 0.5)
WORK = ROOT / "runs" / "seg_frontier"
DATA_OPTS = {"size": SIZE, "n_train": 96, "n_val": 32, "n_test": 48, "cache_dir": str(WORK / "data")}
STUDENT = ("segformer-micro", {"decoder_hidden_size": 32})  # the demo's student (demo-segmentation.yaml)


def _tiles(images: Any, masks: Any, scales: tuple[float, ...] = SCALES) -> tuple[Any, Any]:
    """128 px tiles of every frame at each of `scales` (images antialiased, masks nearest)."""
    import torch
    import torch.nn.functional as F

    out_i, out_m = [], []
    for s in scales:
        side = int(SIZE * s) // TILE * TILE
        im = F.interpolate(
            images.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False
        )
        mk = F.interpolate(masks[:, None].float(), size=(side, side), mode="nearest")[:, 0]
        im = im.round().clamp(0, 255).to(torch.uint8)
        im = (
            im.unfold(2, TILE, TILE)
            .unfold(3, TILE, TILE)
            .permute(0, 2, 3, 1, 4, 5)
            .reshape(-1, 3, TILE, TILE)
        )
        mk = mk.long().unfold(1, TILE, TILE).unfold(2, TILE, TILE).reshape(-1, TILE, TILE)
        out_i.append(im.contiguous())
        out_m.append(mk.contiguous())
    return torch.cat(out_i), torch.cat(out_m)


def _fit_tiles(
    model: Any, meta: dict[str, Any], epochs: float, lr: float, scales: tuple[float, ...] = SCALES
) -> None:
    """`epochs` passes over the multi-scale tiles (a fraction: one pass over that share of them); a
    fixed schedule, not a time budget, so a rerun on a busy machine trains the same model."""
    import torch

    from vitshrink.data import VisionDataset, aerial, load_dataset
    from vitshrink.train import fit

    ds = load_dataset("aerial", "train", data_options=dict(DATA_OPTS))
    imgs, masks = _tiles(ds.images, ds.targets, scales)
    n = int(len(imgs) * min(1.0, epochs))
    perm = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(0))[:n]
    train = VisionDataset(imgs[perm], masks[perm], "segmentation", list(aerial.CLASSES), "aerial-tiles")
    passes = max(1, round(epochs))
    t = time.perf_counter()
    # the tiles go in at their own 128 px: a saved model's meta says 512, and preprocessing to it would
    # upsample every tile 4x and train the network on objects 4x larger than it will see
    tile_meta = {**meta, "preprocess": {**meta["preprocess"], "size": [TILE, TILE]}}
    fit(
        model,
        tile_meta,
        train,
        None,
        epochs=passes,
        batch_size=16,
        lr=lr,
        quiet=True,
        device=torch.device("cpu"),
    )
    print(f"  {n} of {len(imgs)} tiles x {passes} epochs: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    model.eval()


def student(epochs: float) -> Path:
    from vitshrink.data import aerial
    from vitshrink.models import build_model, save_model

    out = WORK / "student"
    if (out / "config.json").exists():
        return out
    model, meta = build_model(
        STUDENT[0],
        image_size=TILE,
        class_names=list(aerial.CLASSES),
        mean=list(aerial.MEAN),
        std=list(aerial.STD),
        **STUDENT[1],
    )
    _fit_tiles(model, meta, epochs, lr=3e-3)
    meta["preprocess"]["size"] = [SIZE, SIZE]
    save_model(model, meta, out)
    return out


def pruned(src: Path, ratio: float, epochs: float) -> Path:
    """`src` width-pruned by `ratio` (prune's defaults), then fine-tuned on the tiles."""
    from vitshrink.models import load_model, save_model
    from vitshrink.prune import prune

    out = WORK / f"pruned-{ratio:g}"
    if (out / "config.json").exists():
        return out
    tmp = WORK / f"pruned-{ratio:g}-raw"
    prune(src, tmp, ratio=ratio, quiet=True)
    model, meta = load_model(tmp)
    _fit_tiles(model, meta, epochs, lr=1e-3)
    save_model(model, meta, out)
    return out


def tuned(src: Path, tag: str, res: int, epochs: float) -> Path:
    """`src` fine-tuned on tiles at the one scale its network sees when it runs at `res` inside a 512 px
    photo (`vitshrink train` / `distill` at --data-opt size=RES do the same for a user)."""
    from vitshrink.models import load_model, save_model

    out = WORK / f"tuned-{tag}-r{res}"
    if (out / "config.json").exists():
        return out
    model, meta = load_model(src)
    _fit_tiles(model, meta, epochs, lr=3e-4, scales=(res / SIZE,))
    save_model(model, meta, out)
    return out


def quantized(model_dir: Path, name: str, mode: str, **kw: Any) -> tuple[Path, dict[str, Any]]:
    from vitshrink.quantize import quantize

    path = WORK / f"{name}.onnx"
    rec = WORK / f"{name}.json"
    if path.exists() and rec.exists():
        return path, json.loads(rec.read_text())
    t = time.perf_counter()
    calib = "aerial" if mode != "int8-dynamic" else None  # dynamic int8 has nothing to calibrate
    _, rep = quantize(
        model_dir, path, mode=mode, calib_data=calib, data_options=dict(DATA_OPTS), quiet=True, **kw
    )
    info = {"chosen": rep.get("chosen") or mode, "quantize_s": round(time.perf_counter() - t, 1)}
    rec.write_text(json.dumps(info))
    return path, info


def exported(model_dir: Path, name: str, **kw: Any) -> Path:
    from vitshrink.export import export_onnx

    path = WORK / f"{name}.onnx"
    if not path.exists():
        export_onnx(model_dir, path, **kw)
    return path


def miou(path: Path) -> float:
    from vitshrink.evaluate import evaluate

    m = evaluate(path, "aerial", split="test", data_options=dict(DATA_OPTS), quiet=True, threads=1)
    return float(m["miou"])


def latencies(paths: list[Path], threads: int, runs: int, budget_s: float) -> list[float]:
    """Median ms per call, all interleaved; a logits graph pays the host argmax the runtime does."""
    from vitshrink.bench.timing import round_robin_ms
    from vitshrink.deploy.runtime import cpu_session

    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    fns = []
    for p in paths:
        s = cpu_session(p, threads, spin=threads == 1)
        ids = s.get_outputs()[0].type == "tensor(uint8)"
        feed = {s.get_inputs()[0].name: x}
        fns.append(
            (lambda s=s, f=feed: s.run(None, f)[0])
            if ids
            else (lambda s=s, f=feed: s.run(None, f)[0].argmax(1).astype(np.uint8))
        )
    gap = 0.2 if threads > 1 else 0.0
    times = round_robin_ms(fns, runs=runs, budget_s=budget_s, warmup=2, min_runs=5, gap_s=gap)
    return [float(np.median(t)) for t in times]


def build(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train, prune, export, quantize and score every variant (no timing: run it niced, outside the
    bench lock); the rows are kept in WORK/rows.json for the latency phase."""
    full = student(args.epochs)
    widths = {"1.0": full}
    for r in (float(v) for v in args.ratios.split(",") if v.strip()):
        widths[f"{1 - r:g}"] = pruned(full, r, args.epochs / 3)
    # today's choice: int8 of the full width at 512, logits out
    base_path, base_q = quantized(full, "today-int8", "int8")
    mode = base_q["chosen"]
    print(f"today's int8 -> {mode}", file=sys.stderr)
    rows: list[dict[str, Any]] = [
        {"name": f"today: int8 ({mode}) @512, logits", "path": base_path, "int8": True}
    ]
    for w, d in widths.items():
        for res in (int(v) for v in args.resolutions.split(",")):
            tag = f"w{w}-r{res}"
            if w == "1.0" and res == SIZE:  # the float reference (the frontier itself is int8)
                fp32 = exported(d, f"fp32-{tag}", resolution=res, argmax=True)
                rows.append({"name": f"fp32 w{w} r{res} argmax", "path": fp32, "int8": False})
            path, _ = quantized(d, f"int8-{tag}", mode, resolution=res, argmax=True)
            rows.append({"name": f"int8 w{w} r{res} argmax", "path": path, "int8": True})
            # the same network fine-tuned at that resolution (at 512 too: the control for the extra epochs)
            if args.tune_epochs > 0:
                t = tuned(d, f"w{w}", res, args.tune_epochs)
                path, _ = quantized(t, f"int8-{tag}-tuned", mode, resolution=res, argmax=True)
                rows.append({"name": f"int8 w{w} r{res} argmax, tuned at {res}", "path": path, "int8": True})
    for r in rows:
        r["miou"] = miou(r["path"])
        r["path"] = str(r["path"])
        print(f"  {r['name']}: mIoU {r['miou']:.4f}", file=sys.stderr)
    (WORK / "rows.json").write_text(json.dumps(rows, indent=1))
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    base = rows[0]
    ok = [r for r in rows[1:] if r["int8"] and r["miou"] >= base["miou"] - 0.01]
    chosen = min(ok, key=lambda r: r["ms"]) if ok else None
    from vitshrink.cpu import cpu_name

    cpu = cpu_name()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, commit {commit.stdout.strip()}, {cpu}, {args.threads} thread(s)\n")
    print("| variant | mIoU @512 | vs today | ms | speed-up vs today |\n|---|---:|---:|---:|---:|")
    for r in rows:
        mark = " **chosen**" if r is chosen else ""
        print(
            f"| {r['name']}{mark} | {r['miou']:.4f} | {r['miou'] - base['miou']:+.4f} | {r['ms']:.1f} "
            f"| {base['ms'] / r['ms']:.2f}x |"
        )
    if chosen is None:
        print("\nno int8 point within 0.01 mIoU of today's int8")
    else:
        gain = base["ms"] / chosen["ms"]
        print(f"\nchosen: {chosen['name']}: {gain:.2f}x faster, {chosen['miou'] - base['miou']:+.4f} mIoU")
    (WORK / "results.json").write_text(
        json.dumps({"args": vars(args), "cpu": cpu, "rows": rows}, indent=1, default=str)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["build", "latency", "all"], nargs="?", default="all")
    ap.add_argument("--epochs", type=float, default=3.0, help="student epochs over the multi-scale tiles")
    ap.add_argument("--ratios", default="0.3", help="prune ratios besides the full width (comma list)")
    ap.add_argument("--resolutions", default="512,384,320,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument(
        "--tune-epochs",
        type=float,
        default=3.0,
        help="epochs fine-tuning each width at each lower resolution",
    )
    ap.add_argument("--n-train", type=int, default=DATA_OPTS["n_train"], help="512 px training renders")
    ap.add_argument("--work", type=Path, default=WORK, help="cache folder (one per --n-train / --epochs)")
    args = ap.parse_args()
    _configure(args.work, args.n_train)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.phase in ("build", "all"):
        rows = build(args)
        if args.phase == "build":
            return
    rows = json.loads((WORK / "rows.json").read_text())
    ms = latencies([Path(r["path"]) for r in rows], args.threads, args.runs, args.budget_s)
    for r, m in zip(rows, ms):
        r["ms"] = m
    report(rows, args)


def _configure(work: Path, n_train: int) -> None:
    """Point the module's cache folder and training-set size at the command line's."""
    global WORK
    WORK = work
    DATA_OPTS.update(n_train=n_train, cache_dir=str(work.parent / f"data-{n_train}"))


if __name__ == "__main__":
    main()
