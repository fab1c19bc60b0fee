"""Every stage's options (train, evaluate, distill, prune, quantize, export, baseline) and the recipe
stages built from them."""

from __future__ import annotations

from dataclasses import replace

from ..cpu import TARGET_CPUS
from ..targets import TARGET_DEVICES
from .core import (
    AMP_MODES,
    CALIB_METHODS,
    DEFAULT_OPSET,
    FRACTION,
    GRANULARITIES,
    IMPORTANCES,
    NONNEG_FLOAT,
    NONNEG_INT,
    ONNX_FORMATS,
    OPSET,
    POS_FLOAT,
    POS_INT,
    QUANT_MODES,
    RUNTIMES,
    SEED,
    SPLITS,
    UNIT,
    Option,
    _arg,
    _granularity,
    _losses,
    fraction_or_auto,
    image_size,
    key_values,
    resolution,
)


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
    Option(
        "round_to",
        None,
        "keep widths multiples of this (default: what --target-device's kernels want: a CPU's vector "
        "width, 16 AVX-512, 8 AVX2 / arm64; 8 cuda; 32 jetson-nano)",
        POS_INT,
    ),
    Option(
        "target_cpu",
        "auto",
        "CPU the pruned model will run on (auto = this one): sets the default --round-to",
        choices=TARGET_CPUS,
    ),
    Option(
        "target_device",
        "cpu",
        "device the pruned model will run on: cpu (--target-cpu's vector width), cuda (8: fp16 tensor "
        "cores) or jetson-nano (32: TensorRT fp16 tiles) sets the default --round-to; the depth/width "
        "split is still timed on this machine",
        choices=TARGET_DEVICES,
    ),
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
        None,
        "first remove this fraction of the transformer blocks per stage, least influential first (ViT, "
        "DeiT, Swin, SegFormer); 'auto': split the budget between depth (0, 0.25, 0.5) and width at equal "
        "MACs, fastest measured here wins (width only on a speed tie); default: auto where it applies "
        "(those families, a ratio / params / MACs budget, fixed --granularity), else 0",
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
    Option(
        "runtime",
        "auto",
        "onnxruntime (an ONNX file), openvino (OpenVINO IR through NNCF: a folder) or auto: for int8, "
        "build both and keep the faster on this CPU at equal accuracy (needs --calib-data and a folder "
        "--out; otherwise onnxruntime, and the report says why)",
        choices=RUNTIMES,
    ),
    replace(_ARGMAX, help="segmentation: end the quantized graph in ArgMax + Cast to a uint8 class map"),
    replace(
        _RESOLUTION,
        help="segmentation, model directory in (a recipe exports the stage's model): export it to run "
        "at this size inside the graph first (see export --resolution)",
    ),
    FORMAT,
)


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
