"""`vitshrink prune`: structured pruning that physically removes heads, neurons, dims and channels.

The pruned model is a plain Hugging Face model with a rewritten config (uniform widths per layer,
whole heads, head size kept), so it reloads with ``from_pretrained`` and runs faster on any dense
runtime. Optional: a parameter / MAC / latency budget instead of a ratio, iterative pruning with
distillation from the unpruned model between steps, and unstructured sparsity on top (which only
shrinks the compressed file; see ``sparsity.py``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import VitshrinkError
from ..outputs import temp_dir
from .axes import choose_axes
from .core import (
    GRANULARITIES,
    IMPORTANCES,
    count_macs,
    count_params,
    family_for,
    prune_model,
    prune_to_config,
    pruned_config,
    supported_families,
)
from .depth import drop_blocks
from .shape import choose_shape
from .sparsity import unstructured_sparsity
from .target import fill_budget, pruned_architecture, ratio_for_target, ratio_from_latency_table

__all__ = [
    "GRANULARITIES",
    "IMPORTANCES",
    "count_macs",
    "count_params",
    "family_for",
    "prune",
    "prune_model",
    "prune_to_config",
    "pruned_architecture",
    "pruned_config",
    "ratio_for_target",
    "ratio_from_latency_table",
    "supported_families",
    "unstructured_sparsity",
]

_CALIB_BATCHES, _CALIB_BATCH_SIZE = 8, 32
# Pixel-wise KD recovers segmentation best unsoftened: on the aerial demo at 0.25, 6 epochs of KD + labels
# from the teacher reached 0.5639 mIoU at T=1, 0.5615 at T=2, 0.5583 at T=4 (2 seeds each,
# benchmarks/prune_recovery.py --recover-temperature); classification keeps Hinton's T=4.
SEG_RECOVER_TEMPERATURE = 1.0


def _latency_ms(model: torch.nn.Module, x: torch.Tensor, runs: int = 20) -> float:
    """Median single-batch latency of `model` exported to ONNX and run with onnxruntime here, as
    `vitshrink bench` runs the exported artifact; PyTorch eager if the export fails.

    The depth/width choice and latency budgets are about the deployed model, and PyTorch eager's
    per-op overhead ranks shapes differently: at Swin-T 0.25 the eager probe kept width alone, while
    on onnxruntime depth 0.5 + width at the same size runs 20% faster (benchmarks/prune_speed.py).
    """
    import numpy as np

    from ..bench.timing import onnx_latencies_ms, torch_latency_ms
    from ..export import export_onnx

    meta = {"preprocess": {"channels": int(x.shape[1]), "size": [int(x.shape[2]), int(x.shape[3])]}}
    with temp_dir("probe") as tmp:
        path = Path(tmp) / "probe.onnx"
        try:
            export_onnx(model, path, meta=meta, check=False)
        except VitshrinkError:
            return torch_latency_ms(model, x)
        sample = x.cpu().numpy().astype(np.float32)
        return onnx_latencies_ms([path], sample, runs=runs, budget_s=float("inf"), threads=None)[0]


def _widths(config: Any) -> dict[str, Any]:
    """The config fields pruning rewrites (for the metrics record)."""
    keys = (
        "hidden_size",
        "num_attention_heads",
        "intermediate_size",
        "head_dim",
        "embed_dim",
        "num_heads",
        "mlp_ratio",
        "hidden_sizes",
        "neck_hidden_sizes",
        "mlp_ratios",
        "decoder_hidden_size",
        "auxiliary_channels",
        "num_hidden_layers",
        "depths",
    )
    d = config.to_dict()
    out = {k: d[k] for k in keys if k in d}
    if isinstance(d.get("backbone_config"), dict):
        out["backbone"] = {k: d["backbone_config"][k] for k in keys if k in d["backbone_config"]}
    return out


def prune(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ratio: float | None = None,
    target_params: int | None = None,
    target_latency_ms: float | None = None,
    target_macs: int | None = None,
    importance: str = "magnitude",
    granularity: Sequence[str] | str = GRANULARITIES,
    round_to: int = 8,
    steps: int = 1,
    recover_epochs: int = 0,
    teacher: str | os.PathLike | None = None,
    data: str | None = None,
    unstructured: float | None = None,
    latency_table: str | os.PathLike | None = None,
    quiet: bool = False,
    batch_size: int = 64,
    lr: float = 1e-4,
    limit: int | None = None,
    seed: int = 0,
    data_options: dict[str, Any] | None = None,
    augment: bool = True,
    recover_losses: str | dict[str, float] = "kd",
    depth_ratio: float | str = 0.0,
    recover_temperature: float | None = None,
    teacher_cache_dir: str | os.PathLike | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Prune the model directory MODEL and save the result to OUT; returns (OUT, metrics).

    Give `ratio` (fraction of every prunable width removed) or one budget: `target_params`,
    `target_macs` or `target_latency_ms` (the exported model timed with onnxruntime on this machine, as
    `vitshrink bench` does, or interpolated from
    `latency_table`, a JSON {"ratio": latency_ms} measured on the target device). Pruning happens in
    `steps` equal steps; with `recover_epochs` > 0 each step is followed by that many epochs of
    distillation on `data` from the unpruned model (or `teacher`), with `recover_losses` at
    `recover_temperature` (default: 1 for segmentation, 4 otherwise). importance="taylor" needs `data`
    too. `unstructured` zeroes that fraction of the remaining weights at the very end. `depth_ratio`
    first removes that fraction of the transformer blocks of every stage (least influential on sample
    images first; ViT, DeiT, Swin, SegFormer), before any width pruning or budget search.
    `granularity="auto"` picks the axes to cut (heads/embed, mlp, channels) by the least output KL of
    one-shot candidates meeting the same parameter budget (`prune.axes`). `depth_ratio="auto"` splits
    the budget (the parameters `ratio` leaves, or `target_params` / `target_macs`) between depth and
    width: each of depth 0, 0.25, 0.5 gets the width ratio meeting the same budget, and the fastest
    measured here wins (`prune.shape`). `teacher_cache_dir`: recovery from `teacher` with logit
    losses reads the teacher's logits from the cache there (`distill.teacher_cache_path`, shared
    with distillation on the same subset) instead of running the teacher every step.
    `on_epoch_end(epoch, record)` is called after each recovery epoch (see train.fit).
    """
    from ..models import check_finite, load_model, save_model

    out = Path(out)
    budgets = {"ratio": ratio, "target_params": target_params, "target_macs": target_macs}
    budgets["target_latency_ms"] = target_latency_ms
    given = [k for k, v in budgets.items() if v is not None]
    if len(given) != 1:
        raise VitshrinkError(f"give exactly one of {', '.join(budgets)} (got {', '.join(given) or 'none'})")
    if steps < 1:
        raise VitshrinkError(f"steps must be >= 1, got {steps}")
    if recover_epochs < 0:
        raise VitshrinkError(f"recover_epochs must be >= 0, got {recover_epochs}")
    if (recover_epochs > 0 or importance == "taylor") and data is None:
        raise VitshrinkError("recovery fine-tuning and importance='taylor' need data")
    if recover_temperature is not None and not recover_temperature > 0:
        raise VitshrinkError(f"recover temperature must be > 0, got {recover_temperature}")
    if unstructured is not None and not 0.0 <= unstructured < 1.0:
        raise VitshrinkError(f"unstructured sparsity must be in [0, 1), got {unstructured}")
    if importance not in IMPORTANCES:
        raise VitshrinkError(f"unknown importance '{importance}' (choose from {', '.join(IMPORTANCES)})")
    if isinstance(granularity, str):  # "heads,mlp" from the CLI or a recipe
        granularity = tuple(p.strip() for p in granularity.split(",") if p.strip())
    bad = [g for g in granularity if g not in (*GRANULARITIES, "auto")]
    if bad or not granularity:
        raise VitshrinkError(
            f"unknown granularity {bad or granularity!r} (choose from {', '.join(GRANULARITIES)}, or auto)"
        )
    auto_shape = depth_ratio == "auto"
    auto_axes = tuple(granularity) == ("auto",)
    if auto_axes and (auto_shape or target_latency_ms is not None or target_macs is not None):
        raise VitshrinkError(
            "granularity 'auto' needs ratio or target_params (and cannot be combined with depth ratio 'auto')"
        )
    if auto_shape and target_latency_ms is not None:
        raise VitshrinkError("depth ratio 'auto' needs ratio, target_params or target_macs")
    if not auto_shape and not (isinstance(depth_ratio, int | float) and 0.0 <= depth_ratio < 1.0):
        raise VitshrinkError(f"depth ratio must be in [0, 1) or 'auto', got {depth_ratio!r}")

    net, meta = load_model(model)
    check_finite(net, model)  # importance scores of NaN weights rank nothing; the output would be garbage
    family = family_for(net)
    pre = meta["preprocess"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, pre["channels"], *pre["size"], generator=gen)
    params0, macs0 = count_params(net), count_macs(net, x)
    metrics: dict[str, Any] = {"params_before": params0, "macs_before": macs0}

    train_ds = val_ds = calib = None
    if data is not None:  # loaded once: depth ranking, Taylor importance and recovery all use it
        train_ds, val_ds = _datasets(data, meta, limit, seed, data_options)
        if importance == "taylor" or auto_shape or auto_axes or depth_ratio > 0:
            calib = _calib_batches(train_ds, meta)

    unpruned = net  # the model before any pruning: "before" figures and the default recovery teacher
    ratio_mlp: float | None = None  # the MLP widths' own ratio where a budget search sets it
    samples = [b for b, _ in calib] if calib else [x]  # real images rank blocks better than noise
    if auto_axes:
        if ratio is not None:
            target_params = count_params(pruned_architecture(net, ratio, round_to=round_to))
        granularity, ratio, metrics["axes_candidates"] = choose_axes(
            net, x, samples, target_params=target_params, importance=importance, round_to=round_to
        )
        target_params = None
        if not quiet:
            print(
                f"axes: {','.join(granularity)} at ratio {ratio:.3f} (least output KL of {len(metrics['axes_candidates'])})"
            )
    if auto_shape:
        if ratio is not None:
            target_params = count_params(
                pruned_architecture(net, ratio, granularity=granularity, round_to=round_to)
            )
        depth_ratio, ratio, ratio_mlp, metrics["shape_candidates"] = choose_shape(
            net,
            x,
            samples,
            lambda m: _latency_ms(m, x),
            target_params=target_params,
            target_macs=target_macs,
            granularity=granularity,
            round_to=round_to,
        )
        target_params = target_macs = None
        if not quiet:
            print(
                f"shape: depth ratio {depth_ratio:g} + width ratio {ratio:.3f}, MLP {ratio_mlp:.3f} (fastest of {len(metrics['shape_candidates'])})"
            )
    if depth_ratio > 0:
        unpruned = copy.deepcopy(net)
        metrics["depth"] = drop_blocks(net, depth_ratio, samples)

    if ratio is None:
        probe = None if latency_table is not None else (lambda m: _latency_ms(m, x))
        ratio = ratio_for_target(
            net,
            x,
            target_params=target_params,
            target_macs=target_macs,
            measure_latency_ms=probe,
            target_latency_ms=target_latency_ms,
            latency_table=latency_table,
            granularity=granularity,
            round_to=round_to,
        )
        if target_latency_ms is not None and latency_table is None:
            metrics["latency_ms_before"] = _latency_ms(unpruned, x)
        if target_latency_ms is None:  # a size budget: the MLP widths take up what whole heads leave
            ratio_mlp = fill_budget(
                net,
                ratio,
                x,
                target_params=target_params,
                target_macs=target_macs,
                granularity=granularity,
                round_to=round_to,
            )
    if ratio_mlp is None:
        ratio_mlp = ratio
    final_config = pruned_config(
        net, ratio, granularity=granularity, round_to=round_to, ratio_mlp=ratio_mlp
    )  # also validates the options

    taylor_batches = calib if importance == "taylor" else None
    if recover_temperature is None:
        recover_temperature = SEG_RECOVER_TEMPERATURE if meta.get("task") == "segmentation" else 4.0
    kd = _KD(unpruned, meta, teacher, recover_losses, recover_temperature) if recover_epochs > 0 else None
    if kd is not None and teacher is not None and teacher_cache_dir is not None and train_ds is not None:
        kd.use_cache(teacher_cache_dir, teacher, data, limit, seed, data_options, augment, quiet)

    base_config = copy.deepcopy(net.config)
    recovery: list[dict[str, Any]] = []
    for k in range(1, steps + 1):
        r_k = ratio * k / steps
        cfg_k = (
            final_config
            if k == steps
            else family.rewrite_config(base_config, r_k, set(granularity), round_to, ratio_mlp * k / steps)
        )
        net.cpu()  # graph surgery on CPU (recovery may have moved the model to a GPU)
        prune_to_config(net, cfg_k, importance=importance, example_inputs=x, calib_batches=taylor_batches)
        if not quiet:
            print(f"prune step {k}/{steps}: ratio {r_k:.3f}, {count_params(net) / 1e6:.2f} M params")
        if kd is not None:
            recovery.append(
                kd.recover(
                    net,
                    train_ds,
                    val_ds,
                    recover_epochs,
                    batch_size,
                    lr,
                    seed,
                    quiet,
                    f"recover {k}/{steps}",
                    augment,
                    on_epoch_end,
                )
            )
    net.cpu().eval()

    metrics.update(
        ratio=ratio,
        ratio_mlp=ratio_mlp,
        params_after=count_params(net),
        macs_after=count_macs(net, x),
        config=_widths(net.config),
    )
    metrics["params_ratio"] = metrics["params_after"] / params0
    metrics["macs_ratio"] = metrics["macs_after"] / macs0
    if "latency_ms_before" in metrics:
        metrics["latency_ms_after"] = _latency_ms(net, x)
    if recovery:
        metrics["recovery"] = recovery[-1]
        metrics["recovery_history"] = kd.history if kd is not None else []
    if unstructured:
        metrics["unstructured"] = unstructured_sparsity(net, unstructured)
    options = {
        "ratio": ratio,
        "ratio_mlp": ratio_mlp,
        **{k: v for k, v in budgets.items() if k != "ratio" and v is not None},
        "importance": importance,
        "granularity": list(granularity),
        "round_to": round_to,
        "steps": steps,
        "recover_epochs": recover_epochs,
        "teacher": str(teacher) if teacher else None,
        "data": data,
        "unstructured": unstructured,
        "depth_ratio": depth_ratio,
        "recover_losses": recover_losses,
        "recover_temperature": recover_temperature,
        "latency_table": str(latency_table) if latency_table else None,
    }
    # What was asked; ratio / granularity / depth_ratio above are what the searches chose.
    asked = {k: v for k, v in budgets.items() if v is not None}
    if auto_axes:
        options["axes"] = {"granularity": "auto", **asked}
    if auto_shape:
        options["shape"] = {"depth_ratio": "auto", **asked}
    check_finite(net, f"pruned from {model}")  # recovery training can diverge
    save_model(net, meta, out, stage="prune", options=options, metrics=metrics, parent=model)
    if not quiet:
        print(
            f"pruned {family.name}: {params0 / 1e6:.2f} -> {metrics['params_after'] / 1e6:.2f} M params, "
            f"{macs0 / 1e9:.3f} -> {metrics['macs_after'] / 1e9:.3f} GMACs (ratio {ratio:.3f}) -> {out}"
        )
    return out, metrics


def _datasets(
    data: str, meta: dict[str, Any], limit: int | None, seed: int, data_options: dict[str, Any] | None
):
    from ..data import load_dataset
    from ..train import _check_compatible

    size = tuple(meta["preprocess"]["size"])
    kw = {"size": size, "seed": seed, "data_options": dict(data_options or {})}
    train_ds = load_dataset(data, "train", limit=limit, **kw)
    val_ds = load_dataset(data, "val", limit=2000 if limit is None else max(1, limit // 4), **kw)
    _check_compatible(meta, train_ds)
    return train_ds, val_ds


def _calib_batches(train_ds: Any, meta: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few fixed training batches (preprocessed like the model expects) for Taylor importance."""
    from ..train import prepare

    n = min(len(train_ds), _CALIB_BATCHES * _CALIB_BATCH_SIZE)
    return [
        (
            prepare(train_ds.images[i : i + _CALIB_BATCH_SIZE], meta, torch.device("cpu")),
            train_ds.targets[i : i + _CALIB_BATCH_SIZE],
        )
        for i in range(0, n, _CALIB_BATCH_SIZE)
    ]


def _temperature_option(losses: str | dict[str, float], temperature: float) -> dict[str, float]:
    """{"temperature": T} where one of `losses` takes a temperature (kd, cwd), else nothing."""
    from ..distill.losses import LOSSES, _options, parse_loss_spec

    names = parse_loss_spec(losses)
    return {"temperature": temperature} if any("temperature" in _options(LOSSES[n]) for n in names) else {}


class _KD:
    """Recovery fine-tuning: Hinton KD from the unpruned model (or `teacher`) via the shared trainer."""

    def __init__(
        self,
        unpruned: torch.nn.Module,
        meta: dict[str, Any],
        teacher: str | os.PathLike | None,
        losses: str | dict[str, float] = "kd",
        temperature: float = 4.0,
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

        losses = build_losses(self.losses, **_temperature_option(self.losses, self.temperature))
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
        on_epoch_end=None,
    ) -> dict[str, Any]:
        from ..distill import cached_teacher_logits
        from ..distill.losses import build_losses
        from ..models import family_for
        from ..train import default_device, fit, prepare, teacher_forward

        device = default_device()
        self.teacher.to(device)
        combined = build_losses(self.losses, **_temperature_option(self.losses, self.temperature)).to(device)
        s_adapter = family_for(net)
        labels_only = set(combined.losses) == {"ce"}
        cache = None if labels_only else self._cached(train_ds)

        def teacher_out(xb, idx, aug):
            if labels_only:
                return {}
            if cache is not None:
                return {"logits": cached_teacher_logits(cache, idx, aug, xb.shape[-2:]).to(device)}
            return teacher_forward(self.teacher, prepare(xb, self.t_meta, device))

        def loss_fn(model, x, xb, y, idx, aug):
            t_out = teacher_out(xb, idx, aug)
            total, _ = combined(s_adapter.forward_kd(model, x), t_out, y)
            return total

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
        )
        self.history += [{k: r[k] for k in ("epoch", "val") if k in r} for r in res["history"]]
        return res["val"]


from vitshrink._callable import install as _install  # noqa: E402

_install(__name__, "prune")
