"""Every user-facing choice, option, argument and output rule, declared once (torch-free).

onnxruntime's quantization keeps one `CalibrationMethod` enum that every caller imports; vitshrink
does the same for its choices, and declares every argument of every command once as an `Option`
(type, range, choices, help), the way `transformers.HfArgumentParser` derives argparse from dataclass
fields. From these declarations come:

- the CLI: `COMMANDS` lists every subcommand's arguments in order, with what it writes (`Output`);
  `add_options` turns them into argparse arguments (`vitshrink.cli.build_parser` only loops);
- the recipe schema: `RECIPE_STAGES` (types, ranges and choices from the same `Option`s);
- the range checks of the Python API (`validate`, e.g. in `prune`).

`tests/test_options.py` checks the Python signatures, the CLI and the recipe schema against them, so
they cannot drift apart. A new option goes into its stage's tuple (TRAIN, DISTILL, ...) or its command's
`Command.options`, with the function's default; the CLI flag and the recipe key follow.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import __version__
from .cpu import TARGET_CPUS
from .errors import ModelError

# -- choices ------------------------------------------------------------------------------------------
QUANT_MODES = ("fp16", "int8-dynamic", "int8-static", "int8-mixed", "int8")
CALIB_METHODS = ("minmax", "percentile", "entropy", "distribution")
IMPORTANCES = ("magnitude", "taylor", "random")
GRANULARITIES = ("heads", "mlp", "embed", "channels")
ONNX_FORMATS = ("auto", "file", "dir")
AMP_MODES = ("auto", "on", "off")
SPLITS = ("train", "val", "test")
DEFAULT_OPSET = 17
# The oldest opset with scaled_dot_product_attention in the exporter (every family's attention needs
# it); below it the exporter would fail and the dynamo fallback silently raise the opset to 18. No upper
# bound: an opset onnxruntime cannot load is refused by export's own load check.
MIN_OPSET = 14
__all__ = [
    "AMP_MODES",
    "CALIB_METHODS",
    "COMMANDS",
    "DEFAULT_OPSET",
    "DISTILL",
    "EVALUATE",
    "EXPORT",
    "FORMAT",
    "GRANULARITIES",
    "IMPORTANCES",
    "MIN_OPSET",
    "ONNX_FORMATS",
    "PRUNE",
    "QUANT_MODES",
    "QUANTIZE",
    "RECIPE_STAGES",
    "SPLITS",
    "TARGET_CPUS",
    "TRAIN",
    "Command",
    "Option",
    "Output",
    "add_options",
    "check",
    "collect",
    "key_value_pairs",
    "key_values",
    "validate",
]


# -- value types: argparse parses text with them, recipes and the API check values with them ----------
@dataclass(frozen=True)
class Number:
    """An int/float within [lo, hi] (lo / hi excluded unless lo_ok / hi_ok), NaN/inf refused.

    Called on text it is an argparse type; `reason(value)` checks a value (recipes, the API).
    `message`, when set, replaces the CLI's "must be ..." (with {v} for the value).
    """

    kind: type
    lo: float
    lo_ok: bool = True
    hi: float | None = None
    hi_ok: bool = True
    message: str | None = None

    @property
    def __name__(self) -> str:  # argparse names the type in its own messages
        return self.kind.__name__

    @property
    def types(self) -> tuple[type, ...]:
        return (int,) if self.kind is int else (int, float)

    def _ok(self, v: float) -> bool:
        low_ok = v >= self.lo if self.lo_ok else v > self.lo
        high_ok = self.hi is None or (v <= self.hi if self.hi_ok else v < self.hi)
        return math.isfinite(v) and low_ok and high_ok

    def __call__(self, text: str) -> Any:
        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if self.kind is int else 'a number'}, got '{text}'"
            ) from None
        if not self._ok(v):
            raise argparse.ArgumentTypeError(self.refusal(v, text))
        return v

    def refusal(self, v: Any, text: str | None = None) -> str:
        """The one-line refusal of an out-of-range `v` (as typed: `text`) on the command line or the API."""
        if self.message:
            return self.message.format(v=v)
        rng = f"{'>=' if self.lo_ok else '>'} {self.lo:g}"
        rng += f" and {'<=' if self.hi_ok else '<'} {self.hi:g}" if self.hi is not None else ""
        return f"must be {rng}, got '{v if text is None else text}'"

    def reason(self, v: Any) -> str | None:
        """Why the number `v` is out of range (None: it is fine), as recipes word it."""
        if self._ok(v):
            return None
        if self.hi is not None:
            return (
                f"must be in {'[' if self.lo_ok else '('}{self.lo:g}, {self.hi:g}{']' if self.hi_ok else ')'}"
            )
        if self.kind is int and self.lo_ok and self.lo == 1:
            return "must be > 0"
        return f"must be {'>=' if self.lo_ok else '>'} {self.lo:g}"


def number(
    kind: type, lo: float, *, lo_ok: bool = True, hi: float | None = None, hi_ok: bool = True
) -> Number:
    """An argparse type (and value check): an int/float within [lo, hi], NaN/inf refused."""
    return Number(kind, lo, lo_ok, hi, hi_ok)


POS_INT = number(int, 1)
NONNEG_INT = number(int, 0)
POS_FLOAT = number(float, 0, lo_ok=False)
NONNEG_FLOAT = number(float, 0)
UNIT = number(float, 0, hi=1)
FRACTION = number(float, 0, hi=1, hi_ok=False)  # [0, 1): a fraction to remove (all of it is no model)
SEED = number(int, 0)
OVERLAP = number(float, 0, hi=0.9)
OPSET = Number(
    int, MIN_OPSET, message=f"opset {{v}} is not supported: vitshrink exports opset {MIN_OPSET} or newer"
)


class _FractionOrAuto:
    """A FRACTION or the word 'auto' (prune's depth_ratio)."""

    __name__ = "fraction_or_auto"
    types = (float, int, str)

    def __call__(self, v: str) -> float | str:
        return "auto" if v == "auto" else FRACTION(v)

    def reason(self, v: Any) -> str | None:
        if isinstance(v, str):
            return None if v == "auto" else "must be a number in [0, 1) or 'auto'"
        ok = not isinstance(v, bool) and 0 <= v < 1
        return None if ok else "must be a number in [0, 1) or 'auto'"


fraction_or_auto = _FractionOrAuto()


class _Resolution:
    """The size a network runs at inside its graph (export/quantize --resolution): H or HxW pixels, or
    a fraction in (0, 1] of the deployed size (0.5 = half the side)."""

    __name__ = "resolution"
    types = (float, int, str, list)

    def __call__(self, v: str) -> float | tuple[int, int]:
        why = self.reason(v)
        if why:
            raise argparse.ArgumentTypeError(f"{why}, got '{v}'")
        return parse_resolution(v)

    def reason(self, v: Any) -> str | None:
        try:
            parse_resolution(v)
        except ModelError:
            return "must be H or HxW pixels, or a fraction in (0, 1] of the deployed size"
        return None


def parse_resolution(v: Any) -> float | tuple[int, int]:
    """--resolution as (H, W) pixels, or a float fraction in (0, 1]; ModelError otherwise."""
    if isinstance(v, bool):
        raise ModelError(f"resolution must be H[xW] pixels or a fraction, got {v!r}")
    if isinstance(v, float) or (isinstance(v, str) and "." in v and "x" not in v.lower()):
        try:
            f = float(v)
        except ValueError:
            raise ModelError(f"resolution must be H[xW] pixels or a fraction, got {v!r}") from None
        if not (math.isfinite(f) and 0 < f <= 1):
            raise ModelError(f"a resolution fraction must be in (0, 1], got {v!r}")
        return f
    return parse_image_size(v)


resolution = _Resolution()


def key_value_pairs(text: str, *, skip_empty: bool = False) -> list[tuple[str, str]]:
    """`k=v,k=v` -> [(k, v)] (keys stripped, values as written); ValueError names a part without '='.
    The one `key=value` parser: --data-opt (`key_values`) and compress budgets use it."""
    parts = text.split(",")
    if skip_empty:
        parts = [p.strip() for p in parts if p.strip()]
    out = []
    for part in parts:
        if "=" not in part:
            raise ValueError(f"expected key=value, got '{part}'")
        k, v = part.split("=", 1)
        out.append((k.strip(), v))
    return out


def key_values(text: str) -> dict[str, Any]:
    """An argparse type: `k=v,k=v` -> dict (values that read as JSON become numbers etc.)."""
    if not text:
        return {}
    try:
        pairs = key_value_pairs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    out: dict[str, Any] = {}
    for k, v in pairs:
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v.strip()
    return out


def parse_image_size(text: str | int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """ "512" -> (512, 512), "512x384" -> (512, 384) (height x width); also ints and pairs."""
    if isinstance(text, int) and not isinstance(text, bool):
        parts: list[Any] = [text, text]
    elif isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = str(text).lower().replace("*", "x").split("x")
        parts = parts * 2 if len(parts) == 1 else parts
    try:
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ModelError(f"image size must be H or HxW in pixels, got {text!r}") from None
    if h < 1 or w < 1:
        raise ModelError(f"image size must be positive, got {text!r}")
    return h, w


def image_size(text: str) -> tuple[int, int]:
    """An argparse type: H or HxW (height x width)."""
    try:
        return parse_image_size(text)
    except ModelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _losses(v: Any) -> str | None:
    if isinstance(v, list) and not all(isinstance(x, str) for x in v):
        return "must be a loss name, a list of names or a {name: weight} mapping"
    if isinstance(v, dict) and not all(
        isinstance(k, str) and isinstance(w, int | float) and not isinstance(w, bool) for k, w in v.items()
    ):
        return "must map loss names to numeric weights"
    return None


def _granularity(v: Any) -> str | None:
    if v == "auto":
        return None
    parts = v.split(",") if isinstance(v, str) else v
    if not all(isinstance(p, str) for p in parts):
        return f"must be names from {', '.join(GRANULARITIES)}"
    bad = [p for p in parts if p.strip() not in GRANULARITIES]
    return f"unknown {bad} (choose from {', '.join(GRANULARITIES)})" if bad else None


# -- declarations -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One argument of a command (a keyword of its function), as the CLI and recipes expose it.

    name: the Python keyword, argparse dest and recipe key; flag: the CLI flag (default
    --name-with-dashes; `aliases` add more); positional: a positional CLI argument; required: a required
    CLI flag; parse: argparse type (a `Number` also gives the recipe type and range); choices;
    action: argparse action for flags ("store_false" for --no-x); nargs (the default stays the
    function's); metavar; cli / recipe: where it is exposed (API-only options have both False);
    group: a mutually exclusive CLI group; section: a titled CLI argument group (help layout);
    types / check: the recipe types and value check where `parse` does not give them;
    recipe_required: a recipe stage must give it; kwarg: the function's keyword when it differs from
    name (None and api False: a CLI-only argument the command's handler maps itself).
    """

    name: str
    default: Any
    help: str | None
    parse: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    flag: str | None = None
    action: str | None = None
    nargs: str | None = None
    metavar: str | None = None
    cli: bool = True
    recipe: bool = True
    group: str | None = None  # mutually exclusive CLI group
    aliases: tuple[str, ...] = ()
    positional: bool = False
    required: bool = False
    section: str | None = None
    types: tuple[type, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    recipe_required: bool = False
    kwarg: str | None = None
    api: bool = True

    @property
    def cli_flag(self) -> str:
        return self.name if self.positional else self.flag or "--" + self.name.replace("_", "-")

    @property
    def keyword(self) -> str:
        return self.kwarg or self.name

    @property
    def value_types(self) -> tuple[type, ...]:
        """The types a recipe (YAML) value may have."""
        if self.types is not None:
            return self.types
        if self.action in ("store_true", "store_false"):
            return (bool,)
        return getattr(self.parse, "types", (str,))

    @property
    def value_check(self) -> Callable[[Any], str | None] | None:
        return self.check or getattr(self.parse, "reason", None)


def check(o: Option, value: Any) -> str | None:
    """Why `value` (of one of `o.value_types`) is not allowed for `o` (None: it is): its choices and
    range. The one value check: recipes (after their type check), the CLI's types and `validate` use it."""
    if o.choices is not None and value not in o.choices:
        return f"must be one of {', '.join(map(str, o.choices))}"
    fn = o.value_check
    return fn(value) if fn is not None else None


def validate(options: Iterable[Option], values: Mapping[str, Any]) -> None:
    """Check the given keyword values of a stage function (None: not given) against their declarations;
    a bad one raises a one-line VitshrinkError ("recover temperature must be > 0, got 0.0")."""
    from .errors import VitshrinkError

    for o in options:
        v = values.get(o.name)
        if o.name not in values or v is None:
            continue
        types = o.value_types
        if not (isinstance(v, types) and (bool in types or not isinstance(v, bool))):
            continue  # the API also takes e.g. tuples and paths; only values of the declared type are checked
        if reason := check(o, v):
            raise VitshrinkError(f"{o.name.replace('_', ' ')} {reason}, got {v!r}")


def _data_options(help: str = "options of the data SPEC, e.g. size=256,n_train=400 for aerial") -> Option:
    return Option("data_options", None, help, key_values, flag="--data-opt", metavar="K=V,..", recipe=False)


def _augment(help: str = "no random flips/shifts") -> Option:
    return Option("augment", True, help, flag="--no-augment", action="store_false")


_RESUME = Option("resume", False, "continue from OUT.ckpt", action="store_true", recipe=False)
_SEED = Option("seed", 0, "random seed", SEED)
_LIMIT = Option("limit", None, "use a deterministic subset of N training samples", POS_INT)
_VAL_LIMIT = Option("val_limit", 2000, "validate on at most N samples", POS_INT)
_WEIGHT_DECAY = Option("weight_decay", 0.05, "AdamW weight decay", NONNEG_FLOAT)


def _not_in_recipes(options: tuple[Option, ...]) -> tuple[Option, ...]:
    return tuple(replace(o, recipe=False) for o in options)


# train and eval are not recipe stages (compress trains through distill / prune recovery)
TRAIN: tuple[Option, ...] = _not_in_recipes(
    (
        Option("epochs", 1, "training epochs", POS_INT),
        Option("batch_size", 128, "batch size", POS_INT),
        Option("lr", 1e-3, "peak learning rate (warm-up, then cosine decay)", POS_FLOAT),
        _WEIGHT_DECAY,
        Option("image_size", None, "input size of a preset model (default: the data's)", POS_INT),
        Option("channels", None, "input channels of a preset model (default: the data's)", POS_INT),
        _LIMIT,
        _VAL_LIMIT,
        _augment(),
        _RESUME,
        _SEED,
        _data_options(),
        Option(
            "amp",
            "auto",
            "mixed precision: auto = CUDA only; on = also bf16 on CPU (fast on AMX/AVX512-BF16 CPUs)",
            choices=AMP_MODES,
        ),
    )
)

EVALUATE: tuple[Option, ...] = _not_in_recipes(
    (
        Option("split", "test", "which split to score", choices=SPLITS),
        Option("batch_size", 64, "batch size", POS_INT),
        Option("limit", None, "use a deterministic subset of N samples", POS_INT),
        Option("threads", None, "intra-op threads", POS_INT),
        _data_options(),
    )
)

DISTILL: tuple[Option, ...] = (
    Option("epochs", 1, "training epochs", POS_INT),
    Option(
        "losses",
        "kd",
        "kd | mse | dist-token | feature | attention | cwd | hard | ce (several combine; see --loss-weights)",
        flag="--loss",
        nargs="+",
        metavar="LOSS",
        types=(str, list, dict),
        check=_losses,
    ),
    Option("alpha", 0.5, "weight of distillation vs label loss", UNIT),
    Option("temperature", 4.0, "softmax temperature of logit distillation", POS_FLOAT),
    Option("loss_options", None, "extra keyword options of the losses", cli=False, recipe=False),
    Option("batch_size", 128, "batch size", POS_INT),
    Option("lr", 1e-3, "peak learning rate (warm-up, then cosine decay)", POS_FLOAT),
    _WEIGHT_DECAY,
    _LIMIT,
    _VAL_LIMIT,
    Option("image_size", None, "input size of a preset student (default: the teacher's)", POS_INT),
    _augment(),
    Option(
        "cache_teacher",
        False,
        "compute teacher logits once (plain and flipped view) instead of every step; logit losses only",
        action="store_true",
    ),
    _RESUME,
    _SEED,
    _data_options(),
)

PRUNE: tuple[Option, ...] = (
    Option("ratio", None, "fraction of every prunable width to remove", FRACTION, group="target"),
    Option("target_params", None, "prune until at most this many parameters remain", POS_INT, group="target"),
    Option(
        "target_latency_ms",
        None,
        "prune until the exported model runs this fast here (onnxruntime), or per --latency-table",
        POS_FLOAT,
        group="target",
    ),
    Option("target_macs", None, "prune until at most this many MACs remain", POS_INT, group="target"),
    Option("importance", "magnitude", "how to rank what to remove", choices=IMPORTANCES),
    Option(
        "granularity",
        GRANULARITIES,
        "axes to prune (comma-separated from heads, mlp, embed, channels), or 'auto': the subset whose "
        "one-shot pruning changes the outputs least",
        types=(str, list),
        check=_granularity,
    ),
    Option("round_to", 8, "keep widths multiples of this (hardware-friendly)", POS_INT),
    Option("steps", 1, "prune in this many equal steps", POS_INT),
    Option("recover_epochs", 0, "distillation epochs after each step (needs --data)", NONNEG_INT),
    Option("teacher", None, "teacher for recovery (default: the unpruned model)", recipe=False),
    Option("data", None, "data SPEC for recovery, Taylor importance and latency probes", recipe=False),
    Option(
        "unstructured",
        None,
        "global magnitude sparsity S in [0,1) at the end (shrinks compressed files, not dense latency)",
        FRACTION,
    ),
    Option("latency_table", None, "JSON {ratio: ms} measured on another device", types=(str, dict)),
    Option("batch_size", 64, "recovery batch size", POS_INT),
    Option("lr", 1e-4, "recovery learning rate", POS_FLOAT),
    Option("limit", None, "recover on a deterministic subset of N training samples", POS_INT),
    _SEED,
    _data_options("options of the data SPEC, e.g. size=256 for aerial"),
    _augment("no flip/shift augmentation during recovery"),
    Option(
        "recover_losses",
        "kd",
        "recovery loss: kd (from the unpruned model or --teacher), ce (labels), or e.g. kd:1,ce:1",
        flag="--recover-loss",
        types=(str, list, dict),
        check=_losses,
    ),
    Option(
        "depth_ratio",
        0.0,
        "first remove this fraction of the transformer blocks per stage, least influential first (ViT, "
        "DeiT, Swin, SegFormer); 'auto': split the budget between depth (0, 0.25, 0.5) and width, fastest "
        "measured here wins",
        fraction_or_auto,
    ),
    Option(
        "recover_temperature",
        None,
        "KD temperature during recovery (default: 1 for segmentation, 4 for classification)",
        POS_FLOAT,
    ),
)

# export and quantize both write ONNX: one declaration for both
FORMAT = Option(
    "format",
    "auto",
    "file: one .onnx; dir: optimum-style folder (model.onnx, config.json, preprocessor_config.json); "
    "auto: dir unless --out ends in .onnx",
    choices=ONNX_FORMATS,
    recipe=False,
)

# export and quantize (a model directory in) both take these; recipes too
_ARGMAX = Option(
    "argmax",
    False,
    "segmentation: end the graph in ArgMax + Cast to a uint8 class map (N, H, W) instead of logits; "
    "such a model cannot be tiled (overlaps are averaged on logits)",
    action="store_true",
)
_RESOLUTION = Option(
    "resolution",
    None,
    "segmentation: run the network at this size inside the graph (H[xW] px, or a fraction such as 0.5 "
    "of the deployed size): the graph takes the photo at any size, resizes it, and returns masks at the "
    "photo's size (SegFormer, MobileViT, UperNet, Swin at its multiples)",
    resolution,
    metavar="H[xW]|F",
)

QUANTIZE: tuple[Option, ...] = (
    Option(
        "mode",
        "int8",
        "fp16, int8 (fastest of dynamic/static/mixed at equal quality, or the best fit to "
        "--size-mb / --latency-ms) or one variant",
        choices=QUANT_MODES,
        recipe_required=True,
    ),
    Option(
        "calib_data",
        None,
        "data SPEC whose validation split calibrates and scores int8",
        recipe=False,
    ),
    Option("calib_method", "percentile", "activation calibration method", choices=CALIB_METHODS),
    Option("max_drop", None, "largest allowed metric drop; sensitive nodes fall back to float", NONNEG_FLOAT),
    Option("size_mb", None, "int8: keep the most accurate variant whose file fits N MB", POS_FLOAT),
    Option("latency_ms", None, "int8: keep the most accurate variant within N ms (1 thread)", POS_FLOAT),
    Option(
        "data_options",
        None,
        "options of the calibration dataset, e.g. size=256 for aerial",
        key_values,
        flag="--data-opt",
        recipe=False,
    ),
    Option(
        "target_cpu",
        "auto",
        "CPU the int8 model will run on (auto = this one); avx2 = x86 without VNNI: 7-bit weights, because "
        "onnxruntime's AVX2 int8 kernels saturate with full 8-bit weights",
        choices=TARGET_CPUS,
    ),
    replace(_ARGMAX, help="segmentation: end the quantized graph in ArgMax + Cast to a uint8 class map"),
    replace(
        _RESOLUTION,
        help="segmentation, model directory in (a recipe exports the stage's model): export it to run "
        "at this size inside the graph first (see export --resolution)",
    ),
    FORMAT,
)


def _arg(name: str, default: Any, help: str | None, parse: Any = None, **kw: Any) -> Option:
    """A command argument that is not a recipe option (inputs, outputs, run settings)."""
    return Option(name, default, help, parse, recipe=False, **kw)


_IMAGE_SIZE = _arg(
    "image_size",
    None,
    "input size to export/run at (default: the model's preprocess size)",
    image_size,
    metavar="H[xW]",
)
_DYNAMIC_SIZE = _arg(
    "dynamic_size",
    False,
    "dynamic height/width axes (SegFormer; MobileViT and UperNet-MobileViT at multiples of 32 x patch); "
    "parity is checked at two sizes",
    action="store_true",
)

# export writes ONNX; all but image_size/dynamic_size/format are also the recipe's export stage
EXPORT: tuple[Option, ...] = (
    Option("opset", DEFAULT_OPSET, None, OPSET),
    Option("dynamic_batch", False, None, action="store_true"),
    _IMAGE_SIZE,
    _DYNAMIC_SIZE,
    _ARGMAX,
    _RESOLUTION,
    FORMAT,
)

# keys of recipe stages that are not CLI options of a stage command
_STUDENT = Option(
    "student", None, "preset name or model directory", required=True, recipe_required=True, types=(str,)
)
_STUDENT_OPTIONS = Option(
    "student_options",
    None,
    "preset config overrides, e.g. {hidden_size: 32}",
    types=(dict,),
    cli=False,
    api=False,
)
_CALIBRATE = Option(
    "calibrate",
    None,
    "calibrate/score on the run's data (default: only where the mode or max_drop needs it)",
    types=(bool,),
    cli=False,
    api=False,
)
# A CNN trained from scratch on the labels beside the pipeline (vitshrink.baseline), for about as long as
# the stage named `budget` took (or `budget` seconds); it does not feed the next stage. Recipe-only.
BASELINE: tuple[Option, ...] = tuple(
    replace(o, cli=False)
    for o in (
        Option("model", None, "preset; default: the task's CNN baseline (baseline.BASELINES)", types=(str,)),
        Option(
            "budget",
            None,
            "a stage label (e.g. distill) or seconds; default: distill",
            types=(str, int, float),
        ),
        Option("batch_size", 64, "batch size", POS_INT),
        Option("lr", 3e-3, "peak learning rate", POS_FLOAT),
        _LIMIT,
        _augment(),
        _SEED,
    )
)

# recipe stage -> its options (those with recipe=True), in the order "allowed: ..." lists them
RECIPE_STAGES: dict[str, tuple[Option, ...]] = {
    "distill": (_STUDENT, _STUDENT_OPTIONS, *DISTILL),
    "prune": PRUNE,
    "quantize": (*QUANTIZE, _CALIBRATE),
    "baseline": BASELINE,
    "export": EXPORT,
}


# -- commands -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """What a command writes: the argument naming it and the kind `vitshrink.outputs.check_output` checks.

    kind: model | ckpt (OUT.ckpt beside a model OUT) | file | onnx (a file, or an ONNX folder per
    --format) | predict | trt (default MODEL_trt) | run; into: a folder the command writes into.
    An output whose argument is not given (None) is not written, except trt's default folder.
    """

    dest: str
    kind: str
    into: bool = False


@dataclass(frozen=True)
class Command:
    """A subcommand: its arguments in CLI order, the functions whose keywords they are (module:function,
    checked by tests), what it writes, the inputs no output may be or contain, the folders it locks
    besides its outputs, and its required mutually exclusive groups. Commands that write get --overwrite."""

    name: str
    help: str
    options: tuple[Option, ...]
    functions: tuple[str, ...] = ()
    outputs: tuple[Output, ...] = ()
    inputs: tuple[str, ...] = ()
    locks: tuple[str, ...] = ()
    required_groups: tuple[str, ...] = ()

    @property
    def arguments(self) -> tuple[Option, ...]:
        """Everything its parser takes: the shared --quiet/--debug, its options, --overwrite."""
        return (*SUBCOMMAND, *self.options, *((OVERWRITE,) if self.outputs else ()))


# Global options work before and after the subcommand: the subcommand's copies default to SUPPRESS, so
# they only override what was given before it when given themselves.
_QUIET = _arg("quiet", False, "no progress bars", action="store_true", aliases=("-q",), api=False)
_DEBUG = _arg("debug", False, "show tracebacks for unexpected errors", action="store_true", api=False)
GLOBAL: tuple[Option, ...] = (
    _arg("version", f"vitshrink {__version__}", None, action="version", api=False),
    _DEBUG,
    _QUIET,
)
SUBCOMMAND: tuple[Option, ...] = (
    replace(_QUIET, default=argparse.SUPPRESS),
    replace(_DEBUG, default=argparse.SUPPRESS, help=argparse.SUPPRESS),
)
OVERWRITE = _arg(
    "overwrite",
    False,
    "allow replacing an existing file vitshrink did not write (never a folder of yours, never an input "
    "of this run)",
    action="store_true",
)

_MODEL = _arg("model", None, None, positional=True)
_OUT = _arg("out", None, None, required=True)
_DATA = _arg("data", None, "fashion-mnist | aerial | FOLDER", required=True)
_THREADS = _arg("threads", None, None, POS_INT)
_MODEL_OUT = (Output("out", "model"), Output("out", "ckpt"))
_VIDEO = "video (FILE.mp4 / .mov / .avi / .mkv, or folders with --frames)"

_COMMANDS: tuple[Command, ...] = (
    Command(
        "train",
        "Train a model (preset or directory) on a dataset.",
        (
            _arg("model", None, "preset name (see `vitshrink presets`) or model directory", required=True),
            _DATA,
            _OUT,
            *TRAIN,
        ),
        ("vitshrink.train:train",),
        _MODEL_OUT,
        ("model", "data"),
    ),
    Command(
        "eval",
        "Evaluate a model directory or ONNX file.",
        (
            _MODEL,
            _DATA,
            *EVALUATE,
            _arg("json", False, "print metrics as JSON", action="store_true", api=False),
        ),
        ("vitshrink.evaluate:evaluate",),
    ),
    Command(
        "bench",
        "Latency p50/p90/p99, throughput, peak RSS, size, params, MACs.",
        (
            _arg(
                "models",
                None,
                "model directories and/or ONNX files (several are compared in one run)",
                nargs="+",
                positional=True,
                kwarg="model",
            ),
            replace(_THREADS, help="intra-op threads"),
            _arg("batch", 8, "batch size for throughput", POS_INT),
            _arg("runs", 30, None, POS_INT),
            _arg("rounds", 3, None, POS_INT),
            _arg("device", "cpu", None, choices=("cpu", "cuda")),
            _arg("json", None, "write results to this JSON file", kwarg="json_out"),
            _IMAGE_SIZE,
        ),
        ("vitshrink.bench:bench",),
        (Output("json", "file"),),
        ("models",),
    ),
    Command(
        "export",
        "Export a model directory to ONNX (simplified, parity-checked).",
        (_MODEL, _OUT, *EXPORT),
        ("vitshrink.export:export",),
        (Output("out", "onnx"),),
        ("model",),
    ),
    Command(
        "demo",
        "Run the whole pipeline on embedded data.",
        (
            _arg("task", "all", None, choices=("classification", "segmentation", "all")),
            _arg("out", "demo-out", None),
            _arg("quick", False, "small budget: under 5 minutes on 2 cores", action="store_true"),
            _THREADS,
            _arg(
                "student",
                "default",
                "paper: the segmentation student is the paper's UperNet + MobileViT",
                choices=("default", "paper"),
            ),
        ),
        ("vitshrink.demo:demo",),
        (Output("out", "run", into=True),),
    ),
    Command(
        "distill",
        "Distil a teacher into a student.",
        (
            _arg("teacher", None, None, required=True),
            _STUDENT,
            _DATA,
            _OUT,
            *DISTILL,
            _arg("loss_weights", None, "one weight per --loss", NONNEG_FLOAT, nargs="+", api=False),
        ),
        ("vitshrink.distill:distill",),
        _MODEL_OUT,
        ("teacher", "student", "data"),
    ),
    Command(
        "prune",
        "Structured pruning that physically removes heads/neurons/dims/channels.",
        (_MODEL, _OUT, *PRUNE),
        ("vitshrink.prune:prune",),
        _MODEL_OUT,
        ("model", "teacher", "data", "latency_table"),
    ),
    Command(
        "quantize",
        "fp16 / int8 quantization (ONNX) with ViT-aware fallbacks.",
        (
            replace(_MODEL, help="model directory, Hub id, ONNX file or ONNX folder"),
            _OUT,
            *QUANTIZE,
            _IMAGE_SIZE,
            _DYNAMIC_SIZE,
        ),
        ("vitshrink.quantize:quantize",),
        (Output("out", "onnx"),),
        ("model", "calib_data"),
    ),
    Command(
        "predict",
        "Run an ONNX model on images (numpy + Pillow + onnxruntime only).",
        (
            _MODEL,
            _arg("images", None, "image files or folders", nargs="+", positional=True),
            _arg("out", None, None),
            _THREADS,
            _arg(
                "tile",
                None,
                "segmentation: sliding-window tiles of N px (default: the model input) at the frame's own "
                "resolution, logits averaged where tiles overlap; by default tiles are used when a frame is "
                ">= 2x the model input both ways",
                image_size,
                metavar="N[xM]",
                group="resize",
            ),
            _arg(
                "resize",
                False,
                "segmentation: always resize the frame to the model input",
                action="store_true",
                group="resize",
                api=False,
            ),
            _arg("overlap", None, "fraction of a tile shared with its neighbour (default 0.25)", OVERLAP),
            _arg(
                "frames",
                False,
                "each folder is one video's frames, in name order",
                action="store_true",
                section=_VIDEO,
                api=False,
            ),
            _arg("every", 1, "keep every Nth frame", POS_INT, section=_VIDEO),
            _arg(
                "max_fps",
                None,
                "keep at most this many frames per second of video",
                POS_FLOAT,
                section=_VIDEO,
            ),
            _arg("fps", None, "frame rate of a --frames folder (default 10)", POS_FLOAT, section=_VIDEO),
        ),
        ("vitshrink.deploy:predict", "vitshrink.deploy:predict_video"),
        (Output("out", "predict", into=True),),
        ("model", "images"),
    ),
    Command(
        "trt-recipe",
        "Write a TensorRT build command and runner for a Jetson.",
        (
            replace(_MODEL, kwarg="onnx_path"),
            _arg("out", None, None, kwarg="out_dir"),
            _arg("no_fp16", False, None, action="store_true", api=False),
            _arg("workspace_mb", None, None, POS_INT),
        ),
        ("vitshrink.deploy.trt:trt_recipe",),
        (Output("out", "trt", into=True),),
        ("model",),
    ),
    Command(
        "compress",
        "Run a recipe, or search recipes under a device budget.",
        (
            _MODEL,
            _DATA,
            _arg(
                "data_opt",
                {},
                "dataset options, e.g. size=256,n_train=400 for aerial",
                key_values,
                metavar="K=V,..",
                kwarg="data_options",
            ),
            _OUT,
            _arg("recipe", None, None, group="recipe"),
            # passed through as text: compress.parse_budget validates keys and values with one-line errors
            _arg("budget", None, "latency_ms=..,size_mb=..,max_drop=..", group="recipe"),
            _arg("device", "cpu", None, choices=("cpu", "cuda", "jetson-nano")),
            _arg(
                "trials",
                None,
                "budget mode: an optional cap on trials (the time budget ends the search)",
                POS_INT,
            ),
            # text: compress.parse_duration validates it (one-line errors), default 30m printed at start
            _arg("time_budget", None, "budget mode: wall time for the whole run, e.g. 30m, 2h, 90s"),
        ),
        ("vitshrink.compress:compress",),
        (Output("out", "run", into=True),),
        ("model", "data", "recipe"),
        required_groups=("recipe",),
    ),
    Command(
        "report",
        "Write report.md and report.html for a run directory.",
        (_arg("dir", None, None, positional=True, kwarg="run_dir"),),
        ("vitshrink.report:report",),
        locks=("dir",),
    ),
    Command("presets", "List model presets.", ()),
)
COMMANDS: dict[str, Command] = {c.name: c for c in _COMMANDS}


# -- generation ---------------------------------------------------------------------------------------
def _argparse_kwargs(o: Option) -> dict[str, Any]:
    kw: dict[str, Any] = {} if o.help is None else {"help": o.help}
    if not o.positional:
        kw["dest"] = o.name
    if o.action == "version":
        return {**kw, "action": o.action, "version": o.default}
    # a fresh copy of a mutable default per parser (argparse hands the object itself to the namespace)
    kw["default"] = type(o.default)(o.default) if isinstance(o.default, dict | list) else o.default
    if o.action:
        kw["action"] = o.action
    for key in ("choices", "nargs", "metavar"):
        if (value := getattr(o, key)) is not None:
            kw[key] = list(value) if key == "choices" else value
    if o.parse is not None:
        kw["type"] = o.parse
    if o.required:
        kw["required"] = True
    return kw


def add_options(
    parser: argparse.ArgumentParser, options: Sequence[Option], required_groups: Sequence[str] = ()
) -> None:
    """Add the CLI-exposed `options` to an argparse (sub)parser, with their types, choices and help."""
    sections: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for o in options:
        if not o.cli:
            continue
        target: Any = parser
        if o.section:
            if o.section not in sections:
                sections[o.section] = parser.add_argument_group(o.section)
            target = sections[o.section]
        if o.group:
            if o.group not in groups:
                groups[o.group] = target.add_mutually_exclusive_group(required=o.group in required_groups)
            target = groups[o.group]
        target.add_argument(o.cli_flag, *o.aliases, **_argparse_kwargs(o))


def collect(args: argparse.Namespace, options: Sequence[Option]) -> dict[str, Any]:
    """The keyword arguments for the stage function from parsed CLI arguments."""
    return {o.name: getattr(args, o.name) for o in options if o.cli}
