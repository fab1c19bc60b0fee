"""MobileViT: conv widths (neck_hidden_sizes), per-stage transformer widths, one global head count.

Also owns the MobileViT backbone that UperNet uses (``models/mobilevit_backbone.py``, model_type
`BACKBONE_MODEL_TYPE`): its pruning rules are this family's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import transformers as T
from torch import nn

from .base import Family, Preset, register_family
from .widths import kept_heads, kept_width, ratio_for_width

BACKBONE_MODEL_TYPE = "vitshrink_mobilevit_backbone"

# The one table of MobileViT widths: the published ones (Mehta & Rastegari 2022; HF apple/mobilevit-*
# configs, expand_ratio 2 for XXS) and "micro", ours: a few hundred K params so tests and demos run on a
# 2-core CPU. The classifiers and UperNet's MobileViT backbone both read it.
MOBILEVIT_WIDTHS: dict[str, dict[str, Any]] = {
    "micro": {
        "hidden_sizes": [32, 48, 64],
        "neck_hidden_sizes": [8, 16, 24, 32, 48, 64, 160],
        "expand_ratio": 2.0,
    },
    "xxs": {
        "hidden_sizes": [64, 80, 96],
        "neck_hidden_sizes": [16, 16, 24, 48, 64, 80, 320],
        "expand_ratio": 2.0,
    },
    "xs": {
        "hidden_sizes": [96, 120, 144],
        "neck_hidden_sizes": [16, 32, 48, 64, 80, 96, 384],
        "expand_ratio": 4.0,
    },
    "s": {
        "hidden_sizes": [144, 192, 240],
        "neck_hidden_sizes": [16, 32, 64, 96, 128, 160, 640],
        "expand_ratio": 4.0,
    },
}


def _preset(size: str, **extra: Any) -> Preset:
    return Preset("mobilevit", ("classification", "segmentation"), {**MOBILEVIT_WIDTHS[size], **extra})


def reset_batchnorm(model: nn.Module) -> nn.Module:
    """Standard BatchNorm init (weight 1, bias 0).

    transformers' MobileViT init draws BatchNorm weights around 0.02, which shrinks activations ~50x
    per block: from scratch the model predicts one class for several epochs (measured on the aerial set:
    mIoU stuck at 0.03 for 6 epochs).
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@register_family
class MobileViTFamily(Family):
    name = "mobilevit"
    model_types = ("mobilevit", BACKBONE_MODEL_TYPE)
    width_pruning = True
    classes = {
        "classification": T.MobileViTForImageClassification,
        "segmentation": T.MobileViTForSemanticSegmentation,
    }
    presets = {
        "mobilevit-micro": _preset("micro", num_attention_heads=2),
        "mobilevit-xxs": _preset("xxs"),
        "mobilevit-xs": _preset("xs"),
        "mobilevit-s": _preset("s"),
    }
    efficient_for = ("classification",)
    coupled_heads_embed = True
    prunable_backbone = True

    def build(self, preset, task, image_size, channels, num_labels, **overrides):
        return reset_batchnorm(super().build(preset, task, image_size, channels, num_labels, **overrides))

    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        kw = dict(preset.config)
        kw.update(image_size=image_size, num_channels=channels, num_labels=num_labels)
        if task == "segmentation":
            kw.setdefault("aspp_out_channels", max(64, kw["neck_hidden_sizes"][-1] // 2))
        kw.update(overrides)
        return T.MobileViTConfig(**kw)

    def make_exportable(self, model, *, dynamic_size=False):
        # the segmentation head's ASPP pools globally with nn.AdaptiveAvgPool2d
        from ...export.patches import unroll_adaptive_pooling

        return unroll_adaptive_pooling(model, dynamic_size=dynamic_size)

    def size_multiple(self, config):
        # patches of patch_size unfold maps down to stride 32; elsewhere it interpolates to a traced size
        return 32 * int(getattr(config, "patch_size", 2))

    def rewrite(self, cfg, ratio, gran, round_to, r_mlp):
        hidden, heads = list(cfg.hidden_sizes), cfg.num_attention_heads
        head_dims = [h // heads for h in hidden]
        mlp_old = [int(h * cfg.mlp_ratio) for h in hidden]
        if self.coupled(gran):
            k = kept_heads(heads, ratio, head_dims, round_to)
            cfg.num_attention_heads = k
            cfg.hidden_sizes = [k * d for d in head_dims]
        width0 = kept_width(mlp_old[0], r_mlp, round_to)
        cfg.mlp_ratio = ratio_for_width(width0, cfg.hidden_sizes[0])
        if "channels" in gran:
            # stride-1 blocks: layer1 always; layer4/5 when dilated for output_stride 8/16 (segmentation)
            pairs = [0] + {8: [3, 4], 16: [4]}.get(getattr(cfg, "output_stride", 32), [])
            cfg.neck_hidden_sizes = keep_distinct(list(cfg.neck_hidden_sizes), ratio, round_to, pairs)
            if hasattr(cfg, "aspp_out_channels"):
                cfg.aspp_out_channels = kept_width(cfg.aspp_out_channels, ratio, round_to)


def keep_distinct(widths: list[int], ratio: float, round_to: int, pairs: Sequence[int]) -> list[int]:
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
