"""Tiled vs resized inference on large drone frames, with exact ground truth.

Frames: generated 2048x1536 aerial frames (`aerial.render_frame`: 256 px scenes side by side, so a
vehicle is 6-10 px and a person 1-2 px of a 3 MP frame). Model: the demo's segmentation student
(segformer-micro, 32-wide decoder), trained briefly here on 96 px crops of 256 px scenes (half of them centred on small objects), i.e.
at the frames' own pixel scale, then exported with a dynamic input size (input 256x256); or pass an
exported model with --model.

For each mode, a fresh torch-free process (numpy + Pillow + onnxruntime, as on the drone) runs
`OnnxModel.segment` over the frames and reports mIoU (classes present in the ground truth), the IoU of
the small classes (water_vehicle_person, cracks_fissures), frames/s and peak RSS:

* resized - today's behaviour: the whole frame resized to the model input, ids upsampled back;
* tiled   - sliding window at the frame's resolution, tiles of the model input, overlap 0.25.

    PYTHONPATH=src .venv/bin/python benchmarks/tiled_inference.py --quick   # < 3 min on 2 cores
    PYTHONPATH=src .venv/bin/python benchmarks/tiled_inference.py           # longer training, 6 frames
    ... --model student.onnx    # an exported segmentation model (14 aerial classes) instead of training
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SMALL = ("water_vehicle_person", "cracks_fissures")
SRC = Path(__file__).resolve().parents[1] / "src"


def train_student(out: Path, seconds: float, threads: int) -> Path:
    """segformer-micro trained for `seconds` on 96 px crops of 256 px scenes; exported dynamic-size."""
    import torch
    import torch.nn.functional as F

    from vitshrink.data import aerial
    from vitshrink.export import export_onnx
    from vitshrink.models import build_model, family_for

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model, meta = build_model(
        "segformer-micro",
        task="segmentation",
        image_size=256,
        num_labels=aerial.NUM_CLASSES,
        decoder_hidden_size=32,
    )
    meta["class_names"] = list(aerial.CLASSES)
    meta["preprocess"].update(mean=list(aerial.MEAN), std=list(aerial.STD))
    adapter = family_for(model)
    scenes = [aerial.render_sample(10_000 + i, 256) for i in range(96)]
    imgs = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    masks = torch.from_numpy(np.stack([s[1] for s in scenes])).long()
    mean = torch.tensor(aerial.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(aerial.STD).view(1, 3, 1, 1)
    imgs = (imgs - mean) / std
    # Tiny objects are ~0.3% of the pixels: weight classes by 1/sqrt(frequency) so the briefly trained
    # student predicts them at all (both modes use the same model).
    freq = torch.bincount(masks.ravel(), minlength=aerial.NUM_CLASSES).float() + 1
    weight = (freq.sum() / freq).sqrt()
    weight /= weight.mean()
    # Half the crops are centred on a small-object pixel: a CPU budget of a few hundred steps would
    # otherwise show the student too few of them to learn the class at all.
    small = torch.nonzero(masks == aerial.CLASSES.index("water_vehicle_person"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    model.train()
    steps, start, crop, batch = 0, time.perf_counter(), 96, 12
    while time.perf_counter() - start < seconds:
        xs, ts = [], []
        for b in range(batch):
            if b % 2 and len(small):
                i, cy, cx = (int(v) for v in small[int(torch.randint(0, len(small), (1,), generator=g))])
                y0 = min(max(cy - crop // 2, 0), 256 - crop)
                x0 = min(max(cx - crop // 2, 0), 256 - crop)
            else:
                i = int(torch.randint(0, len(imgs), (1,), generator=g))
                y0, x0 = (int(v) for v in torch.randint(0, 256 - crop + 1, (2,), generator=g))
            xs.append(imgs[i, :, y0 : y0 + crop, x0 : x0 + crop])
            ts.append(masks[i, y0 : y0 + crop, x0 : x0 + crop])
        x, t = torch.stack(xs), torch.stack(ts)
        if steps % 2:
            x, t = x.flip(-1), t.flip(-1)
        loss = F.cross_entropy(adapter.logits(model, x), t, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    model.eval()
    print(f"trained segformer-micro {steps} steps in {time.perf_counter() - start:.0f} s (loss {loss:.3f})")
    path, rep = export_onnx(model, out, meta=meta, image_size=256, dynamic_size=True)
    print(f"exported {path} (parity {rep['max_abs_diff']:.1e} at {', '.join(rep['parity_sizes'])})")
    return path


def worker(model: str, frames: str, mode: str, threads: int) -> None:
    """One mode in a fresh torch-free process: confusion matrix, frames/s, peak RSS -> JSON on stdout."""
    from PIL import Image

    from vitshrink._proc import peak_rss_mb
    from vitshrink.deploy import OnnxModel

    net = OnnxModel(model, threads=threads)
    k = len(net.class_names or [])
    conf = np.zeros((k, k), np.int64)
    files = sorted(Path(frames).glob("*_img.png"))
    spent, info = 0.0, None
    for f in files:
        img = Image.open(f).convert("RGB")
        gt = np.asarray(Image.open(str(f).replace("_img.png", "_mask.png")))
        t0 = time.perf_counter()
        res = net.segment(img, mode)
        spent += time.perf_counter() - t0
        info = res["inference"]
        conf += np.bincount(gt.ravel().astype(np.int64) * k + res["mask"].ravel(), minlength=k * k).reshape(
            k, k
        )
    print(
        json.dumps(
            {
                "conf": conf.tolist(),
                "fps": len(files) / spent,
                "ms_per_frame": 1000 * spent / len(files),
                "peak_rss_mb": peak_rss_mb(),
                "inference": info,
                "heavy": [m for m in ("torch", "transformers") if m in sys.modules],
            }
        )
    )


def ious(conf: np.ndarray) -> np.ndarray:
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 frames, 100 s of training")
    ap.add_argument("--model", help="an exported segmentation ONNX model (14 aerial classes)")
    ap.add_argument("--frames", type=int, help="number of 2048x1536 frames (default 3 quick / 6)")
    ap.add_argument("--train-seconds", type=float, help="training budget (default 100 quick / 400)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-model", help="copy the trained student here (reuse it with --model)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "FRAMES", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker, threads=a.threads)
        return

    from PIL import Image

    from vitshrink.data import aerial

    n_frames = a.frames or (3 if a.quick else 6)
    with tempfile.TemporaryDirectory(prefix="vitshrink-tiled-") as tmp:
        tmp_p = Path(tmp)
        t0 = time.perf_counter()
        for i in range(n_frames):  # seeds disjoint from the training scenes (10_000..)
            img, mask = aerial.render_frame(500 + i, (2048, 1536))
            Image.fromarray(img).save(tmp_p / f"{i:02d}_img.png", compress_level=1)
            Image.fromarray(mask).save(tmp_p / f"{i:02d}_mask.png")
        print(f"rendered {n_frames} frames of 2048x1536 in {time.perf_counter() - t0:.0f} s")
        model = a.model or str(
            train_student(tmp_p / "student.onnx", a.train_seconds or (100 if a.quick else 400), a.threads)
        )
        if a.save_model and not a.model:
            import shutil

            shutil.copyfile(model, a.save_model)
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        results = {}
        for mode in ("resize", "tile"):
            proc = subprocess.run(
                [sys.executable, __file__, "--threads", str(a.threads), "--worker", model, tmp, mode],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if proc.returncode:
                sys.exit(f"{mode} worker failed: {proc.stderr.strip().splitlines()[-1]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])

    names = list(aerial.CLASSES)
    rows = {}
    for mode, r in results.items():
        iou = ious(np.asarray(r["conf"]))
        present = np.asarray(r["conf"]).sum(1) > 0
        rows[mode] = {
            "miou": float(np.nanmean(iou[present])),
            **{f"iou_{c}": float(iou[names.index(c)]) for c in SMALL},
            "fps": r["fps"],
            "ms_per_frame": r["ms_per_frame"],
            "peak_rss_mb": r["peak_rss_mb"],
            "inference": r["inference"],
            "torch_loaded": bool(r["heavy"]),
            "iou": {c: (None if np.isnan(v) else round(float(v), 4)) for c, v in zip(names, iou)},
            "predicted_fraction": {
                c: round(float(v), 5) for c, v in zip(names, np.asarray(r["conf"]).sum(0) / np.sum(r["conf"]))
            },
        }
    print(f"\n{n_frames} frames of 2048x1536, {a.threads} threads")
    print(
        f"{'mode':8s} {'mIoU':>6s} " + " ".join(f"{c[:12]:>12s}" for c in SMALL) + "  frames/s  peak RSS MB"
    )
    for mode, r in rows.items():
        small = " ".join(f"{r[f'iou_{c}']:12.3f}" for c in SMALL)
        print(f"{mode:8s} {r['miou']:6.3f} {small}  {r['fps']:8.2f}  {r['peak_rss_mb']:11.0f}")
    print(f"tiled: {rows['tile']['inference']}")
    if a.json:
        Path(a.json).write_text(
            json.dumps({"frames": n_frames, "threads": a.threads, "results": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
