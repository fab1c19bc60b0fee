"""TensorRT recipe: the trtexec command, a Python-API fallback builder, a standalone runner and a README.

Nothing here needs TensorRT: the recipe is written on the workstation and run on the device, because an
engine is tied to the GPU and TensorRT version that built it. Only `onnx` is used (lazily, it is light
and stays optional for `predict`) to read the graph's node names and metadata.
"""

from __future__ import annotations

import os
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import atomic_file
from ..errors import ModelError, VitshrinkError
from ._meta import read_meta_props, resolve_class_names, resolve_preprocess, resolve_task

TRTEXEC = "/usr/src/tensorrt/bin/trtexec"  # where JetPack installs it; it is not on PATH


@dataclass(frozen=True)
class Device:
    label: str
    memory_mb: int  # RAM shared by CPU and GPU on Jetsons
    workspace_mb: int
    workspace_why: str
    jetpack: str
    tensorrt: str
    gpu: str
    fast_int8: bool


DEVICES: dict[str, Device] = {
    "jetson-nano": Device(
        label="Jetson Nano 4 GB",
        memory_mb=4096,
        # CPU and GPU share 4 GB, of which the OS takes ~1 GB (more with the desktop on) and the builder
        # holds the network and its weights at least twice while timing tactics. 1 GiB of scratch lets the
        # fast GEMM/conv tactics compete without pushing the build into swap; trtexec 8.2's default of
        # 16 MiB would silently rule most of them out.
        workspace_mb=1024,
        workspace_why="1/4 of the 4 GB shared CPU/GPU memory: room for the fast tactics, not for swapping",
        jetpack="JetPack 4.6.x (L4T R32.7), the last release for the Nano: TensorRT 8.2.1, CUDA 10.2, Python 3.6",
        tensorrt="8.2",
        gpu="128-core Maxwell (sm_53)",
        fast_int8=False,
    ),
    "jetson-orin-nano": Device(
        label="Jetson Orin Nano 8 GB",
        memory_mb=8192,
        workspace_mb=2048,
        workspace_why="1/4 of the 8 GB shared CPU/GPU memory",
        jetpack="JetPack 5.1.x (TensorRT 8.5) or 6.x (TensorRT 8.6 / 10.3)",
        tensorrt="8.5",
        gpu="Ampere (sm_87) with tensor cores",
        fast_int8=True,
    ),
    "desktop": Device(
        label="desktop / server GPU",
        memory_mb=16384,
        workspace_mb=4096,
        workspace_why="ample on a discrete GPU",
        jetpack="not a Jetson: any TensorRT >= 8.4 install",
        tensorrt="8.6",
        gpu="discrete NVIDIA GPU",
        fast_int8=True,
    ),
}

# Ops whose fp16 arithmetic overflows or loses too much: variance/mean reductions (x*x passes fp16's
# 65504 as soon as |x| > 256, common in ViT residual streams) and softmax over attention logits.
NORM_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax")
_TEMPLATE_START = "# --- constants (filled in by vitshrink.deploy.trt_recipe) ---"
_TEMPLATE_END = "# --- end constants ---"


def _fill_template(name: str, constants: dict[str, Any]) -> str:
    """The template module's source with its constants block replaced by `constants` (as Python literals)."""
    src = (Path(__file__).parent / name).read_text()
    head, rest = src.split(_TEMPLATE_START, 1)
    _, tail = rest.split(_TEMPLATE_END, 1)
    body = "".join(f"{k} = {v!r}\n" for k, v in constants.items())
    return head + _TEMPLATE_START + "\n" + body + _TEMPLATE_END + tail


def fp32_node_names(model: Any) -> list[str]:
    """Names of the ONNX nodes to keep in fp32 under --fp16, in graph order.

    LayerNormalization / GroupNormalization / InstanceNormalization / Softmax nodes, and the
    ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div chains that exports below opset 17 (the
    ones TensorRT 8.2 on the Nano can parse) produce for LayerNorm. Unnamed nodes cannot be addressed.
    """
    return [n.name for n in _fp32_nodes(model) if n.name]


def _fp32_nodes(model: Any) -> list[Any]:
    nodes = list(model.graph.node)
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def src(node: Any, ops: tuple[str, ...]) -> Any:
        for t in node.input:
            p = producer.get(t)
            if p is not None and p.op_type in ops:
                return p
        return None

    picked: set[int] = set()
    for sqrt in (n for n in nodes if n.op_type == "Sqrt"):
        # Walk back from the Sqrt along the exact decomposed-LayerNorm pattern; anything else is not a norm.
        chain = [sqrt]
        node = src(sqrt, ("Add", "ReduceMean"))
        if node is not None and node.op_type == "Add":  # + eps
            chain.append(node)
            node = src(node, ("ReduceMean",))
        if node is None or node.op_type != "ReduceMean":
            continue
        chain.append(node)  # variance
        square = src(node, ("Pow", "Mul"))
        centre = src(square, ("Sub",)) if square is not None else None
        if centre is None:
            continue
        chain += [square, centre]
        mean = src(centre, ("ReduceMean",))
        if mean is not None:
            chain.append(mean)
        chain += [c for c in consumers.get(sqrt.output[0], []) if c.op_type in ("Div", "Reciprocal")]
        picked.update(id(n) for n in chain)
    picked.update(id(n) for n in nodes if n.op_type in NORM_OPS)
    return [n for n in nodes if id(n) in picked]


def _input_dims(model: Any) -> tuple[str, list[int | None]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]  # old exports list weights as inputs
    if len(inputs) != 1:
        raise ModelError(f"expected one image input, the model has {len(inputs)}")
    inp = inputs[0]
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in inp.type.tensor_type.shape.dim
    ]
    if len(dims) != 4:
        raise ModelError(f"input {inp.name!r} has rank {len(dims)}; expected NCHW images")
    return inp.name, dims


@dataclass(frozen=True)
class _Recipe:
    onnx_path: Path
    engine_name: str
    device: str
    dev: Device
    fp16: bool
    workspace_mb: int
    fp32_layers: list[str]
    cli_layers: list[str]
    unnamed: int
    warnings: list[str]
    input_name: str
    shape: str | None  # "1x3x512x512" when the input is dynamic and must be pinned
    task: str


def trt_recipe(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    fp16: bool = True,
    workspace_mb: int | None = None,
    device: str = "jetson-nano",
) -> Path:
    """Write build_engine.sh, build_engine.py, run_engine.py and README.txt for `onnx_path`.

    Default folder: <onnx dir>/<stem>_trt. Returns the folder. Run build_engine.sh on the device itself.
    """
    onnx_path = Path(onnx_path)
    if device not in DEVICES:
        raise VitshrinkError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    dev = DEVICES[device]
    workspace_mb = dev.workspace_mb if workspace_mb is None else int(workspace_mb)
    if not 0 < workspace_mb < dev.memory_mb:
        raise VitshrinkError(f"workspace_mb must be between 1 and {dev.memory_mb - 1} on a {dev.label}")
    if not onnx_path.is_file():
        raise ModelError(f"ONNX model not found: {onnx_path}")
    model = _load_graph(onnx_path)

    where = str(onnx_path)
    meta = read_meta_props(model.metadata_props, where)
    input_name, dims = _input_dims(model)
    outs = list(model.graph.output)
    out = next((o for o in outs if o.name == "logits"), outs[0])
    out_dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in out.type.tensor_type.shape.dim
    ]
    from .class_map import is_class_map

    class_ids = is_class_map(model)
    task = resolve_task(meta, (len(out_dims) + class_ids) or None, where)
    channels, size, mean, std = resolve_preprocess(meta, dims[1], (dims[2], dims[3]), where)
    num_classes = out_dims[1] if len(out_dims) > 1 and not class_ids else None
    class_names = resolve_class_names(meta, num_classes, where) or [
        f"class_{i}" for i in range(num_classes or 0)
    ]
    if None in dims[2:] and "preprocess" not in meta:
        raise ModelError(f"{where}: input height/width are dynamic and there is no metadata to fix them")
    # A fully static graph must NOT get --*Shapes (trtexec refuses: "Static model does not take explicit
    # shapes"); a dynamic one is pinned to the single deployed shape, the cheapest engine to build and hold.
    profile = None if None not in dims else (dims[0] or 1, channels, *size)

    out_dir = Path(out_dir) if out_dir is not None else onnx_path.parent / f"{onnx_path.stem}_trt"
    if class_ids:  # TensorRT builds a copy whose class ids are int32 (see _int32_class_map)
        onnx_path = _int32_class_map(model, onnx_path, out_dir)
    nodes = _fp32_nodes(model) if fp16 else []
    fp32_layers = [n.name for n in nodes if n.name]
    warn = _version_warnings(model, dev)

    r = _Recipe(
        onnx_path=onnx_path,
        engine_name=f"{onnx_path.stem}_{'fp16' if fp16 else 'fp32'}.engine",
        device=device,
        dev=dev,
        fp16=fp16,
        workspace_mb=workspace_mb,
        fp32_layers=fp32_layers,
        # trtexec's spec is "name:prec,name:prec": names holding ',' or ':' are left to build_engine.py.
        cli_layers=[n for n in fp32_layers if "," not in n and ":" not in n],
        unnamed=len(nodes) - len(fp32_layers),
        warnings=warn,
        input_name=input_name,
        shape="x".join(str(d) for d in profile) if profile else None,
        task=task,
    )
    runner = _fill_template(
        "_engine_runner.py",
        {
            "TASK": task,
            "CLASS_NAMES": class_names,
            "MEAN": list(mean),
            "STD": list(std),
            "SIZE": list(size),
            "CHANNELS": channels,
            "INPUT_NAME": input_name,
            "OUTPUT_NAME": out.name,
            "ENGINE_NAME": r.engine_name,
            "CLASS_IDS": class_ids,
        },
    )
    builder = _fill_template(
        "_engine_builder.py",
        {
            "FP16": fp16,
            "WORKSPACE_MB": workspace_mb,
            "FP32_LAYERS": fp32_layers,
            "INPUT_NAME": input_name,
            "PROFILE_SHAPE": list(profile) if profile else None,
            "ENGINE_NAME": r.engine_name,
        },
    )
    _write_recipe(out_dir, r, builder, runner)
    return out_dir


def _load_graph(onnx_path: Path) -> Any:
    """The graph and metadata (weights stay on disk), refusing what TensorRT cannot build."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise VitshrinkError("trt_recipe needs the 'onnx' package: pip install onnx") from None
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise ModelError(
            f"not a valid ONNX model: {onnx_path}: {str(e).splitlines()[0] if str(e) else e}"
        ) from None
    if not model.graph.node:
        raise ModelError(f"not a valid ONNX model (empty graph): {onnx_path}")
    ort_ops = sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})
    if ort_ops:
        raise ModelError(
            f"{onnx_path} uses onnxruntime-only ops ({', '.join(ort_ops)}): it is an int8 model for "
            "onnxruntime on CPU; give TensorRT the fp32 / fp16 ONNX or `vitshrink quantize --target tensorrt`"
        )
    return model


def _version_warnings(model: Any, dev: Any) -> list[str]:
    """What the device's TensorRT cannot parse in this graph (also issued as Python warnings)."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    warn = []
    if dev.tensorrt == "8.2" and any(n.op_type == "LayerNormalization" for n in model.graph.node):
        warn.append(
            f"This graph uses the LayerNormalization op (opset {opset}). TensorRT 8.2, the newest for the "
            f"{dev.label}, has no parser for it: re-export below opset 17 (14-16 for transformers' SDPA "
            "attention), where LayerNorm becomes ReduceMean/Pow/Sqrt, which this recipe also pins to fp32."
        )
    for w in warn:
        warnings.warn(w, stacklevel=3)  # the caller of trt_recipe
    return warn


def _write_recipe(out_dir: Path, r: _Recipe, builder: str, runner: str) -> None:
    for name, text, mode in (
        ("build_engine.sh", _build_script(r), 0o755),
        ("build_engine.py", builder, 0o755),
        ("run_engine.py", runner, 0o755),
        ("README.txt", _readme(r), 0o644),
    ):
        with atomic_file(out_dir / name, "w") as f:
            f.write(text)
            os.fchmod(f.fileno(), mode)


def _int32_class_map(model: Any, onnx_path: Path, out_dir: Path) -> Path:
    """A copy of a class-map graph (export --argmax) for TensorRT, written into the recipe folder, whose
    last Cast yields int32 instead of uint8: TensorRT 8.2 (the Nano's) has no uint8 type at all, and
    TensorRT's ArgMax (a TopK) gives int32 indices anyway. run_engine.py narrows them to uint8 on the
    host; the copy out is 4 bytes a pixel, still 1/K of the float logits."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0]
    cast = next(n for n in m.graph.node if out.name in n.output)
    if cast.op_type != "Cast":
        raise ModelError(
            f"{onnx_path}: a uint8 output that is not a Cast of the argmax; re-export with --argmax"
        )
    for a in cast.attribute:
        if a.name == "to":
            a.i = onnx.TensorProto.INT32
    out.type.tensor_type.elem_type = onnx.TensorProto.INT32
    dst = out_dir / f"{onnx_path.stem}_int32ids.onnx"
    from ..artifacts import atomic_path

    with atomic_path(dst) as tmp:
        onnx.save(m, str(tmp))
    return dst


def _trtexec_args(
    onnx: str, engine: str, fp16: bool, workspace: str, layers: list[str], input_name: str, shape: str | None
) -> list[str]:
    args = [f"--onnx={onnx}", f"--saveEngine={engine}"]
    if fp16:
        args.append("--fp16")
    args.append(workspace)
    if layers:
        spec = ",".join(f"{n}:fp32" for n in layers)
        # Output types too: a layer computing x*x in fp32 would still overflow when it stores fp16.
        args += ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    if shape:
        args += [f"--{k}Shapes={input_name}:{shape}" for k in ("min", "opt", "max")]
    return args


def _build_script(r: _Recipe) -> str:
    q = shlex.quote
    name, dev, engine_name, workspace_mb = r.onnx_path.name, r.dev, r.engine_name, r.workspace_mb
    layer_lines = "".join(f"  {q(n)}\n" for n in r.cli_layers)
    shapes = (
        " ".join(q(f"--{k}Shapes={r.input_name}:{r.shape}") for k in ("min", "opt", "max")) if r.shape else ""
    )
    needs_pinning = "1" if r.fp16 and r.fp32_layers else "0"
    return f"""#!/usr/bin/env bash
# Build a TensorRT engine from {name} for the {dev.label}. Generated by vitshrink (trt_recipe).
# Run this ON the device: an engine only runs on the GPU model and TensorRT version that built it.
#   ./build_engine.sh                       # ONNX next to this script (or one folder up)
#   ONNX=/path/model.onnx ENGINE=/path/x.engine TRTEXEC=/path/trtexec ./build_engine.sh
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"

if [[ -z "${{ONNX:-}}" ]]; then
  for c in "$HERE/"{q(name)} "$HERE/../"{q(name)} {q(str(r.onnx_path.resolve()))}; do
    if [[ -f "$c" ]]; then ONNX="$c"; break; fi
  done
fi
if [[ -z "${{ONNX:-}}" || ! -f "$ONNX" ]]; then
  echo "error: {name} not found: copy it next to this script or set ONNX=/path/to/{name}" >&2
  exit 1
fi
ENGINE="${{ENGINE:-$HERE/{engine_name}}}"
TRTEXEC="${{TRTEXEC:-{TRTEXEC}}}"
if [[ ! -x "$TRTEXEC" ]]; then TRTEXEC="$(command -v trtexec || true)"; fi
if [[ -z "$TRTEXEC" ]]; then
  echo "error: trtexec not found (JetPack puts it in {TRTEXEC}); set TRTEXEC=/path/to/trtexec" >&2
  exit 1
fi

# Builder scratch memory: {workspace_mb} MiB ({dev.workspace_why}).
WORKSPACE_MB={workspace_mb}
# Layers kept in fp32 under --fp16: LayerNorm (or its ReduceMean/Pow/Sqrt chain) and Softmax.
FP32_LAYERS=(
{layer_lines})
NEEDS_PINNING={needs_pinning}

HELP="$("$TRTEXEC" --help 2>&1 || true)"
if [[ "$NEEDS_PINNING" == 1 && ( "${{USE_PYTHON_API:-0}}" == 1 || "$HELP" != *--layerPrecisions* ) ]]; then
  # trtexec < 8.4 (JetPack 4.6, the Nano's last) has no --layerPrecisions; TensorRT's Python API does.
  echo "note: pinning layers through the TensorRT Python API (build_engine.py)" >&2
  exec "${{PYTHON:-python3}}" "$HERE/build_engine.py" --onnx "$ONNX" --engine "$ENGINE"
fi

ARGS=(--onnx="$ONNX" --saveEngine="$ENGINE"{" --fp16" if r.fp16 else ""})
if [[ "$HELP" == *--memPoolSize* ]]; then
  ARGS+=(--memPoolSize=workspace:${{WORKSPACE_MB}}M)
else
  ARGS+=(--workspace=$WORKSPACE_MB)  # trtexec < 8.4
fi
if [[ "$NEEDS_PINNING" == 1 && ${{#FP32_LAYERS[@]}} -gt 0 ]]; then
  SPEC="$(IFS=,; echo "${{FP32_LAYERS[*]/%/:fp32}}")"
  ARGS+=(--precisionConstraints=obey "--layerPrecisions=$SPEC" "--layerOutputTypes=$SPEC")
fi
ARGS+=({shapes})
echo "+ $TRTEXEC ${{ARGS[*]}}" >&2
"$TRTEXEC" "${{ARGS[@]}}"
"""


def _readme(r: _Recipe) -> str:
    dev, engine_name, workspace_mb, fp32_layers = r.dev, r.engine_name, r.workspace_mb, r.fp32_layers
    args = _trtexec_args(
        r.onnx_path.name,
        engine_name,
        r.fp16,
        f"--memPoolSize=workspace:{workspace_mb}M",
        r.cli_layers,
        r.input_name,
        r.shape,
    )
    cmd = " ".join(shlex.quote(a) for a in [TRTEXEC, *args])
    lines = [f"TensorRT recipe for {r.onnx_path.name} ({r.task}) on the {dev.label}", "=" * 72, ""]
    for w in r.warnings:
        lines += [f"WARNING: {w}", ""]
    lines += [
        "Files",
        "  build_engine.sh  builds the engine with trtexec; falls back to build_engine.py when the",
        "                   device's trtexec (TensorRT < 8.4) lacks --layerPrecisions",
        "  build_engine.py  the same build through the TensorRT Python API (layer precisions pinned)",
        f"  run_engine.py    runs {engine_name} on one image with tensorrt + pycuda, preprocessing",
        "                   exactly like `vitshrink predict` (constants copied from the model metadata);",
        "                   segmentation frames >= 2x the input run as overlapping tiles at the photo's",
        "                   resolution (--tile auto|on|off, --overlap 0.25), as predict does",
        "",
        "Steps (on the device)",
        f"  1. Copy this folder and {r.onnx_path.name} to the device (the ONNX next to the scripts or one up).",
        "  2. sudo nvpmodel -m 0 && sudo jetson_clocks     # max power mode, fixed clocks"
        if r.device != "desktop"
        else "  2. (desktop) nothing to set up",
        "  3. ./build_engine.sh                             # minutes on a Nano; writes " + engine_name,
        "  4. python3 run_engine.py photo.jpg --runs 200    # result + latency",
        "",
        "Software",
        f"  {dev.jetpack}.",
        *(
            [
                "  TensorRT 8.2 has no LayerNormalization importer (opset 17+): export with opset 14-16.",
                "  It documents opsets up to 13; newer ones parse as long as every op has an importer.",
            ]
            if dev.tensorrt == "8.2"
            else []
        ),
        f"  trtexec lives at {TRTEXEC} (not on PATH). Check versions with",
        "  `dpkg -l | grep -E 'nvinfer|tensorrt'` or `cat /etc/nv_tegra_release`.",
        "  run_engine.py needs: python3-libnvinfer, python3-numpy, python3-pil (apt) and pycuda",
        "  (`pip3 install pycuda` with /usr/local/cuda/bin on PATH).",
        "  Engines are not portable: rebuild after any JetPack/TensorRT upgrade or on another device.",
        "",
        "Precision",
        f"  {'fp16 with ' + str(len(fp32_layers)) + ' layers pinned to fp32' if r.fp16 else 'fp32 (fp16 off)'}.",
        "  fp16 is the latency path on Jetson GPUs. LayerNorm statistics (x*x overflows fp16 beyond |x| = 256)",
        "  and Softmax stay fp32; pinning costs a little speed for accuracy. Compare against an fp32 build",
        "  (trt_recipe(..., fp16=False)) or `vitshrink predict` on a few images after building.",
    ]
    if r.unnamed:
        lines.append(
            f"  {r.unnamed} normalisation nodes have no name in the ONNX graph and could not be pinned."
        )
    if len(r.cli_layers) < len(fp32_layers):
        lines.append(
            "  Some node names contain ',' or ':' and are pinned only by build_engine.py (USE_PYTHON_API=1)."
        )
    if not dev.fast_int8:
        lines += [
            f"  INT8: the {dev.gpu} GPU has no fast int8 math (no DP4A, no tensor cores), so an int8 model",
            "  saves memory (smaller weights) but not time on this device; fp16 is the latency path.",
        ]
    lines += [
        "",
        "Memory",
        f"  Builder workspace {workspace_mb} MiB: {dev.workspace_why}.",
        f"  CPU and GPU share the {dev.memory_mb // 1024} GB of the {dev.label}. For big models stop the",
        "  desktop while building (`sudo systemctl isolate multi-user.target`) and add a swap file.",
        "",
        "Latency: measure it on the device itself",
        "  Desktop GPU timings do not transfer. After jetson_clocks, with a fan, run either",
        f"    {TRTEXEC} --loadEngine={engine_name} --warmUp=500 --avgRuns=100",
        "    python3 run_engine.py photo.jpg --runs 200      # includes host<->device copies",
        "  and report the median. Watch for thermal throttling in long runs (tegrastats).",
        "",
        "Equivalent trtexec command (TensorRT >= 8.4)",
        f"  {cmd}",
        "",
    ]
    return "\n".join(lines)
