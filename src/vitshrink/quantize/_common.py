"""Shared helpers for the ONNX quantization paths: loading, running, comparing, metadata, noise control."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .. import __version__
from ..cpu import reduce_range_for
from ..deploy._meta import read_meta_props, write_meta_props
from ..errors import DataError, ModelError

CALIB_MAX_SAMPLES = 256  # enough for stable activation ranges
CALIB_BATCH_PIXELS = 16 * 224 * 224  # pixels per calibration batch (see batch_size_for)


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file or raise a one-line ModelError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"ONNX model not found: {p}")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # noqa: BLE001 - protobuf raises several unrelated types on garbage input
        raise ModelError(f"not a valid ONNX file: {p} ({type(e).__name__})") from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise ModelError(f"not a valid ONNX model (empty graph): {p}")
    return model


def read_meta(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The vitshrink metadata (deploy._meta decides: ModelError when corrupt); None when absent."""
    return read_meta_props(model.metadata_props, "model") or None


def copy_metadata(
    src: onnx.ModelProto,
    dst: onnx.ModelProto,
    history: dict[str, Any] | None = None,
    size: Sequence[int] | None = None,
) -> None:
    """Copy all metadata_props from src to dst; append `history` to the vitshrink meta when present.
    `size`: the (H, W) a dynamic-size graph was calibrated at, recorded as the size it is deployed at."""
    del dst.metadata_props[:]
    for prop in src.metadata_props:
        entry = dst.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    meta = read_meta(src)
    if meta is not None and history is not None:
        if size is not None and isinstance(meta.get("preprocess"), dict):
            meta["preprocess"] = {**meta["preprocess"], "size": [int(v) for v in size]}
        meta.setdefault("history", []).append({**history, "version": __version__})
        meta["vitshrink_version"] = __version__
        write_meta_props(dst.metadata_props, meta)


def input_spec(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """Name and shape (None for symbolic dims) of the model's first real (non-initializer) input."""
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name not in inits:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
            return inp.name, dims
    raise ModelError("ONNX model has no input")


class Batches(Sequence[np.ndarray]):
    """Batches spilled to disk, one .npy file each, read back one at a time.

    Calibration inputs and the fp32 reference outputs grow with the number of images and their size
    (256 images at 512 px: 800 MB of inputs); on disk, memory stays that of one batch. Without a
    folder they stay in memory (a plain list), which is what tiny models want.
    """

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self._folder = None if folder is None else Path(folder)
        if self._folder is not None:
            self._folder.mkdir(parents=True, exist_ok=True)
        self._items: list[np.ndarray | Path] = []
        self._sizes: list[int] = []

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if self._folder is None:
            self._items.append(arr)
        else:
            path = self._folder / f"{len(self._items):05d}.npy"
            np.save(path, arr, allow_pickle=False)
            self._items.append(path)
        self._sizes.append(int(arr.shape[0]))

    @property
    def samples(self) -> int:
        return sum(self._sizes)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        item = self._items[i]
        return item if isinstance(item, np.ndarray) else np.load(item, allow_pickle=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))


def batch_size_for(shape: Sequence[int | None]) -> int:
    """Samples per batch: the model's fixed batch, else ~CALIB_BATCH_PIXELS pixels (16 at 224 px, 3 at
    512 px), so that one batch's activations -- what calibration holds at once -- do not grow with
    the image size."""
    if shape[0]:
        return int(shape[0])
    pixels = int(np.prod([d for d in shape[2:] if d])) if len(shape) > 2 else 0
    return max(1, min(16, CALIB_BATCH_PIXELS // pixels)) if pixels else 16


def prepare_calib(
    calib: Iterable[np.ndarray] | None,
    shape: Sequence[int | None],
    spill: str | os.PathLike | None = None,
) -> Batches:
    """Calibration batches (float32, NCHW), re-chunked to the model's batch dim if fixed (else to
    `batch_size_for`), streamed: at most one input batch is in memory at a time when `spill` names a
    folder to keep them in."""
    out = Batches(spill)
    if calib is None:
        return out
    if isinstance(calib, np.ndarray):  # one array is one batch, not an iterable of images
        calib = [calib]
    shape = list(shape)
    pending: list[np.ndarray] = []
    total = 0
    bs = 0
    for i, batch in enumerate(calib):
        arr = np.asarray(batch)
        if arr.ndim == len(shape) - 1:
            arr = arr[None]
        if arr.ndim != len(shape) or not np.issubdtype(arr.dtype, np.number):
            raise DataError(
                f"calibration batch {i} has shape {arr.shape}; expected {len(shape)}-D pixel_values"
            )
        for axis, want in enumerate(shape[1:], start=1):
            if want is not None and arr.shape[axis] != want:
                raise DataError(f"calibration batch {i} has shape {arr.shape}; the model expects {shape}")
        if not np.isfinite(arr).all():
            raise DataError(f"calibration batch {i} contains NaN or inf")
        arr = arr.astype(np.float32, copy=False)[: CALIB_MAX_SAMPLES - total]
        if not bs:
            bs = batch_size_for([shape[0], *arr.shape[1:]])
        pending.append(arr)
        total += arr.shape[0]
        while sum(len(a) for a in pending) >= bs:
            flat = np.concatenate(pending)
            out.append(flat[:bs])
            pending = [flat[bs:]] if len(flat) > bs else []
        if total >= CALIB_MAX_SAMPLES:
            break
    if not total:
        raise DataError("calibration data is empty")
    rest = sum(len(a) for a in pending)
    if shape[0] and not len(out):  # fixed batch size: whole batches only
        raise DataError(f"the model takes batches of {shape[0]}; got only {rest} calibration samples")
    if rest and not shape[0]:
        out.append(np.concatenate(pending))
    return out


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
    from ..deploy.runtime import cpu_session

    return cpu_session(model, threads)


def run(model: str | os.PathLike | bytes | ort.InferenceSession, batches: Sequence[np.ndarray]) -> np.ndarray:
    """First output of the model over all batches, concatenated."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([np.asarray(sess.run(None, {name: b})[0], dtype=np.float32) for b in batches])


def agreement(ref: np.ndarray, out: np.ndarray) -> float:
    """Top-1 agreement (classification logits B,K) or per-pixel argmax agreement (B,K,H,W)."""
    return float(np.mean(ref.argmax(1) == out.argmax(1)))


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


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def weight_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul / Gemm / Conv nodes whose weight is a constant: the ones worth int8 (memory + compute)."""
    inits = {i.name for i in model.graph.initializer}
    return [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1 and n.input[1] in inits
    ]


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MB: VmHWM where /proc has it (ru_maxrss survives exec,
    so a child started by a big process would report its parent's peak), else getrusage (macOS)."""
    import resource

    from .._proc import peak_rss_mb as vm_hwm

    if (hwm := vm_hwm()) is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB elsewhere


def weight_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-adds per sample of the constant-weight MatMul / Gemm / Conv nodes, by op type, from the
    output shapes shape inference recorded (nodes without a known shape are left out; 2-D outputs,
    tokens folded into the batch dim, count whole, which assumes batch 1 there)."""
    shapes = {
        vi.name: [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        for vi in (*model.graph.value_info, *model.graph.output)
    }
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    macs: dict[str, int] = {}
    for n in weight_nodes(model):
        out, w = shapes.get(n.output[0]), inits[n.input[1]]
        if not out or not all(out[1:]):
            continue
        per_out = int(np.prod(w[1:])) if n.op_type == "Conv" else w[0]  # Cin/group*kh*kw, or K
        if n.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            per_out = w[1] if trans_b else w[0]
        rows = out if len(out) == 2 else out[1:]  # a 2-D Gemm / MatMul holds batch x tokens in dim 0
        macs[n.op_type] = macs.get(n.op_type, 0) + int(np.prod(rows)) * per_out
    return macs


def file_size(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size


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


def make_say(quiet: bool) -> Callable[[str], None]:
    if quiet or os.environ.get("VITSHRINK_QUIET") == "1":
        return lambda msg: None
    return lambda msg: print(f"[quantize] {msg}", file=sys.stderr, flush=True)


# The state every int8 build shares; here rather than in builders.py because the graph rewrites
# (rewrites.py), which builders.py uses, take it too.
@dataclass
class Ctx:
    work: Path
    batches: Sequence[np.ndarray]  # calibration (or generated probe) inputs, see _common.Batches
    ref: Sequence[np.ndarray] | None  # fp32 outputs per batch
    eval_fn: Callable[[str], float] | None
    base_metric: float | None
    per_channel: bool
    calib_method: str
    vit_aware: bool
    target: str
    say: Callable[[str], None]
    sample: np.ndarray | None = None  # one batch-1 input (or the fixed batch) for latency
    quiet: bool = False
    target_cpu: str = "vnni"  # concrete int8 CPU target (see vitshrink.cpu); "avx2" means 7-bit weights
    generated: bool = False  # `batches` are generated probe inputs, not calibration data
    pre: Path | None = None  # the pre-processed float model every candidate derives from
    rewrites: dict[str, Any] = field(default_factory=dict)  # exact graph rewrites applied to `pre`
    counter: list[int] = field(default_factory=lambda: [0])
    memo: dict[str, float | None] = field(default_factory=dict)
    compared: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def reduce_range(self) -> bool:
        # TensorRT runs symmetric int8 x int8 on the GPU: no 16-bit pair sums to protect.
        return self.target != "tensorrt" and reduce_range_for(self.target_cpu)

    def path(self, tag: str) -> Path:
        self.counter[0] += 1
        return self.work / f"{self.counter[0]:04d}-{tag}.onnx"

    def metric(self, path: Path) -> float | None:
        key = str(path)
        if key not in self.memo:
            if self.eval_fn is not None:
                self.memo[key] = float(self.eval_fn(key))
            else:
                self.memo[key] = None if self.ref is None else self.compare(path)["agreement"]
        return self.memo[key]

    def fidelity(self, path: Path) -> dict[str, float]:
        return {} if self.ref is None else dict(self.compare(path))

    def compare(self, path: Path) -> dict[str, float]:
        """Agreement / relative error / finiteness vs fp32 over all batches, streamed (see _common.compare)."""
        key = str(path)
        if key not in self.compared:
            assert self.ref is not None
            self.compared[key] = compare(path, self.batches, self.ref)
        return self.compared[key]
