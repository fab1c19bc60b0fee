"""Does the data layer scale with the user's photos? Peak memory, loader speed, epoch time and mIoU on
generated FloodNet-like sets: mixed sizes around 3000x2000, 10 classes, N and 4N training photos.

Photos are crops (random offset, flips, 90-degree turns; sizes 2600-3200 x 1700-2300) of large
generated aerial frames (`data.aerial.render_frame`, scenes at their native object size), with the 14
aerial classes folded into FloodNet's 10. Train and val photos come from disjoint frames. For each N it
runs, in a fresh subprocess (so peak RSS is this phase's own, workers included):

* index: building the index (cold) and loading it again (cached by fingerprint);
* loader: training-view images/s of the streamed loader (default workers) vs the training step's
  images/s on the same batches (segformer-micro forward + backward), i.e. who is the bottleneck;
* epoch: one `train()` epoch of a segformer-micro student (the val pass included), seconds;
* decoded cache: writing the memory-mapped copy at the training size, then one epoch from it;
* eval: val mIoU scored on the masks at each photo's own resolution (sliding window, as `predict`
  runs such photos) vs on masks resized to the model input;
* peak RSS of the process and its workers.

    PYTHONPATH=src .venv/bin/python benchmarks/data_scale.py                 # N = 100 and 400
    PYTHONPATH=src .venv/bin/python benchmarks/data_scale.py --sizes 20,80   # quick
Run it alone: two busy processes on 2 cores spoil every rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

FLOODNET = [
    "background",
    "building-flooded",
    "building-non-flooded",
    "road-flooded",
    "road-non-flooded",
    "water",
    "tree",
    "vehicle",
    "pool",
    "grass",
]
# aerial id -> FloodNet id: background->grass, damaged buildings->flooded, flooding/ice->water, ...
FOLD = np.array([9, 0, 2, 1, 0, 5, 5, 0, 4, 0, 0, 0, 6, 7], np.uint8)
FRAME = (3200, 2300)


def _frame(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from vitshrink.data import aerial

    img, mask = aerial.render_frame(seed, size=FRAME)
    return img, FOLD[mask]


def _write_split(root: Path, split: str, n: int, frame_seeds: list[int], seed: int) -> None:
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        frames = list(pool.map(_frame, frame_seeds))
    for i in range(n):
        img, mask = frames[i % len(frames)]
        w, h = int(rng.integers(2600, 3201)), int(rng.integers(1700, 2301))
        if rng.random() < 0.3:  # a portrait photo now and then
            img, mask = img.transpose(1, 0, 2), mask.T
        hh, ww = mask.shape
        w, h = min(w, ww), min(h, hh)
        y0, x0 = int(rng.integers(0, hh - h + 1)), int(rng.integers(0, ww - w + 1))
        im, m = img[y0 : y0 + h, x0 : x0 + w], mask[y0 : y0 + h, x0 : x0 + w]
        if rng.random() < 0.5:
            im, m = im[:, ::-1], m[:, ::-1]
        Image.fromarray(np.ascontiguousarray(im)).save(root / split / "images" / f"{i:04d}.jpg", quality=90)
        Image.fromarray(np.ascontiguousarray(m), mode="L").save(root / split / "masks" / f"{i:04d}.png")


def ensure_set(root: Path, n: int) -> Path:
    """root/train (n photos), root/val and root/test (n // 10, at least 8): generated once."""
    done = root / "done.json"
    if done.exists():
        return root
    n_val = max(8, n // 10)
    _write_split(root, "train", n, list(range(1, 25)), seed=0)
    _write_split(root, "val", n_val, list(range(101, 105)), seed=1)
    _write_split(root, "test", n_val, list(range(201, 205)), seed=2)
    (root / "classes.json").write_text(json.dumps(FLOODNET))
    done.write_text(json.dumps({"n": n}))
    return root


def _peak_mb() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((me + kids) / 1024, 1)


def phase(kind: str, root: str, size: int, out: str) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from vitshrink.data import load_dataset

    torch.manual_seed(0)
    res: dict = {}
    if kind == "index":
        t0 = time.perf_counter()
        ds = load_dataset(root, "train", size=size)
        res["index_cold_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        ds = load_dataset(root, "train", size=size)
        res["index_warm_s"] = round(time.perf_counter() - t0, 3)
        res["photos"] = len(ds)
        res["sizes"] = len({s for s in ds.index.sizes})
    elif kind == "loader":
        from vitshrink.batch import prepare, segmentation_ce
        from vitshrink.data import describe
        from vitshrink.models import build_model
        from vitshrink.models.families import find_family

        ds = load_dataset(root, "train", size=size)
        bs, nb = 8, 6
        gen = torch.Generator().manual_seed(0)
        t0, seen, batches = time.perf_counter(), 0, []
        for b in ds.batches(bs, train=True, generator=gen):
            batches.append(b)
            seen += len(b.index)
            if len(batches) >= nb:
                break
        res["loader_img_s"] = round(seen / (time.perf_counter() - t0), 2)
        res["workers"] = int(ds.options.workers if ds.options.workers is not None else -1)
        info = describe(root)
        net, meta = build_model(
            "segformer-micro",
            task="segmentation",
            image_size=size,
            num_channels=3,
            class_names=info["class_names"],
        )
        fam = find_family(net)
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        net.train()

        def step(b) -> None:
            loss = segmentation_ce(
                fam.model_logits(net, prepare(b.images, meta, torch.device("cpu"))), b.targets
            )
            opt.zero_grad()
            loss.backward()
            opt.step()

        step(batches[0])
        t0 = time.perf_counter()
        for b in batches[1:]:
            step(b)
        res["train_step_img_s"] = round(bs * (len(batches) - 1) / (time.perf_counter() - t0), 2)
    elif kind in ("epoch", "epoch_cached"):
        from vitshrink.train import train

        opts = {"decoded_cache": True} if kind == "epoch_cached" else {}
        t0 = time.perf_counter()
        if kind == "epoch_cached":
            load_dataset(root, "train", size=size, data_options=opts).materialize()
            res["cache_write_s"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
        _, metrics = train(
            "segformer-micro",
            root,
            out=out,
            epochs=1,
            batch_size=8,
            image_size=size,
            lr=2e-3,
            val_limit=4,
            quiet=True,
            data_options=opts,
        )
        res["epoch_s"] = round(time.perf_counter() - t0, 1)
    elif kind == "eval":
        from vitshrink.batch import prepare
        from vitshrink.evaluate import _Scorer, eval_dataset, evaluate
        from vitshrink.models import family_for, load_model

        t0 = time.perf_counter()
        native = evaluate(out, root, split="val", batch_size=8, quiet=True)
        res["miou_native"] = round(native["miou"], 4)
        res["eval_native_s"] = round(time.perf_counter() - t0, 1)
        net, meta = load_model(out)
        ds = eval_dataset(root, "val", meta)
        sc = _Scorer("segmentation", meta["class_names"])
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in ds.batches(8, view="fixed"):
                sc.add(family_for(net).logits(net, prepare(b.images, meta, torch.device("cpu"))), b.targets)
        res["miou_resized"] = round(sc.result()["miou"], 4)
        res["eval_resized_s"] = round(time.perf_counter() - t0, 1)
    res["peak_rss_mb"] = _peak_mb()
    return res


def run_phase(kind: str, root: Path, size: int, out: Path, cache: Path) -> dict:
    env = {**os.environ, "VITSHRINK_CACHE": str(cache), "VITSHRINK_QUIET": "1"}
    p = subprocess.run(
        [
            sys.executable,
            __file__,
            "--phase",
            kind,
            "--root",
            str(root),
            "--image-size",
            str(size),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if p.returncode:
        raise SystemExit(f"phase {kind} failed: {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,400", help="training photo counts, comma-separated")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "vitshrink-floodlike"))
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    if a.phase:
        print(json.dumps(phase(a.phase, a.root, a.image_size, a.out)))
        return
    rows = []
    for n in (int(v) for v in a.sizes.split(",")):
        root = ensure_set(Path(a.root) / f"n{n}", n)
        with tempfile.TemporaryDirectory(prefix="vitshrink-data-scale-") as tmp:
            cache, out = Path(tmp) / "cache", Path(tmp) / "student"
            row = {"photos": n}
            for kind in ("index", "loader", "epoch", "eval", "epoch_cached"):
                r = run_phase(
                    kind, root, a.image_size, out if kind != "epoch_cached" else Path(tmp) / "s2", cache
                )
                row[f"{kind}_peak_rss_mb"] = r.pop("peak_rss_mb")
                row.update({k if k not in row else f"{kind}_{k}": v for k, v in r.items()})
                print(n, kind, r, flush=True)
        rows.append(row)
    print(json.dumps(rows, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
