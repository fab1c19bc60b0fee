"""Tiny ViTs on a synthetic grating task, their ONNX export and comparison helpers, shared by the
quantization tests (test_quantize, test_quantize_rewrites, test_cpu_targets, test_openvino)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers

SIZE, CLASSES = 28, 10
OUTLIER_CHANNELS, OUTLIER_FACTORS = (3, 17, 40), (60.0, 100.0, 40.0)
META = {
    "format": 1,
    "task": "classification",
    "family": "vit",
    "class_names": [f"c{i}" for i in range(CLASSES)],
    "preprocess": {"mean": [0.5], "std": [0.25], "size": [SIZE, SIZE], "channels": 1},
    "history": [{"stage": "train", "options": {}, "metrics": {"accuracy": 0.9}}],
    "checksums": {},
}


def gratings(n: int, seed: int, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Class k = sinusoidal grating at k*18 degrees, random frequency/phase, plus noise."""
    g = np.random.default_rng(seed)
    y = g.integers(0, CLASSES, n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    th, f, ph = y * np.pi / CLASSES, g.uniform(0.12, 0.22, n), g.uniform(0, 2 * np.pi, n)
    x = np.sin(
        2 * np.pi * f[:, None, None] * (xx * np.cos(th)[:, None, None] + yy * np.sin(th)[:, None, None])
        + ph[:, None, None]
    )
    x = x + g.normal(0, noise, x.shape)
    return x[:, None].astype(np.float32), y


def vit(hidden: int = 64, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        image_size=SIZE,
        patch_size=4,
        num_channels=1,
        num_labels=CLASSES,
    )
    return transformers.ViTForImageClassification(cfg).eval()


def train(model: torch.nn.Module, steps: int = 100, batch: int = 48) -> None:
    x, y = gratings(steps * batch, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for i in range(steps):
        sl = slice(i * batch, (i + 1) * batch)
        loss = torch.nn.functional.cross_entropy(
            model(pixel_values=torch.from_numpy(x[sl])).logits, torch.from_numpy(y[sl])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def inject_outliers(model: torch.nn.Module) -> None:
    """Scale LN channels up and the consumers' input columns down: same function, outlier activations."""

    def scale(ln: torch.nn.LayerNorm, linears: list[torch.nn.Linear]) -> None:
        for c, s in zip(OUTLIER_CHANNELS, OUTLIER_FACTORS):
            ln.weight[c] *= s
            ln.bias[c] *= s
            for lin in linears:
                lin.weight[:, c] /= s

    for layer in model.vit.layers:
        att = layer.attention
        scale(layer.layernorm_before, [att.q_proj, att.k_proj, att.v_proj])
        scale(layer.layernorm_after, [layer.mlp.fc1])
    scale(model.vit.layernorm, [model.classifier])


def export(model: torch.nn.Module, path: Path, opset: int = 17) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 1, SIZE, SIZE),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "vitshrink", json.dumps(META)
    onnx.save(proto, str(path))
    return path


def run(path: Path | str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x}
    )[0]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def agree(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def ort_ops(path: Path) -> list[str]:
    """Op types of the graph onnxruntime runs (all optimisations, layout transforms included)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(path.with_suffix(".ort-opt.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # The machine is shared; conftest asks for 2 threads, which oversubscribes under load (8x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
