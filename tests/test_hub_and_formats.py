"""Meeting users where they are: Hub ids from the local cache, optimum-style ONNX folders, --version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import vitshrink
from vitshrink.deploy.runtime import OnnxModel
from vitshrink.export import export
from vitshrink.models import build_model, save_model
from vitshrink.quantize import quantize

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAMES = ["sky", "road", "person"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitshrink.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, meta = build_model("vit-micro", image_size=28, num_channels=1, class_names=NAMES)
    return save_model(model, meta, tmp_path_factory.mktemp("m") / "vit", stage="test")


@pytest.fixture(scope="module")
def hub_cache(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache laid out as huggingface_hub writes it: refs/<name> -> commit, snapshots/<commit>/files."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / "models--acme--tiny-vit"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    return cache


def test_hub_ids_resolve_from_the_local_cache_offline(hub_cache: Path, tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    code = (
        "from vitshrink.models import load_model; "
        "m, meta = load_model('acme/tiny-vit'); m2, _ = load_model('acme/tiny-vit@v1'); "
        "print(meta['class_names'], type(m).__name__, type(m2).__name__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "['sky', 'road', 'person'] ViTForImageClassification ViTForImageClassification" in proc.stdout
    # The CLI takes the id wherever a model directory goes.
    out = tmp_path / "hub.onnx"
    assert cli("export", "acme/tiny-vit", "--out", str(out), env=env).returncode == 0
    assert OnnxModel(out).class_names == NAMES
    # Not cached and offline: one line, exit 2, no traceback.
    bad = cli("eval", "acme/missing-vit", "--data", "fashion-mnist", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "nor in the Hugging Face cache" in bad.stderr and "HF_HUB_OFFLINE" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    rev = cli("eval", "acme/tiny-vit@v9", "--data", "fashion-mnist", env=env)
    assert rev.returncode == 2 and "Traceback" not in rev.stderr


def test_onnx_folders_hold_consistent_optimum_files(model_dir: Path, tmp_path: Path) -> None:
    folder, rep = export(model_dir, tmp_path / "onnx-vit")  # no .onnx suffix: a folder
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.onnx",
        "preprocessor_config.json",
        "vitshrink.json",
    ]
    cfg = json.loads((folder / "config.json").read_text())
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert cfg["model_type"] == "vit" and cfg["id2label"] == {"0": "sky", "1": "road", "2": "person"}
    assert cfg["label2id"]["person"] == 2
    dims = [
        d.dim_value for d in onnx.load(str(folder / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    ]
    assert pre["size"] == {"height": dims[2], "width": dims[3]} and len(pre["image_mean"]) == dims[1] == 1
    assert rep["argmax_agreement"] == 1.0
    # Every vitshrink command that takes an ONNX file takes the folder.
    rt = OnnxModel(folder)
    assert rt.class_names == NAMES and rt.path.name == "model.onnx"
    qfolder, qrep = quantize(folder, tmp_path / "int8-vit", mode="int8-dynamic", quiet=True)
    qcfg = json.loads((qfolder / "config.json").read_text())
    assert (
        qcfg["id2label"] == cfg["id2label"]
        and (qfolder / "model.onnx").stat().st_size < (folder / "model.onnx").stat().st_size
    )
    assert json.loads((qfolder / "vitshrink.json").read_text())["history"][-1]["stage"] == "quantize"
    assert OnnxModel(qfolder).class_names == NAMES
    # --format file keeps the single-file artifact even without the suffix rule.
    path, _ = export(model_dir, tmp_path / "single.onnx", format="file")
    assert path.is_file()


def test_version_everywhere(model_dir: Path, tmp_path: Path) -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"vitshrink {vitshrink.__version__}"
    meta = json.loads((model_dir / "vitshrink.json").read_text())
    assert meta["vitshrink_version"] == vitshrink.__version__
    assert meta["history"][-1]["version"] == vitshrink.__version__
    out, _ = export(model_dir, tmp_path / "v.onnx")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["vitshrink"])["vitshrink_version"] == vitshrink.__version__
    # Global options go before or after the subcommand.
    assert cli("-q", "presets").returncode == 0 and cli("presets", "-q").returncode == 0
