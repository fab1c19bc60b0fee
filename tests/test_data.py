from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitshrink.data import augment, load_dataset
from vitshrink.errors import DataError

from .conftest import needs_fmnist


@needs_fmnist
def test_fashion_mnist_splits_are_documented_sizes():
    tr, va, te = (load_dataset("fashion-mnist", s) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (55000, 5000, 10000)
    assert tr.images.dtype == torch.uint8 and tr.images.shape[1:] == (1, 28, 28)
    assert tr.num_classes == 10 and tr.class_names[9] == "ankle boot"
    assert set(te.targets.unique().tolist()) == set(range(10))


@needs_fmnist
def test_resize_and_channel_conversion():
    ds = load_dataset("fashion-mnist", "val", size=32, channels=3, limit=16)
    assert ds.images.shape == (16, 3, 32, 32)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])


def _write_cls_folder(root, n=30):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_splits_partition_the_files(tmp_path):
    _write_cls_folder(tmp_path)
    sizes = [len(load_dataset(tmp_path, s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 60 and all(s > 0 for s in sizes)
    ds = load_dataset(tmp_path, "train")
    images, labels = ds.take(range(4))
    assert (
        ds.task == "classification" and ds.class_names == ["cat", "dog"] and images.shape[1:] == (3, 12, 12)
    )
    assert images.dtype == torch.uint8 and labels.dtype == torch.long


def _write_seg_folder(root, n=12, size=(16, 16)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            root / "images" / f"{i:03d}.png"
        )
        Image.fromarray(rng.integers(0, 3, size, dtype=np.uint8), mode="L").save(
            root / "masks" / f"{i:03d}.png"
        )
    (root / "classes.json").write_text('["a", "b", "c"]')


def test_segmentation_folder_loads(tmp_path):
    _write_seg_folder(tmp_path)
    ds = load_dataset(tmp_path, "train", size=8)
    assert ds.task == "segmentation" and ds.class_names == ["a", "b", "c"]
    images, masks = ds.take(range(3), view="fixed")
    assert images.shape[1:] == (3, 8, 8) and masks.shape[1:] == (8, 8) and masks.max() <= 2
    _, native = ds.take(range(3))  # the eval view keeps each mask at its photo's size
    assert native.shape[1:] == (16, 16) and native.dtype == torch.uint8


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("mask_size", "is 8x8 but image"),
        ("bad_class", "unknown class id 7"),
        ("corrupt", "corrupt or unreadable image"),
        ("no_mask", "no mask for image"),
        ("no_masks_dir", "missing folder"),
    ],
)
def test_bad_segmentation_data_names_the_file(tmp_path, breakage, message):
    _write_seg_folder(tmp_path, n=3)
    target = tmp_path / "masks" / "001.png"
    if breakage == "mask_size":
        Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(target)
    elif breakage == "bad_class":
        Image.fromarray(np.full((16, 16), 7, np.uint8), mode="L").save(target)
    elif breakage == "corrupt":
        target = tmp_path / "images" / "001.png"
        target.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif breakage == "no_mask":
        target.unlink()
        target = tmp_path / "images" / "001.png"
    elif breakage == "no_masks_dir":
        for p in (tmp_path / "masks").iterdir():
            p.unlink()
        (tmp_path / "masks").rmdir()
        target = tmp_path / "masks"
    with pytest.raises(DataError, match=message) as e:
        # all three files land in the val/test/train splits differently; read every split
        for s in ("train", "val", "test"):
            try:
                for _ in load_dataset(tmp_path, s).batches(2):  # bad pixels show when decoded
                    pass
            except DataError as err:
                if "no images for split" in str(err) or "no images in" in str(err):
                    continue
                raise
    assert str(target) in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_data_is_one_line():
    with pytest.raises(DataError, match="neither a built-in dataset"):
        load_dataset("/no/such/folder", "train")


def test_aerial_spec_with_options():
    ds = load_dataset("aerial", "val", data_options={"size": 64, "n_train": 4, "n_val": 6, "n_test": 4})
    assert len(ds) == 6 and ds.images.shape[1:] == (3, 64, 64) and ds.num_classes == 14
    with pytest.raises(DataError, match="unknown aerial dataset option"):
        load_dataset("aerial", "val", n_vals=3)


def test_augment_keeps_masks_aligned():
    masks = torch.randint(0, 5, (6, 16, 16), dtype=torch.uint8)
    images = (masks * 40)[:, None].expand(-1, 3, -1, -1).contiguous()
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        xi, yi = augment(images, masks, "segmentation", g)
        valid = yi != 255
        assert torch.equal(xi[:, 0][valid], (yi * 40)[valid])
