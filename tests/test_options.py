"""Options declared once: the Python signatures, the CLI and the recipe schema agree with vitshrink.options."""

from __future__ import annotations

import inspect

import pytest

from vitshrink.cli import build_parser
from vitshrink.compress.recipe import SCHEMA
from vitshrink.options import PRUNE, QUANTIZE, Option
from vitshrink.prune import prune
from vitshrink.quantize import quantize

# Keywords a stage function takes that are not user options (set by the CLI itself or by compress).
NOT_OPTIONS = {"quiet", "teacher_cache_dir", "on_epoch_end", "image_size", "dynamic_size"}
STAGES = [("prune", prune, PRUNE), ("quantize", quantize, QUANTIZE)]


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    return sub.choices[name]


@pytest.mark.parametrize("name, fn, options", STAGES, ids=[s[0] for s in STAGES])
def test_every_keyword_is_declared_once_with_the_functions_default(
    name, fn, options: tuple[Option, ...]
) -> None:
    params = {
        k: p for k, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    declared = {o.name: o for o in options}
    assert len(declared) == len(options), "an option is declared twice"
    assert set(params) - NOT_OPTIONS == set(declared), set(params) ^ set(declared)
    for o in options:
        assert params[o.name].default == o.default, (o.name, params[o.name].default, o.default)


@pytest.mark.parametrize("name, fn, options", STAGES, ids=[s[0] for s in STAGES])
def test_the_cli_is_generated_from_the_declarations(name, fn, options: tuple[Option, ...]) -> None:
    sp = _subparser(name)
    actions = {a.dest: a for a in sp._actions}
    for o in options:
        if not o.cli:
            assert o.name not in actions
            continue
        a = actions[o.name]
        assert o.cli_flag in a.option_strings
        if o.choices is not None:
            assert list(a.choices) == list(o.choices)
    # parsing an empty command line gives exactly the function's defaults
    args = sp.parse_args(["m", "--out", "o"])
    for o in options:
        if o.cli:
            assert getattr(args, o.name) == o.default, o.name


@pytest.mark.parametrize("name, fn, options", STAGES, ids=[s[0] for s in STAGES])
def test_the_recipe_schema_takes_the_same_options_and_choices(name, fn, options: tuple[Option, ...]) -> None:
    schema = SCHEMA[name]
    recipe_opts = {o.name: o for o in options if o.recipe}
    # compress-only recipe keys (e.g. quantize's `calibrate`) are allowed on top
    extra = set(schema) - set(recipe_opts)
    assert extra <= {"calibrate"}, extra
    assert set(recipe_opts) <= set(schema), set(recipe_opts) - set(schema)
    for k, o in recipe_opts.items():
        if o.choices is not None:
            assert tuple(schema[k].choices) == tuple(o.choices), k


def test_prune_cli_reaches_every_option_and_rejects_unknown_choices() -> None:
    sp = _subparser("prune")
    args = sp.parse_args(
        [
            "m",
            "--out",
            "o",
            "--ratio",
            "0.5",
            "--batch-size",
            "8",
            "--lr",
            "0.01",
            "--seed",
            "3",
            "--limit",
            "100",
            "--data-opt",
            "size=64",
            "--no-augment",
            "--recover-epochs",
            "1",
            "--importance",
            "taylor",
            "--granularity",
            "mlp,heads",
        ]
    )
    assert (args.batch_size, args.lr, args.seed, args.limit) == (8, 0.01, 3, 100)
    assert args.data_options == {"size": 64} and args.augment is False and args.recover_epochs == 1
    assert isinstance(args.recover_epochs, int)  # was parsed as a float and crashed prune()
    with pytest.raises(SystemExit):
        sp.parse_args(["m", "--out", "o", "--importance", "magnitud"])  # was silently random importance
