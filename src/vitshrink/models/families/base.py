"""The `Family` base class and the one registry of model families (timm's `register_model` style).

A family is one class in one file (``families/<name>.py``) registered with `@register_family`. It holds
every quirk of its models for every stage: presets, build/config, logits, distillation outputs, export
patches, width-pruning rules, depth rules and whether it makes an efficient student. Stages look the
family up with `family_for(model | config | model_type | family name)` and never name a family.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedFamilyError, VitshrinkError
from ...options import GRANULARITIES  # noqa: F401 - re-exported (declared once in vitshrink.options)

# (block list, setter replacing it) for one stage of a model: what depth pruning edits.
BlockStage = tuple[nn.ModuleList, Callable[[nn.ModuleList], None]]


@dataclass(frozen=True)
class Preset:
    family: str  # a registered family name
    tasks: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None  # UperNet: "swin" or "mobilevit"
    note: str = ""


class Family:
    """Defaults cover a plain transformers model: `model(pixel_values=...).logits`, no patches, no rules."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values this family owns
    classes: ClassVar[dict[str, type]] = {}  # task -> transformers class
    presets: ClassVar[dict[str, Preset]] = {}
    # tasks for which `compress` tries this family as a student beside the teacher's own
    efficient_for: ClassVar[tuple[str, ...]] = ()
    # width pruning: whether `rewrite` is implemented, and whether heads and embed dims can only shrink
    # together (head size derived from the width)
    width_pruning: ClassVar[bool] = False
    coupled_heads_embed: ClassVar[bool] = False
    # depth pruning: whether `depth_stages` is implemented, and whether blocks go in (plain, shifted) pairs
    depth_pruning: ClassVar[bool] = False
    paired_blocks: ClassVar[bool] = False
    # width pruning of a composite model (UperNet) may delegate its backbone to this family's rules
    prunable_backbone: ClassVar[bool] = False

    # -- building -------------------------------------------------------------------------------------
    def build(
        self, preset: Preset, task: str, image_size: int, channels: int, num_labels: int, **overrides: Any
    ) -> nn.Module:
        cfg = self.config(preset, task, image_size, channels, num_labels, **overrides)
        return self.model_class(task)(cfg)

    def config(
        self, preset: Preset, task: str, image_size: int, channels: int, num_labels: int, **overrides: Any
    ) -> Any:
        raise NotImplementedError

    def model_class(self, task: str) -> type:
        if task not in self.classes:
            raise UnsupportedFamilyError(self.name, f"task '{task}'", sorted(self.classes))
        return self.classes[task]

    def backbone_config(self, spec: dict[str, Any], image_size: int, channels: int) -> Any:
        """This family as UperNet's backbone: a transformers backbone config returning every stage's
        feature map, from an UperNet preset's `backbone` dict (families with `prunable_backbone`)."""
        raise UnsupportedFamilyError(
            self.name, "UperNet backbone", family_names(lambda f: f.prunable_backbone)
        )

    def before_load(self) -> None:
        """Called before `from_pretrained` (e.g. to register custom sub-configs with transformers)."""

    def task_of(self, hf_config: dict[str, Any]) -> str:
        """Task of a plain transformers directory (no vitshrink.json), from its config.json."""
        archs = hf_config.get("architectures") or []
        return "segmentation" if any("Segmentation" in a for a in archs) else "classification"

    # -- running --------------------------------------------------------------------------------------
    def model_logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's own logits (segmentation maps at the model's output resolution): what training
        losses, pruning importance and output comparisons use. `model` may be DDP-wrapped."""
        return model(pixel_values=pixel_values).logits

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits as deployed; segmentation maps are resized to the input size."""
        out = self.model_logits(model, pixel_values)
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
        res = self.kd_logits(out)
        if features:
            res["features"] = self.hidden_features(model, out, pixel_values)
        if attentions and getattr(out, "attentions", None) is not None:
            res["attentions"] = list(out.attentions)
        return res

    def kd_logits(self, out: Any) -> dict[str, torch.Tensor]:
        """The logit entries of `forward_kd` from a model output."""
        return {"logits": out.logits}

    def hidden_features(self, model: nn.Module, out: Any, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        hs = getattr(out, "hidden_states", None)
        return list(hs[1:]) if hs is not None else []

    def distillation_student(self, model: nn.Module, losses: set[str]) -> nn.Module:
        """The model to train as a student with these loss names (e.g. a two-head variant)."""
        return model

    # -- export ---------------------------------------------------------------------------------------
    def export_wrapper(self, model: nn.Module) -> nn.Module:
        return LogitsWrapper(self, model)

    def make_exportable(self, model: nn.Module, *, dynamic_size: bool = False) -> nn.Module:
        """Swap modules the exporters cannot handle, or run slowly, for exact equivalents (in place);
        `dynamic_size`: for a graph with symbolic height/width."""
        return model

    def size_multiple(self, config: Any) -> int | None:
        """The multiple every height/width must be for a dynamic-size graph of this family to be exact;
        None where traced graphs keep the export size (reshapes, masks, position embeddings)."""
        return None

    def size_floor(self, config: Any) -> int:
        """The smallest height/width a dynamic-size graph of this family is exact at (export and run)."""
        return self.size_multiple(config) or 1

    # -- width pruning --------------------------------------------------------------------------------
    def check_prunable(self, config: Any) -> None:
        """Raise UnsupportedFamilyError when this particular config cannot be width-pruned."""

    def rewrite_config(
        self, config: Any, ratio: float, granularity: set[str], round_to: int, ratio_mlp: float | None = None
    ) -> Any:
        """Return a pruned deep copy of `config` (the original is not modified).

        `ratio_mlp` prunes the MLP hidden widths by their own ratio (default `ratio`): heads move in
        whole heads, so a parameter budget is met exactly only by also setting the fine-grained axis.
        """
        new = copy.deepcopy(config)
        r_mlp = ratio if ratio_mlp is None else ratio_mlp
        self.rewrite(new, ratio, granularity, round_to, r_mlp if "mlp" in granularity else 0.0)
        return new

    def rewrite(self, cfg: Any, ratio: float, gran: set[str], round_to: int, r_mlp: float) -> None:
        """Narrow `cfg` in place (its widths become the targets of the graph surgery)."""
        raise NotImplementedError

    def coupled(self, gran: set[str]) -> bool:
        """For coupled families, heads and embed are one axis: both or neither."""
        wanted = {"heads", "embed"} & gran
        if len(wanted) == 1:
            raise VitshrinkError(
                f"{self.name}: head size is derived from the width, so 'heads' and 'embed' must be pruned "
                f"together (granularity has only '{wanted.pop()}')"
            )
        return bool(wanted)

    def customized_pruners(self, model: nn.Module) -> dict[Any, Any]:
        """Torch-Pruning pruners for modules its dependency graph mis-reads."""
        return {}

    def ignored_params(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the graph must leave alone (the family prunes them in `prune_head_extras`)."""
        return []

    def prune_head_extras(self, model: nn.Module, attention: nn.Module, keep_heads: torch.Tensor) -> None:
        """Prune per-head tensors the dependency graph cannot see (called once per attention module)."""

    def extra_outputs(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose outputs are not part of `logits` but whose inputs get pruned (traced too)."""
        return []

    def spatial_slice_dims(self, model: nn.Module) -> tuple[int, ...]:
        """Dims of 4-D tensors that are spatial although Torch-Pruning takes them for channels."""
        return ()

    # -- depth pruning --------------------------------------------------------------------------------
    def depth_stages(self, model: nn.Module) -> list[BlockStage]:
        """(block list, setter replacing it) per stage, for families with `depth_pruning`."""
        raise NotImplementedError

    def set_depths(self, config: Any, depths: list[int]) -> None:
        """Write the kept per-stage depths into the config (so `from_pretrained` rebuilds the same blocks)."""
        config.depths = list(depths)


class LogitsWrapper(nn.Module):
    """pixel_values -> logits (segmentation maps at input size), the one signature ONNX gets."""

    def __init__(self, family: Family, model: nn.Module) -> None:
        super().__init__()
        self.family = family
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.family.logits(self.model, pixel_values)


# -- registry -----------------------------------------------------------------------------------------
_BY_NAME: dict[str, Family] = {}  # family name -> instance, in registration order
_BY_TYPE: dict[str, Family] = {}  # config.model_type -> instance
_PRESETS: dict[str, Preset] = {}  # every family's presets, in registration order

_FamilyT = TypeVar("_FamilyT", bound=type[Family])


def register_family(cls: _FamilyT) -> _FamilyT:
    """Class decorator: register one instance under its name and every model_type it owns."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name`")
    taken = [t for t in (cls.name, *cls.model_types) if t in _BY_NAME or t in _BY_TYPE]
    taken += [p for p in cls.presets if p in _PRESETS]
    if taken:
        raise ValueError(f"family {cls.name!r}: {taken} already registered")
    wrong = [p for p, preset in cls.presets.items() if preset.family != cls.name]
    if wrong:
        raise ValueError(f"family {cls.name!r}: presets {wrong} name another family")
    inst = cls()
    _BY_NAME[cls.name] = inst
    _BY_TYPE.update(dict.fromkeys(cls.model_types, inst))
    _PRESETS.update(cls.presets)
    return cls


def unregister_family(name: str) -> None:
    """Remove a family, its model types and its presets (for tests and plugins)."""
    fam = _BY_NAME.pop(name)
    for t in fam.model_types:
        _BY_TYPE.pop(t, None)
    for p in fam.presets:
        _PRESETS.pop(p, None)


def families() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_BY_NAME.values())


def family_names(where: Callable[[Family], bool] | None = None) -> list[str]:
    return [f.name for f in _BY_NAME.values() if where is None or where(f)]


def efficient_families(task: str) -> list[str]:
    """Families worth trying as students for `task` beyond the teacher's own (`Family.efficient_for`)."""
    return family_names(lambda f: task in f.efficient_for)


def model_type_of(obj: Any) -> str:
    """config.model_type of a model, a config, or the string itself."""
    if isinstance(obj, str):
        return obj
    cfg = getattr(obj, "config", obj)
    return getattr(cfg, "model_type", None) or type(obj).__name__


def find_family(obj: Any) -> Family | None:
    """Like `family_for`, but None where no family owns the type."""
    key = model_type_of(obj)
    return _BY_TYPE.get(key) or _BY_NAME.get(key)


def family_for(obj: Any, stage: str = "vitshrink") -> Family:
    """The family of a model, a config, a model_type or a family name.

    Raises UnsupportedFamilyError (naming `stage`) for a model type no family owns.
    """
    fam = find_family(obj)
    if fam is None:
        raise UnsupportedFamilyError(model_type_of(obj), stage, sorted(_BY_NAME))
    return fam


def all_presets() -> dict[str, Preset]:
    """Every registered family's presets, in registration order (a live view: later families join it)."""
    return _PRESETS
