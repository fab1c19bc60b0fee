"""Tests for the generated aerial-scene segmentation dataset (vitshrink.data.aerial)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitshrink.data import aerial
from vitshrink.errors import VitshrinkError


def _snapshot(root: Path) -> dict[str, int]:
    """Every path under root (files and dirs) -> mtime in ns."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in [root, *root.rglob("*")]}


def test_constants() -> None:
    assert len(aerial.CLASSES) == aerial.NUM_CLASSES == 14
    assert aerial.CLASSES[0] == "background" and aerial.CLASSES[13] == "water_vehicle_person"
    assert len(aerial.PALETTE) == 14 and len(set(aerial.PALETTE)) == 14
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in aerial.PALETTE)


def test_deterministic_by_seed() -> None:
    a_img, a_mask = aerial.render_sample(7, 64)
    b_img, b_mask = aerial.render_sample(7, 64)
    assert a_img.tobytes() == b_img.tobytes() and a_mask.tobytes() == b_mask.tobytes()
    c_img, c_mask = aerial.render_sample(8, 64)
    assert a_img.tobytes() != c_img.tobytes()
    assert a_mask.tobytes() != c_mask.tobytes()


@pytest.mark.parametrize("size", [64, 256])
def test_shapes_dtypes_and_ids(size: int) -> None:
    for seed in range(3):
        img, mask = aerial.render_sample(seed, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == np.uint8
        assert mask.max() < aerial.NUM_CLASSES
        assert img.std() > 5  # a real scene, not a flat image


def test_scale_invariant_layout() -> None:
    # The same seed at 64 and 256 px is the same scene: nearest-downsampled masks mostly agree.
    for seed in range(4):
        _, small = aerial.render_sample(seed, 64)
        _, big = aerial.render_sample(seed, 256)
        agree = (big[1::4, 1::4] == small).mean()
        assert agree > 0.9, (seed, agree)


def test_every_class_appears_over_60_samples() -> None:
    counts = np.zeros(aerial.NUM_CLASSES, np.int64)
    present = np.zeros(aerial.NUM_CLASSES, np.int64)
    for seed in range(60):
        _, mask = aerial.render_sample(seed, 64)
        b = np.bincount(mask.ravel(), minlength=aerial.NUM_CLASSES)
        counts += b
        present += b > 0
    assert (counts > 0).all(), [aerial.CLASSES[k] for k in np.flatnonzero(counts == 0)]
    # not every class in every image, and no class swamps the data
    assert (present < 60).sum() >= 10
    assert counts.max() / counts.sum() < 0.6


def test_mean_std_constants_match_rendered_images() -> None:
    pix = np.concatenate([aerial.render_sample(s, 64)[0].reshape(-1, 3) for s in range(40)]) / 255.0
    np.testing.assert_allclose(pix.mean(0), aerial.MEAN, atol=0.04)
    np.testing.assert_allclose(pix.std(0), aerial.STD, atol=0.03)


def test_invalid_arguments() -> None:
    with pytest.raises(VitshrinkError, match="seed"):
        aerial.render_sample(-1)
    with pytest.raises(VitshrinkError, match="size"):
        aerial.render_sample(0, size=8)
    with pytest.raises(VitshrinkError, match="n must"):
        aerial.generate("/nonexistent/never", 0)


def test_generate_writes_split(tmp_path: Path) -> None:
    root = aerial.generate(tmp_path / "split", n=3, size=32, seed=5)
    assert root == tmp_path / "split"
    assert sorted(p.name for p in (root / "images").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert sorted(p.name for p in (root / "masks").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert json.loads((root / "classes.json").read_text()) == list(aerial.CLASSES)
    assert json.loads((root / "aerial.json").read_text()) == {
        "n": 3,
        "size": 32,
        "seed": 5,
        "version": aerial.VERSION,
    }
    for i in range(3):
        img, mask = aerial.render_sample(5 * 1_000_003 + i, 32)
        with Image.open(root / "images" / f"{i:05d}.png") as im:
            assert im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), img)
        with Image.open(root / "masks" / f"{i:05d}.png") as m:
            assert m.mode == "L"
            np.testing.assert_array_equal(np.asarray(m), mask)
    # nothing but the finished split is left beside it (no temp dirs)
    assert [p.name for p in tmp_path.iterdir()] == ["split"]


def test_generate_interrupted_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = aerial.render_sample

    def flaky(seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        if seed % 1_000_003 == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real(seed, size)

    monkeypatch.setattr(aerial, "render_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        aerial.generate(tmp_path / "split", n=4, size=32)
    assert list(tmp_path.iterdir()) == []


def test_ensure_caches_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = {"n_train": 3, "n_val": 2, "n_test": 2, "size": 32, "seed": 1}
    paths = aerial.ensure(tmp_path, **kw)
    base = tmp_path / f"aerial-32-s1-v{aerial.VERSION}"
    assert paths == {"train": base / "train-3", "val": base / "val-2", "test": base / "test-2"}
    assert [len(list((p / "masks").iterdir())) for p in paths.values()] == [3, 2, 2]
    # splits come from disjoint seeds
    seeds = {json.loads((p / "aerial.json").read_text())["seed"] for p in paths.values()}
    assert len(seeds) == 3
    firsts = {(p / "images" / "00000.png").read_bytes() for p in paths.values()}
    assert len(firsts) == 3
    assert not [p for p in base.iterdir() if p.name.endswith(".tmp")]

    before = _snapshot(tmp_path)
    monkeypatch.setattr(aerial, "generate", lambda *a, **k: pytest.fail("regenerated a cached split"))
    assert aerial.ensure(tmp_path, **kw) == paths
    assert _snapshot(tmp_path) == before


def test_ensure_regenerates_incomplete_split(tmp_path: Path) -> None:
    kw = {"n_train": 2, "n_val": 1, "n_test": 1, "size": 32}
    paths = aerial.ensure(tmp_path, **kw)
    (paths["val"] / "aerial.json").unlink()  # e.g. a split written by a different tool / damaged
    aerial.ensure(tmp_path, **kw)
    assert (paths["val"] / "aerial.json").is_file()


def test_ensure_removes_leftovers_of_killed_runs(tmp_path: Path) -> None:
    base = tmp_path / f"aerial-32-s0-v{aerial.VERSION}"
    stale = base / ".val-1.abc123.tmp"  # the temp dir name atomic_dir uses, as a SIGKILL leaves it
    (stale / "images").mkdir(parents=True)
    aerial.ensure(tmp_path, n_train=1, n_val=1, n_test=1, size=32)
    assert not stale.exists()
    assert sorted(p.name for p in base.iterdir() if not p.name.endswith(".lock")) == [
        "test-1",
        "train-1",
        "val-1",
    ]


def test_ensure_default_cache_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSHRINK_CACHE", str(tmp_path / "cache"))
    paths = aerial.ensure(n_train=1, n_val=1, n_test=1, size=32, seed=3)
    assert paths["train"] == tmp_path / "cache" / f"aerial-32-s3-v{aerial.VERSION}" / "train-1"
    assert os.path.isdir(paths["test"])


def test_colorize_and_preview(tmp_path: Path) -> None:
    mask = np.arange(aerial.NUM_CLASSES, dtype=np.uint8)[None].repeat(2, 0)
    np.testing.assert_array_equal(aerial.colorize(mask)[0], np.asarray(aerial.PALETTE, np.uint8))
    out = aerial.preview(tmp_path / "p.png", n=3, size=32)
    with Image.open(out) as im:
        assert im.mode == "RGB"
        assert im.width >= 3 * 34 + 2 and im.height > 2 * 34
        arr = np.asarray(im)
    # the second row holds the colourised mask of sample 0
    _, m0 = aerial.render_sample(0, 32)
    np.testing.assert_array_equal(arr[36:68, 2:34], aerial.colorize(m0))
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_large_frames_are_mosaics_of_scenes(tmp_path: Path) -> None:
    img, mask = aerial.render_frame(3, (80, 48), scene=32)  # 3 x 2 cells, the last column cropped
    assert img.shape == (48, 80, 3) and mask.shape == (48, 80) and img.dtype == mask.dtype == np.uint8
    first, first_mask = aerial.render_sample(aerial._seed_for(3, 0), 32)
    np.testing.assert_array_equal(img[:32, :32], first)
    np.testing.assert_array_equal(mask[:32, :32], first_mask)
    again, _ = aerial.render_frame(3, (80, 48), scene=32)
    np.testing.assert_array_equal(img, again)
    assert aerial.parse_frame_size("2048x1536") == (2048, 1536) and aerial.parse_frame_size(64) == 64
    with pytest.raises(VitshrinkError, match="WxH"):
        aerial.parse_frame_size("2048xbig")
    paths = aerial.ensure(tmp_path, n_train=1, n_val=1, n_test=1, size="300x260")
    assert paths["val"].parent.name.startswith("aerial-300x260-")
    assert Image.open(paths["val"] / "images" / "00000.png").size == (300, 260)
    assert Image.open(paths["val"] / "masks" / "00000.png").size == (300, 260)
