"""Options declared once: the Python signatures, the CLI and the recipe schema agree with vitshrink.options
(train, eval, distill, prune, quantize)."""

from __future__ import annotations

import inspect

import pytest

from vitshrink.cli import build_parser
from vitshrink.compress.recipe import SCHEMA, RecipeError, validate_stage
from vitshrink.distill import distill
from vitshrink.evaluate import evaluate
from vitshrink.options import COMMANDS, DISTILL, EVALUATE, PRUNE, QUANTIZE, RECIPE_STAGES, TRAIN, Option
from vitshrink.prune import prune
from vitshrink.quantize import quantize
from vitshrink.train import train

# Keywords a stage function takes that are not user options (set by the CLI itself or by compress).
NOT_OPTIONS = {"quiet", "out", "teacher_cache_dir", "on_epoch_end", "dynamic_size"}
# quantize's image_size is the export size (a CLI-only H[xW] argument shared with export)
NOT_OPTIONS_OF = {"quantize": {"image_size"}}
STAGES = [
    ("train", train, TRAIN),
    ("eval", evaluate, EVALUATE),
    ("distill", distill, DISTILL),
    ("prune", prune, PRUNE),
    ("quantize", quantize, QUANTIZE),
]
IDS = [s[0] for s in STAGES]
# the smallest valid command line of each subcommand (its required arguments)
REQUIRED = {
    "train": ["--model", "m", "--data", "d", "--out", "o"],
    "eval": ["m", "--data", "d"],
    "distill": ["--teacher", "t", "--student", "s", "--data", "d", "--out", "o"],
    "prune": ["m", "--out", "o"],
    "quantize": ["m", "--out", "o"],
}
# recipe keys of a stage that are not keywords of its function (positional inputs, compress-only keys)
RECIPE_ONLY = {"distill": {"student", "student_options"}, "quantize": {"calibrate"}}


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    return sub.choices[name]


@pytest.mark.parametrize("name, fn, options", STAGES, ids=IDS)
def test_every_keyword_is_declared_once_with_the_functions_default(
    name, fn, options: tuple[Option, ...]
) -> None:
    params = {
        k: p for k, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    declared = {o.name: o for o in options}
    assert len(declared) == len(options), "an option is declared twice"
    skip = NOT_OPTIONS | NOT_OPTIONS_OF.get(name, set())
    assert set(params) - skip == set(declared), set(params) ^ set(declared)
    for o in options:
        assert params[o.name].default == o.default, (o.name, params[o.name].default, o.default)


@pytest.mark.parametrize("name, fn, options", STAGES, ids=IDS)
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
    args = sp.parse_args(REQUIRED[name])
    for o in options:
        if o.cli:
            assert getattr(args, o.name) == o.default, o.name


@pytest.mark.parametrize("name, fn, options", STAGES, ids=IDS)
def test_the_recipe_schema_takes_the_same_options_and_choices(name, fn, options: tuple[Option, ...]) -> None:
    recipe_opts = {o.name: o for o in options if o.recipe}
    if name not in SCHEMA:  # not a recipe stage: nothing may claim to be a recipe key
        assert not recipe_opts
        return
    schema = SCHEMA[name]
    extra = set(schema) - set(recipe_opts)
    assert extra <= RECIPE_ONLY.get(name, set()), extra
    assert set(recipe_opts) <= set(schema), set(recipe_opts) - set(schema)
    for k, o in recipe_opts.items():
        if o.choices is not None:
            assert tuple(schema[k].choices) == tuple(o.choices), k


def _cli_accepts(o: Option, value: object) -> bool:
    try:
        o.parse(str(value))  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - argparse types raise ArgumentTypeError / ValueError
        return False
    return True


MINIMAL_STAGE = {"distill": {"student": "vit-micro"}, "prune": {"ratio": 0.25}, "quantize": {"mode": "fp16"}}


def _recipe_accepts(stage: str, name: str, value: object) -> bool:
    opts = {**MINIMAL_STAGE[stage], name: value}
    if stage == "prune" and name in ("target_params", "target_latency_ms", "target_macs"):
        opts.pop("ratio")
    try:
        validate_stage({stage: opts}, "r")
    except RecipeError:
        return False
    return True


STAGES_IN_RECIPES = [s for s in STAGES if s[0] in SCHEMA]


@pytest.mark.parametrize("name, fn, options", STAGES_IN_RECIPES, ids=[s[0] for s in STAGES_IN_RECIPES])
def test_cli_and_recipe_accept_the_same_numbers(name, fn, options: tuple[Option, ...]) -> None:
    """Every numeric option allows the same range on the command line and in a recipe."""
    probes = (-1, 0, 0.5, 1, 2, 21, 1e-3)
    checked = 0
    for o in options:
        if not (o.cli and o.recipe and o.parse is not None and o.name in SCHEMA[name]):
            continue
        if not set(SCHEMA[name][o.name].types) & {int, float}:
            continue
        for v in probes:
            assert _cli_accepts(o, v) == _recipe_accepts(name, o.name, v), (o.name, v)
        checked += 1
    assert checked >= 1


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


def test_distill_cli_reaches_every_option() -> None:
    sp = _subparser("distill")
    base = REQUIRED["distill"]
    args = sp.parse_args(
        [*base, "--loss", "kd", "feature", "--loss-weights", "1", "0.5", "--val-limit", "50"]
    )
    assert args.losses == ["kd", "feature"] and args.loss_weights == [1.0, 0.5] and args.val_limit == 50
    args = sp.parse_args(
        [*base, "--weight-decay", "0", "--image-size", "32", "--no-augment", "--cache-teacher"]
    )
    assert (args.weight_decay, args.image_size, args.augment, args.cache_teacher) == (0.0, 32, False, True)
    with pytest.raises(SystemExit):
        sp.parse_args([*base, "--alpha", "1.5"])  # the recipe refuses it too (alpha is a mixing weight)


def test_distill_loss_weights_must_match_the_losses(tmp_path, capsys) -> None:
    from vitshrink.cli import main

    argv = ["distill", "--teacher", str(tmp_path / "t"), "--student", "vit-micro", "--data", "fashion-mnist"]
    rc = main([*argv, "--out", str(tmp_path / "o"), "--loss", "kd", "ce", "--loss-weights", "1"])
    assert rc == 2 and "--loss-weights gives 1 weights for 2 losses" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- every command

# keywords a command's function has a different default for than its CLI argument, and why
CLI_DEFAULTS = {
    ("predict", "overlap"): "None: --overlap alone does not switch tiling on; the handler passes 0.25",
    ("compress", "data_opt"): "{}: compress takes None or a mapping alike",
}


def _function(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_parser_is_generated_from_its_declarations(name: str) -> None:
    import argparse

    from vitshrink.cli import HANDLERS

    command = COMMANDS[name]
    sp = _subparser(name)
    assert sp.get_default("fn") is HANDLERS[name]
    actions = [a for a in sp._actions if not isinstance(a, argparse._HelpAction)]
    declared = [o for o in command.arguments if o.cli]
    assert [a.dest for a in actions] == [o.name for o in declared]
    for a, o in zip(actions, declared, strict=True):
        assert a.option_strings == ([] if o.positional else [o.cli_flag, *o.aliases]), o.name
        assert a.default == o.default and a.help == o.help and a.required == (o.required or o.positional)
        assert a.type is o.parse and a.metavar == o.metavar, o.name
        assert a.nargs == (0 if o.action else o.nargs), o.name
        assert (None if a.choices is None else list(a.choices)) == (
            None if o.choices is None else list(o.choices)
        )
    # what it writes and reads are its own arguments
    dests = {o.name for o in declared}
    assert {out.dest for out in command.outputs} | set(command.inputs) | set(command.locks) <= dests
    assert ("overwrite" in dests) == bool(command.outputs)
    assert set(HANDLERS) == set(COMMANDS)


@pytest.mark.parametrize("name", [n for n, c in COMMANDS.items() if c.functions])
def test_every_command_flag_is_a_keyword_of_its_function(name: str) -> None:
    command = COMMANDS[name]
    params: dict[str, inspect.Parameter] = {}
    for spec in command.functions:
        params = {**inspect.signature(_function(spec)).parameters, **params}
    api = [o for o in command.options if o.cli and o.api]
    for o in api:
        assert o.keyword in params, (name, o.name, o.keyword)
        p = params[o.keyword]
        if p.default is not inspect.Parameter.empty and (name, o.name) not in CLI_DEFAULTS:
            assert o.default == p.default, (name, o.name, o.default, p.default)
    # every argument the function cannot do without has a CLI argument
    required = {
        k
        for spec in command.functions[:1]
        for k, p in inspect.signature(_function(spec)).parameters.items()
        if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    assert required <= {o.keyword for o in api}, required


def test_the_recipe_schema_is_generated_from_the_declarations() -> None:
    assert list(SCHEMA) == list(RECIPE_STAGES)
    for kind, options in RECIPE_STAGES.items():
        recipe = [o for o in options if o.recipe]
        assert list(SCHEMA[kind]) == [o.name for o in recipe], kind
        for o in recipe:
            opt = SCHEMA[kind][o.name]
            assert opt.option is o and opt.types == o.value_types and opt.required == o.recipe_required
            assert opt.choices == (None if o.choices is None else tuple(o.choices))


def test_one_owner_for_quant_modes_opset_and_key_values() -> None:
    import typing

    from vitshrink.compress.search import parse_budget
    from vitshrink.errors import VitshrinkError
    from vitshrink.export import DEFAULT_OPSET as EXPORT_DEFAULT
    from vitshrink.options import DEFAULT_OPSET, MIN_OPSET, OPSET, QUANT_MODES, key_value_pairs, key_values
    from vitshrink.quantize.onnx_quant import MODES, Mode

    assert typing.get_args(Mode) == QUANT_MODES and MODES is QUANT_MODES  # the Literal is for type checkers
    assert EXPORT_DEFAULT == DEFAULT_OPSET and OPSET.lo == MIN_OPSET == 14 and OPSET.hi is None
    assert SCHEMA["export"]["opset"].option.parse is OPSET
    assert key_value_pairs(" a = 1,b=x") == [("a", " 1"), ("b", "x")]
    assert key_values("size=64,name=x") == {"size": 64, "name": "x"}
    assert parse_budget("latency_ms=5,,size_mb=2") == {"latency_ms": 5.0, "size_mb": 2.0}
    with pytest.raises(VitshrinkError, match="budget: expected key=value, got 'x'"):
        parse_budget("x")


def test_no_hand_written_argparse_arguments_outside_the_generator() -> None:
    from pathlib import Path

    import vitshrink

    src = Path(vitshrink.__file__).parent
    calls = {
        str(f.relative_to(src)): f.read_text().count(".add_argument(")
        for f in src.rglob("*.py")
        if ".add_argument(" in f.read_text()
    }
    # the TensorRT scripts run standalone on a Jetson (no vitshrink there)
    standalone = {"deploy/_engine_runner.py", "deploy/_engine_builder.py"}
    assert {k: v for k, v in calls.items() if k not in standalone} == {"options/commands.py": 1}
    assert sum(calls.values()) <= 10


def test_prune_api_refuses_out_of_range_values_with_the_declared_checks() -> None:
    from vitshrink.errors import VitshrinkError
    from vitshrink.options import validate

    cases = {
        "recover_temperature": (0.0, "recover temperature must be > 0, got 0.0"),
        "steps": (0, "steps must be > 0, got 0"),
        "unstructured": (1.0, r"unstructured must be in \[0, 1\), got 1.0"),
        "depth_ratio": (1.5, r"depth ratio must be a number in \[0, 1\) or 'auto', got 1.5"),
        "importance": ("magnitud", "importance must be one of magnitude, taylor, random, got 'magnitud'"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(VitshrinkError, match=message):
            validate(PRUNE, {key: value})
    validate(PRUNE, {"granularity": ("heads",), "latency_table": None, "depth_ratio": "auto", "steps": 2})
