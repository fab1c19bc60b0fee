"""Per-family pruning rules, looked up by ``config.model_type`` (one small class per family).

A family only decides *what a pruned config looks like*; the graph surgery itself is generic
(``prune.core``): the new config is instantiated and every prunable width is cut down to the width that
config implies, so whatever we produce reloads with a plain ``from_pretrained``.

transformers rebuilds every layer from one config, so widths must be uniform per layer (per stage for
hierarchical models) and, where the head size is derived from the width (Swin, SegFormer, MobileViT:
``head_dim = width / heads``), heads and embedding width can only shrink together in whole heads.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import nn
from transformers import PreTrainedConfig

from ..errors import UnsupportedFamilyError, VitshrinkError

GRANULARITIES = ("heads", "mlp", "embed", "channels")


# -- width arithmetic -----------------------------------------------------------------------------------
def kept_width(width: int, ratio: float, round_to: int) -> int:
    """Width left after removing `ratio` of `width`, rounded to the nearest multiple of `round_to`.

    Never below one step and never wider than `width`; widths narrower than `round_to` move in steps of 1.
    """
    if ratio <= 0:
        return width
    target = width * (1.0 - ratio)
    step = round_to if round_to > 1 and width >= round_to else 1
    kept = max(step, math.floor(target / step + 0.5) * step)
    return min(kept, width)


def kept_heads(
    heads: int,
    ratio: float,
    head_dims: Sequence[int],
    round_to: int,
    valid: Callable[[int], bool] | None = None,
) -> int:
    """Number of heads to keep (whole heads; head size unchanged).

    Among admissible counts (1..heads, filtered by `valid`) pick the one closest to heads*(1-ratio),
    preferring counts whose resulting widths (count * head_dim) are multiples of `round_to`; on a tie
    the larger count (e.g. 3 heads at ratio 0.5 keep 2).
    """
    if ratio <= 0:
        return heads
    target = heads * (1.0 - ratio)
    cands = [k for k in range(1, heads + 1) if valid is None or valid(k)]
    if not cands:
        return heads

    def score(k: int) -> tuple[int, float, int]:
        aligned = round_to <= 1 or all((k * d) % round_to == 0 for d in head_dims)
        return (0 if aligned else 1, abs(k - target), -k)

    return min(cands, key=score)


def ratio_for_width(width: int, base: int) -> float:
    """Smallest float r with int(r * base) == width (config ratios are applied as int(r * dim))."""
    r = width / base
    while int(r * base) < width:  # float division can land just below the integer
        r = math.nextafter(r, math.inf)
    return r


# -- families -------------------------------------------------------------------------------------------
class Family:
    """Base class: subclasses rewrite the config; the defaults cover plain attention blocks."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    # heads and embed dims can only shrink together (head size derived from the width)
    coupled_heads_embed: ClassVar[bool] = False

    def rewrite_config(
        self,
        config: PreTrainedConfig,
        ratio: float,
        granularity: set[str],
        round_to: int,
        ratio_mlp: float | None = None,
    ) -> PreTrainedConfig:
        """Return a pruned deep copy of `config` (the original is not modified).

        `ratio_mlp` prunes the MLP hidden widths by their own ratio (default `ratio`): heads move in
        whole heads, so a parameter budget is met exactly only by also setting the fine-grained axis.
        """
        new = copy.deepcopy(config)
        r_mlp = ratio if ratio_mlp is None else ratio_mlp
        self._rewrite(new, ratio, granularity, round_to, r_mlp if "mlp" in granularity else 0.0)
        return new

    def _rewrite(
        self, cfg: PreTrainedConfig, ratio: float, gran: set[str], round_to: int, r_mlp: float
    ) -> None:
        raise NotImplementedError

    def _coupled(self, gran: set[str]) -> bool:
        """For coupled families, heads and embed are one axis: both or neither."""
        wanted = {"heads", "embed"} & gran
        if len(wanted) == 1:
            raise VitshrinkError(
                f"{self.name}: head size is derived from the width, so 'heads' and 'embed' must be pruned "
                f"together (granularity has only '{wanted.pop()}')"
            )
        return bool(wanted)

    # hooks used by core ----------------------------------------------------------------------------
    def customized_pruners(self, model: nn.Module) -> dict[Any, Any]:
        return {}

    def ignored_params(self, model: nn.Module) -> list[nn.Parameter]:
        return []

    def prune_head_extras(self, model: nn.Module, attention: nn.Module, keep_heads: torch.Tensor) -> None:
        """Prune per-head tensors the dependency graph cannot see (called once per attention module)."""

    def extra_outputs(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose outputs are not part of `logits` but whose inputs get pruned (traced too)."""
        return []

    def spatial_slice_dims(self, model: nn.Module) -> tuple[int, ...]:
        """Dims of 4-D tensors that are spatial although Torch-Pruning takes them for channels."""
        return ()


class ViTFamily(Family):
    name = "vit"
    model_types = ("vit",)

    def _rewrite(self, cfg, ratio, gran, round_to, r_mlp):
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        if "heads" in gran:
            cfg.num_attention_heads = kept_heads(heads, ratio, [head_dim], round_to)
        # transformers' ViT/DeiT read config.head_dim, so the head size survives any hidden width
        cfg.head_dim = head_dim
        if "embed" in gran:
            cfg.hidden_size = kept_width(hidden, ratio, round_to)
            if getattr(cfg, "pooler_output_size", None) == hidden:  # derived default in __post_init__
                cfg.pooler_output_size = cfg.hidden_size
        cfg.intermediate_size = kept_width(cfg.intermediate_size, r_mlp, round_to)


class DeiTFamily(ViTFamily):
    name = "deit"
    model_types = ("deit",)


class SwinFamily(Family):
    """Swin: stage i has width embed_dim * 2**i and num_heads[i] heads; one global mlp_ratio."""

    name = "swin"
    model_types = ("swin",)
    coupled_heads_embed = True

    def _rewrite(self, cfg, ratio, gran, round_to, r_mlp):
        embed, heads = cfg.embed_dim, list(cfg.num_heads)
        dims = [embed * 2**i for i in range(len(heads))]
        head_dims = [d // h for d, h in zip(dims, heads)]
        mlp_old = [int(cfg.mlp_ratio * d) for d in dims]
        if self._coupled(gran):
            # stage-0 head count k fixes embed_dim = k * head_dim_0; every stage must keep whole heads
            k = kept_heads(
                heads[0],
                ratio,
                head_dims,
                round_to,
                valid=lambda k: all(h * k % heads[0] == 0 for h in heads),
            )
            cfg.embed_dim = k * head_dims[0]
            cfg.num_heads = [h * k // heads[0] for h in heads]
            cfg.hidden_size = int(cfg.embed_dim * 2 ** (len(cfg.depths) - 1))  # derived in __post_init__
        width0 = kept_width(mlp_old[0], r_mlp, round_to)
        cfg.mlp_ratio = ratio_for_width(width0, cfg.embed_dim)

    def customized_pruners(self, model):
        from transformers.models.swin.modeling_swin import SwinPatchMerging

        return {SwinPatchMerging: SwinPatchMergingPruner()}

    def spatial_slice_dims(self, model):
        # Swin slices (B, H, W, C) maps on H and W (padding crop, 2x2 patch merging)
        return (1, 2)

    def ignored_params(self, model):
        return [
            m.relative_position_bias_table
            for m in model.modules()
            if hasattr(m, "relative_position_bias_table")
        ]

    def prune_head_extras(self, model, attention, keep_heads):
        # The relative-position table (positions x heads) reaches the scores through an index/permute
        # chain the dependency graph cannot map to head channels, so its head columns are cut here.
        bias = getattr(attention, "relative_position_bias", None)
        table = getattr(bias, "relative_position_bias_table", None)
        if table is not None:
            with torch.no_grad():
                kept = table.index_select(1, keep_heads.to(table.device)).contiguous()
            bias.relative_position_bias_table = nn.Parameter(kept, requires_grad=table.requires_grad)


class SwinPatchMergingPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner for Swin patch merging (2x2 neighbours concatenated on channels, then Linear).

    Needed because the dependency graph maps the strided spatial slices of the (B, H, W, C) map to
    channel slices (it assumes channels-first for 4-D tensors). Same approach as Torch-Pruning's own
    examples/transformers/prune_hf_swin.py.
    """

    @staticmethod
    def _dim(layer: nn.Module) -> int:
        return layer.reduction.in_features // 4

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        tp.prune_linear_out_channels(layer.reduction, list(idxs))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        dim = self._dim(layer)
        # torch.cat of 4 neighbour maps: input channel c sits at c, c+dim, c+2dim and c+3dim
        rep = [i + k * dim for k in range(4) for i in idxs]
        tp.prune_linear_in_channels(layer.reduction, rep)
        tp.prune_layernorm_out_channels(layer.norm, rep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return self._dim(layer)


class SegformerFamily(Family):
    """SegFormer (MiT): per-stage hidden_sizes / num_attention_heads / integer mlp_ratios + MLP decoder."""

    name = "segformer"
    model_types = ("segformer",)
    coupled_heads_embed = True

    def _rewrite(self, cfg, ratio, gran, round_to, r_mlp):
        hidden, heads, mlp = list(cfg.hidden_sizes), list(cfg.num_attention_heads), list(cfg.mlp_ratios)
        if self._coupled(gran):
            new_hidden, new_heads = [], []
            for h, n in zip(hidden, heads):
                k = kept_heads(n, ratio, [h // n], round_to)
                new_heads.append(k)
                new_hidden.append(k * (h // n))
            cfg.hidden_sizes, cfg.num_attention_heads = new_hidden, new_heads
        # MLP width = hidden * mlp_ratio, and mlp_ratios is list[int] in the (strict) config, so the MLP
        # width can only move in steps of the stage width: take the integer ratio closest to the target.
        cfg.mlp_ratios = [
            max(1, math.floor(h * m * (1 - r_mlp) / h_new + 0.5))
            for h, m, h_new in zip(hidden, mlp, cfg.hidden_sizes)
        ]
        if "channels" in gran:
            cfg.decoder_hidden_size = kept_width(cfg.decoder_hidden_size, ratio, round_to)


class MobileViTFamily(Family):
    """MobileViT: conv widths (neck_hidden_sizes), per-stage transformer widths, one global head count."""

    name = "mobilevit"
    model_types = ("mobilevit", "vitshrink_mobilevit_backbone")
    coupled_heads_embed = True

    def _rewrite(self, cfg, ratio, gran, round_to, r_mlp):
        hidden, heads = list(cfg.hidden_sizes), cfg.num_attention_heads
        head_dims = [h // heads for h in hidden]
        mlp_old = [int(h * cfg.mlp_ratio) for h in hidden]
        if self._coupled(gran):
            k = kept_heads(heads, ratio, head_dims, round_to)
            cfg.num_attention_heads = k
            cfg.hidden_sizes = [k * d for d in head_dims]
        width0 = kept_width(mlp_old[0], r_mlp, round_to)
        cfg.mlp_ratio = ratio_for_width(width0, cfg.hidden_sizes[0])
        if "channels" in gran:
            # stride-1 blocks: layer1 always; layer4/5 when dilated for output_stride 8/16 (segmentation)
            pairs = [0] + {8: [3, 4], 16: [4]}.get(getattr(cfg, "output_stride", 32), [])
            cfg.neck_hidden_sizes = _keep_distinct(list(cfg.neck_hidden_sizes), ratio, round_to, pairs)
            if hasattr(cfg, "aspp_out_channels"):
                cfg.aspp_out_channels = kept_width(cfg.aspp_out_channels, ratio, round_to)


def _keep_distinct(widths: list[int], ratio: float, round_to: int, pairs: Sequence[int]) -> list[int]:
    """Shrink stage widths without creating or removing an equality between stage i and i+1 (i in pairs).

    MobileViT adds a residual to a stride-1 block exactly where its in and out widths match, so a pruned
    config that made such neighbours equal, or different, would build a different network.
    """
    new = [kept_width(w, ratio, round_to) for w in widths]
    for i in pairs:
        a, b = widths[i], widths[i + 1]
        if (a == b) == (new[i] == new[i + 1]):
            continue
        if a == b:
            new[i + 1] = new[i]
            continue
        step = round_to if round_to > 1 else 1
        if new[i + 1] + step <= b:
            new[i + 1] += step
        elif new[i] + step <= a:
            new[i] += step
        else:  # cannot stay distinct without growing: leave this width unpruned
            new[i + 1] = b
    return new


class UperNetFamily(Family):
    """UperNet: prune the backbone with its own family's rules, the decoder channels by `ratio`."""

    name = "upernet"
    model_types = ("upernet",)

    def _backbone(self, cfg: PreTrainedConfig) -> Family:
        bb = getattr(cfg, "backbone_config", None)
        bt = getattr(bb, "model_type", None)
        fam = _REGISTRY.get(bt or "")
        if fam is None or isinstance(fam, UperNetFamily) or fam.name in ("vit", "deit"):
            raise UnsupportedFamilyError(f"upernet with backbone '{bt}'", "prune", ["swin", "mobilevit"])
        return fam

    def _rewrite(self, cfg, ratio, gran, round_to, r_mlp):
        self._backbone(cfg)._rewrite(cfg.backbone_config, ratio, gran, round_to, r_mlp)
        if "channels" in gran:
            cfg.hidden_size = kept_width(cfg.hidden_size, ratio, round_to)
            cfg.auxiliary_channels = kept_width(cfg.auxiliary_channels, ratio, round_to)

    def customized_pruners(self, model):
        return self._backbone(model.config).customized_pruners(model)

    def ignored_params(self, model):
        return self._backbone(model.config).ignored_params(model)

    def spatial_slice_dims(self, model):
        return self._backbone(model.config).spatial_slice_dims(model)

    def prune_head_extras(self, model, attention, keep_heads):
        self._backbone(model.config).prune_head_extras(model, attention, keep_heads)

    def extra_outputs(self, model):
        # The auxiliary FCN head only feeds the training loss, so it is absent from `logits`; trace it
        # explicitly or its input channels would not follow the backbone's.
        aux = getattr(model, "auxiliary_head", None)
        return [aux] if aux is not None else []


_REGISTRY: dict[str, Family] = {}
for _cls in (ViTFamily, DeiTFamily, SwinFamily, SegformerFamily, MobileViTFamily, UperNetFamily):
    _inst = _cls()
    for _t in _cls.model_types:
        _REGISTRY[_t] = _inst


def supported_families() -> list[str]:
    return sorted({f.name for f in _REGISTRY.values()})


def family_for(model_or_config: nn.Module | PreTrainedConfig) -> Family:
    """The pruning rules for a model (or config); UnsupportedFamilyError if there are none."""
    cfg = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(cfg, "model_type", None) or type(model_or_config).__name__
    fam = _REGISTRY.get(model_type)
    if fam is None:
        raise UnsupportedFamilyError(model_type, "prune", supported_families())
    if isinstance(fam, UperNetFamily):
        fam._backbone(cfg)  # fail early on an unsupported backbone
    return fam
