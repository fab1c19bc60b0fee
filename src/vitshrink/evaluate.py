"""Evaluation: top-1 (classification); mIoU, mean Dice and per-class IoU (segmentation).

Works on a model directory, an in-memory model or an ONNX file (run with onnxruntime), so every
stage's artifact is scored the same way. Segmentation metrics come from one confusion matrix
accumulated over the split; pixels labelled 255 are ignored; classes absent from both prediction
and ground truth are left out of the means.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX, align_classes, load_dataset
from .errors import VitshrinkError
from .progress import progress


def confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    valid = target != IGNORE_INDEX
    idx = target[valid].long() * k + pred[valid].long()
    return torch.bincount(idx, minlength=k * k).reshape(k, k)


def seg_metrics(cm: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    union = tp + fp + fn
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    dice = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return {
        "miou": float(np.nanmean(iou)) if present.any() else 0.0,
        "dice": float(np.nanmean(dice)) if present.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "per_class_iou": {n: (None if np.isnan(v) else round(float(v), 4)) for n, v in zip(class_names, iou)},
    }


class _Scorer:
    def __init__(self, task: str, class_names: list[str]) -> None:
        self.task, self.names, self.k = task, class_names, len(class_names)
        self.correct = torch.zeros(2, dtype=torch.float64)
        self.cm = torch.zeros(self.k, self.k, dtype=torch.float64)

    def add(self, logits: torch.Tensor, targets: Any) -> None:
        """Logits of a batch against its targets; segmentation maps are upsampled to each mask's own
        size (a list of masks when the photos differ in size)."""
        if torch.isnan(logits).any():
            # argmax of NaN is index 0, which would score as a silently wrong accuracy
            raise VitshrinkError("the model produced NaN outputs (corrupt weights or invalid preprocessing)")
        if self.task == "segmentation" and logits.ndim == 3:  # class ids of a class-map graph (--argmax)
            self._add_ids(logits, targets)
            return
        if self.task == "segmentation":
            masks = list(targets) if isinstance(targets, list) else None
            if masks is None and logits.shape[-2:] != targets.shape[-2:]:
                logits = F.interpolate(
                    logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False
                )
            if masks is not None:
                for lg, m in zip(logits, masks):
                    lg = lg[None].float()
                    if lg.shape[-2:] != m.shape[-2:]:
                        lg = F.interpolate(lg, size=m.shape[-2:], mode="bilinear", align_corners=False)
                    self.add_pred(lg.argmax(1).cpu(), m[None].cpu())
                return
        self.add_pred(logits.argmax(1).cpu(), targets)

    def _add_ids(self, ids: torch.Tensor, targets: Any) -> None:
        """(B, H, W) class ids, resized nearest to each mask's size where they differ."""
        for p, m in zip(ids, list(targets)):
            p = p[None, None].float()
            if p.shape[-2:] != m.shape[-2:]:
                p = F.interpolate(p, size=m.shape[-2:], mode="nearest")
            self.add_pred(p[:, 0].long().cpu(), m[None].cpu())

    def add_pred(self, pred: torch.Tensor, targets: torch.Tensor) -> None:
        """Class ids (B,) or (B, H, W) against the targets."""
        targets = targets.cpu()
        if self.task == "classification":
            self.correct += torch.tensor([(pred == targets).sum().item(), len(targets)], dtype=torch.float64)
        else:
            if pred.shape[-2:] != targets.shape[-2:]:
                raise VitshrinkError(
                    f"prediction size {tuple(pred.shape[-2:])} does not match mask size {tuple(targets.shape[-2:])}"
                )
            self.cm += confusion(pred, targets, self.k).double()

    def result(self, distributed: bool = False) -> dict[str, Any]:
        if distributed:
            from .batch import all_reduce_sum

            all_reduce_sum(self.correct)
            all_reduce_sum(self.cm)
        if self.task == "classification":
            return {
                "accuracy": float(self.correct[0] / max(1.0, float(self.correct[1]))),
                "samples": int(self.correct[1]),
            }
        out = seg_metrics(self.cm.numpy(), self.names)
        out["samples"] = None
        return out


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    meta: dict[str, Any],
    ds: Any,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    quiet: bool = False,
    distributed: bool = False,
) -> dict[str, Any]:
    """Score an in-memory model; with `distributed`, each rank scores its shard and counts are summed."""
    from .batch import default_device, dist_info
    from .models import family_for

    device = torch.device(device) if device is not None else default_device()
    family = family_for(model)
    was_training = model.training
    model.eval()
    rank, world = dist_info() if distributed else (0, 1)
    scorer = _Scorer(meta["task"], meta["class_names"])
    idx_all = torch.arange(len(ds))[rank::world]

    def run(x: torch.Tensor) -> torch.Tensor:
        return family.logits(model, x.to(device)).float()

    for b in progress(
        ds.batches(batch_size, order=idx_all),
        total=-(-len(idx_all) // batch_size),
        desc="eval",
        disable=quiet,
    ):
        _score_batch(scorer, b, meta, run, device)
    model.train(was_training)
    res = scorer.result(distributed and world > 1)
    if res.get("samples") is None:
        res["samples"] = len(ds)
    _note_skipped(res, ds)
    return res


def evaluate_onnx(
    path: str | os.PathLike,
    ds: Any,
    *,
    batch_size: int = 32,
    threads: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Score an ONNX file (onnxruntime) or OpenVINO model, preprocessing as its metadata says."""
    from .deploy.loader import open_model

    m = open_model(path, threads=threads)
    meta = onnx_model_meta(m)
    ds = _check_data(meta, ds, str(path))
    scorer = _Scorer(meta["task"], meta["class_names"])
    bs = batch_size if m._batch is None else m._batch  # a static-batch export takes only its own batch

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(m._run_padded(x.numpy())).float()

    for b in progress(ds.batches(bs), total=-(-len(ds) // bs), desc="eval onnx", disable=quiet):
        _score_batch(scorer, b, meta, run, torch.device("cpu"))
    res = scorer.result()
    res["samples"] = len(ds)
    _note_skipped(res, ds)
    return res


def _score_batch(scorer: _Scorer, b: Any, meta: dict[str, Any], run: Any, device: torch.device) -> None:
    """Score one batch: a stacked batch in one run; photos kept at their own size (a list) one by one,
    by sliding window when predict would tile them (`deploy.tiling`), else resized to the input."""
    from .batch import prepare

    if not isinstance(b.images, list):
        scorer.add(run(prepare(b.images, meta, device)), b.targets)
        return
    from .deploy import tiling

    size = tuple(meta["preprocess"]["size"])

    def to_input(crop: np.ndarray) -> np.ndarray:  # one (h, w, C) uint8 tile, normalised as every batch is
        return prepare(torch.from_numpy(crop).permute(2, 0, 1)[None], meta, torch.device("cpu"))[0].numpy()

    def run_np(x: np.ndarray) -> np.ndarray:
        return run(torch.from_numpy(x)).numpy()

    for img, tgt in zip(b.images, b.targets):
        frame = tuple(img.shape[-2:])
        if meta.get("output") == "class_ids" or not tiling.should_tile(frame, size):
            scorer.add(run(prepare(img[None], meta, device)), [tgt])
            continue
        pixels = img.permute(1, 2, 0).numpy()
        ids, _ = tiling.slide(pixels, run_np, to_input, tiling.plan(frame, size), batch=4)
        scorer.add_pred(torch.from_numpy(ids.astype(np.int64))[None], tgt[None])


def _note_skipped(res: dict[str, Any], ds: Any) -> None:
    if getattr(ds, "skipped", None):
        res["skipped_bad"] = len(ds.skipped)


def onnx_model_meta(m: Any) -> dict[str, Any]:
    """The meta dict as the deploy runtime resolved it (works for ONNX files without our metadata)."""
    return {
        "task": m.task,
        **({"output": "class_ids"} if getattr(m, "class_ids", False) else {}),
        "class_names": list(m.class_names),
        "preprocess": {
            "mean": m.mean.ravel().tolist(),
            "std": m.std.ravel().tolist(),
            "size": list(m.size),
            "channels": m.channels,
        },
    }


def _check_data(meta: dict[str, Any], ds: Any, name: str) -> Any:
    if meta["task"] != ds.task:
        raise VitshrinkError(f"{name} is a {meta['task']} model but the data is {ds.task}")
    if len(meta["class_names"]) != ds.num_classes:
        raise VitshrinkError(
            f"{name} has {len(meta['class_names'])} classes but the data has {ds.num_classes}"
        )
    return align_classes(ds, meta["class_names"], model=name)


def eval_dataset(
    data: str,
    split: str,
    meta: dict[str, Any],
    *,
    limit: int | None = None,
    data_options: dict[str, Any] | None = None,
) -> Any:
    """One split as a model with `meta` is scored on it: images at the model's input by its
    processor's resize, segmentation masks at each photo's own resolution (built-in sets too)."""
    pre = meta["preprocess"]
    seg = meta["task"] == "segmentation"
    ds = load_dataset(
        data,
        split,
        size=None if seg else pre["size"],
        channels=pre["channels"],
        limit=limit,
        data_options=data_options or {},
        shortest_edge=pre.get("shortest_edge"),
    )
    if getattr(ds, "streaming", False):
        ds = ds.with_view(tuple(pre["size"]), pre["channels"])
    return ds


def evaluate(
    model: str | os.PathLike,
    data: str,
    *,
    split: str = "test",
    batch_size: int = 64,
    limit: int | None = None,
    threads: int | None = None,
    quiet: bool = False,
    data_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a model directory (or Hub id), ONNX file, ONNX folder or OpenVINO folder on one split of a
    data SPEC."""
    from .deploy.loader import open_model
    from .deploy.ov_runtime import is_openvino
    from .hub import resolve_model
    from .onnx_folder import onnx_file

    path = onnx_file(resolve_model(model))
    data_options = data_options or {}
    if path.suffix == ".onnx" or path.is_file() or is_openvino(path):
        om = open_model(path, threads=threads)
        ds = eval_dataset(data, split, onnx_model_meta(om), limit=limit, data_options=data_options)
        return evaluate_onnx(path, ds, batch_size=batch_size, threads=threads, quiet=quiet)
    from .models import load_model

    net, meta = load_model(path)
    ds = _check_data(meta, eval_dataset(data, split, meta, limit=limit, data_options=data_options), str(path))
    if threads:
        torch.set_num_threads(threads)
    return evaluate_model(net, meta, ds, batch_size=batch_size, quiet=quiet)


from ._callable import install as _install  # noqa: E402

_install(__name__, "evaluate")
