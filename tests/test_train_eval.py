from __future__ import annotations

import json

import numpy as np
import pytest

from vitshrink.evaluate import evaluate, seg_metrics
from vitshrink.train import train

from .conftest import needs_fmnist

# Measured: vit-micro (patch 7), one epoch over 40k Fashion-MNIST images (batch 64, no augmentation)
# reaches 0.816 / 0.811 top-1 on 3000 test images (seeds 0 / 1); the floor leaves room for thread-count
# noise but fails on a broken pipeline (chance is 0.10).
FMNIST_ONE_EPOCH_FLOOR = 0.76


@needs_fmnist
def test_one_epoch_teacher_reaches_floor(fmnist_teacher):
    m = evaluate(fmnist_teacher, "fashion-mnist", split="test", limit=3000, quiet=True)
    assert m["accuracy"] >= FMNIST_ONE_EPOCH_FLOOR, m


@needs_fmnist
def test_onnx_and_pytorch_evaluate_the_same(fmnist_teacher, tmp_path):
    from vitshrink.export import export_onnx

    onnx_path, parity = export_onnx(fmnist_teacher, tmp_path / "t.onnx")
    assert parity["max_abs_diff"] < 1e-4 and parity["argmax_agreement"] == 1.0
    a = evaluate(fmnist_teacher, "fashion-mnist", limit=500, quiet=True)["accuracy"]
    b = evaluate(onnx_path, "fashion-mnist", limit=500, quiet=True)["accuracy"]
    assert abs(a - b) <= 0.002


@needs_fmnist
def test_int8_on_fashion_mnist_keeps_the_float_accuracy(fmnist_teacher, tmp_path):
    # The floor for quantization on real data: vitshrink int8 of the 1-epoch teacher stays above
    # the same floor as the float model and within 0.5 point of it (max_drop guards the val split).
    from vitshrink.quantize import quantize

    q, rep = quantize(
        fmnist_teacher,
        tmp_path / "q.onnx",
        mode="int8",
        calib_data="fashion-mnist",
        max_drop=0.005,
        quiet=True,
    )
    fp32 = evaluate(fmnist_teacher, "fashion-mnist", split="test", limit=2000, quiet=True)["accuracy"]
    int8 = evaluate(q, "fashion-mnist", split="test", limit=2000, quiet=True)["accuracy"]
    assert int8 >= FMNIST_ONE_EPOCH_FLOOR and int8 >= fp32 - 0.005, (fp32, int8, rep["chosen"])
    assert rep["size_after"] < 0.5 * rep["size_before"]


@needs_fmnist
def test_resume_reaches_the_same_result(tmp_path):
    kw = dict(epochs=2, limit=1200, val_limit=300, batch_size=100, quiet=True, seed=3)
    _, straight = train("vit-micro", "fashion-mnist", out=tmp_path / "a", **kw)
    # run 1 epoch, then resume to 2 (the schedule is set by epochs=2 from the start)
    train("vit-micro", "fashion-mnist", out=tmp_path / "b", **{**kw, "epochs": 1})
    ckpt = tmp_path / "b.ckpt"
    hist = json.loads((ckpt / "history.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1]
    _, resumed = train("vit-micro", "fashion-mnist", out=tmp_path / "b", resume=True, **kw)
    assert resumed["accuracy"] == pytest.approx(straight["accuracy"], abs=0.01)


def test_segmentation_metrics_known_values():
    # 2 classes; rows = truth, cols = prediction
    cm = np.array([[3, 1], [1, 5]])
    m = seg_metrics(cm, ["a", "b"])
    # per-class IoU is reported rounded to 4 decimals
    assert m["per_class_iou"]["a"] == pytest.approx(3 / 5, abs=1e-4)
    assert m["per_class_iou"]["b"] == pytest.approx(5 / 7, abs=1e-4)
    assert m["miou"] == pytest.approx((3 / 5 + 5 / 7) / 2)
    assert m["dice"] == pytest.approx((6 / 8 + 10 / 12) / 2)
    # a class absent from truth and prediction is left out of the mean
    m3 = seg_metrics(np.array([[3, 1, 0], [1, 5, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert m3["miou"] == pytest.approx(m["miou"]) and m3["per_class_iou"]["c"] is None


def test_segmentation_training_learns_on_aerial(tmp_path):
    opts = {"size": 64, "n_train": 48, "n_val": 8, "n_test": 16}
    out, m = train(
        "segformer-micro",
        "aerial",
        out=tmp_path / "seg",
        epochs=3,
        batch_size=8,
        lr=3e-3,
        data_options=opts,
        quiet=True,
    )
    res = evaluate(out, "aerial", data_options=opts, quiet=True)
    assert set(res) >= {"miou", "dice", "per_class_iou", "pixel_accuracy"}
    assert len(res["per_class_iou"]) == 14
    # chance pixel accuracy for 14 classes is far below this; background/terrain alone gives ~0.3
    assert res["pixel_accuracy"] > 0.2 and res["miou"] < 0.99
