"""Named model presets: sized for this 2-core CPU (``*-micro``) and for the real thing.

Real-size presets follow the published configs (ViT/DeiT tiny/small/base, Swin-T, MobileViT xxs/xs/s,
SegFormer b0/b1, UperNet-Swin-T). Image size, channels and number of labels are parameters; the
patch size of plain ViTs adapts to small images (see `vit_patch_size`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelError


@dataclass(frozen=True)
class Preset:
    family: str  # vit | deit | swin | mobilevit | segformer | upernet
    tasks: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None  # UperNet: "swin" or "mobilevit"
    note: str = ""


def _vit(hidden: int, layers: int, heads: int, mlp: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
    }


_SWIN_T = {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}
_SWIN_MICRO = {"embed_dim": 32, "depths": [2, 2, 2], "num_heads": [1, 2, 4], "window_size": 4}
_SEGF_B0 = {
    "hidden_sizes": [32, 64, 160, 256],
    "depths": [2, 2, 2, 2],
    "num_attention_heads": [1, 2, 5, 8],
    "decoder_hidden_size": 256,
}
_SEGF_B1 = {
    "hidden_sizes": [64, 128, 320, 512],
    "depths": [2, 2, 2, 2],
    "num_attention_heads": [1, 2, 5, 8],
    "decoder_hidden_size": 256,
}
_SEGF_MICRO = {
    "hidden_sizes": [16, 32, 64, 96],
    "depths": [1, 1, 1, 1],
    "num_attention_heads": [1, 1, 2, 2],
    "decoder_hidden_size": 64,
}
_MVIT = {
    "micro": {
        "hidden_sizes": [32, 48, 64],
        "neck_hidden_sizes": [8, 16, 24, 32, 48, 64, 160],
        "expand_ratio": 2.0,
        "num_attention_heads": 2,
    },
    "xxs": {
        "hidden_sizes": [64, 80, 96],
        "neck_hidden_sizes": [16, 16, 24, 48, 64, 80, 320],
        "expand_ratio": 2.0,
    },
    "xs": {"hidden_sizes": [96, 120, 144], "neck_hidden_sizes": [16, 32, 48, 64, 80, 96, 384]},
    "s": {"hidden_sizes": [144, 192, 240], "neck_hidden_sizes": [16, 32, 64, 96, 128, 160, 640]},
}

PRESETS: dict[str, Preset] = {
    "vit-micro": Preset("vit", ("classification",), _vit(64, 4, 2, 128), note="~0.2M, tests/demos"),
    "vit-mini": Preset("vit", ("classification",), _vit(128, 6, 4, 384), note="~1.2M"),
    "vit-tiny": Preset("vit", ("classification",), _vit(192, 12, 3, 768)),
    "vit-small": Preset("vit", ("classification",), _vit(384, 12, 6, 1536)),
    "vit-base": Preset("vit", ("classification",), _vit(768, 12, 12, 3072)),
    "deit-micro": Preset("deit", ("classification",), _vit(64, 4, 2, 128)),
    "deit-tiny": Preset("deit", ("classification",), _vit(192, 12, 3, 768)),
    "deit-small": Preset("deit", ("classification",), _vit(384, 12, 6, 1536)),
    "deit-base": Preset("deit", ("classification",), _vit(768, 12, 12, 3072)),
    "swin-micro": Preset("swin", ("classification",), dict(_SWIN_MICRO)),
    "swin-tiny": Preset("swin", ("classification",), dict(_SWIN_T)),
    "mobilevit-micro": Preset("mobilevit", ("classification", "segmentation"), dict(_MVIT["micro"])),
    "mobilevit-xxs": Preset("mobilevit", ("classification", "segmentation"), dict(_MVIT["xxs"])),
    "mobilevit-xs": Preset("mobilevit", ("classification", "segmentation"), dict(_MVIT["xs"])),
    "mobilevit-s": Preset("mobilevit", ("classification", "segmentation"), dict(_MVIT["s"])),
    "segformer-micro": Preset("segformer", ("segmentation",), dict(_SEGF_MICRO)),
    "segformer-b0": Preset("segformer", ("segmentation",), dict(_SEGF_B0)),
    "segformer-b1": Preset("segformer", ("segmentation",), dict(_SEGF_B1)),
    "upernet-swin-micro": Preset(
        "upernet", ("segmentation",), {"backbone": dict(_SWIN_MICRO), "hidden_size": 64}, "swin"
    ),
    "upernet-swin-tiny": Preset(
        "upernet",
        ("segmentation",),
        {"backbone": dict(_SWIN_T), "hidden_size": 512},
        "swin",
        "paper's teacher",
    ),
    "upernet-mobilevit-micro": Preset("upernet", ("segmentation",), {"size": "micro"}, "mobilevit"),
    "upernet-mobilevit-xxs": Preset("upernet", ("segmentation",), {"size": "xxs"}, "mobilevit"),
    "upernet-mobilevit-xs": Preset("upernet", ("segmentation",), {"size": "xs"}, "mobilevit"),
    "upernet-mobilevit-s": Preset(
        "upernet", ("segmentation",), {"size": "s"}, "mobilevit", "paper's student"
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model preset '{name}' (choose from: {', '.join(PRESETS)})") from None


def vit_patch_size(image_size: int) -> int:
    """Patch size giving a token grid a CPU can afford: 16 at >=160 px, 8 at >=64 px, else 4."""
    if image_size >= 160:
        return 16
    if image_size >= 64:
        return 8
    return 4
