"""Model families, one file each; importing this package registers every one of them.

To add a family, drop a module here whose `Family` subclass carries `@register_family`; it is imported
(and so registered) after the built-in ones, whose order below fixes the order presets are listed in.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    GRANULARITIES,
    BlockStage,
    Family,
    LogitsWrapper,
    Preset,
    all_presets,
    efficient_families,
    families,
    family_for,
    family_names,
    find_family,
    register_family,
    unregister_family,
)

_BUILTIN = ("vit", "swin", "mobilevit", "segformer", "upernet")
_HELPERS = ("base", "widths")

for _name in (
    *_BUILTIN,
    *sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if m.name not in _BUILTIN + _HELPERS and not m.name.startswith("_")
    ),
):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = [
    "GRANULARITIES",
    "BlockStage",
    "Family",
    "LogitsWrapper",
    "Preset",
    "all_presets",
    "efficient_families",
    "families",
    "family_for",
    "family_names",
    "find_family",
    "register_family",
    "unregister_family",
]
