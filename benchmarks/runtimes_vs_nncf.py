"""vitshrink's chosen deploy (`quantize --runtime auto`: onnxruntime or OpenVINO, whichever it measured
faster here) vs NNCF int8 on OpenVINO with NNCF's defaults; run through `quant_vs_peers.py --runtimes`.

Models: DeiT-S 224 and SegFormer-B0 512 with random weights (latency only: their accuracy means nothing),
and the demo classification teacher (Fashion-MNIST, accuracy on the first 2000 test images). Every int8
build sees the same calibration batches. Latency: batch 1, 1 and 2 threads, all variants interleaved
round-robin in this process (0.2 s pauses between 2-thread calls, so no runtime's spinning pool steals
the next one's cores), median per variant.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitshrink.artifacts import atomic_file  # noqa: E402
from vitshrink.bench.timing import round_robin_ms  # noqa: E402
from vitshrink.cpu import cpu_name  # noqa: E402


def nncf_peer(src: Path, calib: list[np.ndarray], out: Path, meta: dict[str, Any] | None) -> Path:
    """NNCF int8 as its documentation shows it for a transformer: convert, quantize, save."""
    import nncf
    import openvino as ov

    from vitshrink.deploy.ov_runtime import save_ir, write_openvino_folder

    samples = [b[i : i + 1] for b in calib for i in range(len(b))]  # one image per item, as NNCF shows it
    q = nncf.quantize(
        ov.convert_model(str(src)),
        nncf.Dataset(samples),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(samples),
    )
    xml = out.with_suffix(".xml")
    save_ir(q, xml, meta)  # the metadata only lets vitshrink's evaluate read its preprocessing
    return write_openvino_folder(xml, out, meta)


def runner(path: Path, threads: int) -> Any:
    from vitshrink.deploy.ov_runtime import OvSession, is_openvino
    from vitshrink.deploy.runtime import cpu_session
    from vitshrink.onnx_folder import onnx_file

    if is_openvino(path):
        return OvSession(path, threads)
    return cpu_session(onnx_file(path), threads, spin=threads == 1)  # an ONNX folder runs its model.onnx


def latencies(paths: dict[str, Path], x: np.ndarray, runs: int, budget_s: float) -> dict[str, dict]:
    out: dict[str, dict] = {k: {} for k in paths}
    for threads in (1, 2):
        sessions = {k: runner(p, threads) for k, p in paths.items()}
        fns = [lambda s=s: s.run(None, {s.get_inputs()[0].name: x}) for s in sessions.values()]
        gap = 0.2 if threads > 1 else 0.0
        times = round_robin_ms(fns, runs=runs, budget_s=budget_s, warmup=3, min_runs=10, gap_s=gap)
        for k, t in zip(paths, times):
            out[k][f"ms_{threads}t"] = float(np.median(t))
        del sessions, fns
    return out


def random_model(preset: str, size: int, work: Path, **kw: Any) -> tuple[Path, list[np.ndarray]]:
    from vitshrink.export import export_onnx
    from vitshrink.models import build_model

    model, meta = build_model(preset, image_size=size, **kw)
    src, _ = export_onnx(model.eval(), work / f"{preset}.onnx", meta=meta)
    g = np.random.default_rng(0)
    bs = 4 if size <= 224 else 2
    calib = [g.standard_normal((bs, 3, size, size)).astype(np.float32) for _ in range(4)]
    return src, calib


def teacher_model(teacher: Path | None, work: Path) -> tuple[Path, list[np.ndarray], Any, Any]:
    import torch

    from vitshrink.demo import demo_cache
    from vitshrink.evaluate import eval_dataset, evaluate_onnx
    from vitshrink.export import export_onnx
    from vitshrink.quantize import _data
    from vitshrink.quantize.files import load_onnx, read_meta

    if teacher is None:
        found = [p for p in demo_cache().glob("classification-teacher-*") if (p / "config.json").is_file()]
        found = [p for p in found if p.suffix != ".ckpt"]  # a training checkpoint, not a finished teacher
        found.sort(key=lambda p: p.stat().st_mtime)
        if not found:
            raise SystemExit("no demo classification teacher cached: run `vitshrink demo` first")
        teacher = found[-1]
    print(f"teacher: {teacher}", file=sys.stderr)
    src, _ = export_onnx(teacher, work / "teacher.onnx")
    meta = read_meta(load_onnx(src))
    batches, _ = _data("fashion-mnist", meta, src)
    calib = list(batches)
    test = eval_dataset("fashion-mnist", "test", meta, limit=2000)
    torch.set_num_threads(2)

    def accuracy(p: Path) -> float:
        return float(evaluate_onnx(p, test, quiet=True, threads=2)["accuracy"])

    return src, calib, accuracy, teacher


def compare(name: str, src: Path, calib: list[np.ndarray], work: Path, spec: str | None, metric: Any) -> dict:
    from vitshrink.quantize import quantize, quantize_onnx
    from vitshrink.quantize.files import load_onnx, read_meta

    t = time.perf_counter()
    if spec is not None:  # a trained model: calibrate and guarantee max_drop on its data, as the CLI does
        _, rep = quantize(src, work / f"{name}_vitshrink", runtime="auto", calib_data=spec, quiet=True)
    else:  # random weights: no accuracy to keep, only the choice by speed is of interest
        rep = quantize_onnx(
            src,
            work / f"{name}_vitshrink.onnx",
            calib=calib,
            runtime="auto",
            openvino_out=work / f"{name}_vitshrink",
            max_drop=1.0,
            quiet=True,
        )
    secs = time.perf_counter() - t
    t = time.perf_counter()
    peer = nncf_peer(src, calib, work / f"{name}_nncf", read_meta(load_onnx(src)))
    peer_secs = time.perf_counter() - t
    paths = {"fp32 (onnxruntime)": src, "vitshrink int8 (auto)": Path(rep["path"]), "NNCF int8": peer}
    x = calib[0][:1]
    lat = latencies(paths, x, runs=60, budget_s=15.0)
    rows = []
    for k, p in paths.items():
        row = {"variant": k, **lat[k]}
        if metric is not None:
            row["accuracy"] = metric(p)
        rows.append(row)
    rows[1]["runtime"] = rep["runtime"]
    rows[1]["chosen"] = rep["chosen"]
    return {
        "model": name,
        "rows": rows,
        "runtime_choice": rep.get("runtime_choice"),
        "quantize_seconds": round(secs, 1),
        "nncf_seconds": round(peer_secs, 1),
    }


def table(res: dict) -> str:
    acc = "accuracy" in res["rows"][0]
    lines = [
        f"#### {res['model']}",
        "",
        "| variant | 1 thread ms | 2 threads ms |" + (" accuracy |" if acc else ""),
        "|---|---:|---:|" + ("---:|" if acc else ""),
    ]
    for r in res["rows"]:
        label = r["variant"] + (f" -> {r['runtime']} {r['chosen']}" if "runtime" in r else "")
        lines.append(
            f"| {label} | {r['ms_1t']:.2f} | {r['ms_2t']:.2f} |" + (f" {r['accuracy']:.4f} |" if acc else "")
        )
    c = res["runtime_choice"] or {}
    lines.append("")
    lines.append(f"auto: {c.get('kept')} kept: {c.get('why')}")
    return "\n".join(lines) + "\n"


def main(which: list[str], teacher: Path | None, json_out: Path | None) -> None:
    import torch

    torch.set_num_threads(2)
    results = {"cpu": cpu_name(), "models": []}
    with tempfile.TemporaryDirectory(prefix="vitshrink-runtimes-") as tmp:
        work = Path(tmp)
        for w in which:
            if w == "deit":
                src, calib = random_model("deit-small", 224, work, num_labels=1000)
                res = compare("DeiT-S 224 (random weights)", src, calib, work, None, None)
            elif w == "segformer":
                src, calib = random_model("segformer-b0", 512, work, num_labels=14)
                res = compare("SegFormer-B0 512 (random weights)", src, calib, work, None, None)
            elif w == "teacher":
                src, calib, acc, path = teacher_model(teacher, work)
                res = compare("demo classification teacher", src, calib, work, "fashion-mnist", acc)
                res["teacher"] = str(path)
            else:
                raise SystemExit(f"unknown model '{w}' (deit, teacher, segformer)")
            results["models"].append(res)
            print(table(res), flush=True)
    if json_out:
        with atomic_file(json_out, "w") as f:
            json.dump(results, f, indent=2, default=str)
