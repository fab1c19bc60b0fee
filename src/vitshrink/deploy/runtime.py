"""A light ONNX runtime for the edge: numpy + Pillow + onnxruntime only (no torch, no transformers).

A 4 GB Jetson Nano cannot afford torch's ~1 GB of resident memory next to the model, so everything on the
deploy path stays within these three libraries.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..cpu import runs_exactly_here
from ..errors import DataError, ModelError
from ..onnx_folder import onnx_file
from ._base import TOP_K, DeployModel, static_dim
from ._meta import read_meta_props

# onnxruntime raises its own pybind11 exception classes (not RuntimeError subclasses) for bad models and
# bad inputs; collect the ones this build has so they can be turned into one-line errors.
try:
    from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

    _ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
        getattr(_ort_state, n)
        for n in (
            "Fail",
            "InvalidArgument",
            "NoSuchFile",
            "NoModel",
            "EngineError",
            "RuntimeException",
            "InvalidProtobuf",
            "ModelLoaded",
            "NotImplemented",
            "InvalidGraph",
            "EPFail",
        )
        if hasattr(_ort_state, n)
    ) + (RuntimeError,)
except ImportError:  # pragma: no cover - layout of other onnxruntime builds
    _ORT_ERRORS = (Exception,)

# GPU providers first: TensorRT, then CUDA (both present in the Jetson onnxruntime-gpu wheels), CPU last.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers(available: Sequence[str] | None = None) -> list[str | tuple[str, dict[str, Any]]]:
    """The execution providers to use, best first, among those this onnxruntime build offers."""
    available = list(ort.get_available_providers() if available is None else available)
    chosen: list[str | tuple[str, dict[str, Any]]] = []
    for name in PREFERRED_PROVIDERS:
        if name not in available:
            continue
        if name == "TensorrtExecutionProvider":
            # Without an engine cache the TensorRT EP rebuilds its engine (minutes on a Nano) in every process.
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitshrink" / "ort-trt"
            chosen.append((name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}))
        else:
            chosen.append(name)
    return chosen or ["CPUExecutionProvider"]


def _ort_message(e: BaseException) -> str:
    """onnxruntime's message without its '[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :' prefix, one line."""
    msg = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", str(e).strip())
    return msg.splitlines()[0] if msg else type(e).__name__


def session_options(threads: int | None = None, *, spin: bool = True) -> ort.SessionOptions:
    """onnxruntime options every vitshrink session uses: `threads` intra-op threads, errors-only log,
    and subnormal floats flushed to zero. `spin=False` lets the worker threads sleep as soon as an op
    ends (see bench.timing.onnx_latencies_ms).

    Subnormals (|x| < 1.2e-38) take a microcoded slow path on x86: attention weights of masked or
    near-zero scores land there (e^-100 ~ 4e-44), and one such softmax or MatMul runs several times
    slower than its neighbours. Flushing them changes results by < 1e-37.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT's warnings (unused initialisers...) are noise to a user
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def cpu_session(
    model: str | os.PathLike | bytes, threads: int | None = 1, *, spin: bool = True
) -> ort.InferenceSession:
    """A CPU session with `session_options`; ModelError (one line) if onnxruntime cannot load the model."""
    src = model if isinstance(model, bytes) else str(model)
    try:
        opts = session_options(threads, spin=spin)
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise ModelError(f"onnxruntime cannot load the model: {str(e).splitlines()[0][:300]}") from None


class OnnxModel(DeployModel):
    """An exported vitshrink ONNX model run by onnxruntime (see `DeployModel`)."""

    runtime = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        providers: Sequence[Any] | None = None,
        *,
        low_memory: bool = False,
    ) -> None:
        self.path = onnx_file(path)  # an optimum-style folder runs its model.onnx
        where = str(self.path)
        if not self.path.is_file():
            raise ModelError(f"not a file: {where}" if self.path.exists() else f"model not found: {where}")
        if self.path.stat().st_size == 0:
            raise ModelError(f"not an ONNX model (empty file): {where}")
        if threads is not None and threads < 1:
            raise ModelError(f"threads must be >= 1, got {threads}")

        opts = session_options(threads)
        if low_memory:
            # Measured with predict() on SegFormer-B0 at 512x512, 8 images, 1 thread (x86): peak RSS
            # 557 -> 336 MiB for 25-40% more time. The arena keeps freed blocks for reuse, and the
            # ENABLE_ALL layout pass (NCHWc) holds reordered copies of weights and activations.
            opts.enable_cpu_mem_arena = False
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            self.session = ort.InferenceSession(
                str(self.path), opts, providers=list(providers) if providers else default_providers()
            )
        except _ORT_ERRORS as e:
            raise ModelError(f"not a valid ONNX model: {where}: {_ort_message(e)}") from None
        except ValueError as e:  # unknown provider names
            raise ModelError(f"cannot open {where}: {str(e).splitlines()[0]}") from None

        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{where}: expected one image input, the model has {len(inputs)}")
        inp = inputs[0]
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ModelError(f"{where}: input {inp.name!r} has rank {len(shape)}; expected NCHW images")
        if inp.type != "tensor(float)":
            raise ModelError(f"{where}: input {inp.name!r} is {inp.type}; expected float32 (tensor(float))")
        self.input_name = inp.name

        outputs = self.session.get_outputs()
        names = [o.name for o in outputs]
        out = outputs[names.index("logits")] if "logits" in names else outputs[0]
        self.output_name = out.name
        out_shape = list(out.shape) if out.shape is not None else None
        # A class-map graph (export --argmax) returns uint8 class ids (N, H, W), not logits.
        self.class_ids = out.type == "tensor(uint8)"
        meta = read_meta_props(self.session.get_modelmeta().custom_metadata_map, where)
        self._setup(where, shape, out_shape, meta)
        made_for = (self.meta.get("int8") or {}).get("target_cpu")
        if self.session.get_providers()[0] == "CPUExecutionProvider" and not runs_exactly_here(made_for):
            self.warnings.append(
                f"{where} was quantized for {made_for} CPUs; this x86 CPU lacks VNNI, so its int8 kernels "
                "may saturate and lose accuracy: re-quantize with --target-cpu avx2"
            )
            warnings.warn(self.warnings[-1], RuntimeWarning, stacklevel=2)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            (logits,) = self.session.run([self.output_name], {self.input_name: batch})
        except _ORT_ERRORS as e:
            raise DataError(f"inference failed on {self.path.name}: {_ort_message(e)}") from None
        return logits


__all__ = ["TOP_K", "OnnxModel", "cpu_session", "default_providers", "session_options", "static_dim"]
