"""Recovery fine-tuning between pruning steps, and the data it (and the plan) reads.

`prune()` loads its data once (`recovery_datasets`); a few fixed batches of it (`calib_batches`) rank
blocks, score Taylor importance and compare axes; `Recovery` distils the pruned model from the unpruned
one (or a given teacher) through the shared trainer (`train.fit`) after each step.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch

CALIB_BATCHES, CALIB_BATCH_SIZE = 8, 32
# Pixel-wise KD recovers segmentation best unsoftened: on the aerial demo at 0.25, 6 epochs of KD + labels
# from the teacher reached 0.5639 mIoU at T=1, 0.5615 at T=2, 0.5583 at T=4 (2 seeds each,
# benchmarks/prune_recovery.py --recover-temperature); classification keeps Hinton's T=4.
SEG_RECOVER_TEMPERATURE = 1.0
CLS_RECOVER_TEMPERATURE = 4.0

__all__ = [
    "CALIB_BATCHES",
    "CALIB_BATCH_SIZE",
    "SEG_RECOVER_TEMPERATURE",
    "Recovery",
    "calib_batches",
    "default_temperature",
    "recovery_datasets",
    "temperature_option",
]


def recovery_datasets(
    data: str, meta: dict[str, Any], limit: int | None, seed: int, data_options: dict[str, Any] | None
) -> tuple[Any, Any]:
    """(train, val) at the model's input size; val is 2000 samples, or a quarter of `limit`."""
    from ..data import load_dataset
    from ..train import _check_compatible

    size = tuple(meta["preprocess"]["size"])
    kw = {"size": size, "seed": seed, "data_options": dict(data_options or {})}
    train_ds = load_dataset(data, "train", limit=limit, **kw)
    val_ds = load_dataset(data, "val", limit=2000 if limit is None else max(1, limit // 4), **kw)
    _check_compatible(meta, train_ds)
    return train_ds, val_ds


def calib_batches(train_ds: Any, meta: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few fixed training batches (preprocessed like the model expects) for Taylor importance."""
    from ..batch import prepare
    from ..data import head

    n = min(len(train_ds), CALIB_BATCHES * CALIB_BATCH_SIZE)
    images, targets = head(train_ds, n)
    return [
        (
            prepare(images[i : i + CALIB_BATCH_SIZE], meta, torch.device("cpu")),
            targets[i : i + CALIB_BATCH_SIZE],
        )
        for i in range(0, n, CALIB_BATCH_SIZE)
    ]


def default_temperature(task: str | None) -> float:
    return SEG_RECOVER_TEMPERATURE if task == "segmentation" else CLS_RECOVER_TEMPERATURE


def temperature_option(losses: str | dict[str, float], temperature: float) -> dict[str, float]:
    """{"temperature": T} where one of `losses` takes a temperature (kd, cwd), else nothing."""
    from ..distill.losses import LOSSES, _options, parse_loss_spec

    names = parse_loss_spec(losses)
    return {"temperature": temperature} if any("temperature" in _options(LOSSES[n]) for n in names) else {}


class Recovery:
    """Recovery fine-tuning: Hinton KD from the unpruned model (or `teacher`) via the shared trainer."""

    def __init__(
        self,
        unpruned: torch.nn.Module,
        meta: dict[str, Any],
        teacher: str | os.PathLike | None,
        losses: str | dict[str, float] = "kd",
        temperature: float = CLS_RECOVER_TEMPERATURE,
    ) -> None:
        from ..models import load_model

        # "ce" recovers from labels alone: measured better than KD when the teacher is weaker than the
        # pruned student's parent (benchmarks/prune_recovery.py, aerial demo: 0.4253 vs 0.4000 mIoU).
        self.losses = losses
        self.temperature = temperature

        if teacher is not None:
            self.teacher, self.t_meta = load_model(teacher)
        else:
            self.teacher, self.t_meta = copy.deepcopy(unpruned), meta
        self.teacher.eval().requires_grad_(False)
        self.meta = meta
        self.cache: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []

    def use_cache(self, cache_dir, teacher, data, limit, seed, data_options, augment, quiet) -> None:
        """Teacher logits on the recovery subset from (or into) the shared cache, where the losses
        need logits only."""
        from ..distill.losses import build_losses

        losses = build_losses(self.losses, **temperature_option(self.losses, self.temperature))
        if {"features", "attentions"} & losses.requires:
            return  # feature / attention losses need the live teacher
        self._cache_args = (cache_dir, teacher, data, limit, seed, dict(data_options or {}), augment, quiet)

    def _cached(self, train_ds) -> torch.Tensor | None:
        from ..distill import teacher_cache_path, teacher_logits_cache

        args = getattr(self, "_cache_args", None)
        if args is None:
            return None
        if self.cache is None or self.cache.shape[1] != len(train_ds):
            cache_dir, teacher, data, limit, seed, data_options, augment, quiet = args
            size = self.meta["preprocess"]["size"][0]
            path = teacher_cache_path(cache_dir, teacher, data, limit, seed, size, data_options, augment)
            self.cache = teacher_logits_cache(
                self.teacher, self.t_meta, train_ds, path, quiet=quiet, flipped=augment
            )
        return self.cache

    def recover(
        self,
        net,
        train_ds,
        val_ds,
        epochs,
        batch_size,
        lr,
        seed,
        quiet,
        desc,
        augment=True,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        from ..data import training_view
        from ..distill import cached_teacher_logits
        from ..distill.losses import build_losses
        from ..models import family_for
        from ..train import default_device, fit, prepare, teacher_forward

        device = default_device()
        self.teacher.to(device)
        combined = build_losses(self.losses, **temperature_option(self.losses, self.temperature)).to(device)
        s_family = family_for(net)
        labels_only = set(combined.losses) == {"ce"}
        if not labels_only and getattr(self, "_cache_args", None) is not None:
            train_ds = training_view(
                train_ds, need_index=True, quiet=quiet
            )  # cached logits follow its batches
        cache = None if labels_only else self._cached(train_ds)

        # feature / attention losses (hint distillation) read the internals of both networks; their
        # width projections are trained with the student (distill's pattern)
        internals = {
            "features": "features" in combined.requires,
            "attentions": "attentions" in combined.requires,
        }

        def teacher_out(xb, idx, aug):
            if labels_only:
                return {}
            if cache is not None:
                return {"logits": cached_teacher_logits(cache, idx, aug, xb.shape[-2:]).to(device)}
            return teacher_forward(self.teacher, prepare(xb, self.t_meta, device), **internals)

        def loss_fn(model, x, xb, y, idx, aug):
            t_out = teacher_out(xb, idx, aug)
            total, _ = combined(s_family.forward_kd(model, x, **internals), t_out, y)
            return total

        extra: list[torch.nn.Parameter] = []
        if any(internals.values()):  # materialise the lazily built projections before the optimiser
            from ..data import head

            xb0, yb0 = head(train_ds, 2)
            net.eval()
            with torch.no_grad():
                s_out = s_family.forward_kd(net, prepare(xb0, self.meta, device), **internals)
                combined.prepare(s_out, teacher_out(xb0, torch.arange(2), False), yb0.to(device))
            extra = list(combined.parameters())

        res = fit(
            net,
            self.meta,
            train_ds,
            val_ds,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            loss_fn=loss_fn,
            seed=seed,
            quiet=quiet,
            device=device,
            desc=desc,
            do_augment=augment,
            on_epoch_end=on_epoch_end,
            extra_params=extra,
        )
        self.history += [{k: r[k] for k in ("epoch", "val") if k in r} for r in res["history"]]
        return res["val"]
