"""Every user-facing choice, option, argument and output rule, declared once (torch-free).

onnxruntime's quantization keeps one `CalibrationMethod` enum that every caller imports; vitshrink
does the same for its choices, and declares every argument of every command once as an `Option`
(type, range, choices, help), the way `transformers.HfArgumentParser` derives argparse from dataclass
fields. From these declarations come:

- the CLI: `COMMANDS` lists every subcommand's arguments in order, with what it writes (`Output`);
  `add_options` turns them into argparse arguments (`vitshrink.cli.build_parser` only loops);
- the recipe schema: `RECIPE_STAGES` (types, ranges and choices from the same `Option`s);
- the range checks of the Python API (`validate`, e.g. in `prune`).

Layout: `core.py` (choices, value types, `Option`, `check`/`validate`), `stages.py` (each stage's
options and `RECIPE_STAGES`), `commands.py` (`COMMANDS` and the argparse generator).

`tests/test_options.py` checks the Python signatures, the CLI and the recipe schema against them, so
they cannot drift apart. A new option goes into its stage's tuple (TRAIN, DISTILL, ...) or its command's
`Command.options`, with the function's default; the CLI flag and the recipe key follow.
"""

from __future__ import annotations

from ..cpu import TARGET_CPUS
from .commands import (
    COMMANDS,
    GLOBAL,
    Command,
    Output,
    add_options,
    collect,
)
from .core import (
    AMP_MODES,
    CALIB_METHODS,
    DEFAULT_OPSET,
    GRANULARITIES,
    IMPORTANCES,
    MIN_OPSET,
    ONNX_FORMATS,
    OPSET,
    QUANT_MODES,
    RUNTIMES,
    SPLITS,
    Option,
    check,
    key_value_pairs,
    key_values,
    parse_image_size,
    parse_resolution,
    validate,
)
from .stages import (
    DISTILL,
    EVALUATE,
    EXPORT,
    FORMAT,
    PRUNE,
    QUANTIZE,
    RECIPE_STAGES,
    TRAIN,
)

__all__ = [
    "GLOBAL",
    "OPSET",
    "parse_image_size",
    "parse_resolution",
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
    "RUNTIMES",
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
