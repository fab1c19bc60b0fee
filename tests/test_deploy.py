"""The deploy path: torch-free ONNX runtime, `predict` over files/folders, and the TensorRT recipe.

Tiny torch modules are exported to ONNX here (torch is fine in the test; the deploy code must not need it)
and their outputs are the reference for labels and masks.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from vitshrink.deploy import PALETTE, OnnxModel, predict, trt_recipe
from vitshrink.deploy.predict import MIN_SIDE, load_image
from vitshrink.deploy.runtime import default_providers
from vitshrink.deploy.trt import fp32_node_names
from vitshrink.errors import DataError, ModelError, VitshrinkError

torch.set_num_threads(1)
SRC = Path(__file__).resolve().parents[1] / "src"
CLS_NAMES = [f"thing{i}" for i in range(10)]
SEG_NAMES = [f"region{i}" for i in range(14)]
CLS_PRE = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "size": [32, 32], "channels": 3}
TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
SEG_PRE = {"mean": [0.45, 0.45, 0.45], "std": [0.25, 0.25, 0.25], "size": [40, 48], "channels": 3}


def _meta(task: str, names: list[str], pre: dict) -> dict:
    return {
        "format": 1,
        "task": task,
        "family": "vit" if task == "classification" else "segformer",
        "class_names": names,
        "preprocess": pre,
        "history": [],
        "checksums": {},
    }


class TinyViT(nn.Module):
    """Patch embedding, LayerNorm, one softmax attention, mean pool: the ops a ViT exports."""

    def __init__(self, channels: int = 3, dim: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, 8, 8)
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.ln(t)).chunk(3, dim=-1)
        t = t + torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v
        return self.head(self.ln2(t).mean(1))


class TinySeg(nn.Module):
    """(B, 3, H, W) -> (B, 14, H, W) logits at the input resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 14, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _export(
    module: nn.Module, shape: tuple, path: Path, meta: dict | None, opset: int = 17, dynamic: bool = False
):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice
        torch.onnx.export(
            module,
            torch.randn(*shape),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None,
        )
    if meta is not None:
        model = onnx.load(str(path))
        onnx.helper.set_model_props(model, {"vitshrink": json.dumps(meta)})
        onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cls, seg, grey = TinyViT().eval(), TinySeg().eval(), TinyViT(channels=1).eval()
    return {
        "cls": cls,
        "seg": seg,
        "grey": grey,
        "cls_path": _export(cls, (1, 3, 32, 32), d / "cls.onnx", _meta("classification", CLS_NAMES, CLS_PRE)),
        "cls13_path": _export(
            cls, (1, 3, 32, 32), d / "cls13.onnx", _meta("classification", CLS_NAMES, CLS_PRE), 13
        ),
        "dyn_path": _export(
            cls, (1, 3, 32, 32), d / "dyn.onnx", _meta("classification", CLS_NAMES, CLS_PRE), dynamic=True
        ),
        "seg_path": _export(seg, (1, 3, 40, 48), d / "seg.onnx", _meta("segmentation", SEG_NAMES, SEG_PRE)),
        "grey_path": _export(
            grey,
            (1, 1, 32, 32),
            d / "grey.onnx",
            _meta(
                "classification", CLS_NAMES, {"mean": [0.3], "std": [0.2], "size": [32, 32], "channels": 1}
            ),
        ),
        "bare_path": _export(cls, (1, 3, 32, 32), d / "bare.onnx", None),
    }


def _noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)  # a different dominant colour per image, so predictions differ
    px = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(px)


def _torch_logits(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


# ----------------------------------------------------------------------------------------------- runtime


def test_classification_matches_torch(models):
    m = OnnxModel(models["cls_path"], threads=1)
    assert (m.task, m.class_names, m.size, m.channels) == ("classification", CLS_NAMES, (32, 32), 3)
    images = [
        _noise(w, h, s)
        for s, (w, h) in enumerate([(50, 40), (32, 32), (100, 20), (17, 64), (64, 64), (33, 9)])
    ]
    results = m.predict(images)
    labels = []
    for img, res in zip(images, results):
        x = m.preprocess(img)
        ref = _torch_logits(models["cls"], x)[0]
        np.testing.assert_allclose(m.run(x)[0], ref, atol=1e-4)
        p = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
        assert res["index"] == int(ref.argmax()) and res["label"] == CLS_NAMES[int(ref.argmax())]
        assert res["score"] == pytest.approx(float(p.max()), abs=1e-5)
        probs = [t["probability"] for t in res["top5"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert [t["index"] for t in res["top5"]] == list(np.argsort(-p)[:5])
        labels.append(res["label"])
    assert len(set(labels)) > 1, "images should not all get the same label, or the parity check proves little"
    # batched inference gives the same answers as one at a time (dynamic-batch graph)
    dyn = OnnxModel(models["dyn_path"], threads=1)
    assert [r["label"] for r in dyn.predict(images, batch_size=4)] == labels


def test_preprocess_uses_metadata_exactly(models):
    m = OnnxModel(models["cls_path"])
    x = m.preprocess(Image.new("RGB", (9, 7), (200, 100, 50)))
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    want = (np.array([200, 100, 50]) / 255 - np.array(CLS_PRE["mean"])) / np.array(CLS_PRE["std"])
    np.testing.assert_allclose(x[0, :, 5, 5], want, atol=1e-5)
    assert np.ptp(x, axis=(2, 3)).max() == 0  # a flat image stays flat

    g = OnnxModel(models["grey_path"])
    assert g.channels == 1
    # RGB input is converted to grey (ITU-R 601 luma), 16-bit grey is scaled by 65535, not clipped at 255
    xr = g.preprocess(Image.new("RGB", (40, 40), (255, 255, 255)))
    np.testing.assert_allclose(xr[0, 0], (1.0 - 0.3) / 0.2, atol=1e-5)
    x16 = g.preprocess(Image.fromarray(np.full((40, 40), 32768, np.uint16)))
    assert x16.shape == (1, 1, 32, 32)
    np.testing.assert_allclose(x16[0, 0], (32768 / 65535 - 0.3) / 0.2, atol=1e-5)


def test_defaults_without_metadata(models):
    m = OnnxModel(models["bare_path"])
    assert m.task == "classification" and m.size == (32, 32)  # from the output rank and the graph
    assert m.class_names == [f"class_{i}" for i in range(10)]
    np.testing.assert_allclose(m.mean.ravel(), [0.485, 0.456, 0.406])
    assert m.predict([_noise(20, 20, 1)])[0]["label"].startswith("class_")


def test_model_errors(models, tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        OnnxModel(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01this is not a protobuf\xff" * 10)
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        OnnxModel(tmp_path / "junk.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match="empty file"):
        OnnxModel(tmp_path / "empty.onnx")
    # a 4-channel model cannot take images
    four = _export(nn.Conv2d(4, 2, 3), (1, 4, 16, 16), tmp_path / "four.onnx", None)
    with pytest.raises(ModelError, match="4-channel input"):
        OnnxModel(four)
    # metadata that contradicts the graph
    bad = _export(
        models["cls"],
        (1, 3, 32, 32),
        tmp_path / "bad.onnx",
        _meta("classification", CLS_NAMES, {**CLS_PRE, "size": [64, 64]}),
    )
    with pytest.raises(ModelError, match="does not match the model's fixed 32"):
        OnnxModel(bad)
    bad = _export(
        models["cls"], (1, 3, 32, 32), tmp_path / "bad2.onnx", _meta("classification", ["a", "b"], CLS_PRE)
    )
    with pytest.raises(ModelError, match="2 class names but the model outputs 10"):
        OnnxModel(bad)
    # inputs the model cannot take
    m = OnnxModel(models["cls_path"])
    with pytest.raises(DataError, match="takes"):
        m.run(np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(DataError, match="takes"):
        m.run(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(DataError, match="exactly 1"):
        m.run(np.zeros((2, 3, 32, 32), np.float32))


def test_default_providers_prefer_gpu():
    assert default_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    got = default_providers(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"])
    assert [p if isinstance(p, str) else p[0] for p in got] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert got[0][1]["trt_engine_cache_enable"] is True  # no multi-minute rebuild per process


# ----------------------------------------------------------------------------------------------- predict


def test_segmentation_masks_and_overlays(models, tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "a").mkdir(parents=True)
    (imgs / "b").mkdir()
    same = _noise(48, 40, 10)  # exactly the model size: mask must equal torch's argmax
    other = _noise(61, 37, 11)  # a different size and aspect: mask comes back at 61x37
    same.save(imgs / "a" / "x.png")
    other.save(imgs / "b" / "x.png")  # same stem: outputs must not overwrite each other
    out = imgs / "out"  # inside the input folder: a re-run must not predict on its own masks

    rep = predict(models["seg_path"], [imgs], out=out, quiet=True)
    assert rep["errors"] == [] and rep["task"] == "segmentation" and len(rep["results"]) == 2
    assert rep["peak_rss_mb"] is None or rep["peak_rss_mb"] > 10

    m = OnnxModel(models["seg_path"])
    for img, stem in ((same, "x"), (other, "x_2")):
        ref_ids = _torch_logits(models["seg"], m.preprocess(img))[0].argmax(0).astype(np.uint8)
        mask_img = Image.open(out / f"{stem}_mask.png")
        assert mask_img.mode == "L" and mask_img.size == img.size
        mask = np.asarray(mask_img)
        if img.size == (48, 40):
            np.testing.assert_array_equal(mask, ref_ids)
        else:
            np.testing.assert_array_equal(
                mask, np.asarray(Image.fromarray(ref_ids).resize(img.size, Image.NEAREST))
            )
        assert len(np.unique(mask)) > 1
        ov = Image.open(out / f"{stem}_overlay.png")
        assert ov.mode == "RGB" and ov.size == img.size
        blend = (np.asarray(img, np.float64) + PALETTE[mask]) / 2
        assert np.abs(np.asarray(ov, np.float64) - blend).max() <= 1.0

    preds = json.loads((out / "predictions.json").read_text())["predictions"]
    assert set(preds) == {str(imgs / "a" / "x.png"), str(imgs / "b" / "x.png")}
    entry = preds[str(imgs / "b" / "x.png")]
    assert entry["mask"] == "x_2_mask.png" and entry["size"] == [61, 37]
    mask = np.asarray(Image.open(out / "x_2_mask.png"))
    counts = np.bincount(mask.ravel(), minlength=14)
    want = {SEG_NAMES[i]: c / mask.size for i, c in enumerate(counts) if c}
    assert entry["class_fractions"] == pytest.approx(want) and sum(want.values()) == pytest.approx(1.0)

    again = predict(models["seg_path"], [imgs], out=out, quiet=True)
    assert len(again["results"]) == 2  # the masks/overlays under out/ were not picked up


def _corrupt_files(folder: Path) -> dict[str, str]:
    """Bad inputs -> a word their error must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / "ok.png"
    _noise(40, 30, 3).save(png)
    raw = png.read_bytes()
    (folder / "corrupt.png").write_bytes(raw[:60] + bytes(range(256)) * 4)  # valid header, garbage data
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("these are my holiday notes, not a photo\n")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "pixel.png")
    _noise(64, 48, 4).save(folder / "half.jpg", quality=90)
    jpg = (folder / "half.jpg").read_bytes()
    (folder / "half.jpg").write_bytes(jpg[: len(jpg) // 2])
    return {
        "corrupt.png": "corrupt",
        "empty.png": "empty file",
        "notes.jpg": "not an image",
        "pixel.png": "too small",
        "half.jpg": "truncated",
    }


def test_folder_with_bad_files_keeps_going(models, tmp_path):
    imgs = tmp_path / "imgs"
    bad = _corrupt_files(imgs)
    (imgs / "deeper").mkdir()
    _noise(50, 50, 5).convert("L").save(imgs / "deeper" / "grey.jpg")
    _noise(30, 30, 6).convert("P").save(imgs / "deeper" / "palette.webp")
    (imgs / "readme.txt").write_text("not an image extension: ignored")
    tiff = tmp_path / "float.tif"
    Image.fromarray(np.random.default_rng(0).random((20, 20)).astype(np.float32)).save(tiff)
    out = tmp_path / "out"

    rep = predict(models["cls_path"], [imgs, tiff, tmp_path / "missing.png"], out=out, quiet=True)
    ok = sorted(Path(r["file"]).name for r in rep["results"])
    assert ok == ["grey.jpg", "ok.png", "palette.webp"]
    errors = {Path(e["file"]).name: e["error"] for e in rep["errors"]}
    assert set(errors) == set(bad) | {"float.tif", "missing.png"}
    for name, word in bad.items():
        assert word in errors[name], (name, errors[name])
        assert "\n" not in errors[name]
    assert "unsupported image mode 'F'" in errors["float.tif"]
    assert errors["missing.png"] == "file not found"

    saved = json.loads((out / "predictions.json").read_text())
    assert saved["task"] == "classification" and len(saved["predictions"]) == 3
    assert len(saved["errors"]) == len(errors)
    for r in rep["results"]:
        assert saved["predictions"][r["file"]]["label"] == r["label"] in CLS_NAMES
        assert 0 < r["score"] <= 1

    with pytest.raises(DataError, match="too small"):
        load_image(imgs / "pixel.png")
    Image.new("RGB", (MIN_SIDE, MIN_SIDE)).save(tmp_path / "edge.png")
    assert load_image(tmp_path / "edge.png").size == (MIN_SIDE, MIN_SIDE)
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="no images found"):
        predict(models["cls_path"], [tmp_path / "void"], quiet=True)
    with pytest.raises(ModelError, match="model not found"):
        predict(tmp_path / "nope.onnx", [imgs], quiet=True)


def test_predict_imports_no_torch(models, tmp_path):
    """The deploy path runs in a fresh interpreter without torch, transformers or onnx ever loaded."""
    img = tmp_path / "p.png"
    _noise(70, 50, 7).save(img)
    code = (
        "import json, sys\n"
        "import vitshrink.deploy\n"
        "import vitshrink\n"
        f"r = vitshrink.deploy.predict({str(models['seg_path'])!r}, [{str(img)!r}], out={str(tmp_path / 'o')!r}, quiet=True)\n"
        f"r2 = vitshrink.predict({str(models['cls_path'])!r}, [{str(img)!r}], quiet=True)\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'n': len(r['results']) + len(r2['results']), 'rss': r['peak_rss_mb']}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [] and got["n"] == 2
    assert got["rss"] is None or 10 < got["rss"] < 1024
    assert Image.open(tmp_path / "o" / "p_mask.png").size == (70, 50)


def test_palette_is_fixed():
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in PALETTE[:14]}) == 14
    assert len({tuple(c) for c in PALETTE[:255]}) == 255  # every class id its own colour
    assert tuple(PALETTE[3]) == (0, 130, 200) and tuple(PALETTE[255]) == (0, 0, 0)


# ----------------------------------------------------------------------------------------------- TensorRT


def _fake_trtexec(path: Path, modern: bool) -> Path:
    flags = "--memPoolSize=poolspec --layerPrecisions=spec" if modern else "--workspace=N"
    path.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == --help ]]; then echo "  {flags} --precisionConstraints=spec --fp16"; exit 0; fi\n'
        'printf "%s\\n" "$@" > "$ARGS_OUT"\n'
    )
    path.chmod(0o755)
    return path


def _run_script(script: Path, tmp_path: Path, **env: str) -> list[str]:
    args_out = tmp_path / "args.txt"
    args_out.unlink(missing_ok=True)
    full = {**os.environ, "ARGS_OUT": str(args_out), **env}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=full, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return args_out.read_text().splitlines()


def test_trt_recipe_pins_layernorm_and_softmax(models, tmp_path):
    with pytest.warns(UserWarning, match="LayerNormalization"):  # TensorRT 8.2 on the Nano cannot parse it
        d = trt_recipe(models["cls_path"], tmp_path / "r17")
    g = onnx.load(str(models["cls_path"])).graph
    want = [n.name for n in g.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(want) == 3
    script = (d / "build_engine.sh").read_text()
    assert "--fp16" in script and all(n in script for n in want)
    assert "Shapes" not in script.split("ARGS+=(")[-1]  # static graph: trtexec refuses explicit shapes
    assert subprocess.run(["bash", "-n", str(d / "build_engine.sh")]).returncode == 0
    readme = (d / "README.txt").read_text()
    for words in (TRTEXEC, "JetPack 4.6", "int8", "on the device itself", "1024"):
        assert words in readme

    # modern trtexec: the exact command line
    args = _run_script(
        d / "build_engine.sh",
        tmp_path,
        ONNX=str(models["cls_path"]),
        TRTEXEC=str(_fake_trtexec(tmp_path / "t_new", True)),
    )
    spec = ",".join(f"{n}:fp32" for n in want)
    assert args == [
        f"--onnx={models['cls_path']}",
        f"--saveEngine={d / 'cls_fp16.engine'}",
        "--fp16",
        "--memPoolSize=workspace:1024M",
        "--precisionConstraints=obey",
        f"--layerPrecisions={spec}",
        f"--layerOutputTypes={spec}",
    ]
    # TensorRT 8.2's trtexec (the Nano's) has no --layerPrecisions: the Python-API builder takes over
    fake_py = _fake_trtexec(tmp_path / "fake_python", True)
    args = _run_script(
        d / "build_engine.sh",
        tmp_path,
        ONNX=str(models["cls_path"]),
        TRTEXEC=str(_fake_trtexec(tmp_path / "t_old", False)),
        PYTHON=str(fake_py),
    )
    assert args == [
        str(d / "build_engine.py"),
        "--onnx",
        str(models["cls_path"]),
        "--engine",
        str(d / "cls_fp16.engine"),
    ]
    assert TRTEXEC in script


def test_trt_recipe_decomposed_layernorm_and_shapes(models, tmp_path):
    g = onnx.load(str(models["cls13_path"]))
    names = fp32_node_names(g)
    ln_ops = {n.op_type for n in g.graph.node if n.name in names}
    assert {"ReduceMean", "Pow", "Sqrt", "Div", "Softmax"} <= ln_ops
    assert "/ReduceMean" not in names  # the classifier's mean pooling is not a norm: not pinned
    assert sum(n.startswith("/ln/") for n in names) == 7 and sum(n.startswith("/ln2/") for n in names) == 7

    d = trt_recipe(models["cls13_path"], tmp_path / "r13", device="jetson-orin-nano", workspace_mb=512)
    script = (d / "build_engine.sh").read_text()
    assert all(n in script for n in names) and "WORKSPACE_MB=512" in script

    d = trt_recipe(models["dyn_path"], tmp_path / "dyn", fp16=False, device="desktop")
    args = _run_script(
        d / "build_engine.sh",
        tmp_path,
        ONNX=str(models["dyn_path"]),
        TRTEXEC=str(_fake_trtexec(tmp_path / "t", False)),
    )
    assert "--fp16" not in args and not any("layerPrecisions" in a for a in args)
    assert "--workspace=4096" in args  # old trtexec: no --memPoolSize
    assert [a for a in args if "Shapes" in a] == [
        f"--{k}Shapes=pixel_values:1x3x32x32" for k in ("min", "opt", "max")
    ]

    with pytest.raises(VitshrinkError, match="unknown device"):
        trt_recipe(models["cls13_path"], device="raspberry-pi")
    with pytest.raises(VitshrinkError, match="workspace_mb"):
        trt_recipe(models["cls13_path"], workspace_mb=8192)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 5)
    with pytest.raises(ModelError):
        trt_recipe(tmp_path / "junk.onnx")
    # an int8 model made for onnxruntime on CPU (contrib ops) is refused with the way out
    m = onnx.load(str(models["cls13_path"]))
    m.graph.node[0].domain = "com.microsoft"
    m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(m, str(tmp_path / "ort.onnx"))
    with pytest.raises(ModelError, match=r"onnxruntime-only ops .*--target tensorrt"):
        trt_recipe(tmp_path / "ort.onnx")


def _load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trt_scripts_match_runtime(models, tmp_path):
    d = trt_recipe(models["seg_path"], tmp_path / "seg", device="jetson-orin-nano")
    for name in ("run_engine.py", "build_engine.py"):
        src = (d / name).read_text()
        tree = ast.parse(src, feature_version=(3, 6))  # JetPack 4.6 ships Python 3.6
        assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in ast.walk(tree))
        assert os.access(d / name, os.X_OK)
    runner = _load_script(d / "run_engine.py", "run_engine_under_test")  # importable without tensorrt
    assert (runner.TASK, runner.CLASS_NAMES, runner.SIZE) == ("segmentation", SEG_NAMES, [40, 48])
    m = OnnxModel(models["seg_path"])
    for img in (
        _noise(61, 37, 8),
        _noise(48, 40, 9).convert("L"),
        Image.fromarray(np.full((30, 30), 40000, np.uint16)),
    ):
        np.testing.assert_array_equal(runner.preprocess(img), m.preprocess(img))
    img = _noise(61, 37, 8)
    logits = _torch_logits(models["seg"], m.preprocess(img))
    np.testing.assert_array_equal(
        np.asarray(runner.postprocess(logits, img)["mask"]), m.predict([img])[0]["mask"]
    )
    # a frame >= 2x the input is tiled on the device exactly as predict tiles it
    big = _noise(131, 97, 10)
    assert runner.should_tile(big) and not runner.should_tile(img)
    for overlap in (0.25, 0.5):
        ref = m.segment(big, mode="tile", overlap=overlap)["mask"]
        np.testing.assert_array_equal(runner.segment_tiled(big, m.run, overlap), np.asarray(ref))

    builder = _load_script(d / "build_engine.py", "build_engine_under_test")
    assert builder.FP16 is True and builder.WORKSPACE_MB == 2048 and builder.PROFILE_SHAPE is None
    assert builder.pinned("/ln/Pow", {"/ln/Pow"}) and builder.pinned("/ln/Pow_3", {"/ln/Pow"})
    assert not builder.pinned("/ln/Sub", {"/ln/Pow"})
