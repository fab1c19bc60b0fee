"""Peak memory of `vitshrink predict` on a 512x512 segmentation model (the README's deploy footprint).

Builds SegFormer-B0 with 14 classes at 512x512 (random weights: memory does not depend on them),
exports it to ONNX (fp32, and int8 with `quantize --mode int8-dynamic`), then runs the deploy path
(`vitshrink.deploy.predict`: numpy + Pillow + onnxruntime, torch never imported) in a fresh process
per setting on one 512x512 image and reports that process's peak RSS (VmHWM).

    PYTHONPATH=src .venv/bin/python benchmarks/predict_memory.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import json, sys
from vitshrink.deploy import predict
from vitshrink._proc import peak_rss_mb
model, image, out, threads, low = sys.argv[1:6]
rep = predict(model, [image], out=out, threads=int(threads), quiet=True, low_memory=low == "1")
assert rep["results"] and not rep["errors"], rep
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules}))
"""


def run_child(model: Path, image: Path, out: Path, threads: int, low_memory: bool) -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(model),
            str(image),
            str(out),
            str(threads),
            "1" if low_memory else "0",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from vitshrink.export import export_onnx
    from vitshrink.models import build_model, save_model
    from vitshrink.quantize import quantize

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        net, meta = build_model("segformer-b0", image_size=512, num_channels=3, num_labels=14)
        save_model(net, meta, d / "b0")
        fp32, _ = export_onnx(d / "b0", d / "b0.onnx")
        int8, _ = quantize(fp32, d / "b0-int8.onnx", mode="int8-dynamic", quiet=True)
        img = d / "scene.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(img)
        rows = []
        for name, path in (("fp32", fp32), ("int8-dynamic", int8)):
            for low in (False, True):
                r = run_child(path, img, d / "out", args.threads, low)
                size = Path(path).stat().st_size / 2**20
                rows.append((name, low, size, r["peak_rss_mb"], r["torch_imported"]))
    print(f"SegFormer-B0, 14 classes, 512x512, one image, {args.threads} thread(s), fresh process each")
    print("| model | low_memory | file MB | peak RSS MiB | torch imported |")
    print("|---|---|---:|---:|---|")
    for name, low, size, rss, torch_in in rows:
        print(f"| {name} | {low} | {size:.1f} | {rss:.0f} | {torch_in} |")


if __name__ == "__main__":
    main()
