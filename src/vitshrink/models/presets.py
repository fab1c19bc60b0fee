"""Named model presets: sized for this 2-core CPU (``*-micro``) and for the real thing.

Each family declares its own presets (``families/<name>.py``); this module gathers them. Real-size
presets follow the published configs (ViT/DeiT tiny/small/base, Swin-T, MobileViT xxs/xs/s, SegFormer
b0/b1, UperNet-Swin-T). Image size, channels and number of labels are parameters; the patch size of
plain ViTs adapts to small images (see `vit_patch_size`).
"""

from __future__ import annotations

from ..errors import ModelError
from .families import Preset, all_presets
from .families.vit import vit_patch_size

__all__ = ["PRESETS", "Preset", "get_preset", "vit_patch_size"]

PRESETS: dict[str, Preset] = all_presets()


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model preset '{name}' (choose from: {', '.join(PRESETS)})") from None
