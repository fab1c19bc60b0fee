"""One adapter per model family: every family quirk lives here, looked up by ``config.model_type``.

Stages never branch on the family; they ask the adapter to build a config, run the model to logits
(segmentation maps at input size), expose features for distillation and wrap it for export.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

from ..errors import UnsupportedFamilyError
from .presets import Preset, vit_patch_size


class Adapter:
    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    classes: ClassVar[dict[str, type]] = {}  # task -> transformers class

    # -- building -------------------------------------------------------------------------------
    def build(
        self, preset: Preset, task: str, image_size: int, channels: int, num_labels: int, **overrides: Any
    ) -> nn.Module:
        cfg = self.config(preset, task, image_size, channels, num_labels, **overrides)
        cls = self.model_class(task)
        return cls(cfg)

    def config(
        self, preset: Preset, task: str, image_size: int, channels: int, num_labels: int, **overrides: Any
    ):
        raise NotImplementedError

    def model_class(self, task: str) -> type:
        if task not in self.classes:
            raise UnsupportedFamilyError(self.family, f"task '{task}'", sorted(self.classes))
        return self.classes[task]

    # -- running --------------------------------------------------------------------------------
    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=pixel_values).logits
        if out.dim() == 4 and out.shape[-2:] != pixel_values.shape[-2:]:
            out = F.interpolate(out, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def forward_kd(
        self,
        model: nn.Module,
        pixel_values: torch.Tensor,
        *,
        features: bool = False,
        attentions: bool = False,
    ) -> dict[str, Any]:
        """Outputs for distillation: raw logits (maps at the model's own resolution) and optional internals."""
        kwargs: dict[str, Any] = {"pixel_values": pixel_values}
        if features:
            kwargs["output_hidden_states"] = True
        if attentions:
            kwargs["output_attentions"] = True
        out = model(**kwargs)
        res: dict[str, Any] = {"logits": out.logits}
        if getattr(out, "distillation_logits", None) is not None:
            # DeiT with a distillation token: the class-token head learns from labels, the
            # distillation head from the teacher (their average is the inference output).
            res["logits"], res["dist_logits"] = out.cls_logits, out.distillation_logits
        if features:
            res["features"] = self.hidden_features(model, out, pixel_values)
        if attentions and getattr(out, "attentions", None) is not None:
            res["attentions"] = list(out.attentions)
        return res

    def hidden_features(self, model: nn.Module, out: Any, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        hs = getattr(out, "hidden_states", None)
        return list(hs[1:]) if hs is not None else []

    def export_wrapper(self, model: nn.Module) -> nn.Module:
        return _LogitsWrapper(self, model)


class _LogitsWrapper(nn.Module):
    """pixel_values -> logits (segmentation maps at input size), the one signature ONNX gets."""

    def __init__(self, adapter: Adapter, model: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(self.model, pixel_values)


class ViTAdapter(Adapter):
    family = "vit"
    model_types = ("vit",)
    classes = {"classification": T.ViTForImageClassification}
    config_cls: ClassVar[type] = T.ViTConfig

    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        kw = dict(preset.config)
        kw.setdefault("patch_size", vit_patch_size(image_size))
        kw.update(image_size=image_size, num_channels=channels, num_labels=num_labels)
        kw.update(overrides)
        return self.config_cls(**kw)


class DeiTAdapter(ViTAdapter):
    family = "deit"
    model_types = ("deit",)
    classes = {"classification": T.DeiTForImageClassification}
    config_cls = T.DeiTConfig


class SwinAdapter(Adapter):
    family = "swin"
    model_types = ("swin",)
    classes = {"classification": T.SwinForImageClassification}

    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        kw = dict(preset.config)
        kw.setdefault("patch_size", 2 if image_size < 64 else 4)
        kw.update(image_size=image_size, num_channels=channels, num_labels=num_labels)
        kw.update(overrides)
        return T.SwinConfig(**kw)


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


class MobileViTAdapter(Adapter):
    family = "mobilevit"
    model_types = ("mobilevit",)
    classes = {
        "classification": T.MobileViTForImageClassification,
        "segmentation": T.MobileViTForSemanticSegmentation,
    }

    def build(self, preset, task, image_size, channels, num_labels, **overrides):
        return reset_batchnorm(super().build(preset, task, image_size, channels, num_labels, **overrides))

    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        kw = dict(preset.config)
        kw.update(image_size=image_size, num_channels=channels, num_labels=num_labels)
        if task == "segmentation":
            kw.setdefault("aspp_out_channels", max(64, kw["neck_hidden_sizes"][-1] // 2))
        kw.update(overrides)
        return T.MobileViTConfig(**kw)


class SegformerAdapter(Adapter):
    family = "segformer"
    model_types = ("segformer",)
    classes = {
        "segmentation": T.SegformerForSemanticSegmentation,
        "classification": T.SegformerForImageClassification,
    }

    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        kw = dict(preset.config)
        kw.update(num_channels=channels, num_labels=num_labels, image_size=image_size)
        kw.update(overrides)
        return T.SegformerConfig(**kw)


class UperNetAdapter(Adapter):
    family = "upernet"
    model_types = ("upernet",)
    classes = {"segmentation": T.UperNetForSemanticSegmentation}

    def build(self, preset, task, image_size, channels, num_labels, **overrides):
        if preset.backbone == "mobilevit":
            from .mobilevit_backbone import build_upernet_mobilevit

            self.model_class(task)
            return build_upernet_mobilevit(
                image_size, channels, num_labels, preset=preset.config["size"], **overrides
            )
        return super().build(preset, task, image_size, channels, num_labels, **overrides)

    def config(self, preset, task, image_size, channels, num_labels, **overrides):
        bb = dict(preset.config["backbone"])
        bb.update(image_size=image_size, num_channels=channels, patch_size=4)
        n = len(bb["depths"])
        bb["out_features"] = [f"stage{i + 1}" for i in range(n)]
        hidden = overrides.pop("hidden_size", preset.config.get("hidden_size", 512))
        return T.UperNetConfig(
            backbone_config=T.SwinConfig(**bb),
            num_labels=num_labels,
            hidden_size=hidden,
            use_auxiliary_head=False,
            pool_scales=overrides.pop("pool_scales", [1, 2, 3, 6]),
            **overrides,
        )

    def forward_kd(self, model, pixel_values, *, features=False, attentions=False):
        # One backbone pass gives both the pyramid maps (the features a student can match) and the
        # decoder logits at 1/4 resolution; the KD losses resize maps to a common size themselves.
        feats = model.backbone.forward_with_filtered_kwargs(pixel_values).feature_maps
        res: dict[str, Any] = {"logits": model.decode_head(feats)}
        if features:
            res["features"] = list(feats)
        return res


ADAPTERS: dict[str, Adapter] = {}
for _cls in (ViTAdapter, DeiTAdapter, SwinAdapter, MobileViTAdapter, SegformerAdapter, UperNetAdapter):
    _inst = _cls()
    ADAPTERS[_cls.family] = _inst
    for _t in _cls.model_types:
        ADAPTERS[_t] = _inst


def adapter_for(model_or_type: nn.Module | str) -> Adapter:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return ADAPTERS[model_type]
    except KeyError:
        families = sorted({a.family for a in ADAPTERS.values()})
        raise UnsupportedFamilyError(model_type, "vitshrink", families) from None
