"""`vitshrink distill`: train a small student from a large teacher.

Teacher and student may differ in family, width, depth, patch size and input resolution: each gets
the batch preprocessed its own way (`train.prepare`), and the losses (`distill.losses`) resize logit
maps, resample token grids and project widths. The teacher runs in eval mode without gradients; with
augmentation off its logits can be cached on disk (`cache_teacher`) so each epoch costs only the
student's passes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import transformers as T

from ..artifacts import atomic_path
from ..data import load_dataset
from ..errors import VitshrinkError
from ..models import adapter_for, count_params, is_model_dir, load_model, save_model
from ..progress import progress
from ..train import _check_compatible, checkpoint_dir, default_device, dist_info, fit, prepare, resolve_model
from .losses import LOSSES, build_losses

__all__ = ["distill", "LOSSES", "build_losses", "teacher_logits_cache"]


@torch.no_grad()
def teacher_logits_cache(
    teacher, t_meta: dict[str, Any], ds, path: Path, *, batch_size: int = 64, device=None, quiet: bool = False
) -> torch.Tensor:
    """Teacher logits for every training sample, computed once and kept on disk (fp16)."""
    from safetensors.torch import load_file, save_file

    if path.exists():
        cached = load_file(path)["logits"]
        if cached.shape[0] == len(ds):
            return cached
    device = device or default_device()
    adapter = adapter_for(teacher)
    teacher.to(device).eval()
    parts = []
    for i in progress(range(0, len(ds), batch_size), desc="teacher cache", disable=quiet):
        x = prepare(ds.images[i : i + batch_size], t_meta, device)
        parts.append(adapter.forward_kd(teacher, x)["logits"].half().cpu())
    logits = torch.cat(parts)
    with atomic_path(path) as tmp:
        save_file({"logits": logits}, str(tmp))
    return logits


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
    resume: bool = False,
    seed: int = 0,
    quiet: bool = False,
    data_options: dict[str, Any] | None = None,
    **student_overrides: Any,
) -> tuple[Path, dict[str, Any]]:
    """Distil TEACHER (model directory) into STUDENT (preset or directory) on DATA; saves to OUT."""
    data_options = dict(data_options or {})
    out = Path(out)
    if not is_model_dir(teacher):
        raise VitshrinkError(f"teacher must be a trained model directory: {teacher}")
    t_model, t_meta = load_model(teacher)
    weights = build_losses(losses).weights  # validates names early, before any data is loaded
    if cache_teacher and augment:
        raise VitshrinkError(
            "--cache-teacher needs augmentation off (cached logits must match the exact inputs)"
        )
    s_size = image_size or (None if is_model_dir(student) else t_meta["preprocess"]["size"][0])
    if is_model_dir(student):
        s_size = load_model(student)[1]["preprocess"]["size"][0]
    # Load at the larger of the two resolutions so neither model sees an upsampled image.
    load_size = max(s_size, t_meta["preprocess"]["size"][0])
    train_ds = load_dataset(data, "train", size=load_size, limit=limit, seed=seed, data_options=data_options)
    val_ds = load_dataset(data, "val", size=load_size, limit=val_limit, seed=seed, data_options=data_options)
    _check_compatible(t_meta, train_ds)
    s_model, s_meta = resolve_model(
        student,
        data,
        image_size=s_size,
        channels=t_meta["preprocess"]["channels"],
        data_options=data_options,
        train_ds=train_ds,
        overrides=student_overrides,
    )
    _check_compatible(s_meta, train_ds)
    if (
        {"dist-token", "hard"} & set(weights)
        and s_model.config.model_type == "deit"
        and not isinstance(s_model, T.DeiTForImageClassificationWithTeacher)
    ):
        # A distillation token needs DeiT's two-head model; its embeddings already carry the token.
        two_head = T.DeiTForImageClassificationWithTeacher(s_model.config)
        two_head.deit.load_state_dict(s_model.deit.state_dict())
        s_model = two_head.eval()

    device = default_device()
    t_model.to(device).eval().requires_grad_(False)
    s_model.to(device)
    opts = {"temperature": temperature, "alpha": alpha, **(loss_options or {})}
    combined = build_losses(weights, **_accepted(weights, opts)).to(device)
    need_f, need_a = "features" in combined.requires, "attentions" in combined.requires
    if need_a:
        for m in (t_model, s_model):
            m.set_attn_implementation("eager")  # attention maps are only returned by eager attention
    s_adapter, t_adapter = adapter_for(s_model), adapter_for(t_model)
    cache = None
    if cache_teacher:
        if need_f:
            raise VitshrinkError(
                "--cache-teacher caches logits only; it cannot serve feature/attention losses"
            )
        key = hashlib.sha1(
            f"{teacher}|{data}|{limit}|{seed}|{load_size}|{sorted(data_options.items())}".encode()
        ).hexdigest()[:12]
        cache = teacher_logits_cache(
            t_model,
            t_meta,
            train_ds,
            checkpoint_dir(out) / f"teacher-{key}.safetensors",
            device=device,
            quiet=quiet,
        )

    def teacher_out(xb: torch.Tensor, idx: torch.Tensor) -> dict[str, Any]:
        if cache is not None:
            return {"logits": cache[idx].to(device).float()}
        with torch.no_grad():
            return t_adapter.forward_kd(
                t_model, prepare(xb, t_meta, device), features=need_f, attentions=need_a
            )

    def loss_fn(model, x, xb, y, idx):
        # Under DDP the wrapped module must be called for gradient sync; adapters call model(...).
        s_out = s_adapter.forward_kd(model, x, features=need_f, attentions=need_a)
        total, _ = combined(s_out, teacher_out(xb, idx), y)
        return total

    # Materialise lazily built projections before the optimiser is made.
    xb0, yb0 = train_ds.images[:2], train_ds.targets[:2]
    s_model.eval()
    with torch.no_grad():
        combined.prepare(
            s_adapter.forward_kd(s_model, prepare(xb0, s_meta, device), features=need_f, attentions=need_a),
            teacher_out(xb0, torch.arange(2)),
            yb0.to(device),
        )
    res = fit(
        s_model,
        s_meta,
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
    )
    metrics = {
        **res["val"],
        "epochs": epochs,
        "teacher_params": count_params(t_model),
        "student_params": count_params(s_model),
    }
    if dist_info()[0] == 0:
        save_model(
            s_model.cpu(),
            s_meta,
            out,
            stage="distill",
            parent=teacher,
            metrics=metrics,
            options={
                "teacher": str(teacher),
                "student": str(student),
                "data": str(data),
                "losses": weights,
                "alpha": alpha,
                "temperature": temperature,
                "epochs": epochs,
                "limit": limit,
                "seed": seed,
                "lr": lr,
                "batch_size": batch_size,
                "augment": augment,
            },
        )
    return out, metrics


def _accepted(weights: dict[str, float], opts: dict[str, Any]) -> dict[str, Any]:
    """Shared options only where some listed loss takes them (build_losses rejects unused ones)."""
    import inspect

    names = set()
    for w in weights:
        names |= set(inspect.signature(LOSSES[w].__init__).parameters)
    return {k: v for k, v in opts.items() if k in names or k in weights}


from .._callable import install as _install  # noqa: E402

_install(__name__, "distill")
