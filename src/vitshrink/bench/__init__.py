"""`vitshrink bench`: latency percentiles, throughput, peak memory, size, params and MACs.

Latency and memory are measured in fresh subprocesses (`vitshrink.bench.worker`): one per model for
peak RSS (VmHWM, so no other model or training state pollutes it) and, when several models are
compared, one more that interleaves rounds across them and keeps each model's best median. Compare
models only within one call: absolute numbers on shared machines drift by tens of percent.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..artifacts import write_json
from ..errors import ModelError, VitshrinkError
from ..hub import resolve_model
from ..onnx_folder import onnx_file


def model_stats(path: str | os.PathLike, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Size on disk, params and MACs of a model directory (or Hub id) or ONNX file; MACs at
    `image_size` (H, W) when given, else at the model's own size."""
    path = onnx_file(resolve_model(path))
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    from ..deploy.ov_runtime import is_openvino

    if is_openvino(path):
        return _openvino_stats(path, image_size)
    if path.is_dir():
        import torch

        from ..export import count_macs
        from ..models import count_params, family_for, load_model

        model, meta = load_model(path)
        pre = meta["preprocess"]
        example = torch.zeros(1, pre["channels"], *(image_size or pre["size"]))
        size = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
        return {
            "size_mb": size / 2**20,
            "params": count_params(model),
            "macs": count_macs(family_for(model).export_wrapper(model), example),
            "format": "hf-dir",
        }
    meta = onnx_meta(path)
    stats = meta.get("stats", {}) if meta else {}
    macs = stats.get("macs")
    pre = (meta or {}).get("preprocess") or {}
    if image_size is not None and list(image_size) != pre.get("size"):
        macs = _macs_at(meta or {}, image_size)
    params = stats.get("params")
    if params is None:
        import onnx

        params = sum(
            int(_numel(t.dims)) for t in onnx.load(str(path), load_external_data=False).graph.initializer
        )
    return {
        "size_mb": path.stat().st_size / 2**20,
        "params": params,
        "macs": macs,
        "format": "onnx",
    }


def _openvino_stats(path: Path, image_size: tuple[int, int] | None) -> dict[str, Any]:
    """Size (.xml + .bin), params and MACs of an OpenVINO model, from the metadata it carries (the
    export's counts: quantizing or converting changes neither)."""
    from ..deploy.ov_runtime import ir_meta, ir_size_bytes, openvino_xml, read_model

    xml = openvino_xml(path)
    assert xml is not None
    meta = ir_meta(read_model(xml), xml)
    stats = meta.get("stats") or {}
    macs = stats.get("macs")
    if image_size is not None and list(image_size) != (meta.get("preprocess") or {}).get("size"):
        macs = _macs_at(meta, image_size)
    return {
        "size_mb": ir_size_bytes(xml) / 2**20,
        "params": stats.get("params"),
        "macs": macs,
        "format": "openvino",
    }


def _macs_at(meta: dict[str, Any], size: tuple[int, int]) -> int | None:
    """MACs of a (dynamic-size) ONNX graph at another input size, counted by torch on a randomly
    initialised model built from the HF config the export stored; None when no config rode along.
    (Not on the meta device: there SDPA falls back to a path the FLOP counter counts differently.)

    The export's own count holds only at its size: attention cost grows faster than the pixel count."""
    cfg = meta.get("hf_config")
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        return None
    import torch

    from ..export import count_macs
    from ..models import family_for

    try:
        family = family_for(cfg["model_type"])
        family.before_load()
        cls = family.model_class(meta.get("task", "classification"))
        config = cls.config_class.from_dict(cfg)
        model = cls(config).eval()
        example = torch.zeros(1, int((meta.get("preprocess") or {}).get("channels", 3)), *size)
        return count_macs(family.export_wrapper(model), example)
    except Exception:  # noqa: BLE001 - MACs are informative; an unbuildable config leaves them unknown
        return None


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def onnx_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    from ..deploy._meta import read_onnx_meta

    return read_onnx_meta(path) or None


def _worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    show = bool(spec.get("progress"))
    try:
        # With progress on, the worker's stderr (its tqdm bar) goes straight to the terminal; its
        # errors still come back as JSON on stdout.
        proc = subprocess.run(
            [sys.executable, "-m", "vitshrink.bench.worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=None if show else subprocess.PIPE,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise VitshrinkError(f"benchmark timed out after {timeout:.0f}s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        last = (proc.stderr or "").strip().splitlines() or [f"exit code {proc.returncode}, no output"]
        raise VitshrinkError(f"benchmark worker failed: {last[-1]}")
    out = json.loads(lines[-1])
    if "error" in out:
        raise VitshrinkError(f"benchmark failed: {out['error']}")
    return out


STAGE_FIELDS = ("latency_ms", "throughput", "throughput_batch", "peak_rss_mb", "size_mb", "params", "macs")


def stage_fields(result: dict[str, Any]) -> dict[str, Any]:
    """The measurement keys a results.json stage carries, from one `bench_many` result."""
    return {k: result.get(k) for k in STAGE_FIELDS}


def bench_many(
    models: list[str | os.PathLike],
    *,
    threads: int | None = None,
    batch: int = 8,
    runs: int = 20,
    rounds: int = 3,
    warmup: int = 5,
    device: str = "cpu",
    memory: bool = True,
    timeout: float = 900,
    image_size: tuple[int, int] | None = None,
    quiet: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark several models comparably: one interleaved latency process + one memory process each."""
    from ..deploy.ov_runtime import is_openvino

    paths = [str(onnx_file(resolve_model(m))) for m in models]
    for p in paths:
        if not Path(p).exists():
            raise ModelError(f"model not found: {p}")
        if not Path(p).is_dir() and not p.endswith((".onnx", ".xml")):
            raise ModelError(f"expected a model directory, an .onnx file or an OpenVINO model: {p}")
        if is_openvino(p):
            from ..deploy.ov_runtime import import_openvino

            import_openvino()  # one line here rather than a worker's traceback
    spec = {
        "models": paths,
        "threads": threads,
        "batch": batch,
        "runs": runs,
        "rounds": rounds,
        "warmup": warmup,
        "device": device,
        "image_size": list(image_size) if image_size else None,
    }
    lat = _worker({**spec, "progress": not quiet}, timeout)
    out = []
    from ..progress import progress

    for p, r in progress(list(zip(paths, lat["results"])), desc="bench memory", disable=quiet):
        res = {**r, **model_stats(p, image_size), "threads": threads, "device": device}
        if memory:
            # Always its own batch-1 process: the same model gets the same figure alone or in a group,
            # and the latency process's batch-`batch` throughput run does not inflate it.
            mem = _worker({**spec, "models": [p], "runs": 3, "rounds": 1, "warmup": 1, "batch": 1}, timeout)
            res["peak_rss_mb"] = mem["peak_rss_mb"]
        out.append(res)
    return out


def bench(
    model: str | os.PathLike | list[str | os.PathLike],
    *,
    threads: int | None = None,
    batch: int = 8,
    runs: int = 30,
    rounds: int = 3,
    warmup: int = 5,
    device: str = "cpu",
    json_out: str | os.PathLike | None = None,
    image_size: tuple[int, int] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Benchmark one model (or several, compared in one run); optionally write JSON.

    image_size (H, W): input size for model directories and dynamic-size ONNX graphs (a fixed-size
    graph must already take it); default: each model's own size.
    """
    models = model if isinstance(model, list) else [model]
    results = bench_many(
        models,
        threads=threads,
        batch=batch,
        runs=runs,
        rounds=rounds,
        warmup=warmup,
        device=device,
        image_size=image_size,
        quiet=quiet,
    )
    if len(results) > 1:
        base = results[0]["latency_ms"]["p50"]
        for r in results:
            r["speedup_vs_first"] = base / r["latency_ms"]["p50"]
    report = {"results": results}
    if json_out:
        write_json(json_out, report)
    return report


def format_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table (rich renders it on screen in the CLI)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="vitshrink bench")
    for col in (
        "model",
        "runtime",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "img/s",
        "peak RSS MB",
        "size MB",
        "params",
        "MACs",
    ):
        t.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for r in results:
        lat = r["latency_ms"]
        t.add_row(
            Path(r["model"]).name,
            r["runtime"],
            f"{lat['p50']:.2f}",
            f"{lat['p90']:.2f}",
            f"{lat['p99']:.2f}",
            f"{r.get('throughput', 0):.1f}",
            f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-",
            f"{r['size_mb']:.2f}",
            f"{r['params']:,}" if r.get("params") is not None else "-",
            f"{r['macs'] / 1e6:.1f}M" if r.get("macs") else "-",
        )
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(t)
    return console.export_text()


from .._callable import install as _install  # noqa: E402

_install(__name__, "bench")
