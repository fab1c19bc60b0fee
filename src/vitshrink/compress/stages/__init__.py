"""The compress stage kinds, one module each, behind one registry (see `base.StageKind`).

A new kind: a module here with `KIND = StageKind(...)`, listed below, and its options in
`vitshrink.options.RECIPE_STAGES` (the recipe keys, CLI flags and ranges come from there).
"""

from __future__ import annotations

from ...options import RECIPE_STAGES
from . import baseline, distill, export, prune, quantize
from .base import Opt, RecipeError, Stage, StageKind, StageResult, export_model

# In the order RECIPE_STAGES declares them (error messages list kinds in this order).
KINDS: dict[str, StageKind] = {
    k.name: k
    for k in sorted(
        (distill.KIND, prune.KIND, quantize.KIND, export.KIND, baseline.KIND),
        key=lambda k: list(RECIPE_STAGES).index(k.name),
    )
}
assert set(KINDS) == set(RECIPE_STAGES), "every recipe stage declared in options.py needs a kind here"


def stage_label(stage: Stage) -> str:
    """A stage's name in results and reports: its `name`, else its kind's default label."""
    return KINDS[stage.kind].label_of(stage)


__all__ = ["KINDS", "Opt", "RecipeError", "Stage", "StageKind", "StageResult", "export_model", "stage_label"]
