"""Shared fixtures: an isolated cache, quiet progress bars, and one small trained teacher per session."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# Every x86 host runs the suite as an AVX2-only CPU would (CI may land on one): PyTorch's kernels and
# oneDNN capped at AVX2 (no AVX-512, VNNI, AMX or native bf16), and int8 targeting AVX2. Must precede
# the torch import. Override by exporting other values, e.g. VITSHRINK_CPU=vnni ONEDNN_MAX_CPU_ISA=ALL.
if platform.machine().lower() in ("x86_64", "amd64"):
    for _key, _value in {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "VITSHRINK_CPU": "avx2",
    }.items():
        os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="Debian package dataset-fashion-mnist not installed"
)


@pytest.fixture(scope="session", autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["VITSHRINK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    # parquet sources are converted to Arrow files in the datasets cache: keep them out of ~/.cache
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets"))
    os.environ["VITSHRINK_QUIET"] = "1"
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fmnist_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vit-micro (patch 7: 16 tokens) trained one epoch over 40k Fashion-MNIST images, shared by tests."""
    if not FMNIST.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    from vitshrink.train import train

    out = tmp_path_factory.mktemp("teacher") / "vit"
    train(
        "vit-micro",
        "fashion-mnist",
        out=out,
        epochs=1,
        limit=40000,
        val_limit=1000,
        lr=2e-3,
        batch_size=64,
        augment=False,
        patch_size=7,
        quiet=True,
    )
    return out
