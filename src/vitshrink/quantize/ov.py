"""The OpenVINO deploy target of `quantize`: the exported ONNX as OpenVINO IR (fp32 weights, or fp16),
int8 through NNCF's post-training quantization on vitshrink's calibration batches, and the choice
between onnxruntime and OpenVINO by measurement (`--runtime auto`).

Which runtime is faster depends on the CPU: on AVX-512 VNNI machines OpenVINO's int8 kernels beat
onnxruntime's (DeiT-S 224, 2 threads: 7.4 vs 9.9 ms), on AVX2-only ones onnxruntime's win. So `auto`
builds both, times them here at the deployment thread count and keeps the faster at equal accuracy.

The int8 candidate goes through the same steps as onnxruntime's: `sensitivity.guarantee` falls the
most sensitive weight layers back to float (through NNCF's ignored scope) until `max_drop` holds, and
`Ctx.fidelity` compares it with fp32 (`measure.session` opens IRs with OpenVINO).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import __version__
from ..bench.timing import onnx_latencies_ms, within_speed_tie
from ..deploy._meta import read_onnx_meta
from ..deploy.ov_runtime import INSTALL_HINT, import_openvino, save_ir, write_openvino_folder
from ..errors import DataError, VitshrinkError
from .context import Ctx
from .files import read_meta, with_history
from .measure import ort_quiet

KIND = "openvino-int8"
# Weight layers NNCF quantizes; their friendly names are the ONNX node names (convert_model keeps them).
_WEIGHT_OPS = frozenset({"MatMul", "Convolution", "GroupConvolution"})
_THROUGH = frozenset({"Convert", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Multiply", "Subtract"})
NNCF_KEPT = {
    "LayerNorm / Softmax / GELU": "float in NNCF's transformer scheme (model_type=TRANSFORMER), as in vitshrink's",
}


def missing() -> str | None:
    """Why the OpenVINO target cannot be built here (None: it can)."""
    try:
        import openvino  # noqa: F401, I001 - openvino first: the one to name when neither is there

        import nncf  # noqa: F401
    except ImportError as e:
        return f"{e.name or 'openvino'} is not installed ({INSTALL_HINT})"
    return None


def deploy_threads() -> int:
    """The thread count models run at when deployed here: every core this process may use (what
    predict and bench use by default)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _nncf_quiet() -> Iterator[None]:
    """NNCF's progress bars and INFO lines are noise to a vitshrink user (stdout may carry JSON)."""
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    try:
        with ort_quiet(), contextlib.redirect_stderr(open(os.devnull, "w")):  # noqa: SIM115
            yield
    finally:
        nncf_log.setLevel(level)


def _weight_layers(model: Any) -> list[str]:
    """Friendly names of MatMul / Convolution ops whose weight input is a constant (through converts)."""

    def constant(node: Any) -> bool:
        for _ in range(6):
            t = node.get_type_name()
            if t == "Constant":
                return True
            if t not in _THROUGH or not node.inputs():
                return False
            node = node.input_value(0).get_node()
        return False

    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() in _WEIGHT_OPS and constant(op.input_value(1).get_node())
    ]


class OpenVinoBuilder:
    """NNCF int8 of the float model, duck-typing `builders.Builder` for `sensitivity.guarantee`:
    `candidates` (weight layers), `build(excluded=..., only=...)` -> an IR path in the work folder."""

    kind = KIND
    activations = " static (NNCF, per-tensor) / weights per-channel"
    calibrated = True
    calib_note = None
    calib_method = "nncf"

    def __init__(self, src: Path, ctx: Ctx) -> None:
        ov = import_openvino()
        self.ctx = ctx
        self.model = ov.convert_model(str(src))
        # every candidate carries the metadata, so eval_fn preprocesses for it as for an ONNX candidate
        self.meta = read_onnx_meta(src) or None
        self.candidates = _weight_layers(self.model)
        self.attention: list[str] = []
        self.kept_ops = dict(NNCF_KEPT)

    def build(self, excluded: Iterable[str] = (), only: list[str] | None = None) -> Path:
        import nncf

        excluded = set(excluded)
        ignored = [c for c in self.candidates if (c not in only if only is not None else c in excluded)]
        batches = list(self.ctx.batches)
        with _nncf_quiet():
            q = nncf.quantize(
                self.model.clone(),
                nncf.Dataset(batches),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=max(1, len(batches)),
                ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
            )
        out = self.ctx.path("openvino").with_suffix(".xml")
        save_ir(q, out, self.meta)
        return out


def fp16_ir(src: Path, ctx: Ctx) -> tuple[Path, dict[str, Any]]:
    """The float model as IR with fp16 weights (OpenVINO computes in f32 on CPUs without fp16 units)."""
    ov = import_openvino()
    out = ctx.work / "openvino-fp16.xml"
    save_ir(ov.convert_model(str(src)), out, read_onnx_meta(src) or None, fp16_weights=True)
    info = {"op_types": {"all": "weights stored fp16; OpenVINO computes in f32 on this CPU"}, "nodes": {}}
    return out, {"chosen": "openvino-fp16", "kept_float": info, "runtime": "openvino"}


def int8_ir(src: Path, ctx: Ctx, max_drop: float | None) -> tuple[Path, dict[str, Any]]:
    """NNCF int8 with the sensitivity fallback; the report fields `_int8` gives onnxruntime's."""
    from .sensitivity import guarantee

    if not ctx.batches or ctx.generated:
        raise DataError("OpenVINO int8 (NNCF) needs calibration data: pass --calib-data")
    builder = OpenVinoBuilder(src, ctx)
    ctx.say(f"building {KIND} with NNCF ({len(builder.candidates)} weight layers)")
    path = builder.build()
    res = {"path": path, "metric": ctx.metric(path), "fallback": {}}
    if max_drop is not None:
        res = guarantee(builder, ctx, max_drop, path, res["metric"])  # type: ignore[arg-type]
    kept = {
        n: f"sensitivity-driven fallback (NNCF ignored scope): rel. output error {s} when quantized alone"
        for n, s in res["fallback"].items()
    }
    extra: dict[str, Any] = {
        "chosen": KIND,
        "runtime": "openvino",
        "settings_chosen": {
            "calib_method": "nncf (min-max activations, model_type=TRANSFORMER, SmoothQuant)",
            "activations": "int8" + builder.activations,
            "weights": "int8 per-channel",
        },
        "quantized_nodes": len(builder.candidates) - len(res["fallback"]),
        "kept_float": {"op_types": builder.kept_ops, "nodes": kept},
        "metric_openvino": res["metric"],
    }
    if "warning" in res:
        extra["warnings"] = [res["warning"]]
    return Path(res["path"]), extra


def time_runtimes(paths: list[Path], ctx: Ctx, threads: int) -> list[float]:
    """Median batch-1 latency of each model (onnxruntime or OpenVINO by path), interleaved, at `threads`."""
    assert ctx.sample is not None
    return onnx_latencies_ms(paths, ctx.sample, threads=threads, runs=40, budget_s=6.0)


def choose_runtime(
    ort_path: Path, ort_report: dict[str, Any], src: Path, ctx: Ctx, max_drop: float | None
) -> tuple[Path | None, dict[str, Any]]:
    """`--runtime auto` for int8: build NNCF's int8, time both here at the deployment thread count and
    keep OpenVINO only when it is faster beyond noise and holds max_drop. Returns (the OpenVINO path
    or None to keep onnxruntime, the report fields: `runtime_choice` and, when OpenVINO is kept, the
    fields describing it)."""
    why_not = missing()
    if why_not is None and (ctx.generated or not ctx.batches):
        why_not = "OpenVINO int8 needs calibration data (--calib-data)"
    if why_not is None and ctx.sample is None:
        why_not = "no input to time the models on"
    if why_not is not None:
        ctx.say(f"runtime auto: OpenVINO skipped: {why_not}")
        return None, {"runtime_choice": {"kept": "onnxruntime", "why": f"OpenVINO skipped: {why_not}"}}
    ov_path, ov_extra = int8_ir(src, ctx, max_drop)
    threads = deploy_threads()
    ort_ms, ov_ms = time_runtimes([ort_path, ov_path], ctx, threads)
    base, m = ctx.base_metric, ov_extra["metric_openvino"]
    holds = m is None or base is None or max_drop is None or base - m <= max_drop + 1e-12
    choice: dict[str, Any] = {
        "threads": threads,
        "onnxruntime_ms": ort_ms,
        "openvino_ms": ov_ms,
        "onnxruntime": ort_report.get("chosen"),
        "onnxruntime_metric": ort_report.get("metric_after"),
        "openvino_metric": m,
    }
    faster = not within_speed_tie(ort_ms, ov_ms)  # onnxruntime more than the noise margin slower
    if faster and holds:
        choice["kept"] = "openvino"
        choice["why"] = (
            f"OpenVINO {ov_ms:.2f} ms vs onnxruntime {ort_ms:.2f} ms at {threads} thread(s) here, "
            "accuracy within max_drop"
        )
    else:
        choice["kept"] = "onnxruntime"
        choice["why"] = (
            f"OpenVINO int8 misses max_drop ({m:.4f} vs {base:.4f})"
            if not holds
            else f"onnxruntime {ort_ms:.2f} ms vs OpenVINO {ov_ms:.2f} ms at {threads} thread(s) here: "
            "not slower beyond noise"
        )
    ctx.say(f"runtime auto: kept {choice['kept']}: {choice['why']}")
    if choice["kept"] == "onnxruntime":
        return None, {"runtime_choice": choice}
    return ov_path, {**ov_extra, "runtime_choice": choice, "onnxruntime_candidate": _brief(ort_report)}


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("chosen", "candidates", "kept_because", "settings_chosen", "quantized_nodes", "attention")
    return {k: report[k] for k in keep if k in report}


def check_request(runtime: str, mode: str, target_cpu: str, openvino_out: Any) -> str | None:
    """Refuse what `--runtime openvino` cannot do; for `auto`, why OpenVINO is not considered (None:
    it is)."""
    from ..options import RUNTIMES

    if runtime not in RUNTIMES:
        raise VitshrinkError(f"unknown runtime '{runtime}' (choose from {', '.join(RUNTIMES)})")
    if runtime == "openvino":
        if mode not in ("int8", "fp16"):
            raise VitshrinkError(
                f"--runtime openvino builds int8 (NNCF) or fp16; '{mode}' is an onnxruntime variant"
            )
        if openvino_out is None:
            raise VitshrinkError(
                "an OpenVINO model is a folder (model.xml, model.bin, metadata): give --out without .onnx"
            )
        if (why := missing()) is not None:
            raise VitshrinkError(f"--runtime openvino: {why}")
        return None
    if runtime != "auto":
        return "--runtime onnxruntime"
    if mode != "int8":
        return f"mode {mode} is an onnxruntime build"
    if target_cpu != "auto":
        return (
            f"--target-cpu {target_cpu} names another machine; latencies measured here say nothing about it"
        )
    if openvino_out is None:
        return "the output is one .onnx file; give --out without .onnx to let auto keep an OpenVINO folder"
    return None


def write_openvino(
    final: Path,
    folder: Path,
    original: Any,
    report: dict[str, Any],
    image_size: Any = None,
) -> None:
    """The kept IR with vitshrink's metadata (and this stage's history) as an OpenVINO folder."""
    ov = import_openvino()
    history = {
        "stage": "quantize",
        "options": {"mode": report["mode"], **report["settings"], "chosen": report["chosen"]},
        "metrics": {k: report[k] for k in ("metric_before", "metric_after") if report.get(k) is not None},
        "runtime": "openvino",
    }
    meta = with_history(read_meta(original), history, image_size)
    if meta is not None:
        meta["runtime"] = {"name": "openvino", "openvino": ov.__version__, "vitshrink": __version__}
    tmp = final.with_name(final.stem + "-final.xml")
    save_ir(ov.Core().read_model(str(final)), tmp, meta, fp16_weights=report["chosen"] == "openvino-fp16")
    write_openvino_folder(tmp, folder, meta)


def apply_choice(report: dict[str, Any], extra: dict[str, Any]) -> None:
    """Merge `choose_runtime`'s fields into the report; when OpenVINO is kept, the onnxruntime-only
    fields of the report describe the runner-up (kept under `onnxruntime_candidate`) and are dropped."""
    if extra.get("runtime") == "openvino":
        for k in ("attention", "attention_int8", "rewrites", "smoothing"):
            report.pop(k, None)
        choice = extra["runtime_choice"]
        report.setdefault("candidates", []).append(
            {"kind": KIND, "metric": choice["openvino_metric"], "latency_ms": None, "size_mb": None}
        )
        report["kept_because"] = choice["why"]
    report.update(extra)


def folder_bytes(folder: Path) -> int:
    """Bytes of an OpenVINO folder's IR (.xml + .bin): what the model weighs on disk."""
    from ..deploy.ov_runtime import ir_size_bytes

    return ir_size_bytes(folder)
