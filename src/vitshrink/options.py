"""Every user-facing choice and stage option, declared once (torch-free).

onnxruntime's quantization keeps one `CalibrationMethod` enum that every caller imports; vitshrink
does the same for its choices, and declares each option of every stage (train, eval, distill, prune,
quantize) once as a `Option` (type, range, choices, help). The CLI parsers are generated from these declarations, the recipe schema takes
its choices from them, and `tests/test_options.py` checks the Python signatures, the CLI and the recipe
schema against them, so the three can no longer drift apart.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .cpu import TARGET_CPUS

# -- choices ------------------------------------------------------------------------------------------
QUANT_MODES = ("fp16", "int8-dynamic", "int8-static", "int8-mixed", "int8")
CALIB_METHODS = ("minmax", "percentile", "entropy", "distribution")
IMPORTANCES = ("magnitude", "taylor", "random")
GRANULARITIES = ("heads", "mlp", "embed", "channels")
ONNX_FORMATS = ("auto", "file", "dir")
AMP_MODES = ("auto", "on", "off")
SPLITS = ("train", "val", "test")
__all__ = [
    "AMP_MODES",
    "CALIB_METHODS",
    "DISTILL",
    "EVALUATE",
    "FORMAT",
    "GRANULARITIES",
    "IMPORTANCES",
    "ONNX_FORMATS",
    "PRUNE",
    "QUANT_MODES",
    "QUANTIZE",
    "SPLITS",
    "TARGET_CPUS",
    "TRAIN",
    "Option",
    "add_options",
    "collect",
]


# -- argparse types (also used by cli.py) ------------------------------------------------------------
def number(
    kind: type, lo: float, *, lo_ok: bool = True, hi: float | None = None, hi_ok: bool = True
) -> Callable[[str], Any]:
    """An argparse type: an int/float within [lo, hi] (lo / hi excluded unless lo_ok / hi_ok), NaN/inf
    refused."""

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got '{text}'"
            ) from None
        low_ok = v >= lo if lo_ok else v > lo
        high_ok = hi is None or (v <= hi if hi_ok else v < hi)
        if not math.isfinite(v) or not low_ok or not high_ok:
            rng = f"{'>=' if lo_ok else '>'} {lo:g}"
            rng += f" and {'<=' if hi_ok else '<'} {hi:g}" if hi is not None else ""
            raise argparse.ArgumentTypeError(f"must be {rng}, got '{text}'")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


POS_INT = number(int, 1)
NONNEG_INT = number(int, 0)
POS_FLOAT = number(float, 0, lo_ok=False)
NONNEG_FLOAT = number(float, 0)
UNIT = number(float, 0, hi=1)
FRACTION = number(float, 0, hi=1, hi_ok=False)  # [0, 1): a fraction to remove (all of it is no model)
SEED = number(int, 0)


def fraction_or_auto(v: str) -> float | str:
    return "auto" if v == "auto" else FRACTION(v)


def key_values(text: str) -> dict[str, Any]:
    """Parse `k=v,k=v` (numbers become numbers)."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for part in text.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected key=value, got '{part}'")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v.strip()
    return out


# -- stage options ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One keyword of a stage function, as the CLI and recipes expose it.

    name: the Python keyword (and recipe key); flag: the CLI flag (default --name-with-dashes);
    parse: argparse type; choices; action: argparse action for flags ("store_false" for --no-x);
    nargs: argparse nargs (the default stays the function's); metavar: argparse metavar;
    cli / recipe: where it is exposed (API-only options have both False; stages that are not recipe
    stages, train and eval, have recipe False throughout).
    """

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    flag: str | None = None
    action: str | None = None
    nargs: str | None = None
    metavar: str | None = None
    cli: bool = True
    recipe: bool = True
    group: str | None = None  # mutually exclusive CLI group

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


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
    Option("latency_table", None, "JSON {ratio: ms} measured on another device"),
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

QUANTIZE: tuple[Option, ...] = (
    Option(
        "mode",
        "int8",
        "fp16, int8 (fastest of dynamic/static/mixed at equal quality, or the best fit to "
        "--size-mb / --latency-ms) or one variant",
        choices=QUANT_MODES,
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
    FORMAT,
)


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Add the CLI-exposed `options` to an argparse (sub)parser, with their types, choices and help."""
    groups: dict[str, Any] = {}
    for o in options:
        if not o.cli:
            continue
        target: Any = parser
        if o.group:
            if o.group not in groups:
                groups[o.group] = parser.add_mutually_exclusive_group()
            target = groups[o.group]
        kw: dict[str, Any] = {"dest": o.name, "help": o.help}
        if o.action:
            kw.update(action=o.action)
        else:
            # with nargs the default stays the function's own (e.g. "kd", not ["kd"])
            kw.update(default=o.default)
            if o.parse is not None:
                kw["type"] = o.parse
            if o.choices is not None:
                kw["choices"] = list(o.choices)
            if o.nargs is not None:
                kw["nargs"] = o.nargs
            if o.metavar is not None:
                kw["metavar"] = o.metavar
        target.add_argument(o.cli_flag, **kw)


def collect(args: argparse.Namespace, options: Sequence[Option]) -> dict[str, Any]:
    """The keyword arguments for the stage function from parsed CLI arguments."""
    return {o.name: getattr(args, o.name) for o in options if o.cli}
