"""Training: one loop (`fit`) serves `train`, `distill` and pruning recovery.

AdamW, linear warm-up then cosine decay, light batch-level augmentation, mixed precision on CUDA,
an atomic checkpoint every epoch and `resume` that continues to the same result (per-epoch seeds for
shuffling, augmentation and dropout). Under `torchrun` it runs DistributedDataParallel (gloo on CPU,
nccl on GPU); rank 0 alone logs and writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from .artifacts import atomic_dir, read_json, write_json
from .batch import all_reduce_sum, default_device, dist_info, prepare, segmentation_ce
from .data import align_classes, describe, head, load_dataset, training_view
from .errors import VitshrinkError
from .evaluate import evaluate_model
from .models import build_model, family_for, is_model_dir, load_model, save_model
from .models.families import Family, find_family
from .progress import progress

STATE_FILE = "trainer_state.pt"


# ----------------------------------------------------------------------------------- distributed


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Where a stage writing OUT keeps its per-epoch checkpoint: OUT.ckpt beside it."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def maybe_init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (env://); a no-op for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            # Before init, so NCCL's communicators (and barrier) use this rank's GPU, not GPU 0.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # nccl for CUDA tensors, gloo for the CPU ones (loss/metric sums): NCCL cannot reduce CPU tensors.
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        torch.distributed.init_process_group(backend=backend)
    return dist_info()


def finish_distributed() -> None:
    """Wait for every rank (so rank 0's outputs exist when any rank returns), then leave the group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


AMP_MODES = ("auto", "on", "off")


def native_bf16_cpu() -> bool:
    """Does this CPU compute bf16 natively (AMX or AVX512-BF16)? Elsewhere bf16 is emulated and slow."""
    # oneDNN (which runs bf16 matmuls/convs) honours ONEDNN_MAX_CPU_ISA; capped below its bf16 ISAs the
    # hardware's bf16 is never used, so bf16 would be emulated (how tests see an AVX2 CPU on an AMX host).
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if isa not in ("ALL", "DEFAULT", "") and not any(k in isa for k in ("BF16", "AMX", "AVX10")):
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, c, lambda: False)()) for c in checks)


def amp_dtype_for(device: torch.device, amp: str | bool = "auto") -> torch.dtype | None:
    """The autocast dtype for training on `device`, or None for full fp32.

    "auto": CUDA only (bf16 where supported, else fp16). "on": also bf16 on CPU, 2.2-2.8x faster for
    the demo's 3M-param UperNet-Swin teacher on an AMX CPU, but ~15% slower for a 0.3M-param student
    whose small ops gain nothing. "off": fp32 everywhere.
    """
    amp = {True: "on", False: "off"}.get(amp, amp)  # type: ignore[call-overload]
    if amp not in AMP_MODES:
        raise VitshrinkError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off" or (device.type != "cuda" and amp == "auto"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def inference_autocast(device: torch.device) -> Any:
    """Autocast for a frozen teacher's forward pass: mixed precision on CUDA and on CPUs with native
    bf16 (2.3x faster for the demo's aerial teacher, logits within ~1e-2), fp32 elsewhere."""
    native = device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu())
    dtype = amp_dtype_for(device, "on") if native else None
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def floats(obj: Any) -> Any:
    """Tensors in (nested dicts/lists of) outputs as float32: mixed-precision teacher outputs meet fp32
    student outputs in the losses."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(floats(v) for v in obj)
    return obj


@torch.no_grad()
def teacher_forward(teacher: nn.Module, x: torch.Tensor, **kw: Any) -> dict[str, Any]:
    """A frozen teacher's distillation outputs (`Family.forward_kd`): no gradients, mixed precision
    where it is native (`inference_autocast`), float32 out."""
    with inference_autocast(x.device):
        return floats(family_for(teacher).forward_kd(teacher, x, **kw))


# ------------------------------------------------------------------------------------------ input


def task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    if task == "segmentation":
        return segmentation_ce(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=0.1)


def channel_stats(ds: Any, n: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the first `n` images (256 of a streamed photo set: each is a decode)."""
    x = head(ds, n if not getattr(ds, "streaming", False) else min(n, 256))[0].float().div(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


# ------------------------------------------------------------------------------------------- loop


def fit(
    model: nn.Module,
    meta: dict[str, Any],
    train_ds: Any,
    val_ds: Any | None,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    do_augment: bool = True,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    extra_params: list[nn.Parameter] | None = None,
    ckpt_dir: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int = 0,
    quiet: bool = False,
    device: torch.device | None = None,
    desc: str = "train",
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    amp: str | bool = "auto",
) -> dict[str, Any]:
    """Train `model` in place. `loss_fn(model, x, x_uint8, targets, indices, aug)` overrides the task loss
    (`aug`: the batch's AugParams, None without augmentation, so cached teacher outputs can follow it).

    Returns {"history": [...per-epoch metrics...], "val": last validation metrics}.
    """
    rank, world = maybe_init_distributed()
    device = device or default_device()
    train_ds = training_view(train_ds, quiet=quiet or rank != 0)  # the decoded cache, when asked for
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
    steps_per_epoch = max(1, math.ceil(len(train_ds) / (batch_size * world)))
    opt, sched = _optimizer(params, lr, weight_decay, steps_per_epoch * epochs, warmup)
    amp_dtype = amp_dtype_for(device, amp)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp_dtype == torch.float16)
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    state = _TrainState(opt, sched, scaler, list(extra_params or []), params)

    start_epoch, history = 0, []
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    if resume and ckpt is not None and (ckpt / STATE_FILE).exists():
        start_epoch, history = _resume(ckpt, model, meta, state, device, epochs, quiet=quiet or rank != 0)

    if loss_fn is None:
        loss_fn = _task_loss_fn(model, meta["task"])

    val_metrics: dict[str, Any] = history[-1].get("val", {}) if history else {}
    for epoch in range(start_epoch, epochs):
        rec = _train_epoch(
            train_model,
            meta,
            train_ds,
            state,
            loss_fn,
            epoch=epoch,
            epochs=epochs,
            batch_size=batch_size,
            do_augment=do_augment,
            seed=seed,
            device=device,
            amp_dtype=amp_dtype,
            desc=desc,
            quiet=quiet,
        )
        if val_ds is not None:
            val_metrics = evaluate_model(
                model, meta, val_ds, batch_size=batch_size * 2, device=device, quiet=True, distributed=True
            )
            rec["val"] = {k: v for k, v in val_metrics.items() if k != "per_class_iou"}
        history.append(rec)
        if rank == 0:
            if not quiet:
                print(_fmt_epoch(rec))
            if ckpt is not None:
                _save_checkpoint(ckpt, model, meta, opt, sched, scaler, extra_params, epoch + 1, history)
        if on_epoch_end is not None:
            on_epoch_end(epoch, rec)
    return {"history": history, "val": val_metrics}


def _task_loss_fn(model: nn.Module, task: str) -> Callable[..., torch.Tensor]:
    """The plain training loss (labels only) in `fit`'s loss_fn signature."""
    family = find_family(model) or Family()  # a model of no family: plain transformers outputs

    def loss_fn(m: nn.Module, x: torch.Tensor, xb, y: torch.Tensor, idx, aug) -> torch.Tensor:
        # `m` is the (possibly DDP-wrapped) module: calling it synchronises the gradients.
        return task_loss(family.model_logits(m, x), y, task)

    return loss_fn


@dataclass
class _TrainState:
    """What a training step updates besides the model (and a checkpoint saves)."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    extra_params: list[nn.Parameter]  # loss modules' own parameters (distillation projections)
    params: list[nn.Parameter]  # everything the optimiser updates (gradient clipping)


def _optimizer(
    params: list[nn.Parameter], lr: float, weight_decay: float, total: int, warmup: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with linear warm-up over `warmup` of the `total` steps, then cosine decay."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, int(total * warmup))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _resume(
    ckpt: Path, model: nn.Module, meta: dict[str, Any], state: _TrainState, device, epochs: int, quiet: bool
) -> tuple[int, list]:
    """(epochs done, history) from the checkpoint, with model and optimiser state restored."""
    _check_resumable(ckpt, model, meta)
    start_epoch, history = _load_checkpoint(
        ckpt, model, state.opt, state.sched, state.scaler, state.extra_params, device
    )
    if start_epoch > epochs:
        raise VitshrinkError(
            f"checkpoint {ckpt} has already trained {start_epoch} epochs but --epochs is {epochs}; "
            f"pass --epochs {start_epoch} or more to continue (or drop --resume to start over)"
        )
    if not quiet:
        print(f"resuming from {ckpt} at epoch {start_epoch + 1}/{epochs}")
    return start_epoch, history


def _epoch_order(n: int, epoch: int, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """This epoch's sample order and augmentation generator (the same on resume)."""
    rank, world = dist_info()
    torch.manual_seed(seed * 1000 + epoch)  # dropout & friends: same stream on resume
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    if world > 1:
        # torch's DistributedSampler: one shuffled permutation per epoch (same seed on every rank),
        # padded by wrapping so all ranks take the same number of steps (a rank with one batch more
        # would wait forever in DDP's all-reduce), then every world-th index.
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler)), gen
    return torch.randperm(n, generator=gen), gen


def _train_epoch(
    train_model: nn.Module,
    meta: dict[str, Any],
    train_ds: Any,
    state: _TrainState,
    loss_fn: Callable[..., torch.Tensor],
    *,
    epoch: int,
    epochs: int,
    batch_size: int,
    do_augment: bool,
    seed: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    desc: str,
    quiet: bool,
) -> dict[str, Any]:
    """One pass over `train_ds`; returns the epoch's record (mean training loss, seconds)."""
    rank, _ = dist_info()
    perm, gen = _epoch_order(len(train_ds), epoch, seed)
    train_model.train()
    t0, loss_sum = time.time(), torch.zeros(2, dtype=torch.float64)
    bar = progress(
        train_ds.batches(batch_size, order=perm, train=do_augment, generator=gen),
        total=-(-len(perm) // batch_size),
        desc=f"{desc} {epoch + 1}/{epochs}",
        disable=quiet or rank != 0,
    )
    for xb, yb, idx, aug in bar:
        x = prepare(xb, meta, device)
        y = yb.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn(train_model, x, xb, y, idx, aug)
        if not torch.isfinite(loss):
            raise VitshrinkError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower --lr")
        _step(loss, state)
        loss_sum += torch.tensor([loss.item() * len(idx), len(idx)], dtype=torch.float64)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.3f}")
    all_reduce_sum(loss_sum)
    rec = {
        "epoch": epoch + 1,
        "train_loss": float(loss_sum[0] / max(1, loss_sum[1])),
        "seconds": round(time.time() - t0, 1),
    }
    if getattr(train_ds, "skipped", None):  # --data-opt skip_bad=true: say how many were left out
        rec["skipped_bad"] = len(train_ds.skipped)
    return rec


def _step(loss: torch.Tensor, state: _TrainState) -> None:
    """Backward, gradient sync of the loss modules' parameters, clipping, optimiser and schedule."""
    opt, scaler = state.opt, state.scaler
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    world = dist_info()[1]
    if world > 1:
        # DDP averages the wrapped model's gradients only; loss modules' own parameters
        # (distillation projections) would otherwise drift apart between ranks.
        for p in state.extra_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad).div_(world)
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(state.params, 1.0)
    scaler.step(opt)
    scaler.update()
    state.sched.step()


def _fmt_epoch(rec: dict[str, Any]) -> str:
    s = f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f} ({rec['seconds']}s)"
    if rec.get("skipped_bad"):
        s += f"  skipped {rec['skipped_bad']} bad file(s)"
    for k, v in rec.get("val", {}).items():
        if isinstance(v, float):
            s += f"  val_{k} {v:.4f}"
    return s


def _save_checkpoint(ckpt: Path, model, meta, opt, sched, scaler, extra_params, epoch: int, history) -> None:
    with atomic_dir(ckpt) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        state = {
            "epoch": epoch,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "extra_params": [p.detach().cpu() for p in (extra_params or [])],
        }
        torch.save(state, tmp / STATE_FILE)
        write_json(tmp / "history.json", {"meta": meta, "history": history})


_RESUME_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_sizes",
    "depths",
    "num_labels",
)


def _check_resumable(ckpt: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Refuse a checkpoint of another model or label set, saying what differs (not a size-mismatch crash)."""
    try:
        saved_cfg = read_json(ckpt / "config.json")
        saved_meta = read_json(ckpt / "history.json").get("meta") or {}
    except (VitshrinkError, AttributeError):
        return  # unreadable: _load_checkpoint reports it as corrupt
    now = model.config.to_dict()
    now["num_labels"], saved_cfg["num_labels"] = (
        len(meta["class_names"]),
        len(saved_cfg.get("id2label") or {}),
    )
    diffs = [
        f"{k} {saved_cfg.get(k)!r} vs {now.get(k)!r}"
        for k in _RESUME_KEYS
        if k in saved_cfg and k in now and saved_cfg.get(k) != now.get(k)
    ]
    for k in ("task", "class_names", "preset"):
        if k in saved_meta and saved_meta.get(k) != meta.get(k):
            diffs.append(f"{k} {saved_meta.get(k)!r} vs {meta.get(k)!r}")
    if diffs:
        raise VitshrinkError(
            f"cannot resume from {ckpt}: it was made with different settings ({'; '.join(diffs[:3])}); "
            "use the original options or drop --resume"
        )


def _load_checkpoint(ckpt: Path, model, opt, sched, scaler, extra_params, device) -> tuple[int, list]:
    import pickle

    from safetensors import SafetensorError

    try:
        # Through from_pretrained, which maps the names save_pretrained writes (transformers 5 saves
        # the legacy ones, e.g. ViT's attention.query) back to the in-memory modules (q_proj).
        saved = type(model).from_pretrained(ckpt)
        missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
        if unexpected:
            raise VitshrinkError(
                f"checkpoint {ckpt} does not match the model (unexpected keys: {unexpected[:3]})"
            )
        # weights_only: never unpickle arbitrary objects from a checkpoint on disk.
        state = torch.load(ckpt / STATE_FILE, map_location=device, weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError) as e:
        raise VitshrinkError(
            f"cannot resume from corrupt checkpoint {ckpt}: {str(e).splitlines()[0]}"
        ) from None
    except pickle.UnpicklingError:  # weights_only refused it: damaged, or not a tensors-only file
        raise VitshrinkError(
            f"cannot resume from {ckpt / STATE_FILE}: corrupt or not a tensors-only checkpoint"
        ) from None
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for p, v in zip(extra_params or [], state.get("extra_params", [])):
        p.data.copy_(v)
    history = read_json(ckpt / "history.json")["history"]
    return int(state["epoch"]), history


# -------------------------------------------------------------------------------------- stage API


def resolve_model(
    model: str | os.PathLike,
    data: str,
    *,
    image_size: int | None,
    channels: int | None,
    data_options: dict[str, Any],
    train_ds: Any | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A model directory loads as is; a preset name is built for the data's task, classes and channels."""
    if is_model_dir(model):
        if overrides:
            raise VitshrinkError(f"model options {sorted(overrides)} apply to presets only, not to {model}")
        return load_model(model)
    if Path(str(model)).exists():
        raise VitshrinkError(f"not a model directory (no config.json): {model}")
    info = describe(data, data_options)
    size = image_size or info["size"][0]
    ch = channels or info["channels"]
    mean = std = None
    if train_ds is not None:
        mean, std = channel_stats(train_ds)
    return build_model(
        str(model),
        task=info["task"],
        image_size=size,
        num_channels=ch,
        class_names=info["class_names"],
        mean=mean,
        std=std,
        **(overrides or {}),
    )


def train(
    model: str | os.PathLike,
    data: str,
    *,
    out: str | os.PathLike,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    image_size: int | None = None,
    channels: int | None = None,
    limit: int | None = None,
    val_limit: int | None = 2000,
    augment: bool = True,
    resume: bool = False,
    seed: int = 0,
    quiet: bool = False,
    data_options: dict[str, Any] | None = None,
    amp: str | bool = "auto",
    **model_overrides: Any,
) -> tuple[Path, dict[str, Any]]:
    """Train MODEL (preset or directory) on DATA; writes a model directory to OUT.

    Checkpoints go to OUT.ckpt every epoch; `resume=True` continues from there. `amp`: see
    `amp_dtype_for` ("on" trains large models ~2.5x faster on CPUs with native bf16).
    """
    data_options = dict(data_options or {})
    out = Path(out)
    amp_dtype_for(default_device(), amp)  # validates before any data is loaded
    if is_model_dir(model):
        meta0 = (
            read_json(Path(model) / "vitshrink.json") if (Path(model) / "vitshrink.json").exists() else None
        )
        size = image_size or (meta0["preprocess"]["size"][0] if meta0 else None)
    else:
        size = image_size
    train_ds = load_dataset(
        data, "train", size=size, channels=channels, limit=limit, seed=seed, data_options=data_options
    )
    val_ds = load_dataset(
        data, "val", size=size, channels=channels, limit=val_limit, seed=seed, data_options=data_options
    )
    net, meta = resolve_model(
        model,
        data,
        image_size=size or train_ds.size[0],
        channels=channels or train_ds.channels,
        data_options=data_options,
        train_ds=train_ds,
        overrides=model_overrides,
    )
    train_ds, val_ds = _check_compatible(meta, train_ds), _check_compatible(meta, val_ds)
    res = fit(
        net,
        meta,
        train_ds,
        val_ds,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        do_augment=augment,
        ckpt_dir=checkpoint_dir(out),
        resume=resume,
        seed=seed,
        quiet=quiet,
        amp=amp,
    )
    metrics = {**res["val"], "epochs": epochs}
    if dist_info()[0] == 0:
        save_model(
            net.cpu(),
            meta,
            out,
            stage="train",
            options={
                "data": str(data),
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "limit": limit,
                "seed": seed,
                "amp": amp,
            },
            metrics=metrics,
            parent=model if is_model_dir(model) else None,
        )
    return out, metrics


def _check_compatible(meta: dict[str, Any], ds: Any) -> Any:
    """`ds` with its labels in the model's class order (see data.align_classes); mismatches refused."""
    if meta["task"] != ds.task:
        raise VitshrinkError(f"model task is {meta['task']} but data {ds.source} is {ds.task}")
    if len(meta["class_names"]) != ds.num_classes:
        raise VitshrinkError(
            f"model has {len(meta['class_names'])} classes but data {ds.source} has {ds.num_classes}"
        )
    return align_classes(ds, meta["class_names"], model="the model")


from ._callable import install as _install  # noqa: E402

_install(__name__, "train")
