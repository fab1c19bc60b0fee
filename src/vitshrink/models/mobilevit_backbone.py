"""MobileViT as a transformers backbone, so UperNet can use it (the paper's distillation student).

transformers' `UperNetForSemanticSegmentation` builds its encoder with `load_backbone(config)`, i.e.
`AutoBackbone.from_config(config.backbone_config)`, and there is no MobileViT backbone class upstream.
This module adds one the transformers way (a `BackboneConfigMixin` config + a `BackboneMixin` model,
registered with the Auto classes), reusing `MobileViTModel`'s conv stem and encoder unchanged, so that
an UperNet+MobileViT model saves as a normal HF directory and reloads through
`UperNetForSemanticSegmentation.from_pretrained` / `AutoModelForSemanticSegmentation` in any process
that has called `register()`.

Stages (MobileViT output strides in brackets, for `output_stride=32`):
"stem" (2) = conv_stem, "stage1" (2), "stage2" (4), "stage3" (8), "stage4" (16), "stage5" (32)
= `encoder.layer[0..4]`; channels are `neck_hidden_sizes[0..5]`. Default outputs: stage2..stage5, the
stride-4..32 pyramid UperNet expects.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoBackbone,
    AutoConfig,
    MobileViTConfig,
    PreTrainedConfig,
    PreTrainedModel,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers import initialization as init
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BackboneOutput
from transformers.models.mobilevit.modeling_mobilevit import (
    MobileViTConvLayer,
    MobileViTEncoder,
    MobileViTPreTrainedModel,
)
from transformers.utils import can_return_tuple

from vitshrink.errors import ModelError
from vitshrink.models.families.mobilevit import BACKBONE_MODEL_TYPE, MOBILEVIT_WIDTHS

__all__ = [
    "MODEL_TYPE",
    "STAGE_NAMES",
    "UPERNET_MOBILEVIT_PRESETS",
    "VitshrinkMobileViTBackbone",
    "VitshrinkMobileViTBackboneConfig",
    "build_upernet_mobilevit",
    "register",
]

MODEL_TYPE = BACKBONE_MODEL_TYPE
STAGE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5")
_DEFAULT_OUT_FEATURES = ["stage2", "stage3", "stage4", "stage5"]


@strict
class VitshrinkMobileViTBackboneConfig(BackboneConfigMixin, MobileViTConfig):
    """`MobileViTConfig` plus the backbone `out_features` / `out_indices` (stage names in `STAGE_NAMES`).

    `neck_hidden_sizes[6]` (the classifier's 1x1 expansion width) is kept for config compatibility with
    MobileViT checkpoints but unused: the backbone stops at stage5, like MobileViT's own segmentation model.
    """

    model_type = MODEL_TYPE

    # Same private-field + mixin-property pattern as transformers' ConvNextConfig / SwinConfig.
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.stage_names = list(STAGE_NAMES)
        out_features = kwargs.pop("out_features", None)
        out_indices = kwargs.pop("out_indices", None)
        if out_features is None and out_indices is None:
            # The mixin's own default is the last stage only; UperNet needs a 4-level pyramid.
            out_features = list(_DEFAULT_OUT_FEATURES)
        self.set_output_features_output_indices(out_indices=out_indices, out_features=out_features)
        super().__post_init__(**kwargs)


class VitshrinkMobileViTBackbone(BackboneMixin, MobileViTPreTrainedModel):
    """MobileViT feature pyramid: returns `BackboneOutput(feature_maps=...)` for `config.out_features`."""

    config: VitshrinkMobileViTBackboneConfig
    config_class = VitshrinkMobileViTBackboneConfig
    # Conv/transformer hybrid without exposed attentions: lets UperNet's forward_with_filtered_kwargs drop
    # `output_attentions`.
    has_attentions = False

    def __init__(self, config: VitshrinkMobileViTBackboneConfig) -> None:
        super().__init__(config)
        # The same stem and encoder modules MobileViTModel builds (blocks are reused, not re-implemented).
        # Built directly rather than through a nested MobileViTModel: that one's post_init would initialise
        # (and flag as initialised) every weight with MobileViT's BatchNorm init, which we override below.
        # expand_output is left out, as in MobileViTForSemanticSegmentation: the 1x1 expansion only feeds the
        # classifier. Keys `conv_stem.*` / `encoder.*` equal MobileViTModel's, so apple/mobilevit-* weights
        # should load once transformers strips their `mobilevit.` base-model prefix (untested: no weights here).
        self.conv_stem = MobileViTConvLayer(
            config,
            in_channels=config.num_channels,
            out_channels=config.neck_hidden_sizes[0],
            kernel_size=3,
            stride=2,
        )
        self.encoder = MobileViTEncoder(config)
        self.num_features = [int(c) for c in config.neck_hidden_sizes[: len(STAGE_NAMES)]]
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # MobileViTPreTrainedModel draws BatchNorm weights from N(0, initializer_range). Measured on a fresh
        # micro model in train mode: stage2..5 feature std 1e-5..9e-3 with that init vs 0.56..1.7 with this
        # one (eval mode: logits ~1e-25). Use the generic transformers init instead (BN weight 1, bias 0,
        # fresh running stats), which is also PyTorch's default ...
        PreTrainedModel._init_weights(self, module)
        # ... except for convolutions: He init (fan_out), as MobileViT's reference code (ml-cvnets) and timm
        # do, not N(0, 0.02). With 0.02-std kernels every AdamW step changes a conv by ~lr/0.02 (15% at
        # lr 3e-3), so BatchNorm's running statistics lag the weights and in eval mode the student
        # predicted one class: UperNet-MobileViT-micro, aerial 128 px, 3 epochs: test mIoU 0.030 (train-mode
        # BN 0.121) -> 0.103 with He-initialised backbone convs (benchmarks/paper_student.py).
        if isinstance(module, torch.nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BackboneOutput:
        """`pixel_values` (B, C, H, W) -> feature maps for `out_features`, in stage order."""
        stem = self.conv_stem(pixel_values)
        encoded = self.encoder(stem, output_hidden_states=True, return_dict=True)
        hidden_states = (stem, *encoded.hidden_states)
        wanted = set(self.out_features)
        feature_maps = tuple(h for name, h in zip(self.stage_names, hidden_states) if name in wanted)
        # hidden_states is always filled; filter_output_hidden_states strips it unless the caller asked.
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)


_register_lock = threading.Lock()


def register() -> None:
    """Make the backbone known to transformers' Auto classes. Idempotent and thread-safe.

    Must run before `UperNetConfig(backbone_config=...)` is built from a dict (e.g. `from_pretrained`),
    since `UperNetConfig` resolves the sub-config's `model_type` through `AutoConfig`.
    """
    with _register_lock:
        # exist_ok=True: a second call (or a re-imported module) just re-points the same keys.
        AutoConfig.register(MODEL_TYPE, VitshrinkMobileViTBackboneConfig, exist_ok=True)
        AutoBackbone.register(VitshrinkMobileViTBackboneConfig, VitshrinkMobileViTBackbone, exist_ok=True)


# Widths come from the one MobileViT table (families/mobilevit.py); what UperNet's backbone adds is its
# head count, a little dropout for XXS and decoder_hidden_size, UperNet's head width (upstream's 512
# would dwarf these backbones).
_UPERNET_EXTRAS: dict[str, dict[str, Any]] = {
    "micro": {"decoder_hidden_size": 32},
    "xxs": {"hidden_dropout_prob": 0.05, "decoder_hidden_size": 128},
    "xs": {"decoder_hidden_size": 128},
    "s": {"decoder_hidden_size": 256},
}
UPERNET_MOBILEVIT_PRESETS: dict[str, dict[str, Any]] = {
    size: {**MOBILEVIT_WIDTHS[size], "num_attention_heads": 4, **extras}
    for size, extras in _UPERNET_EXTRAS.items()
}


def _own_fields(cls: type[PreTrainedConfig]) -> set[str]:
    """Dataclass fields a config class adds on top of the generic PreTrainedConfig ones."""
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")} - base


def build_upernet_mobilevit(
    image_size: int,
    num_channels: int,
    num_labels: int,
    *,
    preset: str = "xxs",
    hidden_sizes: list[int] | None = None,
    neck_hidden_sizes: list[int] | None = None,
    decoder_hidden_size: int | None = None,
    **overrides: Any,
) -> UperNetForSemanticSegmentation:
    """Randomly initialised UperNet with a MobileViT backbone.

    `preset` picks widths from `UPERNET_MOBILEVIT_PRESETS`; explicit `hidden_sizes` / `neck_hidden_sizes` /
    `decoder_hidden_size` win over it. `overrides` are routed by name: MobileViT fields (e.g.
    `output_stride`, `out_features`, `patch_size`) go to the backbone config, UperNet fields (e.g.
    `pool_scales`, `use_auxiliary_head`) and generic ones (e.g. `id2label`) to the UperNet config.
    The auxiliary FCN head is off by default: it is training-only and would roughly add another decoder.
    """
    register()
    if preset not in UPERNET_MOBILEVIT_PRESETS:
        raise ModelError(
            f"unknown UperNet+MobileViT preset '{preset}' (choose from {', '.join(UPERNET_MOBILEVIT_PRESETS)})"
        )
    spec = dict(UPERNET_MOBILEVIT_PRESETS[preset])
    decoder = int(decoder_hidden_size if decoder_hidden_size is not None else spec.pop("decoder_hidden_size"))
    spec.pop("decoder_hidden_size", None)
    if hidden_sizes is not None:
        spec["hidden_sizes"] = list(hidden_sizes)
    if neck_hidden_sizes is not None:
        spec["neck_hidden_sizes"] = list(neck_hidden_sizes)

    backbone_keys = _own_fields(MobileViTConfig) | {"out_features", "out_indices"}
    upernet_keys = _own_fields(UperNetConfig) - {"backbone_config"}
    generic_keys = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    backbone_kw: dict[str, Any] = dict(spec)
    upernet_kw: dict[str, Any] = {"use_auxiliary_head": False, "auxiliary_channels": decoder}
    for key, value in overrides.items():
        if key not in backbone_keys | upernet_keys | generic_keys:
            raise ModelError(f"unknown option '{key}' for UperNet+MobileViT")
        if key in backbone_keys:
            backbone_kw[key] = value
        if key in upernet_keys or (key in generic_keys and key not in backbone_keys):
            upernet_kw[key] = value

    hs, neck = list(backbone_kw["hidden_sizes"]), list(backbone_kw["neck_hidden_sizes"])
    heads = int(backbone_kw.get("num_attention_heads", 4))
    if len(hs) != 3 or len(neck) != 7:
        raise ModelError(
            f"MobileViT needs 3 hidden_sizes and 7 neck_hidden_sizes, got {len(hs)} and {len(neck)}"
        )
    if min(hs + neck + [decoder]) <= 0 or any(h % heads for h in hs):
        raise ModelError(
            f"MobileViT widths must be positive and hidden_sizes divisible by {heads} heads: {hs}"
        )
    if image_size <= 0 or num_channels <= 0 or num_labels < 2:
        raise ModelError(
            f"invalid UperNet+MobileViT shape: image_size={image_size}, channels={num_channels}, "
            f"labels={num_labels} (need >0, >0, >=2)"
        )

    backbone_config = VitshrinkMobileViTBackboneConfig(
        image_size=int(image_size), num_channels=int(num_channels), **backbone_kw
    )
    config = UperNetConfig(
        backbone_config=backbone_config, hidden_size=decoder, num_labels=int(num_labels), **upernet_kw
    )
    return UperNetForSemanticSegmentation(config)
