"""int8-static on Fashion-MNIST ViTs: vitshrink vs onnxruntime's plain static recipe, and what moves it.

For each model directory: exported as `vitshrink quantize` exports it (batch 1), calibrated on the same
256 validation images (`quantize --calib-data`'s subset), scored on the whole test split. Rows:

* fp32;
* ort plain - quant_pre_process + quantize_static with its defaults (min-max, per-tensor weights, QDQ);
* vitshrink int8-static - `quantize_onnx(mode="int8-static")` as it is now;
* ... previous recipe - the same with the first / last weight layers static int8 too (no EDGE_SHARE);
* ... without onnxruntime fusions - attention / GELU not fused before calibration (the suspected cause).

Accuracy moves by a few test images between recipes; top-1 agreement with fp32 and the relative logit
error over the 10,000 test images are the quantization's own error and rank the recipes more reliably.

    PYTHONPATH=src .venv/bin/python benchmarks/int8_static.py MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from vitshrink.evaluate import eval_dataset
from vitshrink.export import export_onnx
from vitshrink.quantize import builders, onnx_quant, quantize_onnx, steps
from vitshrink.quantize.files import read_meta
from vitshrink.quantize.measure import ort_quiet, run
from vitshrink.train import prepare

CALIB = 256  # quantize's CALIB_SAMPLES, from the same 1000 validation images, same seed


def ort_plain(src: Path, out: Path, calib: list[np.ndarray]) -> None:
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader:  # one image per call, as onnxruntime's examples feed it
        def __init__(self) -> None:
            self.it = iter([{"pixel_values": b[i : i + 1]} for b in calib for i in range(len(b))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    pre = out.with_name(out.stem + "-pre.onnx")
    with ort_quiet():
        quant_pre_process(str(src), str(pre))
        quantize_static(pre, out, Reader())


@contextlib.contextmanager
def previous_recipe() -> Iterator[None]:
    saved = builders.edge_layers
    builders.edge_layers = lambda model: []
    try:
        yield
    finally:
        builders.edge_layers = saved


@contextlib.contextmanager
def without_ort_fusions() -> Iterator[None]:
    saved = onnx_quant.exact_rewrites
    onnx_quant.exact_rewrites = lambda pre, b, say, ort_ops=False: steps.exact_rewrites(
        pre, b, say, ort_ops=False
    )
    try:
        yield
    finally:
        onnx_quant.exact_rewrites = saved


def one_model(model_dir: Path, work: Path) -> list[dict[str, Any]]:
    src, _ = export_onnx(model_dir, work / "model.onnx", quiet=True)
    meta = read_meta(onnx.load(str(src)))
    val = eval_dataset("fashion-mnist", "val", meta, limit=1000)
    cpu = torch.device("cpu")
    calib = [
        prepare(b.images, meta, cpu).numpy() for b in val.subset(CALIB, seed=1).batches(16, view="fixed")
    ]
    test = eval_dataset("fashion-mnist", "test", meta)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for b in test.batches(500, view="fixed"):
        x = prepare(b.images, meta, cpu).numpy()
        xs += [x[i : i + 1] for i in range(len(x))]  # the exported graph takes batch 1
        ys.append(np.asarray(b.targets))
    y = np.concatenate(ys)
    ref = run(str(src), xs)

    def ours(out: Path, ctx: Callable[[], Any] = contextlib.nullcontext) -> None:
        with ctx():
            quantize_onnx(src, out, mode="int8-static", calib=calib, quiet=True)

    recipes: dict[str, Callable[[Path], None]] = {
        "ort plain static (min-max, per-tensor)": lambda o: ort_plain(src, o, calib),
        "vitshrink int8-static": ours,
        "vitshrink int8-static, previous recipe (edge layers int8)": lambda o: ours(o, previous_recipe),
        "vitshrink int8-static, no attention/GELU fusion": lambda o: ours(o, without_ort_fusions),
    }
    rows = [
        {"recipe": "fp32", "accuracy": float((ref.argmax(1) == y).mean()), "agree": 1.0, "rel_error": 0.0}
    ]
    for i, (name, build) in enumerate(recipes.items()):
        t = time.time()
        out = work / f"q{i}.onnx"
        build(out)
        logits = run(str(out), xs)
        rows.append(
            {
                "recipe": name,
                "accuracy": float((logits.argmax(1) == y).mean()),
                "agree": float((logits.argmax(1) == ref.argmax(1)).mean()),
                "rel_error": float(np.linalg.norm(logits - ref) / np.linalg.norm(ref)),
            }
        )
        print(f"  {name}: {rows[-1]} ({time.time() - t:.0f}s)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="Fashion-MNIST model directories")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for model_dir in args.models:
        with tempfile.TemporaryDirectory(prefix="int8-static-") as tmp:
            print(f"{model_dir}:", flush=True)
            rows = one_model(model_dir, Path(tmp))
        print(
            "| recipe | test top-1 | top-1 agreement with fp32 | relative logit error |\n|---|---:|---:|---:|"
        )
        for r in rows:
            print(f"| {r['recipe']} | {r['accuracy']:.4f} | {r['agree']:.4f} | {r['rel_error']:.4f} |")


if __name__ == "__main__":
    main()
