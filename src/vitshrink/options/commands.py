"""Every command: its arguments in CLI order, outputs and inputs, and the argparse generator."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import __version__
from .core import (
    NONNEG_FLOAT,
    OVERLAP,
    POS_FLOAT,
    POS_INT,
    Option,
    _arg,
    image_size,
    key_values,
)
from .stages import (
    _DYNAMIC_SIZE,
    _IMAGE_SIZE,
    _STUDENT,
    DISTILL,
    EVALUATE,
    EXPORT,
    PRUNE,
    QUANTIZE,
    TRAIN,
)


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

_SHARED = "search on several machines (budget mode)"
_STORAGE = _arg(
    "storage",
    None,
    "Optuna storage shared by the workers: postgresql://.., mysql://.., sqlite:///.., journal:PATH",
    section=_SHARED,
)
_STUDY = _arg("study", None, "study name: every worker that names it joins one search", section=_SHARED)
_ARTIFACTS = _arg(
    "artifacts", None, "artifact store for the trials' files: a folder or s3://bucket/prefix", section=_SHARED
)

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
            _STORAGE,
            _STUDY,
            _ARTIFACTS,
            _arg(
                "finish",
                False,
                "write OUT from the shared study as it stands (the budget is read from the study)",
                action="store_true",
                group="recipe",
                section=_SHARED,
                kwarg="finish_only",
            ),
            _arg(
                "heartbeat",
                None,
                "seconds between a worker's heartbeats (default 15; a trial is failed after 3 missed)",
                POS_INT,
                section=_SHARED,
            ),
        ),
        ("vitshrink.compress:compress",),
        (Output("out", "run", into=True),),
        ("model", "data", "recipe"),
        required_groups=("recipe",),
    ),
    Command(
        "measure-worker",
        "Benchmark a shared budget search's candidates on this device (run it on the target).",
        (
            replace(_STORAGE, required=True, section=None),
            replace(_STUDY, required=True, section=None),
            replace(_ARTIFACTS, section=None, help="the search workers' artifact store (folder or s3://)"),
            _arg("device", "cpu", None, choices=("cpu", "cuda", "jetson-nano")),
            replace(_THREADS, help="intra-op threads"),
            _arg("runs", 20, None, POS_INT),
            _arg("rounds", 3, None, POS_INT),
            _arg(
                "idle_exit",
                None,
                "stop after this many seconds with nothing to measure (default: when the search ends)",
                POS_FLOAT,
            ),
        ),
        ("vitshrink.compress.measure_worker:measure_worker",),
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
