"""ResNet (transformers' `ResNetForImageClassification` / `ResNetBackbone`): the CNN baseline family.

A CNN has one prunable axis, conv channels. transformers rebuilds a ResNet from `embedding_size` (stem)
and one `hidden_sizes` entry per stage, so widths are pruned per stage: each stage's residual stream
and, with it, the inner width of its basic blocks (= the stage width; bottleneck blocks derive theirs
as width / 4). Per-block widths cannot be written in the config, so they are not pruned separately.
Depth pruning removes whole residual blocks, never a stage's first one (it changes width/stride).
As UperNet's backbone (``upernet-resnet-*``) it lends UperNet these same rules.
"""

from __future__ import annotations

from typing import Any

import transformers as T
from torch import nn

from ...errors import VitshrinkError
from .base import BlockStage, Family, Preset, register_family
from .mobilevit import keep_distinct

_BASIC = {"layer_type": "basic", "downsample_in_first_stage": False}
# Published torchvision/HF shapes (He et al. 2016): stem 64, stages 64-128-256-512.
RESNET_18 = {**_BASIC, "embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2]}
RESNET_34 = {**_BASIC, "embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [3, 4, 6, 3]}
# Ours, for tests and the 2-core CPU demo: the same depths at a quarter of the width.
_QUARTER = {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128]}
RESNET_18_MICRO = {**RESNET_18, **_QUARTER}
RESNET_34_MICRO = {**RESNET_34, **_QUARTER}

_CLS = ("classification",)


@register_family
class ResNetFamily(Family):
    name = "resnet"
    model_types = ("resnet",)
    classes = {"classification": T.ResNetForImageClassification}
    presets = {
        "resnet-18-micro": Preset("resnet", _CLS, RESNET_18_MICRO, note="~0.7M, CNN baseline for demos"),
        "resnet-34-micro": Preset("resnet", _CLS, RESNET_34_MICRO),
        "resnet-18": Preset("resnet", _CLS, RESNET_18, note="11.7M, the paper's CNN-baseline class"),
        "resnet-34": Preset("resnet", _CLS, RESNET_34),
    }
    width_pruning = True
    depth_pruning = True
    prunable_backbone = True

    # -- building -------------------------------------------------------------------------------------
    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        kw = {**preset.config, "num_channels": channels, "num_labels": num_labels, **overrides}
        return T.ResNetConfig(**kw)

    def backbone_config(self, spec: dict[str, Any], image_size: int, channels: int) -> Any:
        n = len(spec["depths"])
        return T.ResNetConfig(
            **{**_BASIC, **spec}, num_channels=channels, out_features=[f"stage{i + 1}" for i in range(n)]
        )

    # -- running --------------------------------------------------------------------------------------
    def forward_kd(self, model, pixel_values, *, features=False, attentions=False):
        if attentions:
            raise VitshrinkError(
                f"{self.name} is a CNN: it has no attention maps to distil (drop loss 'attention')"
            )
        # features: the stage outputs (B, C, H, W), which the feature/CWD losses resize and project
        return super().forward_kd(model, pixel_values, features=features)

    # -- export ---------------------------------------------------------------------------------------
    def size_multiple(self, config):
        # five stride-2 steps; other sizes run too, but then the maps' rounding depends on the size
        return 32

    # -- width pruning: channels only -----------------------------------------------------------------
    def rewrite(self, cfg, ratio, gran, round_to, r_mlp):
        if "channels" not in gran:
            raise VitshrinkError(
                f"{self.name} is a CNN: it has no attention heads, MLP or token widths "
                f"(granularity {','.join(sorted(gran))}); prune it with granularity 'channels'"
            )
        widths = [cfg.embedding_size, *cfg.hidden_sizes]
        # The first block of stage 1 has an identity shortcut exactly where stem and stage-1 widths match
        # (and it does not downsample): keep that (in)equality or the config would build another network.
        pairs = [] if cfg.downsample_in_first_stage else [0]
        new = keep_distinct(widths, ratio, round_to, pairs)
        cfg.embedding_size, cfg.hidden_sizes = new[0], new[1:]

    # -- depth pruning: every block of a stage but its first (which changes width and stride) ----------
    def depth_stages(self, model: nn.Module) -> list[BlockStage]:
        stages = _encoder(model).stages
        out: list[BlockStage] = []
        for st in stages:
            first, rest = st.layers[0], nn.ModuleList(list(st.layers)[1:])

            def replace(kept: nn.ModuleList, st: nn.Module = st, first: nn.Module = first) -> None:
                st.layers = nn.Sequential(first, *kept)  # same state-dict keys as from_pretrained's

            out.append((rest, replace))
        return out

    def set_depths(self, config, depths):
        cfg = getattr(config, "backbone_config", None) or config
        cfg.depths = [d + 1 for d in depths]  # depth_stages leaves out each stage's first block


def _encoder(model: nn.Module) -> nn.Module:
    base = getattr(model, "resnet", None) or getattr(model, "backbone", None) or model
    return base.encoder
