"""Benchmark worker, run as a fresh process: `python -m vitshrink.bench.worker SPEC_JSON`.

A fresh process keeps training memory and other models out of the peak-RSS reading. ONNX models are
run with onnxruntime only and OpenVINO models with OpenVINO only (torch is never imported for them, as
on the device); model directories run eagerly in PyTorch. Prints one JSON line on stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from vitshrink._proc import peak_rss_mb
from vitshrink.bench.timing import time_ms
from vitshrink.progress import progress  # tqdm only: no torch in the ONNX worker


class _Runner:
    def __init__(
        self, path: str, threads: int | None, device: str, image_size: list[int] | None = None
    ) -> None:
        self.path = path
        from vitshrink.deploy.ov_runtime import is_openvino

        if is_openvino(path):
            self._openvino(path, threads, image_size)
        elif path.endswith(".onnx"):
            import onnxruntime as ort

            from vitshrink.deploy._meta import read_meta_props
            from vitshrink.deploy.runtime import session_options

            so = session_options(threads)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            providers = (
                ["CUDAExecutionProvider", "CPUExecutionProvider"]
                if device == "cuda"
                else ["CPUExecutionProvider"]
            )
            providers = [p for p in providers if p in ort.get_available_providers()]
            self.sess = ort.InferenceSession(path, so, providers=providers)
            inp = self.sess.get_inputs()[0]
            self.input_name = inp.name
            self.shape = [d if isinstance(d, int) else None for d in inp.shape]
            if len(self.shape) == 4:
                # Symbolic height/width (a dynamic-size export): run at --image-size, else at the size
                # recorded in the metadata, never at 1x1.
                meta = read_meta_props(self.sess.get_modelmeta().custom_metadata_map, path)
                want = image_size or (meta.get("preprocess") or {}).get("size") or [224, 224]
                for axis, v in zip((2, 3), want):
                    if self.shape[axis] is None:
                        self.shape[axis] = int(v)
                    elif image_size and self.shape[axis] != v:
                        raise ValueError(f"{path} takes {self.shape[2]}x{self.shape[3]} only, not {v}")
            self.dtype = np.float16 if "float16" in inp.type else np.float32
            self.dynamic_batch = self.shape[0] is None
            self.kind = "onnx"
        else:
            import torch

            from vitshrink.models import family_for, load_model

            if threads:
                torch.set_num_threads(threads)
            self.torch = torch
            self.dev = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
            model, meta = load_model(path, device=self.dev)
            self.fn = family_for(model).export_wrapper(model).eval()
            pre = meta["preprocess"]
            self.shape = [None, pre["channels"], *(image_size or pre["size"])]
            self.dtype = np.float32
            self.dynamic_batch = True
            self.kind = "torch"

    def _openvino(self, path: str, threads: int | None, image_size: list[int] | None) -> None:
        """An OpenVINO model through the deploy runtime (what predict runs), timed like an ONNX one."""
        from vitshrink.deploy.ov_runtime import OpenVinoModel

        m = OpenVinoModel(path, threads=threads)
        h, w = image_size or list(m.size)
        if not m.takes((h, w)):
            raise ValueError(f"{path} takes {m.size[0]}x{m.size[1]} only, not {h}x{w}")
        self.shape = [m._batch, m.channels, h, w]
        self.dtype = np.float32
        self.dynamic_batch = m._batch is None
        self.fn = m._infer
        self.kind = "openvino"

    def input(self, batch: int) -> np.ndarray:
        shape = [batch] + [d or 1 for d in self.shape[1:]]
        return np.random.default_rng(0).standard_normal(shape).astype(self.dtype)

    def __call__(self, x: np.ndarray) -> None:
        if self.kind == "onnx":
            self.sess.run(None, {self.input_name: x})
        elif self.kind == "openvino":
            self.fn(x)
        else:
            with self.torch.inference_mode():
                self.fn(self.torch.from_numpy(x).to(self.dev))
            if self.dev.type == "cuda":
                self.torch.cuda.synchronize()


def _time(fn: _Runner, x: np.ndarray, n: int) -> list[float]:
    return time_ms(lambda: fn(x), n)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    runners = [
        _Runner(p, spec.get("threads"), spec.get("device", "cpu"), spec.get("image_size"))
        for p in spec["models"]
    ]
    x1 = [r.input(1) for r in runners]
    for r, x in zip(runners, x1):
        _time(r, x, spec.get("warmup", 5))
    best: list[list[float] | None] = [None] * len(runners)
    # Interleave rounds across models and keep each one's best-median round: single back-to-back
    # runs on shared machines vary by 30-50 %.
    rounds = spec.get("rounds", 3)
    steps = [(k, i) for k in range(rounds) for i in range(len(runners))]
    for _, i in progress(steps, desc="bench latency", disable=not spec.get("progress")):
        # one untimed call first: the previous model's onnxruntime threads may still be spinning and
        # would slow this model's first call (it would become the round's p99)
        runners[i](x1[i])
        t = _time(runners[i], x1[i], spec.get("runs", 20))
        if best[i] is None or np.median(t) < np.median(best[i]):
            best[i] = t
    results = []
    for i, r in enumerate(runners):
        t = np.asarray(best[i])
        res: dict[str, Any] = {
            "model": r.path,
            "runtime": {"onnx": "onnxruntime", "openvino": "openvino"}.get(r.kind, "pytorch"),
            "latency_ms": {
                "p50": float(np.percentile(t, 50)),
                "p90": float(np.percentile(t, 90)),
                "p99": float(np.percentile(t, 99)),
                "mean": float(t.mean()),
            },
        }
        b = spec.get("batch", 8)
        if b > 1 and r.dynamic_batch:
            xb = r.input(b)
            _time(r, xb, 1)
            tb = _time(r, xb, max(3, spec.get("runs", 20) // 4))
            res["throughput"] = float(b * 1000 / np.median(tb))
            res["throughput_batch"] = b
        else:
            res["throughput"] = float(1000 / np.median(t))
            res["throughput_batch"] = 1
        results.append(res)
    return {"results": results, "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    try:
        out = run(json.loads(sys.argv[1]))
    except Exception as e:  # noqa: BLE001 - the parent turns this into a one-line error
        print(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}))
        sys.exit(1)
    print(json.dumps(out))
