"""UperNet: a backbone (Swin, ResNet, or vitshrink's MobileViT backbone) + pyramid pooling / FPN decoder.

Everything backbone-specific (pruning rules, export patches) is delegated to the backbone's own family.
"""

from __future__ import annotations

from typing import Any

import transformers as T
from torch import nn

from ...errors import UnsupportedFamilyError
from .base import Family, Preset, family_for, family_names, find_family, register_family
from .resnet import RESNET_18, RESNET_18_MICRO
from .swin import SWIN_MICRO, SWIN_T
from .widths import kept_width

_SEG = ("segmentation",)
# Backbones whose UperNet decoder gets He-initialised convs (mmseg's ConvModule default) instead of
# transformers' N(0, 0.02): the students trained from scratch in a few epochs (UperNet-MobileViT-micro,
# aerial 128 px, 3 epochs: test mIoU 0.103 -> 0.117). The Swin teachers keep the transformers init their
# measured demo numbers were trained with.
_HE_DECODER = ("mobilevit", "resnet")


@register_family
class UperNetFamily(Family):
    name = "upernet"
    model_types = ("upernet",)
    width_pruning = True
    classes = {"segmentation": T.UperNetForSemanticSegmentation}
    presets = {
        "upernet-swin-micro": Preset(
            "upernet", _SEG, {"backbone": dict(SWIN_MICRO), "hidden_size": 64}, "swin"
        ),
        "upernet-swin-tiny": Preset(
            "upernet", _SEG, {"backbone": dict(SWIN_T), "hidden_size": 512}, "swin", "paper's teacher"
        ),
        # widths: mobilevit_backbone.UPERNET_MOBILEVIT_PRESETS (from families.mobilevit.MOBILEVIT_WIDTHS)
        "upernet-mobilevit-micro": Preset("upernet", _SEG, {"size": "micro"}, "mobilevit"),
        "upernet-mobilevit-xxs": Preset("upernet", _SEG, {"size": "xxs"}, "mobilevit"),
        "upernet-mobilevit-xs": Preset("upernet", _SEG, {"size": "xs"}, "mobilevit"),
        "upernet-mobilevit-s": Preset("upernet", _SEG, {"size": "s"}, "mobilevit", "paper's student"),
        # the CNN baseline (ResNet-18 class, like the paper's FANet); the decoder as wide as stage 2
        "upernet-resnet-18-micro": Preset(
            "upernet", _SEG, {"backbone": dict(RESNET_18_MICRO), "hidden_size": 32}, "resnet"
        ),
        "upernet-resnet-18": Preset(
            "upernet", _SEG, {"backbone": dict(RESNET_18), "hidden_size": 128}, "resnet", "CNN baseline"
        ),
    }
    efficient_for = ("segmentation",)

    # -- building -------------------------------------------------------------------------------------
    def build(self, preset, task, image_size, channels, num_labels, **overrides):
        if preset.backbone == "mobilevit":
            from ..mobilevit_backbone import build_upernet_mobilevit

            self.model_class(task)
            model = build_upernet_mobilevit(
                image_size, channels, num_labels, preset=preset.config["size"], **overrides
            )
        else:
            model = super().build(preset, task, image_size, channels, num_labels, **overrides)
        if preset.backbone in _HE_DECODER:
            he_init_decoder(model.decode_head)
        return model

    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        backbone = family_for(preset.backbone or "swin").backbone_config(
            dict(preset.config["backbone"]), image_size, channels
        )
        hidden = overrides.pop("hidden_size", preset.config.get("hidden_size", 512))
        return T.UperNetConfig(
            backbone_config=backbone,
            num_labels=num_labels,
            hidden_size=hidden,
            use_auxiliary_head=False,
            pool_scales=overrides.pop("pool_scales", [1, 2, 3, 6]),
            **overrides,
        )

    def before_load(self) -> None:
        # UperNet + MobileViT uses our registered backbone; registering before any load lets plain
        # `from_pretrained` resolve it.
        from ..mobilevit_backbone import register

        register()

    def task_of(self, hf_config: dict[str, Any]) -> str:
        return "segmentation"

    # -- running --------------------------------------------------------------------------------------
    def forward_kd(self, model, pixel_values, *, features=False, attentions=False):
        # One backbone pass gives both the pyramid maps (the features a student can match) and the
        # decoder logits at 1/4 resolution; the KD losses resize maps to a common size themselves.
        feats = model.backbone.forward_with_filtered_kwargs(pixel_values).feature_maps
        res: dict[str, Any] = {"logits": model.decode_head(feats)}
        if features:
            res["features"] = list(feats)
        return res

    def make_exportable(self, model, *, dynamic_size=False):
        from ...export.patches import unroll_adaptive_pooling

        backbone = find_family(_backbone_config(model))
        if backbone is not None and backbone is not self:
            backbone.make_exportable(model, dynamic_size=dynamic_size)
        # the PSP module pools to 1/2/3/6 bins, which the exporters cannot do on maps they do not divide
        return unroll_adaptive_pooling(model, dynamic_size=dynamic_size)

    def size_multiple(self, config):
        bb = getattr(config, "backbone_config", None)
        backbone = find_family(bb) if bb is not None else None
        return None if backbone is None or backbone is self else backbone.size_multiple(bb)

    def size_floor(self, config):
        bb = getattr(config, "backbone_config", None)
        backbone = find_family(bb) if bb is not None else None
        return 1 if backbone is None or backbone is self else backbone.size_floor(bb)

    # -- width pruning: the backbone by its own family's rules, the decoder channels by `ratio` ---------
    def _backbone(self, cfg: Any) -> Family:
        bt = getattr(_backbone_config(cfg), "model_type", None)
        fam = find_family(bt or "")
        if fam is None or not fam.prunable_backbone:
            supported = family_names(lambda f: f.prunable_backbone)
            raise UnsupportedFamilyError(f"upernet with backbone '{bt}'", "prune", supported)
        return fam

    def check_prunable(self, config):
        self._backbone(config)  # fail early on an unsupported backbone

    def rewrite(self, cfg, ratio, gran, round_to, r_mlp):
        self._backbone(cfg).rewrite(cfg.backbone_config, ratio, gran, round_to, r_mlp)
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


def he_init_decoder(head: nn.Module) -> None:
    """mmseg's UperNet init: He (fan_out) convs with zero biases, the classifier N(0, 0.01)."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(head.classifier.weight, std=0.01)  # small logits: no class favoured at the start


def _backbone_config(model_or_config: Any) -> Any:
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "backbone_config", None)
