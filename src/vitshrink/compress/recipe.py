"""Recipes: a YAML list of stages (distill, prune, quantize, export) and their options, validated up front.

Two accepted shapes::

    # a plain list                          # or a mapping with a `stages` list
    - distill: {student: vit-micro}         description: ...
    - prune: {ratio: 0.25}                  data_options: {size: 128}   # defaults under --data-opt
    - quantize: {mode: int8}                eval_limit: 500             # test samples per stage
                                            stages: [...]

A stage is a one-key mapping `KIND: {options}` (or a bare `KIND` for no options); every kind also takes
`name`, the stage's label in results and reports (default: the kind, `quantize-MODE` for quantize),
which is not part of its cache key. Validation is a small
table-driven checker rather than pydantic (not a dependency) so every mistake is one line naming the
stage and option; the table (`SCHEMA`: types, ranges, choices) is generated from the declarations in
`vitshrink.options.RECIPE_STAGES`, which the CLI is generated from too; each kind's own rules (one
prune target, no student_options on a directory, what may follow a quantize stage) live with the kind
in `compress.stages`. Quantize stages always start from the latest full-precision model, so consecutive
quantize stages are siblings (e.g. fp16 and int8 of the same pruned model) and nothing but another
quantize stage may follow one.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..options import check
from .stages import KINDS, Opt, RecipeError, Stage

TOP_LEVEL = ("stages", "description", "data_options", "eval_limit")
FLOAT = (int, float)
# stage kind -> option -> Opt: each kind's view of options.RECIPE_STAGES (declared once, see stages/)
SCHEMA: dict[str, dict[str, Opt]] = {name: kind.schema for name, kind in KINDS.items()}


@dataclass(frozen=True)
class Recipe:
    stages: list[Stage]
    description: str = ""
    data_options: dict[str, Any] = field(default_factory=dict)
    eval_limit: int | None = None
    source: str = "<recipe>"

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.stages]


def stage_key(prev: str, stage: Stage) -> str:
    """Identity of a stage's output: its input's identity plus its own kind and options."""
    blob = json.dumps([prev, stage.kind, stage.options], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
    if types == FLOAT:
        return "a number"
    return " or ".join(names.get(t, "a list") for t in types)


def _check_value(where: str, name: str, value: Any, opt: Opt) -> Any:
    # YAML booleans are ints in Python: never let `true` pass as a number (or 1 as a boolean).
    ok = isinstance(value, opt.types) and (bool in opt.types or not isinstance(value, bool))
    if not ok:
        hint = ""
        if isinstance(value, str) and float in opt.types:
            with contextlib.suppress(ValueError):
                float(value)
                hint = " (YAML reads exponents without a dot as text: write e.g. 3.0e-3)"
        raise RecipeError(f"{where}: option '{name}' must be {_type_name(opt.types)}, got {value!r}{hint}")
    if opt.option is not None and (reason := check(opt.option, value)):  # choices and range
        raise RecipeError(f"{where}: option '{name}' {reason}, got {value!r}")
    return float(value) if opt.types == FLOAT else value


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def validate_stage(raw: Any, where: str) -> Stage:
    """One list item -> Stage, or a one-line RecipeError."""
    if isinstance(raw, str):
        kind, opts = raw, {}
    elif isinstance(raw, dict):
        if len(raw) != 1:
            raise RecipeError(
                f"{where}: expected one stage name as key, e.g. '- prune: {{ratio: 0.25}}', "
                f"got keys {sorted(map(str, raw))} (check the indentation of the options)"
            )
        ((kind, opts),) = raw.items()
        opts = {} if opts is None else opts
    else:
        raise RecipeError(f"{where}: expected a stage such as '- prune: {{ratio: 0.25}}', got {raw!r}")
    if kind not in SCHEMA:
        raise RecipeError(
            f"{where}: unknown stage '{kind}' ({_suggest(str(kind), list(SCHEMA))}choose from {', '.join(SCHEMA)})"
        )
    where = f"{where} ({kind})"
    if not isinstance(opts, dict):
        raise RecipeError(f"{where}: options must be a mapping, got {opts!r}")
    schema = SCHEMA[kind]
    opts = dict(opts)
    label = opts.pop("name", None)
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise RecipeError(f"{where}: option 'name' must be a non-empty string, got {label!r}")
    out: dict[str, Any] = {}
    for name, value in opts.items():
        if name not in schema:
            raise RecipeError(
                f"{where}: unknown option '{name}' ({_suggest(str(name), list(schema))}allowed: name, {', '.join(schema)})"
            )
        out[name] = _check_value(where, name, value, schema[name])
    missing = [n for n, o in schema.items() if o.required and n not in out]
    if missing:
        raise RecipeError(f"{where}: missing required option '{missing[0]}'")
    if KINDS[kind].check is not None:
        KINDS[kind].check(out, where)
    return Stage(kind, out, label)


def validate_stages(items: Any, source: str = "<recipe>") -> list[Stage]:
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{source}: a recipe needs a non-empty list of stages")
    stages = [validate_stage(raw, f"{source}: stage {i + 1}") for i, raw in enumerate(items)]
    for i, s in enumerate(stages[1:], start=2):
        if not KINDS[s.kind].onnx_only and stages[i - 2].kind == "quantize":
            raise RecipeError(
                f"{source}: stage {i} ({s.kind}) cannot follow a quantize stage (it needs a PyTorch model); "
                "put quantize stages last"
            )
    return stages


def parse_recipe(obj: Any, source: str = "<recipe>") -> Recipe:
    """A parsed YAML document (list or mapping) -> Recipe."""
    if isinstance(obj, dict):
        unknown = [k for k in obj if k not in TOP_LEVEL]
        if unknown:
            raise RecipeError(
                f"{source}: unknown key '{unknown[0]}' ({_suggest(str(unknown[0]), list(TOP_LEVEL))}allowed: {', '.join(TOP_LEVEL)})"
            )
        if "stages" not in obj:
            raise RecipeError(f"{source}: a recipe mapping needs a 'stages' list")
        data_options = obj.get("data_options") or {}
        if not isinstance(data_options, dict):
            raise RecipeError(f"{source}: 'data_options' must be a mapping, got {data_options!r}")
        eval_limit = obj.get("eval_limit")
        if eval_limit is not None and (
            not isinstance(eval_limit, int) or isinstance(eval_limit, bool) or eval_limit <= 0
        ):
            raise RecipeError(f"{source}: 'eval_limit' must be a positive integer, got {eval_limit!r}")
        return Recipe(
            stages=validate_stages(obj["stages"], source),
            description=str(obj.get("description") or ""),
            data_options=dict(data_options),
            eval_limit=eval_limit,
            source=source,
        )
    return Recipe(stages=validate_stages(obj, source), source=source)


def load_recipe(recipe: str | os.PathLike | list[Any] | dict[str, Any] | Recipe) -> Recipe:
    """Read and validate a recipe from a YAML file, or validate an already parsed list/mapping."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, list | dict):
        return parse_recipe(recipe)
    import yaml

    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    from ..errors import DataError
    from ..safeio import load_yaml

    try:
        obj = load_yaml(path)  # bounded: size and alias limits (a YAML alias bomb must not hang compress)
    except DataError as e:
        raise RecipeError(str(e)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    return parse_recipe(obj, str(path))
