"""`vitshrink distill`: train a small student from a large teacher.

Teacher and student may differ in family, width, depth, patch size and input resolution: each gets
the batch preprocessed its own way (`train.prepare`), and the losses (`distill.losses`) resize logit
maps, resample token grids and project widths. The teacher runs in eval mode without gradients; its
logits can be cached on disk (`cache_teacher`) so each epoch costs only the student's passes. The
cache holds the plain and the flipped view and segmentation maps are shifted with the image, so the
cached targets follow the augmentation (the teacher's forward pass was ~85 % of an online aerial KD
epoch: 0.31 s vs 0.05 s for the student's step on a batch of 16).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import atomic_path
from ..data import AugParams, apply_augment, head, load_dataset, training_view
from ..errors import VitshrinkError
from ..models import count_params, family_for, is_model_dir, load_model, save_model
from ..models.families import Family
from ..progress import progress
from ..train import (
    _check_compatible,
    checkpoint_dir,
    default_device,
    dist_info,
    fit,
    prepare,
    resolve_model,
    teacher_forward,
)
from .losses import LOSSES, build_losses, resize_map

__all__ = [
    "distill",
    "LOSSES",
    "build_losses",
    "cached_teacher_logits",
    "teacher_logits_cache",
    "teacher_cache_path",
]


CACHE_BUDGET_BYTES = 512 * 2**20


@torch.no_grad()
def teacher_logits_cache(
    teacher,
    t_meta: dict[str, Any],
    ds,
    path: Path,
    *,
    batch_size: int = 64,
    device=None,
    quiet: bool = False,
    flipped: bool = False,
    budget_bytes: int = CACHE_BUDGET_BYTES,
) -> torch.Tensor:
    """Teacher logits for every training sample, computed once and kept on disk (fp16).

    Returns (V, N, K) or (V, N, K, h, w) with V = 2 when `flipped` (view 1: the teacher run on the
    horizontally flipped image, so flip augmentation gets exact teacher outputs). Segmentation maps
    are stored at the largest resolution (full, 1/2, 1/4 ...) that keeps the cache under
    `budget_bytes`; users of the cache resize them back (the KD losses resize to the student's map).
    """
    from safetensors.torch import load_file, save_file

    views = 2 if flipped else 1
    fingerprint = _fingerprint(ds.images)
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            same = (f.metadata() or {}).get("fingerprint") == fingerprint
        cached = load_file(path)["logits"]
        # Shared across runs (budget search): the same file must hold logits of these very images.
        if same and cached.shape[:2] == (views, len(ds)):
            return cached
    device = device or default_device()
    teacher.to(device).eval()
    parts: list[list[torch.Tensor]] = [[] for _ in range(views)]
    stored: tuple[int, int] | None = None  # map size kept, decided on the first batch
    for i in progress(range(0, len(ds), batch_size), desc="teacher cache", disable=quiet):
        xb = ds.images[i : i + batch_size]
        for v in range(views):
            y = teacher_forward(teacher, prepare(xb.flip(-1) if v else xb, t_meta, device))["logits"]
            if y.dim() == 4:
                if stored is None:
                    stored = _cache_map_size(
                        tuple(y.shape[-2:]), 2 * views * len(ds) * y.shape[1], budget_bytes
                    )
                if tuple(y.shape[-2:]) != stored:
                    y = torch.nn.functional.interpolate(y, size=stored, mode="area")
            parts[v].append(y.half().cpu())
    logits = torch.stack([torch.cat(p) for p in parts])
    with atomic_path(path) as tmp:
        save_file({"logits": logits.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
    return logits


def _fingerprint(images: torch.Tensor) -> str:
    return hashlib.sha1(images.contiguous().numpy().tobytes()).hexdigest()[:16] + f"-{len(images)}"


def teacher_cache_path(
    cache_dir: str | os.PathLike,
    teacher: str | os.PathLike,
    data: str,
    limit: int | None,
    seed: int,
    load_size: int,
    data_options: dict[str, Any],
    augment: bool,
) -> Path:
    """Where the teacher's logits on one training subset live: one file per (teacher, data, subset,
    resolution, views), so distillation and prune recovery on the same subset share it."""
    key = hashlib.sha1(
        f"{teacher}|{data}|{limit}|{seed}|{load_size}|{sorted(data_options.items())}|{augment}".encode()
    ).hexdigest()[:12]
    return Path(cache_dir) / f"teacher-{key}.safetensors"


def _cache_map_size(hw: tuple[int, int], bytes_per_pixel: int, budget_bytes: int) -> tuple[int, int]:
    """The largest of full, 1/2, 1/4 ... resolution (never below 8 pixels) whose maps fit the budget."""
    h, w = hw
    f = 1
    while bytes_per_pixel * (h // f) * (w // f) > budget_bytes and min(h, w) // (2 * f) >= 8:
        f *= 2
    return h // f, w // f


def cached_teacher_logits(
    cache: torch.Tensor, idx: torch.Tensor, aug: AugParams | None, size: tuple[int, int]
) -> torch.Tensor:
    """The cached teacher logits of samples `idx` as seen through this batch's augmentation.

    Flips pick the flipped view (exact). Shifts move segmentation maps with the image (regions
    shifted in from outside are ignore-labelled, so the losses skip them); a classifier's output is
    taken as shift-invariant (the demo shifts by at most 1/16 of the image).
    """
    if aug is None:
        return cache[0, idx].float()
    out = torch.where(aug.flip.view(-1, *[1] * (cache.dim() - 2)), cache[1, idx], cache[0, idx]).float()
    if out.dim() == 4:
        out = apply_augment(resize_map(out, size), aug, 0.0, flip=False)
    return out


def distill(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    data: str,
    *,
    out: str | os.PathLike,
    epochs: int = 1,
    losses: str | list[str] | dict[str, float] = "kd",
    alpha: float = 0.5,
    temperature: float = 4.0,
    loss_options: dict[str, Any] | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    limit: int | None = None,
    val_limit: int | None = 2000,
    image_size: int | None = None,
    augment: bool = True,
    cache_teacher: bool = False,
    teacher_cache_dir: str | os.PathLike | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    resume: bool = False,
    seed: int = 0,
    quiet: bool = False,
    data_options: dict[str, Any] | None = None,
    **student_overrides: Any,
) -> tuple[Path, dict[str, Any]]:
    """Distil TEACHER (model directory) into STUDENT (preset or directory) on DATA; saves to OUT.

    cache_teacher: compute the teacher's logits once (all views) instead of every epoch; kept in
    `teacher_cache_dir` when given (shared with other runs on the same subset), else beside OUT until
    the run ends. on_epoch_end(epoch, record): called after each epoch (see train.fit).
    """
    data_options = dict(data_options or {})
    out = Path(out)
    if not is_model_dir(teacher):
        raise VitshrinkError(f"teacher must be a trained model directory: {teacher}")
    t_model, t_meta = load_model(teacher)
    weights = build_losses(losses).weights  # validates names early, before any data is loaded
    pair, train_ds, val_ds, load_size = _setup(
        t_model, t_meta, student, data, image_size, limit, val_limit, seed, data_options, student_overrides
    )
    pair.s_model = pair.s_family.distillation_student(pair.s_model, set(weights))  # e.g. DeiT's two heads
    device = default_device()
    pair.t_model.to(device).eval().requires_grad_(False)
    pair.s_model.to(device)
    opts = {"temperature": temperature, "alpha": alpha, **(loss_options or {})}
    combined, need_f, need_a = _build_losses(pair, weights, opts, device)
    cache = cache_path = None
    if cache_teacher:
        if need_f:
            raise VitshrinkError(
                "--cache-teacher caches logits only; it cannot serve feature/attention losses"
            )
        key = (teacher, data, limit, seed, load_size, data_options, augment)
        train_ds, cache, cache_path = _logits_cache(
            pair, train_ds, out, teacher_cache_dir, key, device, quiet
        )
    loss_fn = _loss_fn(pair, combined, cache, device, need_f, need_a, head(train_ds, 2))
    res = fit(
        pair.s_model,
        pair.s_meta,
        train_ds,
        val_ds,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        do_augment=augment,
        loss_fn=loss_fn,
        extra_params=list(combined.parameters()),
        ckpt_dir=checkpoint_dir(out),
        resume=resume,
        seed=seed,
        quiet=quiet,
        desc="distill",
        on_epoch_end=on_epoch_end,
    )
    metrics = {
        **res["val"],
        "epochs": epochs,
        "history": [{k: r[k] for k in ("epoch", "val") if k in r} for r in res["history"]],
        "teacher_params": count_params(pair.t_model),
        "student_params": count_params(pair.s_model),
    }
    if dist_info()[0] == 0:
        if cache_path is not None and teacher_cache_dir is None:
            cache_path.unlink(missing_ok=True)
        recorded = {"teacher": str(teacher), "student": str(student), "data": str(data), "losses": weights}
        recorded |= {
            "alpha": alpha,
            "temperature": temperature,
            "epochs": epochs,
            "limit": limit,
            "seed": seed,
        }
        recorded |= {"lr": lr, "batch_size": batch_size, "augment": augment, "cache_teacher": cache_teacher}
        opts = {"stage": "distill", "parent": teacher, "metrics": metrics, "options": recorded}
        save_model(pair.s_model.cpu(), pair.s_meta, out, **opts)
    return out, metrics


def _logits_cache(
    pair: Any, train_ds: Any, out: Path, cache_dir: Any, key: tuple, device: Any, quiet: bool
) -> tuple[Any, Any, Path]:
    """The teacher's logits for every training view, computed once (kept in cache_dir when given, shared
    by runs on the same subset; else beside OUT until the run ends); the training view they follow."""
    teacher, data, limit, seed, load_size, data_options, augment = key
    train_ds = training_view(train_ds, need_index=True, quiet=quiet)  # cached logits follow its batches
    path = _cache_file(out, cache_dir, teacher, data, limit, seed, load_size, data_options, augment)
    cache = teacher_logits_cache(
        pair.t_model, pair.t_meta, train_ds, path, device=device, quiet=quiet, flipped=augment
    )
    return train_ds, cache, path


def _build_losses(
    pair: _Pair, weights: dict[str, float], opts: dict[str, Any], device: torch.device
) -> tuple[Any, bool, bool]:
    """The combined loss on `device`, and whether it needs features / attention maps (then both models
    run eager attention, the only kind that returns them)."""
    combined = build_losses(weights, **_accepted(weights, opts)).to(device)
    need_f, need_a = "features" in combined.requires, "attentions" in combined.requires
    if need_a:
        for m in (pair.t_model, pair.s_model):
            m.set_attn_implementation("eager")
    return combined, need_f, need_a


@dataclass
class _Pair:
    """Teacher and student with their metadata; the student's family runs it."""

    t_model: torch.nn.Module
    t_meta: dict[str, Any]
    s_model: torch.nn.Module
    s_meta: dict[str, Any]
    s_family: Family


def _setup(
    t_model: torch.nn.Module,
    t_meta: dict[str, Any],
    student: str | os.PathLike,
    data: str,
    image_size: int | None,
    limit: int | None,
    val_limit: int | None,
    seed: int,
    data_options: dict[str, Any],
    student_overrides: dict[str, Any],
) -> tuple[_Pair, Any, Any, int]:
    """Load the data (labels in the teacher's class order) and the student built or loaded for it;
    returns (pair, train, val, load size)."""
    s_size = image_size or (None if is_model_dir(student) else t_meta["preprocess"]["size"][0])
    if is_model_dir(student):
        s_size = load_model(student)[1]["preprocess"]["size"][0]
    # Load at the larger of the two resolutions so neither model sees an upsampled image.
    load_size = max(s_size, t_meta["preprocess"]["size"][0])
    train_ds = load_dataset(data, "train", size=load_size, limit=limit, seed=seed, data_options=data_options)
    val_ds = load_dataset(data, "val", size=load_size, limit=val_limit, seed=seed, data_options=data_options)
    # labels in the teacher's class order, so output index i means the same class for both models
    train_ds, val_ds = _check_compatible(t_meta, train_ds), _check_compatible(t_meta, val_ds)
    s_model, s_meta = resolve_model(
        student,
        data,
        image_size=s_size,
        channels=t_meta["preprocess"]["channels"],
        data_options=data_options,
        train_ds=train_ds,
        overrides=student_overrides,
    )
    if not is_model_dir(student):  # a preset student was named from the data: take the teacher's order
        s_meta["class_names"] = list(t_meta["class_names"])
        s_model.config.id2label = dict(enumerate(t_meta["class_names"]))
        s_model.config.label2id = {n: i for i, n in enumerate(t_meta["class_names"])}
    _check_compatible(s_meta, train_ds)
    return _Pair(t_model, t_meta, s_model, s_meta, family_for(s_model)), train_ds, val_ds, load_size


def _cache_file(
    out: Path,
    cache_dir: str | os.PathLike | None,
    teacher: str | os.PathLike,
    data: str,
    limit: int | None,
    seed: int,
    load_size: int,
    data_options: dict[str, Any],
    augment: bool,
) -> Path:
    """Where the teacher's logits are cached: in `cache_dir` (shared with other runs), else beside the
    checkpoint (which is replaced whole on every save), kept until the run ends so --resume does not
    recompute it."""
    path = teacher_cache_path(
        cache_dir or out.parent, teacher, data, limit, seed, load_size, data_options, augment
    )
    return path if cache_dir is not None else out.with_name(f"{out.name}.{path.name}")


def _loss_fn(
    pair: _Pair,
    combined: Any,
    cache: torch.Tensor | None,
    device: torch.device,
    need_f: bool,
    need_a: bool,
    first: tuple[torch.Tensor, torch.Tensor],
) -> Callable[..., torch.Tensor]:
    """`fit`'s loss: the student's outputs against the teacher's (live, or from the cache)."""

    def teacher_out(xb: torch.Tensor, idx: torch.Tensor, aug: AugParams | None = None) -> dict[str, Any]:
        if cache is not None:
            return {"logits": cached_teacher_logits(cache, idx, aug, xb.shape[-2:]).to(device)}
        return teacher_forward(
            pair.t_model, prepare(xb, pair.t_meta, device), features=need_f, attentions=need_a
        )

    def loss_fn(model, x, xb, y, idx, aug):
        # Under DDP the wrapped module must be called for gradient sync; families call model(...).
        s_out = pair.s_family.forward_kd(model, x, features=need_f, attentions=need_a)
        total, _ = combined(s_out, teacher_out(xb, idx, aug), y)
        return total

    # Materialise lazily built projections before the optimiser is made.
    xb0, yb0 = first
    pair.s_model.eval()
    with torch.no_grad():
        s_out = pair.s_family.forward_kd(
            pair.s_model, prepare(xb0, pair.s_meta, device), features=need_f, attentions=need_a
        )
        combined.prepare(s_out, teacher_out(xb0, torch.arange(2)), yb0.to(device))
    return loss_fn


def _accepted(weights: dict[str, float], opts: dict[str, Any]) -> dict[str, Any]:
    """Shared options only where some listed loss takes them (build_losses rejects unused ones)."""
    import inspect

    names = set()
    for w in weights:
        names |= set(inspect.signature(LOSSES[w].__init__).parameters)
    return {k: v for k, v in opts.items() if k in names or k in weights}


from .._callable import install as _install  # noqa: E402

_install(__name__, "distill")
