"""Streamed photo sets: mixed sizes, bounded memory, Hugging Face `datasets`, bad files from workers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitshrink.data import describe, load_dataset
from vitshrink.errors import DataError

SIZES = [(37, 50), (64, 48), (90, 71), (48, 48), (130, 100), (33, 61)]  # (w, h), the 130x100 tiles at 32


def _scene(w: int, h: int, rng: np.random.Generator, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A photo whose class is readable from its colour: bands of class ids, each with its own colour."""
    ids = (np.arange(w)[None, :] * classes // w).repeat(h, 0).astype(np.uint8)
    ids = np.roll(ids, int(rng.integers(0, w)), axis=1)
    palette = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], np.uint8)
    img = palette[ids] + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
    return img, ids


def write_mixed_seg(root: Path, n: int = 24, seed: int = 0, ext: str = ".jpg") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img, ids = _scene(w, h, rng)
        Image.fromarray(img).save(root / "images" / f"{i:03d}{ext}")
        Image.fromarray(ids, mode="L").save(root / "masks" / f"{i:03d}.png")
    (root / "classes.json").write_text(json.dumps(["red", "green", "blue"]))
    return root


def write_mixed_cls(root: Path, n: int = 16) -> Path:
    rng = np.random.default_rng(1)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    for c, rgb in colours.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            w, h = SIZES[i % len(SIZES)]
            img = np.clip(np.array(rgb)[None, None] + rng.integers(-25, 25, (h, w, 3)), 0, 255).astype(
                np.uint8
            )
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


def test_mixed_size_segmentation_batches_follow_the_size_policy(tmp_path):
    root = write_mixed_seg(tmp_path / "seg")
    ds = load_dataset(root, "train", size=32)
    assert ds.streaming and ds.task == "segmentation" and ds.class_names == ["red", "green", "blue"]
    g = torch.Generator().manual_seed(0)
    b = next(ds.batches(8, train=True, generator=g, workers=0))
    assert b.images.shape == (8, 3, 32, 32) and b.images.dtype == torch.uint8
    assert b.targets.shape == (8, 32, 32) and b.targets.dtype == torch.uint8
    # the mask is cut with the image's box: each pixel's colour still names its class
    valid = b.targets != 255
    dominant = b.images.float().argmax(1)  # red 0, green 1, blue 2 by construction
    assert (dominant[valid] == b.targets[valid].long()).float().mean() > 0.9
    # the same seed gives the same crops (resume reproduces an epoch)
    again = next(ds.batches(8, train=True, generator=torch.Generator().manual_seed(0), workers=1))
    assert torch.equal(again.images, b.images) and torch.equal(again.targets, b.targets)
    # eval: masks at each photo's own size, images at the input or whole (to be tiled)
    ev = next(ds.batches(len(ds), workers=0))
    sizes = {tuple(m.shape) for m in ev.targets}
    assert len(sizes) > 2 and all(
        tuple(m.shape) == tuple(x.shape[-2:]) or x.shape[-2:] == (32, 32)
        for x, m in zip(ev.images, ev.targets)
    )


def test_mixed_size_classification_keeps_aspect_and_trains(tmp_path):
    from vitshrink.evaluate import evaluate
    from vitshrink.train import train

    root = write_mixed_cls(tmp_path / "cls")
    info = describe(root)
    assert info["task"] == "classification" and info["class_names"] == ["blue", "red"]
    out, metrics = train(
        "vit-micro", str(root), out=tmp_path / "m", epochs=3, batch_size=8, image_size=16, quiet=True
    )
    res = evaluate(out, str(root), split="train")
    assert res["accuracy"] >= 0.9 and res["samples"] > 10


def test_mixed_size_segmentation_trains_and_scores_at_the_photo_size(tmp_path):
    from vitshrink.evaluate import evaluate
    from vitshrink.train import train

    root = write_mixed_seg(tmp_path / "seg", n=30)
    out, _ = train(
        "segformer-micro",
        str(root),
        out=tmp_path / "m",
        epochs=4,
        batch_size=8,
        image_size=32,
        lr=3e-3,
        quiet=True,
    )
    res = evaluate(out, str(root), split="train")
    assert set(res) >= {"miou", "dice", "pixel_accuracy"}
    assert res["pixel_accuracy"] > 0.6  # colour bands are easy; scored on native masks incl. a tiled photo


PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from vitshrink.data import load_dataset
    ds = load_dataset(sys.argv[1], "train", size=64, data_options={"workers": 1})
    g = torch.Generator().manual_seed(0)
    n = 0
    for b in ds.batches(8, train=True, generator=g):
        n += len(b.index)
    for b in ds.batches(8):
        pass
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(n, me + kids)
    """
)


def _big_photos(root: Path, n: int) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:900, 0:1200]
    base = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    for i in range(n):
        img = np.roll(base, int(rng.integers(0, 1200)), axis=1)
        Image.fromarray(img).save(root / "images" / f"{i:03d}.jpg", quality=85)
        Image.fromarray((img[:, :, 0] // 86).astype(np.uint8), mode="L").save(root / "masks" / f"{i:03d}.png")
    (root / "classes.json").write_text('["a", "b", "c"]')
    return root


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_photos(tmp_path):
    """1200x900 photos: 25 vs 100 (the old in-memory loader held 3.2 MB per photo + an int64 mask)."""
    peaks = {}
    for n in (25, 100):
        root = _big_photos(tmp_path / f"p{n}", n)
        out = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(root)],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout.split()
        assert int(out[0]) > 0.7 * n
        peaks[n] = int(out[1])
    assert peaks[100] <= 1.2 * peaks[25], peaks


def _hf_cls_dataset(n: int = 24):
    import datasets

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(n):
        lab = i % 2
        w, h = SIZES[i % len(SIZES)]
        rgb = (220, 30, 30) if lab == 0 else (30, 30, 220)
        arr = np.clip(np.array(rgb)[None, None] + rng.integers(-25, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr))
        labels.append(lab)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["crimson", "navy"])}
    )
    return datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_hf_datasets_train_with_classlabel_names(tmp_path, kind):
    from vitshrink.models import load_model
    from vitshrink.train import train

    hf = _hf_cls_dataset()
    if kind == "save_to_disk":
        spec = tmp_path / "ds"
        hf.save_to_disk(str(spec))
    else:
        spec = tmp_path / "ds.parquet"
        hf.to_parquet(str(spec))
    ds = load_dataset(spec, "train", size=16)
    assert ds.class_names == ["crimson", "navy"] and ds.streaming
    sizes = [len(load_dataset(spec, s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 24 and all(s > 0 for s in sizes)  # carved from train by row hash
    out, _ = train(
        "vit-micro", str(spec), out=tmp_path / "m", epochs=1, batch_size=8, image_size=16, quiet=True
    )
    net, meta = load_model(out)
    assert meta["class_names"] == ["crimson", "navy"]
    assert net.config.id2label == {0: "crimson", 1: "navy"}


def test_hf_columns_by_option_and_bad_column_is_one_line(tmp_path):
    hf = _hf_cls_dataset().rename_column("img", "picture_data").rename_column("label", "kind")
    spec = tmp_path / "ds"
    hf.save_to_disk(str(spec))
    with pytest.raises(DataError, match="image_column") as e:
        load_dataset(spec, "train", data_options={"image_column": "nope"})
    assert "\n" not in str(e.value)
    found = load_dataset(spec, "train", size=16)  # no names given: found by their Image / ClassLabel types
    assert found.class_names == ["crimson", "navy"]
    ds = load_dataset(
        spec, "train", size=16, data_options={"image_column": "picture_data", "label_column": "kind"}
    )
    images, labels = ds.take([0, 1])
    assert images.shape == (2, 3, 16, 16) and ds.class_names == ["crimson", "navy"]


def _corrupt_middle(root: Path) -> Path:
    """Keep the header readable (indexing passes), break the pixel data: only decoding finds it."""
    victim = sorted((root / "images").iterdir())[len(list((root / "images").iterdir())) // 2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    return victim


def test_corrupt_photo_in_the_middle_is_one_line_from_a_worker(tmp_path):
    root = write_mixed_seg(tmp_path / "seg", n=24, ext=".png")
    victim = _corrupt_middle(root)
    split = next(
        s
        for s in ("train", "val", "test")
        if any(p.endswith(victim.name) for p in load_dataset(root, s).index.images)
    )
    ds = load_dataset(root, split, size=32, data_options={"workers": 1})
    with pytest.raises(DataError) as e:
        for _ in ds.batches(4, train=True, generator=torch.Generator()):
            pass
    assert str(victim) in str(e.value) and "\n" not in str(e.value)
    ok = load_dataset(root, split, size=32, data_options={"workers": 1, "skip_bad": True})
    seen = sum(len(b.index) for b in ok.batches(4, train=True, generator=torch.Generator()))
    assert seen == len(ok) - 1 and len(ok.skipped) == 1


def test_cli_bad_photo_is_one_line_exit_2_and_skip_bad_trains(tmp_path):
    root = write_mixed_cls(tmp_path / "cls", n=10)
    victim = sorted((root / "red").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:60])
    base = [
        sys.executable,
        "-m",
        "vitshrink.cli",
        "train",
        "--model",
        "vit-micro",
        "--data",
        str(root),
        "--image-size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--quiet",
    ]
    bad = subprocess.run([*base, "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and str(victim) in bad.stderr
    assert not (tmp_path / "a").exists()
    good = subprocess.run(
        [*base, "--out", str(tmp_path / "b"), "--data-opt", "skip_bad=true,workers=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "b" / "config.json").exists()


def test_decoded_cache_is_memory_mapped_and_matches_the_eval_view(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSHRINK_CACHE", str(tmp_path / "cache"))
    root = write_mixed_seg(tmp_path / "seg", n=12)
    ds = load_dataset(root, "train", size=24, data_options={"decoded_cache": True})
    mem = ds.materialize()
    assert mem.images.shape == (len(ds), 3, 24, 24) and mem.targets.shape == (len(ds), 24, 24)
    images, masks = ds.take(range(len(ds)), view="fixed")
    assert torch.equal(mem.images, images) and torch.equal(mem.targets, masks)
    assert list((tmp_path / "cache" / "decoded").glob("*.images.u8"))
    again = ds.materialize()  # reused, not rewritten
    assert torch.equal(again.images, mem.images)


def test_index_is_cached_by_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSHRINK_CACHE", str(tmp_path / "cache"))
    root = write_mixed_cls(tmp_path / "cls", n=6)
    n0 = len(load_dataset(root, "train"))
    assert len(list((tmp_path / "cache" / "index").glob("*.json"))) == 1
    from vitshrink.data.folders import split_of

    name = next(f"new-{i}.png" for i in range(100) if split_of(f"red/new-{i}.png") == "train")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "red" / name)
    assert len(load_dataset(root, "train")) == n0 + 1  # a changed folder is indexed anew
    assert len(list((tmp_path / "cache" / "index").glob("*.json"))) == 2


def test_centre_crop_processor_is_the_same_in_training_data_and_deployment(tmp_path):
    """A DeiT-style processor (shortest edge 20, centre crop 16): the eval view the data layer scores
    on is, pixel for pixel, what the deployed ONNX model's preprocessing feeds the network."""
    from vitshrink.data import normalize
    from vitshrink.deploy.runtime import OnnxModel
    from vitshrink.export import export_onnx
    from vitshrink.models import build_model, load_model

    net, meta = build_model("vit-micro", image_size=16, num_channels=3, class_names=["blue", "red"])
    hf_dir = tmp_path / "hf"
    net.save_pretrained(hf_dir)
    (hf_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_resize": True,
                "size": {"shortest_edge": 20},
                "do_center_crop": True,
                "crop_size": {"height": 16, "width": 16},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            }
        )
    )
    _, hf_meta = load_model(hf_dir)
    assert hf_meta["preprocess"]["size"] == [16, 16] and hf_meta["preprocess"]["shortest_edge"] == 20
    export_onnx(net, tmp_path / "m.onnx", meta={**meta, "preprocess": hf_meta["preprocess"]})
    m = OnnxModel(tmp_path / "m.onnx")
    root = write_mixed_cls(tmp_path / "cls", n=6)
    ds = load_dataset(root, "train", size=16, shortest_edge=20)
    images, _ = ds.take(range(len(ds)))
    pre = hf_meta["preprocess"]
    for i, path in enumerate(ds.index.images):
        with Image.open(path) as img:
            x = m.preprocess(img)
        ref = normalize(images[i : i + 1], pre["mean"], pre["std"]).numpy()
        assert np.abs(x - ref).max() < 1e-5, path


def test_compress_recipe_runs_on_a_mixed_size_photo_folder(tmp_path, monkeypatch):
    """Every stage reads the streamed set: distill with the teacher cache (the decoded cache under it),
    prune with recovery, int8 calibration and its check, the final eval at the photos' own sizes."""
    from vitshrink.compress import compress
    from vitshrink.train import train

    monkeypatch.setenv("VITSHRINK_CACHE", str(tmp_path / "cache"))
    root = write_mixed_seg(tmp_path / "seg", n=24)
    teacher, _ = train(
        "segformer-micro", str(root), out=tmp_path / "t", epochs=2, batch_size=8, image_size=32, quiet=True
    )
    recipe = [
        {"distill": {"student": "segformer-micro", "epochs": 1, "batch_size": 8, "cache_teacher": True}},
        {"prune": {"ratio": 0.25, "recover_epochs": 1, "batch_size": 8}},
        {"quantize": {"mode": "int8-dynamic"}},
    ]
    res = compress(
        teacher,
        str(root),
        out=tmp_path / "run",
        recipe=recipe,
        threads=1,
        bench_runs=3,
        bench_rounds=1,
        quiet=True,
    )
    assert Path(res["final"]).exists()
    stages = {s["name"]: s for s in res["stages"]}
    assert len(stages) >= 4 and all("miou" in (s.get("metrics") or s) for s in res["stages"])
    assert list((tmp_path / "cache" / "decoded").glob("*.images.u8"))  # --cache-teacher's decoded copy


def test_decoded_cache_follows_the_folder_content(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSHRINK_CACHE", str(tmp_path / "cache"))
    root = write_mixed_seg(tmp_path / "seg", n=12, ext=".png")
    before = load_dataset(root, "train", size=24).materialize()
    for p in (root / "images").iterdir():  # the same files, repainted
        with Image.open(p) as img:
            inverted = 255 - np.asarray(img)
        Image.fromarray(inverted).save(p)
    after = load_dataset(root, "train", size=24).materialize()
    assert (after.images.int() + before.images.int() - 255).abs().max() <= 1  # resampling rounds


def test_more_segmentation_classes_than_uint8_masks_hold_is_one_line(tmp_path):
    root = write_mixed_seg(tmp_path / "seg", n=6)
    (root / "classes.json").write_text(json.dumps([f"c{i}" for i in range(300)]))
    with pytest.raises(DataError, match="at most 255"):
        load_dataset(root, "train")


def test_planner_counts_a_slow_loader_as_the_training_rate(tmp_path, monkeypatch):
    """The compress planner's probe reads batches through the loader; photos that decode slower than the
    student trains bound the planned training rate (decoding runs beside the step, not before it)."""
    import time as _time

    from vitshrink.compress.context import Context
    from vitshrink.compress.plan import measure_throughput
    from vitshrink.data.stream import StreamingDataset
    from vitshrink.models import build_model, save_model

    root = write_mixed_seg(tmp_path / "seg", n=24)
    net, meta = build_model(
        "segformer-micro",
        task="segmentation",
        image_size=32,
        num_channels=3,
        class_names=["red", "green", "blue"],
    )
    save_model(net, meta, tmp_path / "teacher")
    ctx = Context(
        teacher=tmp_path / "teacher", data=str(root), data_options={"workers": 1}, meta=meta, quiet=True
    )
    fast = measure_throughput(ctx, {"s": {"student": "segformer-micro"}}, batch_size=4)
    decode = StreamingDataset._sample

    def slow(self, *a, **k):
        _time.sleep(0.1)
        return decode(self, *a, **k)

    monkeypatch.setattr(StreamingDataset, "_sample", slow)  # inherited by the forked worker
    slowed = measure_throughput(ctx, {"s": {"student": "segformer-micro"}}, batch_size=4)
    assert slowed.train_s["s"] >= 0.09 > fast.train_s["s"]
