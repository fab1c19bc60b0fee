"""`vitshrink prune`: structured pruning that physically removes heads, neurons, dims and channels.

The pruned model is a plain Hugging Face model with a rewritten config (uniform widths per layer,
whole heads, head size kept), so it reloads with ``from_pretrained`` and runs faster on any dense
runtime. Optional: a parameter / MAC / latency budget instead of a ratio, iterative pruning with
distillation from the unpruned model between steps, and unstructured sparsity on top (which only
shrinks the compressed file; see ``sparsity.py``).

Shape: `depth_ratio` first removes that fraction of the transformer blocks of every stage (least
influential on sample images first; ViT, DeiT, Swin, SegFormer), before any width pruning or budget
search. `depth_ratio="auto"` splits the budget (the parameters `ratio` leaves, or `target_params` /
`target_macs`) between depth and width: each of depth 0, 0.25, 0.5 gets the width ratio meeting the
same budget, and the fastest measured here wins (`prune.shape`). `depth_ratio=None` (the default) is
"auto" where it applies (a family with depth pruning, a ratio / parameter / MAC budget, fixed axes),
else 0; a ratio is then matched at equal MACs. `granularity="auto"` picks the axes to cut (heads/embed,
mlp, channels) by the least output KL of one-shot candidates meeting the same parameter budget
(`prune.axes`). Widths are multiples of `round_to`, by default what `target_device` wants (a GPU's
tile; on a CPU the vector width of `target_cpu`: `vitshrink.targets`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import VitshrinkError
from ..options import PRUNE, validate
from ..outputs import temp_dir
from ..targets import width_rule
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
from .recovery import Recovery, calib_batches, default_temperature, recovery_datasets
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


def _latency_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Single-batch latency of `model` exported to ONNX and run with onnxruntime here (`_latencies_ms`)."""
    return _latencies_ms([model], x)[0]


def _latencies_ms(models: Sequence[torch.nn.Module], x: torch.Tensor) -> list[float]:
    """Single-batch latency of each model exported to ONNX and run with onnxruntime here, as `vitshrink
    bench` runs the exported artifact (all cores, spinning workers), the models timed in turn
    (`bench.timing.interleaved_ms`) so drift on a shared machine cannot decide between them; PyTorch
    eager for all of them if one fails to export.

    The depth/width choice and latency budgets are about the deployed model, and PyTorch eager's
    per-op overhead ranks shapes differently: at Swin-T 0.25 the eager probe kept width alone, while
    on onnxruntime depth 0.5 + width at the same size runs 20% faster (benchmarks/prune_speed.py).
    """
    import numpy as np

    from ..bench.timing import interleaved_ms, torch_latency_ms
    from ..deploy.runtime import cpu_session
    from ..export import export_onnx

    meta = {"preprocess": {"channels": int(x.shape[1]), "size": [int(x.shape[2]), int(x.shape[3])]}}
    with temp_dir("probe") as tmp:
        paths = [Path(tmp) / f"probe{i}.onnx" for i in range(len(models))]
        try:
            for model, path in zip(models, paths):
                export_onnx(model, path, meta=meta, check=False)
        except VitshrinkError:
            return [torch_latency_ms(model, x) for model in models]
        feed = x.cpu().numpy().astype(np.float32)
        sessions = [cpu_session(p, threads=None) for p in paths]
        calls = [lambda s=s: s.run(None, {s.get_inputs()[0].name: feed}) for s in sessions]
        return interleaved_ms(calls)


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
    round_to: int | None = None,
    target_cpu: str = "auto",
    target_device: str = "cpu",
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
    depth_ratio: float | str | None = None,
    recover_temperature: float | None = None,
    teacher_cache_dir: str | os.PathLike | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Prune the model directory MODEL and save the result to OUT; returns (OUT, metrics).

    Give `ratio` (fraction of every prunable width removed) or one budget: `target_params`, `target_macs`
    or `target_latency_ms` (the exported model timed with onnxruntime here, as `vitshrink bench` does, or
    interpolated from `latency_table`, a JSON {"ratio": latency_ms} measured on the target device).
    Pruning happens in `steps` equal steps; with `recover_epochs` > 0 each step is followed by that many
    epochs of distillation on `data` from the unpruned model (or `teacher`), with `recover_losses` at
    `recover_temperature` (default: 1 for segmentation, 4 otherwise). importance="taylor" needs `data`
    too. `unstructured` zeroes that fraction of the remaining weights at the very end. `depth_ratio`,
    `granularity` and `round_to` shape the cut (the module's docstring: depth and width are chosen
    together by default). `teacher_cache_dir`: recovery from `teacher` with logit losses reads the
    teacher's logits from the cache there (`distill.teacher_cache_path`, shared with distillation on
    the same subset). `on_epoch_end(epoch, record)` is called after each recovery epoch (train.fit).
    `round_to`: widths are multiples of it; default: what `target_device`'s kernels want (a GPU's tile,
    or on "cpu" the vector width of `target_cpu`, "auto": this CPU; `vitshrink.targets`), recorded with
    the reason in the metrics' `round_to`.
    """
    # ranges and choices as declared in options.PRUNE (the CLI and recipes check the same declarations)
    validate(PRUNE, locals())
    from ..models import check_finite, load_model

    budget = _Budget(ratio, target_params, target_macs, target_latency_ms, latency_table)
    rounding = _rounding(round_to, target_cpu, target_device, quiet)
    round_to = rounding["multiple"]
    shape = {"importance": importance, "granularity": granularity, "depth_ratio": depth_ratio}
    req = _validate(budget, round_to=round_to, quiet=quiet, recover_epochs=recover_epochs, data=data, **shape)
    net, meta = load_model(model)
    check_finite(net, model)  # importance scores of NaN weights rank nothing; the output would be garbage
    req = _default_shape(req, family_for(net))  # refuses a model no family can prune, before any data
    pre = meta["preprocess"]
    x = torch.randn(1, pre["channels"], *pre["size"], generator=torch.Generator().manual_seed(seed))
    metrics: dict[str, Any] = {"params_before": count_params(net), "macs_before": count_macs(net, x)}
    metrics["round_to"] = rounding

    train_ds = val_ds = calib = None
    if data is not None:  # loaded once: depth ranking, Taylor importance and recovery all use it
        train_ds, val_ds = recovery_datasets(data, meta, limit, seed, data_options)
        if importance == "taylor" or req.auto_shape or req.auto_axes or req.depth_ratio > 0:
            calib = calib_batches(train_ds, meta)
    samples = [b for b, _ in calib] if calib else [x]  # real images rank blocks better than noise
    plan = _plan(net, x, samples, req, metrics)

    if recover_temperature is None:
        recover_temperature = default_temperature(meta.get("task"))
    kd = recover = step_recover = None
    if recover_epochs > 0:
        kd = Recovery(plan.unpruned, meta, teacher, recover_losses, recover_temperature)
        if teacher is not None and teacher_cache_dir is not None and train_ds is not None:
            kd.use_cache(teacher_cache_dir, teacher, data, limit, seed, data_options, augment, quiet)
        fit = (train_ds, val_ds, recover_epochs, batch_size, lr, seed, quiet)
        recover, step_recover = (
            functools.partial(_recover_step, kd, fit, augment, hook) for hook in (on_epoch_end, None)
        )  # the race's recovery reports no epochs: the caller's callbacks follow the kept model

    taylor = calib if importance == "taylor" else None
    schedule = _schedule(net, plan, steps, round_to)
    step = {"importance": importance, "x": x, "taylor_batches": taylor, "recover": recover, "quiet": quiet}
    recovery = _apply_steps(net, schedule, **step)
    if _races(req, plan, recovery, steps):
        net, plan, recovery = _race(net, plan, recovery, req, {**step, "recover": step_recover}, metrics)
    # the options as recorded (granularity / depth_ratio: _record writes what the plan chose)
    settings = {"importance": importance, "granularity": req.granularity, "round_to": round_to}
    settings |= {"target_cpu": target_cpu, "target_device": target_device, "steps": steps}
    settings |= {"recover_epochs": recover_epochs, "teacher": str(teacher) if teacher else None}
    settings |= {"data": data, "unstructured": unstructured, "depth_ratio": depth_ratio}
    settings |= {"recover_losses": recover_losses, "recover_temperature": recover_temperature}
    history = kd.history if kd is not None else []
    _record(net, meta, model, Path(out), x, plan, budget, metrics, settings, recovery, history, quiet)
    return Path(out), metrics


def _recover_step(
    kd: Recovery, fit: tuple, augment: bool, on_epoch_end: Callable | None, net: Any, desc: str
) -> dict[str, Any]:
    """One recovery between pruning steps (`_apply_steps` calls it with the step's description)."""
    train_ds, val_ds, epochs, batch_size, lr, seed, quiet = fit
    return kd.recover(net, train_ds, val_ds, epochs, batch_size, lr, seed, quiet, desc, augment, on_epoch_end)


def _rounding(
    round_to: int | None, target_cpu: str, target_device: str = "cpu", quiet: bool = True
) -> dict[str, Any]:
    """The width multiple and why: the user's --round-to, else what the target device wants."""
    if round_to is not None:
        rounding = {"multiple": round_to, "why": "set by round_to"}
    else:
        multiple, why = width_rule(target_device, target_cpu)
        rounding = {"multiple": multiple, "why": why}
    if not quiet:
        print(f"widths: multiples of {rounding['multiple']} ({rounding['why']})")
    return rounding


@dataclass(frozen=True)
class _Budget:
    """What the user asked for: one of ratio / target_params / target_macs / target_latency_ms."""

    ratio: float | None
    target_params: int | None
    target_macs: int | None
    target_latency_ms: float | None
    latency_table: str | os.PathLike | dict | None

    def given(self) -> dict[str, Any]:
        asked = {
            "ratio": self.ratio,
            "target_params": self.target_params,
            "target_macs": self.target_macs,
            "target_latency_ms": self.target_latency_ms,
        }
        return {k: v for k, v in asked.items() if v is not None}


@dataclass(frozen=True)
class _Request:
    """The validated options the plan reads."""

    budget: _Budget
    granularity: Sequence[str]  # ("auto",) for a search
    depth_ratio: float | str  # "auto" for a search
    auto_axes: bool
    auto_shape: bool
    round_to: int
    importance: str
    quiet: bool
    asked_depth: float | str | None  # depth_ratio as given (None: the default)


@dataclass(frozen=True)
class _Plan:
    """What the searches chose: the widths to cut (the model's depth is already cut)."""

    granularity: Sequence[str]
    ratio: float
    ratio_mlp: float
    depth_ratio: float
    final_config: Any  # the config after the last step
    unpruned: torch.nn.Module  # the model before any pruning: "before" latency, default recovery teacher
    auto_axes: bool  # whether the axes / the depth-width split were searched
    auto_shape: bool


# -- validate -----------------------------------------------------------------------------------------
def _validate(
    budget: _Budget,
    *,
    round_to: int,
    quiet: bool,
    recover_epochs: int,
    importance: str,
    data: str | None,
    granularity: Sequence[str] | str,
    depth_ratio: float | str | None,
) -> _Request:
    """Refuse bad options before anything is loaded."""
    asked = depth_ratio
    names = ("ratio", "target_params", "target_macs", "target_latency_ms")
    given = list(budget.given())
    if len(given) != 1:
        raise VitshrinkError(f"give exactly one of {', '.join(names)} (got {', '.join(given) or 'none'})")
    if (recover_epochs > 0 or importance == "taylor") and data is None:
        raise VitshrinkError("recovery fine-tuning and importance='taylor' need data")
    if isinstance(granularity, str):  # "heads,mlp" from the CLI or a recipe
        granularity = tuple(p.strip() for p in granularity.split(",") if p.strip())
    bad = [g for g in granularity if g not in (*GRANULARITIES, "auto")]
    if bad or not granularity:
        raise VitshrinkError(
            f"unknown granularity {bad or granularity!r} (choose from {', '.join(GRANULARITIES)}, or auto)"
        )
    auto_shape = depth_ratio == "auto"
    auto_axes = tuple(granularity) == ("auto",)
    if depth_ratio is None:  # the default: resolved once the family is known (_default_shape)
        depth_ratio = 0.0
    if auto_axes and (auto_shape or budget.target_latency_ms is not None or budget.target_macs is not None):
        raise VitshrinkError(
            "granularity 'auto' needs ratio or target_params (and cannot be combined with depth ratio 'auto')"
        )
    if auto_shape and budget.target_latency_ms is not None:
        raise VitshrinkError("depth ratio 'auto' needs ratio, target_params or target_macs")
    return _Request(
        budget, granularity, depth_ratio, auto_axes, auto_shape, round_to, importance, quiet, asked
    )


def _default_shape(req: _Request, family: Any) -> _Request:
    """The default depth: measured depth/width split where one can be searched (see `prune.shape`:
    a shallower candidate must run faster at equal MACs to win), else width only."""
    if req.asked_depth is not None or req.auto_axes or req.budget.target_latency_ms is not None:
        return req
    if not family.depth_pruning:
        return req
    return dataclasses.replace(req, depth_ratio="auto", auto_shape=True)


# -- plan: axes, depth, ratio search ------------------------------------------------------------------
def _plan(
    net: torch.nn.Module, x: torch.Tensor, samples: list[torch.Tensor], req: _Request, metrics: dict[str, Any]
) -> _Plan:
    """Decide what to cut: the axes (auto), the depth/width split (auto), then the width ratio meeting
    the budget. Blocks are removed here already, since the width search sizes the shallower model.
    What the searches saw goes into `metrics`."""
    budget, granularity, depth_ratio, round_to = req.budget, req.granularity, req.depth_ratio, req.round_to
    auto_axes, auto_shape, quiet = req.auto_axes, req.auto_shape, req.quiet
    ratio, target_params, target_macs = budget.ratio, budget.target_params, budget.target_macs
    ratio_mlp: float | None = None  # the MLP widths' own ratio where a budget search sets it
    if auto_axes:
        if ratio is not None:
            target_params = count_params(pruned_architecture(net, ratio, round_to=round_to))
        granularity, ratio, metrics["axes_candidates"] = choose_axes(
            net, x, samples, target_params=target_params, importance=req.importance, round_to=round_to
        )
        target_params = None
        if not quiet:
            print(
                f"axes: {','.join(granularity)} at ratio {ratio:.3f} (least output KL of {len(metrics['axes_candidates'])})"
            )
    if auto_shape:
        width_only = ratio
        if ratio is not None:  # the shallower candidates match the width cut's MACs (what latency follows)
            arch = pruned_architecture(
                net, ratio, granularity=granularity, round_to=round_to, device=x.device
            )
            target_macs = count_macs(arch, x)
        depth_ratio, ratio, ratio_mlp, metrics["shape_candidates"] = choose_shape(
            net,
            x,
            samples,
            lambda models: _latencies_ms(models, x),
            target_params=target_params,
            target_macs=target_macs,
            granularity=granularity,
            round_to=round_to,
            ratio=width_only,
        )
        target_params = target_macs = None
        if not quiet:
            print(
                f"shape: depth ratio {depth_ratio:g} + width ratio {ratio:.3f}, MLP {ratio_mlp:.3f} (fastest of {len(metrics['shape_candidates'])})"
            )
    unpruned = net
    assert not isinstance(depth_ratio, str)  # "auto" was resolved above
    if depth_ratio > 0:
        unpruned = copy.deepcopy(net)
        metrics["depth"] = drop_blocks(net, depth_ratio, samples)
    if ratio is None:
        ratio, ratio_mlp = _search_ratio(
            net, unpruned, x, budget, metrics, target_params, target_macs, granularity, round_to
        )
    if ratio_mlp is None:
        ratio_mlp = ratio
    final_config = pruned_config(
        net, ratio, granularity=granularity, round_to=round_to, ratio_mlp=ratio_mlp
    )  # also validates the options
    return _Plan(granularity, ratio, ratio_mlp, depth_ratio, final_config, unpruned, auto_axes, auto_shape)


def _search_ratio(
    net: torch.nn.Module,
    unpruned: torch.nn.Module,
    x: torch.Tensor,
    budget: _Budget,
    metrics: dict[str, Any],
    target_params: int | None,
    target_macs: int | None,
    granularity: Sequence[str],
    round_to: int,
) -> tuple[float, float | None]:
    """The width ratio meeting a parameter / MAC / latency budget, and for size budgets the MLP ratio
    taking up what whole heads leave."""
    latency_ms, table = budget.target_latency_ms, budget.latency_table
    ratio = ratio_for_target(
        net,
        x,
        target_params=target_params,
        target_macs=target_macs,
        measure_latency_ms=None if table is not None else (lambda m: _latency_ms(m, x)),
        target_latency_ms=latency_ms,
        latency_table=table,
        granularity=granularity,
        round_to=round_to,
    )
    if latency_ms is not None and table is None:
        metrics["latency_ms_before"] = _latency_ms(unpruned, x)
    if latency_ms is not None:
        return ratio, None
    ratio_mlp = fill_budget(
        net,
        ratio,
        x,
        target_params=target_params,
        target_macs=target_macs,
        granularity=granularity,
        round_to=round_to,
    )
    return ratio, ratio_mlp


# -- the default's accuracy guard --------------------------------------------------------------------
def _races(req: _Request, plan: _Plan, recovery: list[dict[str, Any]], steps: int) -> bool:
    """The default (not an explicit depth_ratio="auto") dropped blocks and recovered in one step."""
    return (
        req.asked_depth is None and plan.auto_shape and plan.depth_ratio > 0 and bool(recovery) and steps == 1
    )


def _race(
    net: torch.nn.Module,
    plan: _Plan,
    recovery: list[dict[str, Any]],
    req: _Request,
    step: dict[str, Any],
    metrics: dict[str, Any],
) -> tuple[torch.nn.Module, _Plan, list[dict[str, Any]]]:
    """Keep the faster depth + width split only if, after the same recovery, it scores no lower on the
    validation split than the widths-only cut at the same MACs; else that cut.

    Measured why (benchmarks/prune_speed.py --accuracy: two demo ViTs, ratios 0.3 / 0.5 / 0.7, one
    recovery epoch, 2 seeds): at equal MACs, half the blocks + wider layers ran 1.1-1.3x faster and
    scored +0.006 to +0.024 validation top-1 over widths only, except on the weaker teacher at 0.7
    (-0.037, -0.044): no rule predicts which, the recovery shows it. Costs one more recovery, only
    where the default dropped blocks.
    """
    from ..tasks import TASK_METRIC

    row = next((r for r in metrics.get("shape_candidates", []) if r["depth_ratio"] == 0), None)
    key = next((k for k in TASK_METRIC.values() if k in recovery[-1]), None)
    if row is None or key is None:
        return net, plan, recovery
    alt = copy.deepcopy(plan.unpruned)
    ratio, ratio_mlp = row["width_ratio"], row["mlp_ratio"]
    config = pruned_config(
        alt, ratio, granularity=plan.granularity, round_to=req.round_to, ratio_mlp=ratio_mlp
    )
    if not req.quiet:
        print(f"checking the split against widths only at the same MACs (ratio {ratio:.3f}), same recovery")
    alt_recovery = _apply_steps(alt, [(ratio, config)], **step)
    split, widths = float(recovery[-1][key]), float(alt_recovery[-1][key])
    kept = "split" if split >= widths else "widths only"
    metrics["shape_check"] = {"metric": key, "split": split, "widths_only": widths, "kept": kept}
    if not req.quiet:
        print(f"val {key}: split {split:.4f}, widths only {widths:.4f} -> {kept}")
    if kept == "split":
        return net, plan, recovery
    metrics.pop("depth", None)
    plan = dataclasses.replace(plan, ratio=ratio, ratio_mlp=ratio_mlp, depth_ratio=0.0, final_config=config)
    return alt, plan, alt_recovery


# -- schedule and steps -------------------------------------------------------------------------------
def _schedule(net: torch.nn.Module, plan: _Plan, steps: int, round_to: int) -> list[tuple[float, Any]]:
    """(ratio, config) of each step: equal steps towards the planned widths, the last exactly them."""
    family = family_for(net)
    base_config = copy.deepcopy(net.config)
    gran = set(plan.granularity)
    return [
        (
            plan.ratio * k / steps,
            plan.final_config
            if k == steps
            else family.rewrite_config(
                base_config, plan.ratio * k / steps, gran, round_to, plan.ratio_mlp * k / steps
            ),
        )
        for k in range(1, steps + 1)
    ]


def _apply_steps(
    net: torch.nn.Module,
    schedule: list[tuple[float, Any]],
    *,
    importance: str,
    x: torch.Tensor,
    taylor_batches: list[tuple[torch.Tensor, torch.Tensor]] | None,
    recover: Callable[[torch.nn.Module, str], dict[str, Any]] | None,
    quiet: bool,
) -> list[dict[str, Any]]:
    """Prune `net` to each step's config in place, recovering after each; returns the recovery metrics."""
    steps = len(schedule)
    recovery: list[dict[str, Any]] = []
    for k, (r_k, cfg_k) in enumerate(schedule, start=1):
        net.cpu()  # graph surgery on CPU (recovery may have moved the model to a GPU)
        prune_to_config(net, cfg_k, importance=importance, example_inputs=x, calib_batches=taylor_batches)
        if not quiet:
            print(f"prune step {k}/{steps}: ratio {r_k:.3f}, {count_params(net) / 1e6:.2f} M params")
        if recover is not None:
            recovery.append(recover(net, f"recover {k}/{steps}"))
    net.cpu().eval()
    return recovery


# -- record -------------------------------------------------------------------------------------------
def _record(
    net: torch.nn.Module,
    meta: dict[str, Any],
    model: str | os.PathLike,
    out: Path,
    x: torch.Tensor,
    plan: _Plan,
    budget: _Budget,
    metrics: dict[str, Any],
    settings: dict[str, Any],
    recovery: list[dict[str, Any]],
    recovery_history: list[dict[str, Any]],
    quiet: bool,
) -> None:
    """Final figures into `metrics` (and unstructured sparsity on top, the last change to the weights),
    what was chosen and asked into the saved options; save to OUT."""
    from ..models import check_finite, save_model

    params0, macs0 = metrics["params_before"], metrics["macs_before"]
    metrics.update(
        ratio=plan.ratio,
        ratio_mlp=plan.ratio_mlp,
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
        metrics["recovery_history"] = recovery_history
    if settings["unstructured"]:
        metrics["unstructured"] = unstructured_sparsity(net, settings["unstructured"])
    asked = budget.given()
    options = {
        "ratio": plan.ratio,
        "ratio_mlp": plan.ratio_mlp,
        **{k: v for k, v in asked.items() if k != "ratio"},
        **settings,
        "latency_table": str(budget.latency_table) if budget.latency_table else None,
    }
    options["granularity"], options["depth_ratio"] = list(plan.granularity), plan.depth_ratio
    # What was asked; ratio / granularity / depth_ratio above are what the searches chose.
    if plan.auto_axes:
        options["axes"] = {"granularity": "auto", **asked}
    if plan.auto_shape:  # asked "auto", or the default (None) resolved to it
        options["shape"] = {"depth_ratio": settings["depth_ratio"] or "auto (default)", **asked}
    check_finite(net, f"pruned from {model}")  # recovery training can diverge
    save_model(net, meta, out, stage="prune", options=options, metrics=metrics, parent=model)
    if not quiet:
        print(
            f"pruned {family_for(net).name}: {params0 / 1e6:.2f} -> {metrics['params_after'] / 1e6:.2f} M params, "
            f"{macs0 / 1e9:.3f} -> {metrics['macs_after'] / 1e9:.3f} GMACs (ratio {plan.ratio:.3f}) -> {out}"
        )


from vitshrink._callable import install as _install  # noqa: E402

_install(__name__, "prune")
