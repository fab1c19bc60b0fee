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

from .options import (
    COMMANDS,
    DISTILL,
    EVALUATE,
    GLOBAL,
    PRUNE,
    QUANTIZE,
    TRAIN,
    Output,
    add_options,
    collect,
)

EXIT_USER, EXIT_BUG = 2, 1


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, like every other failure (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER, f"error: {_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


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
        argmax=a.argmax,
        resolution=a.resolution,
        format=a.format,
    )
    print(f"wrote {out} ({r['size_mb']:.2f} MB, {r['params']:,} params, {r['macs'] / 1e6:.1f}M MACs)")
    if r.get("inner_size") or r.get("output"):
        inner = r.get("inner_size")
        print(
            ("network at " + "x".join(map(str, inner)) + " inside, photo at any size" if inner else "")
            + (", " if inner and r.get("output") else "")
            + ("output: uint8 class map" if r.get("output") else "")
        )
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
        storage=a.storage,
        study=a.study,
        artifacts=a.artifacts,
        finish_only=a.finish,
        heartbeat=a.heartbeat,
    )
    if res.get("shipped") is False:
        print(f"worker done ({res['search']}); the last worker (or compress --finish) writes the model")
        return
    print(f"final artifact: {res.get('final')}")


def cmd_measure_worker(a: argparse.Namespace) -> None:
    from .compress.measure_worker import measure_worker

    res = measure_worker(
        a.storage,
        a.study,
        artifacts=a.artifacts,
        device=a.device,
        threads=a.threads,
        runs=a.runs,
        rounds=a.rounds,
        idle_exit=a.idle_exit,
        quiet=a.quiet,
    )
    print(f"measured {len(res['measured'])} candidates on {res['device']}")


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


def _output(a: argparse.Namespace, o: Output) -> tuple[str, str, bool] | None:
    """(path, kind, into) of one declared output, or None when the command does not write it this time."""
    path = getattr(a, o.dest)
    if o.kind == "trt":
        return (_trt_out(a), "trt", o.into)
    if path is None:
        return None
    if o.kind == "ckpt":
        return (_ckpt(path), "ckpt", o.into)
    return (path, _onnx_kind(a) if o.kind == "onnx" else o.kind, o.into)


def _check_outputs(a: argparse.Namespace) -> list[str]:
    """Apply the output policy (see `outputs`) to the outputs `options.COMMANDS` declares, before
    anything runs; returns the paths to lock."""
    from .outputs import check_output

    command = COMMANDS[a.cmd]
    outs = [out for o in command.outputs if (out := _output(a, o)) is not None]
    inputs: list[Any] = []
    for dest in command.inputs:
        value = getattr(a, dest)
        inputs.extend(value if isinstance(value, list) else [value])
    for path, kind, into in outs:
        check_output(path, kind, inputs=inputs, overwrite=a.overwrite, into=into)
    return [path for path, _, _ in outs] + [getattr(a, dest) for dest in command.locks]


# ---------------------------------------------------------------------------------------- parser

# command -> its handler; its arguments, outputs and inputs are declared in vitshrink.options.COMMANDS
HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "export": cmd_export,
    "demo": cmd_demo,
    "distill": cmd_distill,
    "prune": cmd_prune,
    "quantize": cmd_quantize,
    "predict": cmd_predict,
    "trt-recipe": cmd_trt,
    "compress": cmd_compress,
    "measure-worker": cmd_measure_worker,
    "report": cmd_report,
    "presets": cmd_presets,
}


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI, generated from `vitshrink.options` (GLOBAL, COMMANDS)."""
    p = _Parser(prog="vitshrink", description="Compress Vision Transformers for edge devices.")
    add_options(p, GLOBAL)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sp = sub.add_parser(name, help=command.help, description=command.help)
        sp.set_defaults(fn=HANDLERS[name])
        add_options(sp, command.arguments, command.required_groups)
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
