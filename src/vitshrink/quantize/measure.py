"""Running ONNX models on the CPU to measure them: outputs, agreement and error vs fp32, activation
ranges; and onnxruntime.quantization kept quiet."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .calib import Batches


def compare(
    model: str | os.PathLike,
    batches: Sequence[np.ndarray],
    refs: Sequence[np.ndarray],
    max_samples: int | None = None,
) -> dict[str, float]:
    """Agreement, relative error and finiteness of `model`'s first output vs `refs`, batch by batch
    (no output is kept: the same numbers as on the concatenated outputs, at one batch's memory)."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    agree = count = seen = 0
    diff2 = ref2 = 0.0
    finite = True
    for x, ref in zip(batches, refs):
        if max_samples is not None:
            x, ref = x[: max_samples - seen], ref[: max_samples - seen]
            if not len(x):
                break
        seen += len(x)
        out = np.asarray(sess.run(None, {name: x})[0], dtype=np.float32)
        finite = finite and bool(np.isfinite(out).all())
        agree += int((ref.argmax(1) == out.argmax(1)).sum())
        count += int(np.prod(ref.shape) // ref.shape[1])
        diff2 += float(np.square(out - ref, dtype=np.float64).sum())
        ref2 += float(np.square(ref, dtype=np.float64).sum())
    return {
        "agreement": agree / max(count, 1),
        "rel_error": float(np.sqrt(diff2) / max(np.sqrt(ref2), 1e-12)),
        "finite": finite,
    }


def outputs(
    model: str | os.PathLike, batches: Sequence[np.ndarray], spill: str | os.PathLike | None
) -> Batches:
    """The model's first output per batch, spilled like the batches (the fp32 reference)."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    out = Batches(spill)
    for b in batches:
        out.append(np.asarray(sess.run(None, {name: b})[0], dtype=np.float32))
    return out


def session(model: str | os.PathLike | bytes, threads: int | None = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session, or for an OpenVINO IR the same API over OpenVINO (`OvSession`), so
    every fidelity check measures candidates of both runtimes alike."""
    from ..deploy.ov_runtime import OvSession, is_openvino
    from ..deploy.runtime import cpu_session

    if not isinstance(model, bytes) and is_openvino(model):
        return OvSession(model, threads)  # type: ignore[return-value]
    return cpu_session(model, threads)


def run(model: str | os.PathLike | bytes | ort.InferenceSession, batches: Sequence[np.ndarray]) -> np.ndarray:
    """First output of the model over all batches, concatenated."""
    sess = model if hasattr(model, "get_inputs") else session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([np.asarray(sess.run(None, {name: b})[0], dtype=np.float32) for b in batches])


def rel_error(ref: np.ndarray, out: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / max(float(np.linalg.norm(ref)), 1e-12))


def channel_absmax(
    model: onnx.ModelProto, tensors: Sequence[str], batches: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of intermediate float tensors over the calibration batches."""
    if not tensors:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    sess = session(m.SerializeToString())
    name = sess.get_inputs()[0].name
    out: dict[str, np.ndarray] = {}
    for b in batches:
        for t, v in zip(tensors, sess.run(list(tensors), {name: b})):
            v = np.abs(np.asarray(v, dtype=np.float32)).reshape(-1, v.shape[-1]).max(0)
            out[t] = v if t not in out else np.maximum(out[t], v)
    return out


@contextlib.contextmanager
def ort_quiet() -> Iterator[None]:
    """Silence onnxruntime.quantization's print() progress and root-logger warnings.

    ORT's calibrators print progress to stdout and warn through the root logger; neither is useful to
    vitshrink users and stdout may carry the CLI's JSON output.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
