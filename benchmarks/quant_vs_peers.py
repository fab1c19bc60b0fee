"""vitshrink quantization vs the usual recipes, on a ViT with realistic LayerNorm outlier channels.

Peers: onnxruntime's quantize_dynamic / quantize_static (min-max, percentile) with default settings,
onnxruntime's fp16 converter with its default block list, and torch.ao quantize_dynamic.
Measured: accuracy on a held-out synthetic set, top-1 agreement and relative logit error vs fp32,
file size, and single-thread ORT CPU latency (median, batch 1, runs interleaved across models).

The model is trained for a few hundred steps on a 10-class grating task, then a few LayerNorm
gamma/beta channels are scaled 40-100x and the next Linear compensated: the float function is
unchanged but the activations carry the outlier channels of trained ViTs (what breaks min-max int8).
A second, untrained DeiT-Tiny-sized model (224 px) measures size and latency at a realistic scale.

With ``--demo DIR`` (after `vitshrink demo --out DIR`) it also runs on real data: the demo teachers
(Fashion-MNIST ViT, aerial UperNet-Swin) and a DeiT-small trained briefly on Fashion-MNIST, comparing
fp32, onnxruntime dynamic int8, onnxruntime static int8 with its default settings (min-max, per-tensor)
and vitshrink int8 on the test split.

    PYTHONPATH=src .venv/bin/python benchmarks/quant_vs_peers.py [--quick] [--demo demo-out] [--json out.json]

With ``--runtimes deit,teacher,segformer`` it instead compares deploy runtimes (issue 30): vitshrink int8
with ``--runtime auto`` (onnxruntime or OpenVINO, chosen by its own timing here) against NNCF int8 on
OpenVINO with NNCF's defaults (``model_type=TRANSFORMER``, the same calibration batches), batch 1 at 1
and 2 threads, all variants interleaved in this process; DeiT-S 224 and SegFormer-B0 512 with random
weights (latency), the demo classification teacher on Fashion-MNIST (accuracy on 2000 test images too).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitshrink.artifacts import atomic_file  # noqa: E402
from vitshrink.bench.timing import onnx_latencies_ms as latencies_ms  # noqa: E402
from vitshrink.quantize import quantize_onnx, quantize_torch  # noqa: E402
from vitshrink.quantize.measure import ort_quiet, run  # noqa: E402
from vitshrink.tasks import TASK_METRIC  # noqa: E402

CLASSES = 10


def gratings(n: int, size: int, seed: int, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    y = g.integers(0, CLASSES, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    th, f, ph = y * np.pi / CLASSES, g.uniform(0.12, 0.22, n), g.uniform(0, 2 * np.pi, n)
    x = np.sin(
        2 * np.pi * f[:, None, None] * (xx * np.cos(th)[:, None, None] + yy * np.sin(th)[:, None, None])
        + ph[:, None, None]
    )
    return (x + g.normal(0, noise, x.shape))[:, None].astype(np.float32), y


def vit(hidden: int, layers: int, heads: int, size: int, patch: int, channels: int) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=size,
        patch_size=patch,
        num_channels=channels,
        num_labels=CLASSES,
    )
    return ViTForImageClassification(cfg).eval()


def train(model: torch.nn.Module, steps: int, size: int, batch: int = 64) -> None:
    x, y = gratings(steps * batch, size, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for i in range(steps):
        sl = slice(i * batch, (i + 1) * batch)
        loss = torch.nn.functional.cross_entropy(
            model(pixel_values=torch.from_numpy(x[sl])).logits, torch.from_numpy(y[sl])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def inject_outliers(model: torch.nn.Module, channels=(3, 17, 40), factors=(60.0, 100.0, 40.0)) -> None:
    def scale(ln, linears):
        for c, s in zip(channels, factors):
            ln.weight[c] *= s
            ln.bias[c] *= s
            for lin in linears:
                lin.weight[:, c] /= s

    for layer in model.vit.layers:
        a = layer.attention
        scale(layer.layernorm_before, [a.q_proj, a.k_proj, a.v_proj])
        scale(layer.layernorm_after, [layer.mlp.fc1])
    scale(model.vit.layernorm, [model.classifier])


def export(model: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, *shape),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def peers(src: Path, work: Path, calib: list[np.ndarray], full: bool) -> dict[str, Path]:
    """The recipes a user would reach for first, with onnxruntime's defaults."""
    from onnxruntime.quantization import CalibrationMethod, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnxruntime.transformers.float16 import convert_float_to_float16

    class Reader:
        def __init__(self) -> None:
            self.it = iter([{"pixel_values": b} for b in calib])

        def get_next(self):
            return next(self.it, None)

    out: dict[str, Path] = {}
    with ort_quiet():
        pre = work / "peer_pre.onnx"
        quant_pre_process(str(src), str(pre))
        out["ort fp16 (default block list)"] = work / "peer_fp16.onnx"
        onnx.save(
            convert_float_to_float16(onnx.load(str(pre)), keep_io_types=True),
            str(out["ort fp16 (default block list)"]),
        )
        out["ort int8 dynamic"] = work / "peer_dyn.onnx"
        quantize_dynamic(pre, out["ort int8 dynamic"])
        out["ort int8 dynamic per-channel"] = work / "peer_dyn_pc.onnx"
        quantize_dynamic(pre, out["ort int8 dynamic per-channel"], per_channel=True)
        methods = [("min-max", CalibrationMethod.MinMax), ("percentile", CalibrationMethod.Percentile)]
        if full:
            methods.append(("entropy", CalibrationMethod.Entropy))
        for name, method in methods:
            key = f"ort int8 static QDQ {name}"
            out[key] = work / f"peer_static_{name}.onnx"
            quantize_static(pre, out[key], Reader(), calibrate_method=method, per_channel=True)
    return out


def ours(
    src: Path, work: Path, calib: list[np.ndarray], eval_fn=None
) -> tuple[dict[str, Path], dict[str, Any]]:
    out, reports = {}, {}
    # Full 8-bit weights (VNNI / ARM64 targets) and 7-bit ones (AVX2 target: no saturating pair sums).
    runs = [(m, "vnni") for m in ("fp16", "int8-dynamic", "int8-static", "int8")]
    runs += [("int8-dynamic", "avx2"), ("int8", "avx2")]
    for mode, cpu in runs:
        key = f"vitshrink {mode}" + (" [target avx2: 7-bit weights]" if cpu == "avx2" else "")
        out[key] = work / f"ours_{mode}_{cpu}.onnx"
        t = time.perf_counter()
        reports[key] = quantize_onnx(
            src,
            out[key],
            mode=mode,
            calib=calib,
            eval_fn=eval_fn if mode == "int8" else None,
            target_cpu=cpu,
            quiet=True,
        )
        reports[key]["seconds"] = round(time.perf_counter() - t, 1)
    return out, reports


def score(
    models: dict[str, Path], src: Path, x: np.ndarray, y: np.ndarray | None, sample: np.ndarray
) -> list[dict[str, Any]]:
    ref = run(src, [x[i : i + 64] for i in range(0, len(x), 64)])
    names = ["fp32", *models]
    paths = [src, *models.values()]
    lat = latencies_ms(paths, sample, runs=60, budget_s=20.0)
    rows = []
    for name, path, ms in zip(names, paths, lat):
        out = run(path, [x[i : i + 64] for i in range(0, len(x), 64)])
        finite = bool(np.isfinite(out).all())
        rows.append(
            {
                "method": name,
                "accuracy": None if y is None else float(np.mean(out.argmax(1) == y)),
                "agreement": float(np.mean(out.argmax(1) == ref.argmax(1))),
                "rel_error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                if finite
                else float("inf"),
                "size_mb": path.stat().st_size / 2**20,
                "latency_ms": ms,
            }
        )
    return rows


def torch_rows(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> list[dict[str, Any]]:
    from torch.ao.quantization import quantize_dynamic

    xt = torch.from_numpy(x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model(pixel_values=xt).logits
        variants = {
            "torch fp32": model,
            "torch.ao quantize_dynamic (Linear)": quantize_dynamic(
                copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
            ),
            "vitshrink quantize_torch int8-dynamic": quantize_torch(model, "int8-dynamic"),
            "vitshrink quantize_torch fp16": quantize_torch(model, "fp16"),
        }
        rows = []
        for name, m in variants.items():
            out = m(pixel_values=xt).logits.float()
            rows.append(
                {
                    "method": name,
                    "accuracy": float((out.argmax(1).numpy() == y).mean()),
                    "agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
                    "rel_error": float((out - ref).norm() / ref.norm()),
                }
            )
    return rows


def table(title: str, rows: list[dict[str, Any]]) -> str:
    cols = [
        c for c in ("method", "accuracy", "agreement", "rel_error", "size_mb", "latency_ms") if c in rows[0]
    ]
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r[c] if isinstance(r[c], str) else ("-" if r[c] is None else f"{r[c]:.4g}") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer steps (~1 min)")
    ap.add_argument("--json", type=Path, help="also write all numbers here")
    ap.add_argument(
        "--demo", type=Path, help="also run on the demo teachers found in this demo output folder"
    )
    ap.add_argument("--demo-only", action="store_true", help="skip the synthetic outlier ViT")
    ap.add_argument("--runtimes", help="comma list of deit, teacher, segformer: onnxruntime vs OpenVINO")
    ap.add_argument("--teacher", type=Path, help="demo classification teacher (default: newest cached)")
    args = ap.parse_args()
    if args.runtimes:
        from runtimes_vs_nncf import main as runtimes_main

        runtimes_main(args.runtimes.split(","), args.teacher, args.json)
        return
    torch.set_num_threads(1)
    hidden, layers, steps = (64, 2, 100) if args.quick else (192, 6, 300)
    results: dict[str, Any] = {"config": {"hidden": hidden, "layers": layers, "train_steps": steps}}
    md = []
    with tempfile.TemporaryDirectory(prefix="vitshrink-bench-") as tmp:
        work = Path(tmp)
        if args.demo:
            demo_res, demo_md = run_demo_models(args.demo, work, args.quick)
            results.update(demo_res)
            md.extend(demo_md)
            print("\n".join(demo_md), flush=True)
        if args.demo_only:
            print("\n".join(md))
            if args.json:
                with atomic_file(args.json, "w") as f:
                    json.dump(results, f, indent=2, default=str)
            return
        # 1) trained ViT with outlier channels: accuracy / fidelity
        model = vit(hidden, layers, 4 if hidden % 4 == 0 else 3, 28, 4, 1)
        t = time.perf_counter()
        train(model, steps, 28)
        inject_outliers(model)
        results["train_seconds"] = round(time.perf_counter() - t, 1)
        src = export(model, work / "vit.onnx", (1, 28, 28))
        xc, _ = gratings(128, 28, seed=7)
        calib = [xc[i : i + 16] for i in range(0, len(xc), 16)]
        xt, yt = gratings(1000, 28, seed=99)
        xe, ye = gratings(500, 28, seed=123)  # separate set for the int8 guarantee's metric

        def accuracy(p: str) -> float:
            return float(np.mean(run(p, [xe[i : i + 100] for i in range(0, len(xe), 100)]).argmax(1) == ye))

        models = peers(src, work, calib, full=not args.quick)
        mine, reports = ours(src, work, calib, eval_fn=accuracy)
        rows = score({**models, **mine}, src, xt, yt, xt[:1])
        results["outlier_vit"] = {"rows": rows, "reports": {k: _brief(v) for k, v in reports.items()}}
        md.append(
            table(f"ViT {hidden}x{layers} with LayerNorm outliers (40-100x), 28x28, 1000 test images", rows)
        )
        results["torch"] = torch_rows(model, xt[:500], yt[:500])
        md.append(table("PyTorch-side (same model, 500 images)", results["torch"]))
        # 2) DeiT-Tiny-sized model at 224 px (random weights): size and latency at a realistic scale
        if not args.quick:
            big = vit(192, 12, 3, 224, 16, 3)
            bsrc = export(big, work / "deit_tiny.onnx", (3, 224, 224))
            g = np.random.default_rng(0)
            bcal = [g.standard_normal((4, 3, 224, 224)).astype(np.float32) for _ in range(8)]
            bmodels = {}
            for mode in ("fp16", "int8-dynamic", "int8-static"):
                bmodels[f"vitshrink {mode}"] = work / f"big_{mode}.onnx"
                quantize_onnx(bsrc, bmodels[f"vitshrink {mode}"], mode=mode, calib=bcal, quiet=True)
            bx = g.standard_normal((32, 3, 224, 224)).astype(np.float32)
            brows = score(bmodels, bsrc, bx, None, bx[:1])
            results["deit_tiny_224"] = brows
            md.append(table("DeiT-Tiny-sized (192x12, 224 px, random weights): size / latency", brows))
    text = "\n".join(md)
    print(text)
    if args.json:
        with atomic_file(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


def demo_rows(
    src: Path, data: str, data_options: dict[str, Any], work: Path, test_limit: int | None
) -> list[dict[str, Any]]:
    """fp32 / ORT dynamic / ORT static (defaults) / vitshrink int8 on a real model and its test split."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from vitshrink.data import load_dataset
    from vitshrink.deploy.runtime import OnnxModel
    from vitshrink.evaluate import evaluate_onnx, onnx_model_meta
    from vitshrink.train import prepare

    meta = onnx_model_meta(OnnxModel(src))
    size = tuple(meta["preprocess"]["size"])
    val = load_dataset(data, "val", size=size, limit=256, seed=1, data_options=data_options)
    test = load_dataset(data, "test", size=size, limit=test_limit, data_options=data_options)
    calib_ds = val.subset(64, seed=2)
    calib = [
        prepare(calib_ds.images[i : i + 16], meta, torch.device("cpu")).numpy()
        for i in range(0, len(calib_ds), 16)
    ]
    key = TASK_METRIC[meta["task"]]

    def metric(p: str | Path, ds=val) -> float:
        return evaluate_onnx(p, ds, quiet=True)[key]

    class Reader:
        def __init__(self) -> None:
            self.it = iter([{"pixel_values": b[i : i + 1]} for b in calib for i in range(len(b))])

        def get_next(self):
            return next(self.it, None)

    tag = src.stem + "_" + src.parent.name
    models: dict[str, Path] = {}
    with ort_quiet():
        pre = work / f"{tag}_pre.onnx"
        quant_pre_process(str(src), str(pre))
        models["ort int8 dynamic (defaults)"] = work / f"{tag}_dyn.onnx"
        quantize_dynamic(pre, models["ort int8 dynamic (defaults)"])
        models["ort int8 static (defaults: min-max, per-tensor)"] = work / f"{tag}_static.onnx"
        quantize_static(pre, models["ort int8 static (defaults: min-max, per-tensor)"], Reader())
    models["vitshrink int8"] = work / f"{tag}_ours.onnx"
    t = time.perf_counter()
    rep = quantize_onnx(
        src,
        models["vitshrink int8"],
        mode="int8",
        calib=calib,
        eval_fn=metric,
        max_drop=0.005 if key == "accuracy" else 0.01,
        quiet=True,
    )
    secs = time.perf_counter() - t
    paths = [src, *models.values()]
    sample = calib[0][:1]
    lat = latencies_ms(paths, sample, runs=40, budget_s=15.0)
    rows = []
    base = None
    for name, path, ms in zip(["fp32", *models], paths, lat):
        m = metric(path, test)
        base = m if base is None else base
        rows.append(
            {
                "method": name,
                key: m,
                "delta": m - base,
                "size_mb": Path(path).stat().st_size / 2**20,
                "latency_ms": ms,
            }
        )
    rows[-1]["note"] = f"{rep.get('chosen')}, {secs:.0f}s"
    return rows


def demo_table(title: str, rows: list[dict[str, Any]]) -> str:
    key = "accuracy" if "accuracy" in rows[0] else "miou"
    lines = [
        f"### {title}",
        "",
        f"| method | {key} | vs fp32 | size MB | size / fp32 | latency ms (1 thread) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    fp32_mb = rows[0]["size_mb"]
    for r in rows:
        lines.append(
            f"| {r['method']}{' (' + r['note'].split(',')[0] + ')' if r.get('note') else ''} | {r[key]:.4f} | "
            f"{r['delta']:+.4f} | {r['size_mb']:.2f} | "
            f"{r['size_mb'] / fp32_mb:.2f} | {r['latency_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run_demo_models(demo: Path, work: Path, quick: bool) -> tuple[dict[str, Any], list[str]]:
    from vitshrink.demo import configs, stage_dirs
    from vitshrink.export import export_onnx
    from vitshrink.train import train as vs_train

    cfgs = configs(quick)
    results, md = {}, []
    for task in ("classification", "segmentation"):
        done = (demo / task / "results.json").exists()
        src = stage_dirs(demo / task)["teacher"]["artifact"] if done else None
        if src is None or not src.exists():
            print(
                f"skipping {task}: no finished demo in {demo / task} (run `vitshrink demo --out {demo}` first)"
            )
            continue
        cfg = cfgs[task]
        rows = demo_rows(src, cfg.data, cfg.data_options, work, 2000 if task == "classification" else None)
        results[f"demo_{task}_teacher"] = rows
        split = "first 2000 test images" if task == "classification" else "test split"
        md.append(demo_table(f"demo {task} teacher ({cfg.teacher.model}), {cfg.data} {split}", rows))
    if not quick:
        # DeiT-small shape (384-d, 12 layers, 6 heads), patch 7 on 28x28, a short real training run
        t = time.perf_counter()
        deit, _ = vs_train(
            "deit-small",
            "fashion-mnist",
            out=work / "deit_small",
            epochs=1,
            limit=4000,
            lr=5e-4,
            batch_size=64,
            augment=False,
            quiet=True,
            patch_size=7,
        )
        src, _ = export_onnx(deit, work / "deit_small" / "model.onnx")
        rows = demo_rows(src, "fashion-mnist", {}, work, 2000)
        results["deit_small_fmnist"] = {"rows": rows, "train_seconds": round(time.perf_counter() - t, 1)}
        md.append(
            demo_table("DeiT-small (22M params) trained 1 epoch on 4k Fashion-MNIST images, test split", rows)
        )
    return results, md


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "chosen",
        "metric_before",
        "metric_after",
        "drop",
        "size_ratio",
        "latency_ms",
        "candidates",
        "seconds",
        "smoothing",
    )
    out = {k: report[k] for k in keep if k in report}
    out["kept_float_nodes"] = list(report.get("kept_float", {}).get("nodes", {}))
    return out


if __name__ == "__main__":
    main()
