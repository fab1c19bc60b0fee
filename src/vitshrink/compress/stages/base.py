"""A compress stage kind: its recipe options (a view of `vitshrink.options.RECIPE_STAGES`), the rule
checking them together, how it runs, how it is labelled, and whether the next stage builds on it.

The way optimum's `TasksManager` keeps one entry per task, each kind is one module of this package
holding one `StageKind`; `compress.recipe` validates with it, `compress.runner` runs it, and a new kind
is a new module listed in `stages/__init__.py` plus its options in `RECIPE_STAGES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import VitshrinkError
from ...options import RECIPE_STAGES, Option
from ..context import Context, Current


class RecipeError(VitshrinkError):
    """An invalid recipe; the message names the file, the stage and the option."""


# {"model_dir": Path | None, "artifact": Path, "train_metrics": dict}
StageResult = dict[str, Any]


@dataclass(frozen=True)
class Stage:
    kind: str  # a key of compress.stages.KINDS
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # label in results (None: derived from the kind); not part of the key

    def to_json(self) -> dict[str, Any]:
        return {self.kind: {**({"name": self.name} if self.name else {}), **self.options}}


@dataclass(frozen=True)
class Opt:
    """A recipe key: its YAML types, whether the stage needs it, its choices, and its declaration
    (`vitshrink.options.Option`, whose range check `options.check` applies)."""

    types: tuple[type, ...]
    required: bool = False
    choices: tuple[Any, ...] | None = None
    option: Option | None = None


def schema_view(kind: str) -> dict[str, Opt]:
    """The recipe keys of `kind`, from the declarations the CLI is generated from too."""
    return {
        o.name: Opt(o.value_types, o.recipe_required, None if o.choices is None else tuple(o.choices), o)
        for o in RECIPE_STAGES[kind]
        if o.recipe
    }


Runner = Callable[[Stage, Context, Current, Path], StageResult]


@dataclass
class StageKind:
    """One stage kind. Not frozen: tests wrap `run` to count or interrupt stages.

    check(options, where): the rules between options a per-option schema cannot say (raise RecipeError).
    branch: its output is a leaf; the stage after it starts from the same full-precision model.
    onnx_only: works on the ONNX artifact alone, so it may follow a quantize stage (only quantize does).
    label(stage): the default name in results and reports.
    """

    name: str
    run: Runner
    check: Callable[[dict[str, Any], str], None] | None = None
    branch: bool = False
    onnx_only: bool = False
    label: Callable[[Stage], str] | None = None
    schema: dict[str, Opt] = field(init=False)

    def __post_init__(self) -> None:
        self.schema = schema_view(self.name)

    def label_of(self, stage: Stage) -> str:
        if stage.name:
            return stage.name
        return self.label(stage) if self.label is not None else self.name


def export_model(model_dir: Path, out: Path, **kw: Any) -> Path:
    """A stage's model directory as its ONNX artifact (looked up on this module, so tests can fake it)."""
    from ...export import export_onnx

    path, _ = export_onnx(model_dir, out, **kw)
    return path


def epoch_hook(ctx: Context, kind: str) -> Callable[[int, dict[str, Any]], None] | None:
    """The training callback feeding ctx.epoch_hook (budget search) each epoch's score, or None."""
    hook = ctx.epoch_hook
    if hook is None:
        return None
    return lambda epoch, rec: hook(kind, {k: rec[k] for k in ("epoch", "val") if k in rec})
