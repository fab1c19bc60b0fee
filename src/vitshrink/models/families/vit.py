"""ViT and DeiT: one stack of identical blocks, patch size chosen from the image size.

DeiT differs only in its transformers classes and its optional distillation token (two heads).
"""

from __future__ import annotations

from typing import Any

import transformers as T
from torch import nn

from .base import BlockStage, Family, Preset, register_family
from .widths import kept_heads, kept_width


def vit_patch_size(image_size: int) -> int:
    """Patch size giving a token grid a CPU can afford: 16 at >=160 px, 8 at >=64 px, else 4."""
    if image_size >= 160:
        return 16
    if image_size >= 64:
        return 8
    return 4


def _vit(hidden: int, layers: int, heads: int, mlp: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
    }


_CLS = ("classification",)


@register_family
class ViTFamily(Family):
    name = "vit"
    model_types = ("vit",)
    width_pruning = True
    classes = {"classification": T.ViTForImageClassification}
    config_cls: type = T.ViTConfig
    depth_pruning = True
    presets = {
        "vit-micro": Preset("vit", _CLS, _vit(64, 4, 2, 128), note="~0.2M, tests/demos"),
        "vit-mini": Preset("vit", _CLS, _vit(128, 6, 4, 384), note="~1.2M"),
        "vit-tiny": Preset("vit", _CLS, _vit(192, 12, 3, 768)),
        "vit-small": Preset("vit", _CLS, _vit(384, 12, 6, 1536)),
        "vit-base": Preset("vit", _CLS, _vit(768, 12, 12, 3072)),
    }

    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        kw = dict(preset.config)
        kw.setdefault("patch_size", vit_patch_size(image_size))
        kw.update(image_size=image_size, num_channels=channels, num_labels=num_labels)
        kw.update(overrides)
        return self.config_cls(**kw)

    def rewrite(self, cfg, ratio, gran, round_to, r_mlp):
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

    def depth_stages(self, model: nn.Module) -> list[BlockStage]:
        base = model.base_model
        # transformers 5 keeps the blocks in `layers`, 4.x in `encoder.layer`
        owner, name = (base, "layers") if hasattr(base, "layers") else (base.encoder, "layer")
        return [(getattr(owner, name), lambda m: setattr(owner, name, m))]

    def set_depths(self, config, depths):
        config.num_hidden_layers = depths[0]


@register_family
class DeiTFamily(ViTFamily):
    name = "deit"
    model_types = ("deit",)
    classes = {"classification": T.DeiTForImageClassification}
    config_cls = T.DeiTConfig
    presets = {
        "deit-micro": Preset("deit", _CLS, _vit(64, 4, 2, 128)),
        "deit-tiny": Preset("deit", _CLS, _vit(192, 12, 3, 768)),
        "deit-small": Preset("deit", _CLS, _vit(384, 12, 6, 1536)),
        "deit-base": Preset("deit", _CLS, _vit(768, 12, 12, 3072)),
    }

    def kd_logits(self, out):
        if getattr(out, "distillation_logits", None) is None:
            return super().kd_logits(out)
        # With a distillation token the class-token head learns from labels, the distillation head
        # from the teacher (their average is the inference output).
        return {"logits": out.cls_logits, "dist_logits": out.distillation_logits}

    def distillation_student(self, model, losses):
        if not {"dist-token", "hard"} & set(losses) or isinstance(
            model, T.DeiTForImageClassificationWithTeacher
        ):
            return model
        # A distillation token needs DeiT's two-head model; its embeddings already carry the token.
        two_head = T.DeiTForImageClassificationWithTeacher(model.config)
        two_head.deit.load_state_dict(model.deit.state_dict())
        return two_head.eval()
