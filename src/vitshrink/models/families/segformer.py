"""SegFormer (MiT encoder + all-MLP decoder): per-stage hidden_sizes / num_attention_heads / mlp_ratios."""

from __future__ import annotations

import math

import transformers as T
from torch import nn

from .base import BlockStage, Family, Preset, register_family
from .widths import kept_heads, kept_width

_SEG = ("segmentation",)
_B0 = {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "num_attention_heads": [1, 2, 5, 8]}
_B1 = {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "num_attention_heads": [1, 2, 5, 8]}
_MICRO = {"hidden_sizes": [16, 32, 64, 96], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2]}


@register_family
class SegformerFamily(Family):
    name = "segformer"
    model_types = ("segformer",)
    width_pruning = True
    classes = {
        "segmentation": T.SegformerForSemanticSegmentation,
        "classification": T.SegformerForImageClassification,
    }
    presets = {
        "segformer-micro": Preset("segformer", _SEG, {**_MICRO, "decoder_hidden_size": 64}),
        "segformer-b0": Preset("segformer", _SEG, {**_B0, "decoder_hidden_size": 256}),
        "segformer-b1": Preset("segformer", _SEG, {**_B1, "decoder_hidden_size": 256}),
    }
    efficient_for = ("segmentation",)
    coupled_heads_embed = True
    depth_pruning = True

    def size_multiple(self, config):
        return 1  # convolutions and sequence-reduced attention: any input size

    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        kw = dict(preset.config)
        kw.update(num_channels=channels, num_labels=num_labels, image_size=image_size)
        kw.update(overrides)
        return T.SegformerConfig(**kw)

    def rewrite(self, cfg, ratio, gran, round_to, r_mlp):
        hidden, heads, mlp = list(cfg.hidden_sizes), list(cfg.num_attention_heads), list(cfg.mlp_ratios)
        if self.coupled(gran):
            new_hidden, new_heads = [], []
            for h, n in zip(hidden, heads):
                k = kept_heads(n, ratio, [h // n], round_to)
                new_heads.append(k)
                new_hidden.append(k * (h // n))
            cfg.hidden_sizes, cfg.num_attention_heads = new_hidden, new_heads
        # MLP width = hidden * mlp_ratio, and mlp_ratios is list[int] in the (strict) config, so the MLP
        # width can only move in steps of the stage width: take the integer ratio closest to the target,
        # never wider than the trained MLP (160 * 4 over 96 kept would round 6.67 up to 672 > 640).
        cfg.mlp_ratios = [
            max(1, min(math.floor(h * m * (1 - r_mlp) / h_new + 0.5), (h * m) // h_new))
            for h, m, h_new in zip(hidden, mlp, cfg.hidden_sizes)
        ]
        if "channels" in gran:
            cfg.decoder_hidden_size = kept_width(cfg.decoder_hidden_size, ratio, round_to)

    def depth_stages(self, model: nn.Module) -> list[BlockStage]:
        return [(st.blocks, lambda m, st=st: setattr(st, "blocks", m)) for st in model.base_model.stages]
