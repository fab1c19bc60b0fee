"""SegFormer-B0 at its deployment size (512x512, 14 aerial classes): fp32 vs every vitshrink int8
variant vs OpenVINO fp32 and NNCF int8 (issue 18).

Measured per variant: mIoU on the aerial test split at 512, batch-1 latency at 1 and 2 threads
(all variants interleaved round-robin in one process), file size, peak RSS of inference (a fresh
process that loads the model and runs it) and of quantization (the quantize run in a fresh process,
100 calibration images from the aerial val split).

The model is trained briefly from scratch (no pretrained weights offline): 128x128 tiles cut from
512x512 renders, so it learns the scale it is deployed at, at 1/16 of the cost of full frames. Data,
checkpoint and artifacts are cached under runs/seg_int8_512/ (gitignored); a rerun reuses them.

OpenVINO / NNCF are optional (`pip install .[peers]`, or a folder put on the path with --peers-site);
without them those rows are skipped.

    PYTHONPATH=src .venv/bin/python benchmarks/seg_int8_512.py prepare   # data, train, quantize, mIoU, RSS
    flock -x /tmp/vitshrink-cpu.lock env PYTHONPATH=src .venv/bin/python benchmarks/seg_int8_512.py latency
    PYTHONPATH=src .venv/bin/python benchmarks/seg_int8_512.py table     # markdown table from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SIZE, TILE = 512, 128
WORK = ROOT / "runs" / "seg_int8_512"
DATA_OPTS = {"size": SIZE, "n_train": 200, "n_val": 100, "n_test": 100, "cache_dir": str(WORK / "data")}
# vitshrink variants: (name, quantize mode, calibration data?)
VITSHRINK = [
    ("vitshrink int8 (no calibration data: dynamic)", "int8", False),
    ("vitshrink int8-static", "int8-static", True),
    ("vitshrink int8-mixed", "int8-mixed", True),
    ("vitshrink int8 (chosen, calibrated)", "int8", True),
]


def results_path() -> Path:
    return WORK / "results.json"


def load_results() -> dict[str, Any]:
    p = results_path()
    return json.loads(p.read_text()) if p.exists() else {"variants": {}}


def save_results(res: dict[str, Any]) -> None:
    from vitshrink.artifacts import atomic_file

    with atomic_file(results_path(), "w") as f:
        f.write(json.dumps(res, indent=1))


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ----------------------------------------------------------------------------------------- training


def train_model(minutes: float) -> Path:
    """A SegFormer-B0 trained on 128 px tiles of 512 px renders for about `minutes`; cached."""
    import torch

    from vitshrink.data import VisionDataset, aerial, load_dataset
    from vitshrink.models import build_model, save_model
    from vitshrink.train import fit

    out = WORK / "model"
    if (out / "config.json").exists():
        return out
    ds = load_dataset("aerial", "train", data_options=dict(DATA_OPTS))
    n = SIZE // TILE
    imgs = ds.images.unfold(2, TILE, TILE).unfold(3, TILE, TILE)  # N,C,n,n,T,T
    imgs = imgs.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, TILE, TILE).contiguous()
    masks = ds.targets.unfold(1, TILE, TILE).unfold(2, TILE, TILE).reshape(-1, TILE, TILE).contiguous()
    # how many tiles fit the time budget: time a few steps first
    model, meta = build_model(
        "segformer-b0",
        image_size=TILE,
        class_names=list(aerial.CLASSES),
        mean=list(aerial.MEAN),
        std=list(aerial.STD),
    )
    x = torch.randn(16, 3, TILE, TILE)
    t = time.perf_counter()
    model.train()
    for _ in range(2):
        model(pixel_values=x).logits.mean().backward()
    per_tile = (time.perf_counter() - t) / 32 * 1.3  # + optimiser, data, augmentation
    model.zero_grad()
    tiles = int(min(len(imgs), max(256, minutes * 60 / per_tile)))
    perm = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(0))[:tiles]
    train = VisionDataset(imgs[perm], masks[perm], "segmentation", list(aerial.CLASSES), "aerial-tiles")
    print(
        f"training on {tiles} tiles of {TILE} px ({per_tile:.2f} s/tile), {n * n} per frame", file=sys.stderr
    )
    fit(model, meta, train, None, epochs=1, batch_size=16, lr=2e-3, quiet=False, device=torch.device("cpu"))
    model.eval()
    meta["preprocess"]["size"] = [SIZE, SIZE]
    save_model(model, meta, out)
    return out


# --------------------------------------------------------------------------------------- quantizing

QUANT_CHILD = """
import json, sys
from vitshrink.quantize import quantize
src, dst, mode, calib, opts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", json.loads(sys.argv[5])
_, report = quantize(src, dst, mode=mode, calib_data="aerial" if calib else None, data_options=opts, quiet=True)
print(json.dumps(report, default=str))
"""

RSS_CHILD = """
import json, sys
import numpy as np
path, kind = sys.argv[1], sys.argv[2]
x = np.random.default_rng(0).standard_normal((1, 3, 512, 512)).astype(np.float32)
if kind == "ort":
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    so.enable_cpu_mem_arena = False  # the arena grows in power-of-two steps and would hide differences
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    f = lambda: s.run(None, {s.get_inputs()[0].name: x})
else:
    import openvino as ov
    m = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": 1})
    f = lambda: m(x)
for _ in range(3):
    f()
from vitshrink._proc import peak_rss_mb  # VmHWM: ru_maxrss would carry this benchmark's own peak over exec
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""


def child_env(peers: str | None) -> dict[str, str]:
    path = [str(ROOT / "src")] + ([peers] if peers else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "VITSHRINK_QUIET": "1"}


def run_child(code: str, args: list[str], peers: str | None) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=child_env(peers)
    )
    if res.returncode:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "child failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def quantize_variants(
    fp32: Path, res: dict[str, Any], peers: str | None, only: list[str] | None = None
) -> None:
    """Each variant quantized in a fresh process; its record kept beside it (WORK/<slug>.quant.json),
    so variants may be built by concurrent invocations (--variants)."""
    for name, mode, calib in VITSHRINK:
        path = WORK / f"{slug(name)}.onnx"
        record = WORK / f"{slug(name)}.quant.json"
        if not record.exists() or not path.exists():
            if only is not None and not any(o in name for o in only):
                continue
            t = time.perf_counter()
            rep = run_child(
                QUANT_CHILD, [str(fp32), str(path), mode, "1" if calib else "0", json.dumps(DATA_OPTS)], peers
            )
            q = {
                "chosen": rep.get("chosen"),
                "peak_rss_mb": rep.get("peak_rss_mb"),
                "seconds": round(time.perf_counter() - t, 1),
                "candidates": rep.get("candidates"),
                "fallback_nodes": len((rep.get("kept_float") or {}).get("nodes") or {}),
                "metric_before": rep.get("metric_before"),
                "metric_after": rep.get("metric_after"),
                "warnings": rep.get("warnings"),
                "rewrites": rep.get("rewrites"),
                "attention": rep.get("attention"),
                "drop": rep.get("drop"),
            }
            record.write_text(json.dumps(q, indent=1))
            print(f"{name}: {q}", file=sys.stderr)
        res["variants"].setdefault(name, {}).update(
            path=str(path), kind="ort", quantize=json.loads(record.read_text())
        )


NNCF_CHILD = """
import json, sys
import numpy as np
import nncf, openvino as ov
from vitshrink.data import load_dataset
from vitshrink.deploy.runtime import OnnxModel
fp32, out_fp32, out_int8, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
m = OnnxModel(fp32)
ds = load_dataset("aerial", "val", data_options=opts)
mean, std = m.mean.reshape(1, -1, 1, 1), m.std.reshape(1, -1, 1, 1)
def transform(img):
    return ((img[None].numpy().astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
model = ov.convert_model(fp32)
ov.save_model(model, out_fp32)
q = nncf.quantize(model, nncf.Dataset(list(ds.images), transform), subset_size=len(ds))
ov.save_model(q, out_int8)
from vitshrink._proc import peak_rss_mb  # VmHWM: ru_maxrss would carry this benchmark's own peak over exec
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""


def peer_variants(fp32: Path, res: dict[str, Any], peers: str | None) -> None:
    try:
        run_child("import openvino, nncf; print('{}')", [], peers)
    except RuntimeError as e:
        res["peers_skipped"] = f"openvino / nncf not importable: {e}"
        return
    ov_fp32, ov_int8 = WORK / "openvino_fp32.xml", WORK / "nncf_int8.xml"
    name, record = "NNCF int8 (OpenVINO)", WORK / "nncf_int8.quant.json"
    if not ov_int8.exists() or not record.exists():
        t = time.perf_counter()
        rep = run_child(NNCF_CHILD, [str(fp32), str(ov_fp32), str(ov_int8), json.dumps(DATA_OPTS)], peers)
        rep["seconds"] = round(time.perf_counter() - t, 1)
        record.write_text(json.dumps(rep))
    res["variants"][name] = {"path": str(ov_int8), "kind": "ov", "quantize": json.loads(record.read_text())}
    res["variants"].setdefault("OpenVINO fp32", {}).update(path=str(ov_fp32), kind="ov")
    save_results(res)


def folded_fp32(fp32: Path, res: dict[str, Any]) -> None:
    """The fp32 model with vitshrink's exact decoder rewrites alone (what int8 builds on: the fuse conv
    folded, the upsample-and-sum tail channels-last), to separate the rewrites' gain from int8's."""
    import onnx

    from vitshrink.quantize.fusions import channels_last_tail, fold_concat_conv
    from vitshrink.quantize.steps import preprocess

    out = WORK / "fp32_rewritten.onnx"
    if not out.exists():
        pre = preprocess(fp32, WORK / "fp32_pre.onnx", onnx.load(str(fp32)), lambda m: None)
        folded, info = fold_concat_conv(pre)
        tail, tinfo = channels_last_tail(folded)
        assert info["folded"] == 1 and tinfo["channels_last_tails"] == 1, (info, tinfo)
        onnx.save(tail, str(out))
        (WORK / "fp32_pre.onnx").unlink()
    res["variants"].pop("fp32 + decoder fold (vitshrink rewrite)", None)
    res["variants"].setdefault("fp32 + decoder rewrites (vitshrink)", {}).update(path=str(out), kind="ort")
    save_results(res)


# ---------------------------------------------------------------------------------- accuracy, memory


def file_mb(path: str) -> float:
    p = Path(path)
    size = p.stat().st_size + (p.with_suffix(".bin").stat().st_size if p.suffix == ".xml" else 0)
    return size / 2**20


def runner(path: str, kind: str, threads: int) -> Any:
    if kind == "ort":
        from vitshrink.deploy.runtime import cpu_session

        s = cpu_session(path, threads)
        name = s.get_inputs()[0].name
        return lambda x: s.run(None, {name: x})[0]
    import openvino as ov

    m = ov.Core().compile_model(
        path, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    )
    return lambda x: m(x)[0]


def miou(path: str, kind: str, ds: Any, mean: np.ndarray, std: np.ndarray) -> float:
    import torch

    from vitshrink.evaluate import confusion, seg_metrics

    f = runner(path, kind, threads=2)
    cm = torch.zeros(ds.num_classes, ds.num_classes, dtype=torch.float64)
    for i in range(len(ds)):
        x = ((ds.images[i : i + 1].numpy().astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        logits = torch.from_numpy(np.asarray(f(x), dtype=np.float32))
        logits = torch.nn.functional.interpolate(
            logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False
        )
        cm += confusion(logits.argmax(1), ds.targets[i : i + 1], ds.num_classes).double()
    return float(seg_metrics(cm.numpy(), ds.class_names)["miou"])


def evaluate_all(res: dict[str, Any], peers: str | None) -> None:
    from vitshrink.data import load_dataset
    from vitshrink.deploy.runtime import OnnxModel

    if peers:
        sys.path.insert(0, peers)
    ds = load_dataset("aerial", "test", data_options=dict(DATA_OPTS))
    m = OnnxModel(res["variants"]["fp32 (onnxruntime)"]["path"])
    mean, std = m.mean.reshape(1, -1, 1, 1), m.std.reshape(1, -1, 1, 1)
    for name, v in res["variants"].items():
        if not Path(v["path"]).exists():
            continue
        # one record per variant beside it, so evaluations may run side by side with other phases
        record = WORK / f"{slug(name)}.eval.json"
        if not record.exists():
            rec = {"miou": miou(v["path"], v["kind"], ds, mean, std)}
            rec["infer_peak_rss_mb"] = run_child(RSS_CHILD, [v["path"], v["kind"]], peers)["peak_rss_mb"]
            record.write_text(json.dumps(rec))
            print(f"{name}: {rec}", file=sys.stderr)
        v.update(json.loads(record.read_text()), size_mb=file_mb(v["path"]))
        save_results(res)


# ------------------------------------------------------------------------------------------ latency


def latency(res: dict[str, Any], peers: str | None, runs: int, budget_s: float) -> None:
    """Batch-1 latency at 1 and 2 threads, every variant interleaved round-robin in this process (each
    runtime as deployed: onnxruntime's pools spin, so 2-thread calls are spaced out)."""
    from vitshrink.bench.timing import round_robin_ms

    if peers:
        sys.path.insert(0, peers)
    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    names = list(res["variants"])
    for threads in (1, 2):
        fns = []
        for n in names:
            f = runner(res["variants"][n]["path"], res["variants"][n]["kind"], threads)
            fns.append(lambda f=f: f(x))
        # With worker threads, each runtime's pool spins after its run and would steal the cores from
        # the next variant (58 ms alone vs 90 ms in turn, measured): pause until it sleeps.
        gap = 0.2 if threads > 1 else 0.0
        times = round_robin_ms(fns, runs=runs, budget_s=budget_s, warmup=2, min_runs=5, gap_s=gap)
        for n, t in zip(names, times):
            res["variants"][n][f"ms_{threads}t"] = float(np.median(t))
            res["variants"][n][f"runs_{threads}t"] = len(t)
        del fns
    from vitshrink.cpu import cpu_name

    res["latency_cpu"] = cpu_name()
    save_results(res)


# -------------------------------------------------------------------------------------------- table


def table(res: dict[str, Any]) -> str:
    v = res["variants"]
    base = v["fp32 (onnxruntime)"]
    rows = [
        "| variant | mIoU @512 | vs fp32 | 1-thread ms | 2-thread ms | speed-up vs fp32 (1t) | file MB "
        "| inference peak RSS MB | quantization peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in v.items():
        q = (r.get("quantize") or {}).get("peak_rss_mb")
        chosen = (r.get("quantize") or {}).get("chosen")
        label = name + (f" -> {chosen}" if chosen and "chosen" in name else "")
        if r.get("miou") is None:
            acc = "= fp32 | exact "
        else:
            acc = f"{r['miou']:.4f} | {r['miou'] - base['miou']:+.4f} "
        rows.append(
            f"| {label} | {acc}"
            f"| {r.get('ms_1t', float('nan')):.0f} | {r.get('ms_2t', float('nan')):.0f} "
            f"| {base.get('ms_1t', float('nan')) / r.get('ms_1t', float('nan')):.2f}x | {r['size_mb']:.1f} "
            f"| {r.get('infer_peak_rss_mb', float('nan')):.0f} | {'' if q is None else f'{q:.0f}'} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["prepare", "quantize", "evaluate", "latency", "table"])
    ap.add_argument(
        "--variants",
        help="quantize only the vitshrink variants whose name contains one of these (comma list)",
    )
    ap.add_argument("--train-minutes", type=float, default=4.0)
    ap.add_argument("--peers-site", default=os.environ.get("VITSHRINK_PEERS_SITE"))
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=90.0, help="per thread count, all variants")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    res = load_results()
    if args.phase == "prepare":
        from vitshrink.export import export_onnx

        model_dir = train_model(args.train_minutes)
        fp32 = WORK / "fp32.onnx"
        if not fp32.exists():
            export_onnx(model_dir, fp32, image_size=SIZE, quiet=True)
        res["variants"].setdefault("fp32 (onnxruntime)", {}).update(path=str(fp32), kind="ort")
        save_results(res)
        folded_fp32(fp32, res)
        only = args.variants.split(",") if args.variants else None
        quantize_variants(fp32, res, args.peers_site, only)
        save_results(res)
        peer_variants(fp32, res, args.peers_site)
        evaluate_all(res, args.peers_site)
    elif args.phase == "quantize":  # vitshrink variants only, e.g. several invocations side by side
        only = args.variants.split(",") if args.variants else None
        quantize_variants(WORK / "fp32.onnx", {"variants": {}}, args.peers_site, only)
        return
    elif args.phase == "evaluate":  # what is built so far (records of other invocations included)
        res = {"variants": {"fp32 (onnxruntime)": {"path": str(WORK / "fp32.onnx"), "kind": "ort"}}}
        folded_fp32(WORK / "fp32.onnx", res)
        quantize_variants(WORK / "fp32.onnx", res, args.peers_site, only=[])
        if (WORK / "nncf_int8.quant.json").exists():
            peer_variants(WORK / "fp32.onnx", res, args.peers_site)
        for name, path in (("OpenVINO fp32", "openvino_fp32.xml"), ("NNCF int8 (OpenVINO)", "nncf_int8.xml")):
            if (WORK / path).exists():
                res["variants"].setdefault(name, {}).update(path=str(WORK / path), kind="ov")
        evaluate_all(res, args.peers_site)
    elif args.phase == "latency":
        latency(res, args.peers_site, args.runs, args.budget_s)
    print(table(res))


if __name__ == "__main__":
    main()
