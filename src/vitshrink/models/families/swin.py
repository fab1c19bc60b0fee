"""Swin: hierarchical stages (width embed_dim * 2**i, num_heads[i] heads), shifted windows, patch merging."""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
import transformers as T
from torch import nn

from .base import BlockStage, Family, Preset, register_family
from .widths import kept_heads, kept_width, ratio_for_width

SWIN_T = {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}
SWIN_MICRO = {"embed_dim": 32, "depths": [2, 2, 2], "num_heads": [1, 2, 4], "window_size": 4}


# -- export patch ---------------------------------------------------------------------------------------
# Swin's shifted-window mask is -100 in transformers; after softmax those weights are ~e^-100 ~ 4e-44,
# float32 subnormals, and x86 subnormal arithmetic is microcoded: on onnxruntime CPU the probs @ V
# MatMul of every shifted block ran 10-35x slower than the same MatMul in a plain block (Swin-T: 13 of
# 59 ms). At -1e4 they underflow to exact zeros; the kept weights differ by < 1e-40 (and -1e4 still
# fits float16 for TensorRT / fp16 exports).
SHIFT_MASK_FILL = -1e4


def _zero_underflow_mask(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    mask = type(self).get_attn_mask(self, *args, **kwargs)
    return None if mask is None else mask.masked_fill(mask < 0, SHIFT_MASK_FILL)


def zero_underflow_shift_masks(model: nn.Module) -> nn.Module:
    """Shifted-window blocks (those with `get_attn_mask`) mask with SHIFT_MASK_FILL instead (in place)."""
    for mod in model.modules():
        # bound per instance, so deepcopy and pickle follow the module
        if callable(getattr(type(mod), "get_attn_mask", None)) and "get_attn_mask" not in vars(mod):
            mod.get_attn_mask = types.MethodType(_zero_underflow_mask, mod)
    return model


@register_family
class SwinFamily(Family):
    name = "swin"
    model_types = ("swin",)
    width_pruning = True
    classes = {"classification": T.SwinForImageClassification}
    presets = {
        "swin-micro": Preset("swin", ("classification",), dict(SWIN_MICRO)),
        "swin-tiny": Preset("swin", ("classification",), dict(SWIN_T)),
    }
    coupled_heads_embed = True
    # from_pretrained gives block i a shifted window iff i is odd: blocks go in (plain, shifted) pairs
    depth_pruning = True
    paired_blocks = True
    prunable_backbone = True

    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        kw = dict(preset.config)
        kw.setdefault("patch_size", 2 if image_size < 64 else 4)
        kw.update(image_size=image_size, num_channels=channels, num_labels=num_labels)
        kw.update(overrides)
        return T.SwinConfig(**kw)

    def backbone_config(self, spec, image_size, channels):
        bb = {**spec, "image_size": image_size, "num_channels": channels, "patch_size": 4}
        return T.SwinConfig(**bb, out_features=[f"stage{i + 1}" for i in range(len(bb["depths"]))])

    def make_exportable(self, model, *, dynamic_size=False):
        return zero_underflow_shift_masks(model)

    def size_multiple(self, config):
        # The traced graph keeps the padding to whole windows it computed at the export size: exact
        # only where no stage pads, i.e. at multiples of patch x window x the stages' 2x downsampling.
        return int(config.patch_size) * int(config.window_size) * 2 ** (len(config.depths) - 1)

    def size_floor(self, config):
        # A stage no larger than its window drops the shift and shrinks the window (transformers'
        # set_shift_and_window_size): a graph traced with or without that clamp is wrong on the other
        # side of it, so every stage must be larger than its window, which two multiples guarantee.
        return 2 * self.size_multiple(config)

    # -- width pruning --------------------------------------------------------------------------------
    def rewrite(self, cfg, ratio, gran, round_to, r_mlp):
        embed, heads = cfg.embed_dim, list(cfg.num_heads)
        dims = [embed * 2**i for i in range(len(heads))]
        head_dims = [d // h for d, h in zip(dims, heads)]
        mlp_old = [int(cfg.mlp_ratio * d) for d in dims]
        if self.coupled(gran):
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

    # -- depth pruning --------------------------------------------------------------------------------
    def depth_stages(self, model: nn.Module) -> list[BlockStage]:
        return [
            (st.blocks, lambda m, st=st: setattr(st, "blocks", m)) for st in model.base_model.encoder.layers
        ]


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
