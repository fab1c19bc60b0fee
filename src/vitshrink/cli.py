"""`vitshrink` command line: a thin layer over the Python API (same functions, same options).

Errors a user can cause print one line (`error: ...`) and exit 2; anything unexpected prints one line
and exits 1 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from . import __version__
from .options import (
    DISTILL,
    EVALUATE,
    FORMAT,
    NONNEG_FLOAT,
    POS_FLOAT,
    POS_INT,
    PRUNE,
    QUANTIZE,
    TRAIN,
    add_options,
    collect,
    key_values,
    number,
)

EXIT_USER, EXIT_BUG = 2, 1


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, like every other failure (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER, f"error: {_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _image_size(text: str) -> tuple[int, int]:
    """--image-size H or HxW (height x width)."""
    from .deploy._meta import parse_image_size  # torch-free
    from .errors import ModelError

    try:
        return parse_image_size(text)
    except ModelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _is_rank0() -> bool:
    """Under torchrun only rank 0 reports results (every rank runs the same command)."""
    return os.environ.get("RANK", "0") == "0"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _metrics_line(m: dict[str, Any]) -> str:
    keys = ("accuracy", "miou", "dice", "pixel_accuracy", "samples")
    return "  ".join(f"{k} {m[k]:.4f}" if isinstance(m[k], float) else f"{k} {m[k]}" for k in keys if k in m)


# ----------------------------------------------------------------------------------- subcommands


def cmd_train(a: argparse.Namespace) -> None:
    from .train import train

    out, m = train(a.model, a.data, out=a.out, **collect(a, TRAIN), quiet=a.quiet)
    if _is_rank0():
        print(f"saved {out}  {_metrics_line(m)}")


def cmd_eval(a: argparse.Namespace) -> None:
    from .evaluate import evaluate

    m = evaluate(a.model, a.data, **collect(a, EVALUATE), quiet=a.quiet)
    if a.json:
        _print_json(m)
        return
    print(_metrics_line(m))
    for name, v in (m.get("per_class_iou") or {}).items():
        print(f"  IoU {name:24s} {'-' if v is None else f'{v:.4f}'}")


def cmd_bench(a: argparse.Namespace) -> None:
    from .bench import bench, format_table

    rep = bench(
        a.models if len(a.models) > 1 else a.models[0],
        threads=a.threads,
        batch=a.batch,
        runs=a.runs,
        rounds=a.rounds,
        device=a.device,
        json_out=a.json,
        image_size=a.image_size,
        quiet=a.quiet,
    )
    print(format_table(rep["results"]))
    if a.json:
        print(f"wrote {a.json}")


def cmd_export(a: argparse.Namespace) -> None:
    from .export import export

    out, r = export(
        a.model,
        a.out,
        opset=a.opset,
        dynamic_batch=a.dynamic_batch,
        image_size=a.image_size,
        dynamic_size=a.dynamic_size,
        format=a.format,
        quiet=a.quiet,
    )
    print(f"wrote {out} ({r['size_mb']:.2f} MB, {r['params']:,} params, {r['macs'] / 1e6:.1f}M MACs)")
    print(
        f"parity vs PyTorch: max abs diff {r['max_abs_diff']:.2e}, argmax agreement {r['argmax_agreement']:.4f}"
        + (f" (at {', '.join(r['parity_sizes'])})" if r.get("parity_sizes") else "")
    )


def cmd_demo(a: argparse.Namespace) -> None:
    from .demo import demo

    res = demo(task=a.task, out=a.out, quick=a.quick, quiet=a.quiet, threads=a.threads, student=a.student)
    for task, path in res.items():
        print(f"{task}: {path}")


def cmd_distill(a: argparse.Namespace) -> None:
    from .distill import distill
    from .errors import VitshrinkError

    kw = collect(a, DISTILL)
    if a.loss_weights:
        names = [kw["losses"]] if isinstance(kw["losses"], str) else kw["losses"]
        if len(a.loss_weights) != len(names):
            raise VitshrinkError(
                f"--loss-weights gives {len(a.loss_weights)} weights for {len(names)} losses ({' '.join(names)})"
            )
        kw["losses"] = dict(zip(names, a.loss_weights))
    out, m = distill(a.teacher, a.student, a.data, out=a.out, **kw, quiet=a.quiet)
    if _is_rank0():
        print(f"saved {out}  {_metrics_line(m)}")


def cmd_prune(a: argparse.Namespace) -> None:
    from .prune import prune

    out, m = prune(a.model, a.out, **collect(a, PRUNE), quiet=a.quiet)
    print(f"saved {out}")
    _print_json({k: v for k, v in m.items() if not isinstance(v, dict | list)})


def cmd_quantize(a: argparse.Namespace) -> None:
    from .quantize import quantize

    out, r = quantize(
        a.model,
        a.out,
        **collect(a, QUANTIZE),
        image_size=a.image_size,
        dynamic_size=a.dynamic_size,
        quiet=a.quiet,
    )
    print(f"wrote {out}")
    _print_json(r)


def cmd_predict(a: argparse.Namespace) -> None:
    from .deploy import predict
    from .errors import DataError

    # predict() itself stays quiet: the CLI prints one JSON line per result and one line per skipped file.
    mode = "resize" if a.resize else ("tile" if a.tile or a.overlap is not None else "auto")
    overlap = 0.25 if a.overlap is None else a.overlap
    from .deploy.video import is_video

    videos = [i for i in a.images if is_video(i) or (a.frames and os.path.isdir(i))]
    if videos:
        from .deploy import predict_video

        if len(videos) != len(a.images) or not a.out:
            raise DataError("video: give video files (or --frames folders) only, and --out")
        for v in videos:
            summary = predict_video(
                a.model,
                v,
                a.out,
                threads=a.threads,
                mode=mode,
                tile=a.tile,
                overlap=overlap,
                every=a.every,
                max_fps=a.max_fps,
                fps=a.fps,
                quiet=a.quiet,
                overwrite=a.overwrite,
            )
            print(json.dumps(summary))
        return
    rep = predict(
        a.model,
        a.images,
        out=a.out,
        threads=a.threads,
        quiet=True,
        overwrite=a.overwrite,
        mode=mode,
        tile=a.tile,
        overlap=overlap,
    )
    for r in rep["results"]:
        print(json.dumps(r, default=str))
    errors = rep["errors"]
    if errors and not rep["results"] and len(errors) == 1:
        raise DataError(f"{errors[0]['file']}: {errors[0]['error']}")
    for e in errors:
        print(f"skipped {e['file']}: {_one_line(e['error'])}", file=sys.stderr)
    if errors and not rep["results"]:
        raise DataError(f"none of the {len(errors)} inputs could be predicted")


def cmd_trt(a: argparse.Namespace) -> None:
    from .deploy.trt import trt_recipe

    out = trt_recipe(a.model, a.out, fp16=not a.no_fp16, workspace_mb=a.workspace_mb)
    print(f"wrote {out}")


def cmd_compress(a: argparse.Namespace) -> None:
    from .compress import compress

    res = compress(
        a.model,
        a.data,
        out=a.out,
        recipe=a.recipe,
        budget=a.budget,
        device=a.device,
        trials=a.trials,
        quiet=a.quiet,
        data_options=a.data_opt,
        time_budget=a.time_budget,
    )
    print(f"final artifact: {res.get('final')}")


def cmd_report(a: argparse.Namespace) -> None:
    from .report import report

    res = report(a.dir, quiet=a.quiet)
    for k, v in res.items():
        print(f"{k}: {v}")


def cmd_presets(a: argparse.Namespace) -> None:
    from .models.presets import PRESETS

    for name, p in PRESETS.items():
        print(f"{name:26s} {p.family:10s} {','.join(p.tasks):28s} {p.note}")


# ------------------------------------------------------------------------------- output policy


def _ckpt(out: str) -> str:
    return out + ".ckpt" if not out.endswith(("/", os.sep)) else out.rstrip("/" + os.sep) + ".ckpt"


def _trt_out(a: argparse.Namespace) -> str:
    if a.out:
        return a.out
    m = os.path.abspath(a.model)  # trt_recipe's default: MODEL_trt beside the ONNX file
    return os.path.join(os.path.dirname(m), os.path.splitext(os.path.basename(m))[0] + "_trt")


def _onnx_kind(a: argparse.Namespace) -> str:
    from .onnx_folder import wants_folder

    try:
        return "model" if wants_folder(a.out, a.format) else "file"  # an ONNX folder holds vitshrink.json
    except ValueError:
        return "file"  # the command itself refuses the name, in one line


# command -> the outputs it writes: [(path, kind, into)] and the inputs none of them may be or contain
_Outputs = tuple[list[tuple[str, str, bool]], list[Any]]
_OUTPUTS: dict[str, Callable[[argparse.Namespace], _Outputs]] = {
    "train": lambda a: ([(a.out, "model", False), (_ckpt(a.out), "ckpt", False)], [a.model, a.data]),
    "distill": lambda a: (
        [(a.out, "model", False), (_ckpt(a.out), "ckpt", False)],
        [a.teacher, a.student, a.data],
    ),
    "prune": lambda a: (
        [(a.out, "model", False), (_ckpt(a.out), "ckpt", False)],
        [a.model, a.teacher, a.data, a.latency_table],
    ),
    "export": lambda a: ([(a.out, _onnx_kind(a), False)], [a.model]),
    "quantize": lambda a: ([(a.out, _onnx_kind(a), False)], [a.model, a.calib_data]),
    "bench": lambda a: ([(a.json, "file", False)] if a.json else [], list(a.models)),
    "predict": lambda a: ([(a.out, "predict", True)] if a.out else [], [a.model, *a.images]),
    "trt-recipe": lambda a: ([(_trt_out(a), "trt", True)], [a.model]),
    "compress": lambda a: ([(a.out, "run", True)], [a.model, a.data, a.recipe]),
    "demo": lambda a: ([(a.out, "run", True)], []),
}


def _check_outputs(a: argparse.Namespace) -> list[str]:
    """Apply the output policy (see `outputs`) before anything runs; returns the paths to lock."""
    from .outputs import check_output

    if a.cmd not in _OUTPUTS:
        return [a.dir] if a.cmd == "report" else []
    outs, inputs = _OUTPUTS[a.cmd](a)
    for path, kind, into in outs:
        check_output(path, kind, inputs=inputs, overwrite=a.overwrite, into=into)
    return [path for path, _, _ in outs]


# ---------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vitshrink", description="Compress Vision Transformers for edge devices.")
    p.add_argument("--version", action="version", version=f"vitshrink {__version__}")
    # Global options work before and after the subcommand: the subcommand's copies default to
    # SUPPRESS, so they only override what was given before it when given themselves.
    p.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        sp.add_argument(
            "--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
        )
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    def overwrite_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--overwrite",
            action="store_true",
            help="allow replacing an existing file vitshrink did not write (never a folder of yours, "
            "never an input of this run)",
        )

    def size_args(sp: argparse.ArgumentParser, dynamic: bool = True) -> None:
        sp.add_argument(
            "--image-size",
            type=_image_size,
            metavar="H[xW]",
            help="input size to export/run at (default: the model's preprocess size)",
        )
        if dynamic:
            sp.add_argument(
                "--dynamic-size",
                action="store_true",
                help="dynamic height/width axes (SegFormer; MobileViT and UperNet-MobileViT at multiples "
                "of 32 x patch); parity is checked at two sizes",
            )

    def data_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data", required=True, help="fashion-mnist | aerial | FOLDER")

    sp = add("train", cmd_train, "Train a model (preset or directory) on a dataset.")
    sp.add_argument("--model", required=True, help="preset name (see `vitshrink presets`) or model directory")
    data_arg(sp)
    sp.add_argument("--out", required=True)
    add_options(sp, TRAIN)

    sp = add("eval", cmd_eval, "Evaluate a model directory or ONNX file.")
    sp.add_argument("model")
    data_arg(sp)
    add_options(sp, EVALUATE)
    sp.add_argument("--json", action="store_true", help="print metrics as JSON")

    sp = add("bench", cmd_bench, "Latency p50/p90/p99, throughput, peak RSS, size, params, MACs.")
    sp.add_argument(
        "models", nargs="+", help="model directories and/or ONNX files (several are compared in one run)"
    )
    sp.add_argument("--threads", type=POS_INT, help="intra-op threads")
    sp.add_argument("--batch", type=POS_INT, default=8, help="batch size for throughput")
    sp.add_argument("--runs", type=POS_INT, default=30)
    sp.add_argument("--rounds", type=POS_INT, default=3)
    sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sp.add_argument("--json", help="write results to this JSON file")
    size_args(sp, dynamic=False)

    sp = add("export", cmd_export, "Export a model directory to ONNX (simplified, parity-checked).")
    sp.add_argument("model")
    sp.add_argument("--out", required=True)
    sp.add_argument("--opset", type=number(int, 7), default=17)
    sp.add_argument("--dynamic-batch", action="store_true")
    size_args(sp)
    add_options(sp, [FORMAT])

    sp = add("demo", cmd_demo, "Run the whole pipeline on embedded data.")
    sp.add_argument("--task", default="all", choices=["classification", "segmentation", "all"])
    sp.add_argument("--out", default="demo-out")
    sp.add_argument("--quick", action="store_true", help="small budget: under 5 minutes on 2 cores")
    sp.add_argument("--threads", type=POS_INT)
    sp.add_argument(
        "--student",
        default="default",
        choices=["default", "paper"],
        help="paper: the segmentation student is the paper's UperNet + MobileViT",
    )

    sp = add("distill", cmd_distill, "Distil a teacher into a student.")
    sp.add_argument("--teacher", required=True)
    sp.add_argument("--student", required=True, help="preset name or model directory")
    data_arg(sp)
    sp.add_argument("--out", required=True)
    add_options(sp, DISTILL)
    sp.add_argument("--loss-weights", nargs="+", type=NONNEG_FLOAT, help="one weight per --loss")

    sp = add("prune", cmd_prune, "Structured pruning that physically removes heads/neurons/dims/channels.")
    sp.add_argument("model")
    sp.add_argument("--out", required=True)
    add_options(sp, PRUNE)

    sp = add("quantize", cmd_quantize, "fp16 / int8 quantization (ONNX) with ViT-aware fallbacks.")
    sp.add_argument("model", help="model directory, Hub id, ONNX file or ONNX folder")
    sp.add_argument("--out", required=True)
    add_options(sp, QUANTIZE)
    size_args(sp)

    sp = add("predict", cmd_predict, "Run an ONNX model on images (numpy + Pillow + onnxruntime only).")
    sp.add_argument("model")
    sp.add_argument("images", nargs="+", help="image files or folders")
    sp.add_argument("--out")
    sp.add_argument("--threads", type=POS_INT)
    g = sp.add_mutually_exclusive_group()
    g.add_argument(
        "--tile",
        type=_image_size,
        metavar="N[xM]",
        help="segmentation: sliding-window tiles of N px (default: the model input) at the frame's own "
        "resolution, logits averaged where tiles overlap; by default tiles are used when a frame is "
        ">= 2x the model input both ways",
    )
    g.add_argument(
        "--resize", action="store_true", help="segmentation: always resize the frame to the model input"
    )
    sp.add_argument(
        "--overlap",
        type=number(float, 0, hi=0.9),
        help="fraction of a tile shared with its neighbour (default 0.25)",
    )
    v = sp.add_argument_group("video (FILE.mp4 / .mov / .avi / .mkv, or folders with --frames)")
    v.add_argument("--frames", action="store_true", help="each folder is one video's frames, in name order")
    v.add_argument("--every", type=POS_INT, default=1, help="keep every Nth frame")
    v.add_argument("--max-fps", type=POS_FLOAT, help="keep at most this many frames per second of video")
    v.add_argument("--fps", type=POS_FLOAT, help="frame rate of a --frames folder (default 10)")

    sp = add("trt-recipe", cmd_trt, "Write a TensorRT build command and runner for a Jetson.")
    sp.add_argument("model")
    sp.add_argument("--out")
    sp.add_argument("--no-fp16", action="store_true")
    sp.add_argument("--workspace-mb", type=POS_INT)

    sp = add("compress", cmd_compress, "Run a recipe, or search recipes under a device budget.")
    sp.add_argument("model")
    data_arg(sp)
    sp.add_argument(
        "--data-opt",
        type=key_values,
        default={},
        metavar="K=V,..",
        help="dataset options, e.g. size=256,n_train=400 for aerial",
    )
    sp.add_argument("--out", required=True)
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--recipe")
    # passed through as text: compress.parse_budget validates keys and values with one-line errors
    g.add_argument("--budget", help="latency_ms=..,size_mb=..,max_drop=..")
    sp.add_argument("--device", default="cpu", choices=["cpu", "cuda", "jetson-nano"])
    sp.add_argument(
        "--trials",
        type=POS_INT,
        help="budget mode: an optional cap on trials (the time budget ends the search)",
    )
    # text: compress.parse_duration validates it (one-line errors), default 30m printed at start
    sp.add_argument("--time-budget", help="budget mode: wall time for the whole run, e.g. 30m, 2h, 90s")

    sp = add("report", cmd_report, "Write report.md and report.html for a run directory.")
    sp.add_argument("dir")

    add("presets", cmd_presets, "List model presets.")
    for name, sp in sub.choices.items():
        if name in _OUTPUTS:
            overwrite_arg(sp)
    return p


def _error(msg: str) -> None:
    # Under torchrun every rank may fail the same way; the rank tag tells the lines apart.
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
    print(f"error: {'' if rank == '0' else f'[rank {rank}] '}{_one_line(msg)}", file=sys.stderr, flush=True)


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    # Library warnings (e.g. Pillow on a damaged image) as one line each, not file:line + source.
    print(f"warning: {_one_line(str(message))} ({category.__name__})", file=sys.stderr, flush=True)


def _finish_distributed() -> None:
    """After a successful torchrun command: wait for all ranks (rank 0 writes the outputs), leave the group."""
    if "torch.distributed" in sys.modules:  # only a stage that trained can have joined a group
        from .train import finish_distributed

        finish_distributed()


def _exit_code(e: SystemExit) -> int:
    return 0 if e.code is None else e.code if isinstance(e.code, int) else EXIT_USER


def main(argv: list[str] | None = None) -> int:

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (already printed on one line) and --help
        return _exit_code(e)
    if getattr(args, "quiet", False):
        os.environ["VITSHRINK_QUIET"] = "1"
    with warnings.catch_warnings():  # restores the default display when main() returns
        if not args.debug:
            warnings.showwarning = _warning_line
        return _run(args)


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, docker stop): unwinds like Ctrl-C, so temporaries are removed."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _disk_full(e: BaseException) -> bool:
    while e is not None:
        text = str(e)
        if "No space left on device" in text or "StorageFull" in text or "os error 28" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _run(args: argparse.Namespace) -> int:
    from .errors import VitshrinkError

    try:
        with _sigterm_as_interrupt():
            from .outputs import lock_outputs, sweep_stale_temps

            sweep_stale_temps()
            # only rank 0 writes; under torchrun the other ranks must not contend for the lock
            to_lock = _check_outputs(args)
            with lock_outputs(to_lock if _is_rank0() else []):
                args.fn(args)
                _finish_distributed()
    except VitshrinkError as e:
        _error(str(e))
        return EXIT_USER
    except Terminated:
        _error("terminated")
        return 143
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except SystemExit as e:
        return _exit_code(e)
    except MemoryError:
        _error("out of memory")
        return EXIT_USER
    except OSError as e:
        if args.debug:
            raise
        # e.g. a full disk while saving: "No space left on device: OUT" (the partial output is removed)
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        _error(f"{e.strerror or e}{where}")
        return EXIT_USER
    except Exception as e:  # noqa: BLE001 - one line for users; --debug for developers
        if args.debug:
            raise
        if _disk_full(e):  # safetensors/protobuf report ENOSPC as their own error types
            _error("No space left on device (nothing was written; free some space and run again)")
            return EXIT_USER
        msg = str(e).splitlines()[0] if str(e) else ""
        _error(f"unexpected {type(e).__name__}: {msg} (run with --debug for the traceback)")
        return EXIT_BUG
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
