"""Structured pruning that physically removes heads, MLP neurons, embedding dims and conv channels.

How it works (config first, surgery second):

1. the model's family (``models/families/<name>.py``) writes the pruned config: uniform widths per layer/stage, whole
   heads, head size kept, widths rounded to ``round_to``;
2. that config is instantiated once: its layer widths are the targets;
3. Torch-Pruning's DependencyGraph finds every coupled group (residual stream, heads, MLP, convs...)
   and removes the least important channels of each group until it has the target width (whole heads
   for attention groups);
4. the result is checked against the fresh model: every tensor must load into it strictly and give
   the same outputs, so ``save_pretrained`` + ``from_pretrained`` reproduces the pruned model exactly.

Torch-Pruning's ``BasePruner`` turns ratios into channel counts per group with its own rounding
(``int``/``ceil``, ``round_to``), which cannot be made to land on the widths a plain config can express,
so we drive its DependencyGraph and importance estimators directly with the exact counts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from ..batch import segmentation_ce
from ..errors import ModelError, UnsupportedFamilyError, VitshrinkError
from ..export import count_macs as _count_macs
from ..models import (
    count_params as count_params,
)  # re-exported: prune.core is where pruning code looks for it
from ..models.families import GRANULARITIES, Family, family_names
from ..models.families import family_for as _family_for
from ..options import IMPORTANCES

_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


def family_for(model_or_config: nn.Module | PreTrainedConfig) -> Family:
    """The family whose rules prune this model (or config); UnsupportedFamilyError if it cannot be."""
    family = _family_for(model_or_config, "prune")
    if not family.width_pruning:
        raise UnsupportedFamilyError(family.name, "prune", supported_families())
    family.check_prunable(getattr(model_or_config, "config", model_or_config))  # e.g. UperNet's backbone
    return family


def supported_families() -> list[str]:
    """Families whose widths can be pruned."""
    return sorted(family_names(lambda f: f.width_pruning))


# -- measuring ------------------------------------------------------------------------------------------
@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on `example_inputs`, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return _count_macs(lambda x: model(pixel_values=x), example_inputs)
    finally:
        model.train(was_training)


# -- pruning --------------------------------------------------------------------------------------------
@dataclass
class _Attention:
    module: nn.Module
    qkv: tuple[nn.Linear, ...]
    head_dim: int


def _validate(ratio: float, granularity: Sequence[str], importance: str, round_to: int) -> set[str]:
    if not 0.0 <= ratio < 1.0:
        raise VitshrinkError(f"pruning ratio must be in [0, 1), got {ratio}")
    gran = set(granularity)
    unknown = gran - set(GRANULARITIES)
    if unknown:
        raise VitshrinkError(
            f"unknown granularity {sorted(unknown)} (choose from {', '.join(GRANULARITIES)})"
        )
    if importance not in IMPORTANCES:
        raise VitshrinkError(f"unknown importance '{importance}' (choose from {', '.join(IMPORTANCES)})")
    if round_to < 1:
        raise VitshrinkError(f"round_to must be >= 1, got {round_to}")
    return gran


def pruned_config(
    model: PreTrainedModel,
    ratio: float,
    *,
    granularity: Sequence[str] = GRANULARITIES,
    round_to: int = 8,
    ratio_mlp: float | None = None,
) -> PreTrainedConfig:
    """The config `prune_model` would give `model` (a new object; the model's config is untouched)."""
    gran = _validate(ratio, granularity, "magnitude", round_to)
    if ratio_mlp is not None:
        _validate(ratio_mlp, granularity, "magnitude", round_to)
    return family_for(model).rewrite_config(model.config, ratio, gran, round_to, ratio_mlp)


def prune_model(
    model: PreTrainedModel,
    *,
    ratio: float,
    granularity: Sequence[str] = GRANULARITIES,
    importance: str = "magnitude",
    round_to: int = 8,
    example_inputs: torch.Tensor,
    calib_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ratio_mlp: float | None = None,
) -> PreTrainedModel:
    """Remove `ratio` of every prunable width of `model` (in place) and return it with its config rewritten.

    granularity: any of "heads" (whole attention heads), "mlp" (MLP hidden neurons), "embed" (token /
    stage widths) and "channels" (conv and decoder channels). Widths are uniform across layers, rounded
    to multiples of `round_to` where the config allows, and heads keep their size. importance:
    "magnitude" (group L2 norm), "taylor" (|w * grad| accumulated over `calib_batches` of
    (pixel_values, labels) with `loss_fn`, cross-entropy by default) or "random". `ratio_mlp`, if
    given, is the MLP widths' own ratio (see ``target.fill_budget``). The returned model equals
    ``type(model).from_pretrained(d)`` after ``model.save_pretrained(d)``.
    """
    _validate(ratio, granularity, importance, round_to)
    config = pruned_config(model, ratio, granularity=granularity, round_to=round_to, ratio_mlp=ratio_mlp)
    return prune_to_config(
        model,
        config,
        importance=importance,
        example_inputs=example_inputs,
        calib_batches=calib_batches,
        loss_fn=loss_fn,
    )


def prune_to_config(
    model: PreTrainedModel,
    config: PreTrainedConfig,
    *,
    importance: str = "magnitude",
    example_inputs: torch.Tensor,
    calib_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> PreTrainedModel:
    """Shrink `model` in place to the (narrower) architecture of `config`, keeping the most important
    channels and heads; used directly for iterative pruning towards a schedule of configs."""
    if importance not in IMPORTANCES:
        raise VitshrinkError(f"unknown importance '{importance}' (choose from {', '.join(IMPORTANCES)})")
    family = family_for(model)
    reference = _instantiate(model, config)
    was_training = model.training
    model.eval()
    if importance == "taylor":
        if calib_batches is None:
            raise VitshrinkError("importance='taylor' needs calib_batches (pixel_values, labels)")
        _accumulate_grads(model, calib_batches, loss_fn)
    try:
        _surgery(model, reference, family, _importance(importance), example_inputs)
    finally:
        for p in model.parameters():
            p.grad = None
    _sync_attributes(model, reference)
    _check_against(model, reference, example_inputs)
    model.train(was_training)
    return model


def _instantiate(model: PreTrainedModel, config: PreTrainedConfig) -> PreTrainedModel:
    """A freshly initialised model of the same class built from `config` (its widths are the targets)."""
    device = next(model.parameters()).device
    try:
        ref = type(model)(config)
    except (ValueError, AssertionError) as e:  # e.g. a width that is not a multiple of the heads
        raise ModelError(f"pruned {config.model_type} config is not buildable: {e}") from e
    return ref.to(device).eval()


def _importance(name: str) -> tp.importance.Importance:
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.RandomImportance()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _family_for(model).model_logits(model, x)


def _default_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 4:  # segmentation: maps at the model's resolution, masks at the input's
        return segmentation_ce(logits, target)
    return F.cross_entropy(logits, target)


def _accumulate_grads(model: nn.Module, batches: Iterable[Any], loss_fn: Callable | None) -> None:
    loss_fn = loss_fn or _default_loss
    model.zero_grad(set_to_none=True)
    n = 0
    with torch.enable_grad():
        for x, y in batches:
            loss_fn(_logits(model, x), y).backward()
            n += 1
    if n == 0:
        raise VitshrinkError("importance='taylor' got no calibration batches")


def _attention_layers(model: nn.Module) -> dict[nn.Module, _Attention]:
    """q/k/v Linear -> its attention block, for every module with `num_attention_heads` and q/k/v."""
    found: dict[nn.Module, _Attention] = {}
    for m in model.modules():
        heads = getattr(m, "num_attention_heads", None)
        if not isinstance(heads, int):
            continue
        for names in _QKV_NAMES:
            layers = tuple(getattr(m, n, None) for n in names)
            if all(isinstance(lin, nn.Linear) for lin in layers):
                att = _Attention(m, layers, layers[0].out_features // heads)
                found.update({lin: att for lin in layers})
                break
    return found


def _build_graph(model: nn.Module, family: Family, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model` (everything that reaches the logits)."""
    extra = family.extra_outputs(model)
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in extra]

    def forward_fn(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        captured.clear()
        return [_logits(m, x), *captured]

    try:
        with warnings.catch_warnings():
            # cls/position embeddings are detected as "unwrapped parameters" and pruned on their last
            # dim, which is the channel dim for every family here; the warning is noise.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example_inputs,
                forward_fn=forward_fn,
                customized_pruners=family.customized_pruners(model),
                ignored_params=family.ignored_params(model),
            )
    finally:
        for h in hooks:
            h.remove()
    _treat_spatial_slices_as_elementwise(dg, family.spatial_slice_dims(model))
    return dg


def _treat_spatial_slices_as_elementwise(dg: tp.DependencyGraph, dims: tuple[int, ...]) -> None:
    """Stop Torch-Pruning from mapping spatial slices of channels-last maps onto channels.

    Its slice index mapping assumes dim 1 of a 4-D tensor is the channel dim (NCHW); on Swin's
    (B, H, W, C) maps that turns a crop or a 2x2 stride into a bogus channel selection. Such a slice
    keeps every channel, so it is an element-wise op for pruning purposes.
    """
    if not dims:
        return
    for node in dg.module2node.values():
        gf = node.grad_fn
        if node.type != tp.ops.OPTYPE.SLICE or len(getattr(gf, "_saved_self_sym_sizes", ())) != 4:
            continue
        if gf._saved_dim not in dims:
            continue
        node.type = tp.ops.OPTYPE.ELEMENTWISE  # update_index_mapping() skips element-wise nodes
        for dep in node.dependencies:
            dep.index_mapping[0] = None
        for src in node.inputs:
            for dep in src.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = None


def _surgery(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    family: Family,
    scorer: tp.importance.Importance,
    example_inputs: torch.Tensor,
) -> None:
    dg = _build_graph(model, family, example_inputs)
    ignored = {id(p) for p in family.ignored_params(model)}
    handled = {n for n, p in model.named_parameters() if id(p) in ignored}  # pruned by the family
    ref_modules = dict(reference.named_modules())
    attention = _attention_layers(model)
    root_types = (nn.Conv2d, nn.Linear, *family.customized_pruners(model).keys())

    for group in dg.get_all_groups(root_module_types=root_types):
        root, fn = group[0].dep.target.module, group[0].dep.handler
        name = dg._module2name[root]
        pruner = dg.get_pruner_of_module(root)
        current = pruner.get_out_channels(root)
        target = pruner.get_out_channels(ref_modules[name])
        n_remove = current - target
        if n_remove == 0:
            continue
        if n_remove < 0:
            raise ModelError(f"the pruned config is wider than the model at '{name}' ({current} -> {target})")

        with torch.no_grad():
            imp = scorer(group)
        imp = torch.zeros(current) if imp is None else imp.detach().float().cpu()
        att = next(
            (
                attention[d.target.module]
                for d, _ in group
                if d.target.module in attention and dg.is_out_channel_pruning_fn(d.handler)
            ),
            None,
        )
        keep_heads = None
        if att is not None:  # whole heads: rank heads by their mean channel importance
            if n_remove % att.head_dim:
                raise ModelError(
                    f"internal: '{name}' would lose a partial head ({n_remove} of {att.head_dim})"
                )
            head_imp = imp.view(-1, att.head_dim).mean(1)
            drop = torch.argsort(head_imp)[: n_remove // att.head_dim]
            keep_heads = torch.tensor(sorted(set(range(len(head_imp))) - set(drop.tolist())))
            idxs = torch.cat([torch.arange(h * att.head_dim, (h + 1) * att.head_dim) for h in drop.tolist()])
        else:
            idxs = torch.argsort(imp)[:n_remove]
        pruning_group = dg.get_pruning_group(root, fn, sorted(idxs.tolist()))
        if not dg.check_pruning_group(pruning_group):
            raise ModelError(f"internal: pruning '{name}' to {target} would empty a layer")
        pruning_group.prune()
        if keep_heads is not None:
            family.prune_head_extras(model, att.module, keep_heads)
    _resize_unused(model, reference, dg, handled)


def _resize_unused(model: nn.Module, reference: nn.Module, dg: tp.DependencyGraph, handled: set[str]) -> None:
    """Give modules whose output never reaches the logits (e.g. SwinBackbone's final `layernorm`) the
    pruned shape.

    They are invisible to the traced graph, so nothing decides which channels they keep; their values
    cannot affect outputs, so the freshly initialised tensors of the reference model are used.
    Parameters the family prunes itself (`handled`) are left alone.
    """
    ref_modules = dict(reference.named_modules())
    for name, mod in model.named_modules():
        if mod in dg.module2node or name not in ref_modules:
            continue
        ref = ref_modules[name]
        for key, tensor in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if f"{name}.{key}" in handled:
                continue
            ref_tensor = getattr(ref, key, None)
            if ref_tensor is not None and ref_tensor.shape != tensor.shape:
                new = ref_tensor.detach().clone()
                setattr(
                    mod,
                    key,
                    nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new,
                )


_SCALARS = (bool, int, float, str, type(None))


def _is_plain(value: Any) -> bool:
    """Scalars and (nested) lists/tuples of scalars: sizes, never modules or tensors."""
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _SCALARS)


def _stochastic_depth(mod: nn.Module) -> bool:
    """A drop-path module or the Identity that stands in for one at rate 0 (depth pruning changes which
    rate a config gives each kept block, SegFormer / Swin linearly by block index)."""
    return isinstance(mod, nn.Identity) or "DropPath" in type(mod).__name__


def _sync_attributes(model: nn.Module, reference: nn.Module) -> None:
    """Copy derived sizes (num_attention_heads, all_head_size, in/out features...) from the fresh model.

    Torch-Pruning updates Linear/Conv/Norm sizes but not the integers that HF blocks compute from the
    config in __init__; copying every plain attribute that differs from the reference module fixes all
    of them without a per-family list. Module configs are replaced by the pruned config objects.
    """
    ref_modules = dict(reference.named_modules())
    for name, mod in model.named_modules():
        ref = ref_modules.get(name)
        if ref is not None and _stochastic_depth(ref) and _stochastic_depth(mod):
            continue  # a kept block keeps its drop-path rate (Identity at rate 0); both are identity in eval
        if ref is None or type(ref) is not type(mod):
            raise ModelError(f"internal: pruned model structure differs at '{name}'")
        for key, value in vars(ref).items():
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, PreTrainedConfig) or (_is_plain(value) and getattr(mod, key, None) != value):
                setattr(mod, key, value)


@torch.no_grad()
def _check_against(model: PreTrainedModel, reference: PreTrainedModel, example_inputs: torch.Tensor) -> None:
    """The pruned model must load strictly into a fresh model of its config and give the same outputs."""
    try:
        reference.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as e:
        raise ModelError(f"internal: pruned weights do not fit the pruned config: {e}") from e
    reference.eval()
    a, b = _logits(model, example_inputs), _logits(reference, example_inputs)
    tol = 1e-4 * max(1.0, float(b.abs().max()))
    if a.shape != b.shape or float((a - b).abs().max()) > tol:
        raise ModelError("internal: pruned model and its config reload disagree")
