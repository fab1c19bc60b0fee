"""OpenVINO beside onnxruntime: a vitshrink model as OpenVINO IR, run without torch.

The layout (one folder, read like an ONNX file by predict / eval / bench / tiling / video):
`model.xml` + `model.bin` (the IR), `vitshrink.json` (the metadata every vitshrink ONNX carries),
`config.json` and `preprocessor_config.json` (as in an optimum folder). The metadata also rides in the
IR's rt_info under "vitshrink", so a bare `.xml` is as self-describing as an `.onnx`.

`openvino` is an optional extra (`pip install 'vitshrink[openvino]'`) imported only when such a model
is opened; without it, opening one is a one-line ModelError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import atomic_dir, write_json
from ..errors import DataError, ModelError
from ..onnx_folder import preprocessor_config
from ._base import DeployModel
from ._meta import META_KEY, _json_default, parse_meta

XML_FILE = "model.xml"
SIDECAR = "vitshrink.json"
INSTALL_HINT = "pip install 'vitshrink[openvino]'"


def openvino_xml(path: str | os.PathLike) -> Path | None:
    """The IR file a path names (an `.xml`, or `model.xml` inside a folder), or None when it names none."""
    p = Path(path)
    if p.suffix == ".xml":
        return p
    if p.is_dir() and (p / XML_FILE).is_file():
        return p / XML_FILE
    return None


def is_openvino(path: str | os.PathLike) -> bool:
    return openvino_xml(path) is not None


def import_openvino() -> Any:
    """The openvino module, or a one-line ModelError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise ModelError(f"OpenVINO is not installed: {INSTALL_HINT}") from None
    return openvino


def compile_config(threads: int | None) -> dict[str, Any]:
    """OpenVINO CPU settings every vitshrink compile uses (the onnxruntime sessions' counterparts)."""
    cfg: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        # No INFERENCE_PRECISION_HINT: OpenVINO's default (bf16 for the float parts on CPUs with AMX or
        # AVX512-BF16, f32 elsewhere) is what an OpenVINO user gets, and quantize's metric and fidelity
        # checks run through these same settings, so what they measured is what deploys here.
        # subnormal floats flushed, as session_options does for onnxruntime (x86's slow path)
        "CPU_DENORMALS_OPTIMIZATION": True,
    }
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


def read_model(xml: Path) -> Any:
    ov = import_openvino()
    if not xml.is_file():
        raise ModelError(f"model not found: {xml}")
    try:
        return ov.Core().read_model(str(xml))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
        msg = _ov_message(e)
        raise ModelError(f"not a valid OpenVINO model: {xml}: {msg}") from None


def ir_meta(model: Any, xml: Path) -> dict[str, Any]:
    """The vitshrink metadata of an IR: rt_info, else the folder's vitshrink.json; {} when neither."""
    if model.has_rt_info([META_KEY]):
        return parse_meta(model.get_rt_info([META_KEY]).astype(str), str(xml))
    side = xml.parent / SIDECAR
    return parse_meta(side.read_text(), str(side)) if side.is_file() else {}


def compile_model(model: Any, threads: int | None) -> Any:
    ov = import_openvino()
    try:
        return ov.Core().compile_model(model, "CPU", compile_config(threads))
    except Exception as e:  # noqa: BLE001
        msg = _ov_message(e)
        raise ModelError(f"OpenVINO cannot compile the model: {msg}") from None


def _ov_message(e: BaseException) -> str:
    """OpenVINO's message in one line: its first lines only name the C++ source file that raised."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))] or lines
    return (useful[0] if useful else type(e).__name__)[:200]


def _dims(pshape: Any) -> list[int | None]:
    return [d.get_length() if d.is_static else None for d in pshape]


class OpenVinoModel(DeployModel):
    """An exported vitshrink model as OpenVINO IR, run by OpenVINO on the CPU (see `DeployModel`).
    `low_memory` is accepted for a common signature; OpenVINO has no arena to turn off."""

    runtime = "openvino"

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        providers: Sequence[Any] | None = None,
        *,
        low_memory: bool = False,
    ) -> None:
        xml = openvino_xml(path)
        if xml is None:
            raise ModelError(f"not an OpenVINO model (no {XML_FILE}): {path}")
        if threads is not None and threads < 1:
            raise ModelError(f"threads must be >= 1, got {threads}")
        self.path = xml
        where = str(xml)
        model = read_model(xml)
        if len(model.inputs) != 1:
            raise ModelError(f"{where}: expected one image input, the model has {len(model.inputs)}")
        inp = model.inputs[0]
        shape = _dims(inp.get_partial_shape())
        if len(shape) != 4:
            raise ModelError(f"{where}: input has rank {len(shape)}; expected NCHW images")
        if inp.get_element_type().get_type_name() != "f32":
            raise ModelError(f"{where}: input is {inp.get_element_type()}; expected float32")
        outs = model.outputs
        idx = next((i for i, o in enumerate(outs) if "logits" in o.get_names()), 0)
        pshape = outs[idx].get_partial_shape()
        out_shape = _dims(pshape) if pshape.rank.is_static else None
        self._setup(where, shape, out_shape, ir_meta(model, xml))
        self.compiled = compile_model(model, threads)
        self._request = self.compiled.create_infer_request()
        self._out = idx

    @property
    def providers(self) -> list[str]:
        return ["OpenVINO CPU"]

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            self._request.infer({0: batch})
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            msg = _ov_message(e)
            raise DataError(f"inference failed on {self.path.name}: {msg}") from None
        # the request reuses its output buffer on the next call: hand out a copy
        return np.array(self._request.get_output_tensor(self._out).data)


class OvSession:
    """The slice of onnxruntime's InferenceSession API vitshrink's measuring code uses (`get_inputs()[0]
    .name`, `run(None, feed)`), over an OpenVINO IR: fidelity checks and timing treat both alike."""

    class _Input:
        name = "pixel_values"

    def __init__(self, path: str | os.PathLike, threads: int | None = 1) -> None:
        xml = openvino_xml(path)
        if xml is None:
            raise ModelError(f"not an OpenVINO model: {path}")
        self.compiled = compile_model(read_model(xml), threads)
        self._request = self.compiled.create_infer_request()

    def get_inputs(self) -> list[Any]:
        return [self._Input()]

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feed.values()
        self._request.infer({0: np.ascontiguousarray(x, np.float32)})
        return [np.array(self._request.get_output_tensor(0).data)]


def save_ir(model: Any, xml: Path, meta: dict[str, Any] | None, *, fp16_weights: bool = False) -> None:
    """Save an ov.Model as IR at `xml` (+ .bin), with `meta` in its rt_info. Weights stay fp32 unless
    `fp16_weights` (OpenVINO's save_model would compress them to fp16 by default)."""
    ov = import_openvino()
    if meta:
        model.set_rt_info(json.dumps(meta, default=_json_default), [META_KEY])
    ov.save_model(model, str(xml), compress_to_fp16=fp16_weights)


def write_openvino_folder(xml: Path, folder: str | os.PathLike, meta: dict[str, Any] | None) -> Path:
    """Lay out the IR at `xml` (+ its .bin) as a vitshrink OpenVINO folder at `folder` (atomically)."""
    import shutil

    meta = meta or {}
    with atomic_dir(Path(folder)) as tmp:
        shutil.copyfile(xml, tmp / XML_FILE)
        shutil.copyfile(xml.with_suffix(".bin"), tmp / "model.bin")
        write_json(tmp / SIDECAR, meta)
        if meta:
            write_json(tmp / "preprocessor_config.json", preprocessor_config(meta))
        config = meta.get("hf_config")
        if isinstance(config, dict):
            names = meta.get("class_names") or []
            config = {
                **config,
                "id2label": {str(i): n for i, n in enumerate(names)},
                "label2id": {n: i for i, n in enumerate(names)},
            }
            write_json(tmp / "config.json", config)
    return Path(folder)


def ir_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of an IR (.xml + .bin)."""
    xml = openvino_xml(path)
    if xml is None:
        raise ModelError(f"not an OpenVINO model: {path}")
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
