"""The OpenVINO deploy target: an IR folder read like an ONNX file (predict / eval / bench), NNCF int8 with
the same fidelity check, `--runtime auto` choosing by measured latency, and a missing install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.quant_models import export, gratings, train, vit

pytest.importorskip("openvino")
pytest.importorskip("nncf")

SRC = Path(__file__).resolve().parents[1] / "src"


def _image(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip((x[0] * 0.25 + 0.5) * 255, 0, 255).astype(np.uint8))  # META's mean/std


@pytest.fixture(scope="module", autouse=True)
def _full_isa() -> Iterator[None]:
    # conftest caps oneDNN at AVX2 to run as an AVX2 CI machine would; OpenVINO 2026.4's CPU plugin (its
    # own oneDNN, loaded on first compile, after this) then fails shape inference of an int8 ViT's
    # Broadcast ("Check 'cmp::le(m_min, u)' failed"), so OpenVINO runs uncapped here.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        yield


@pytest.fixture(scope="module")
def ov_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny trained ViT (ONNX with vitshrink metadata), a folder dataset of it, and its NNCF int8
    folder built by `quantize --runtime openvino` on that data."""
    from vitshrink.quantize import quantize

    d = tmp_path_factory.mktemp("ov")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = vit(hidden=32)
    train(model, steps=60)
    torch.set_num_threads(before)
    src = export(model, d / "tiny.onnx")
    x, y = gratings(160, seed=11)
    for i, (img, label) in enumerate(zip(x, y)):
        folder = d / "data" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        _image(img).save(folder / f"{i:04d}.png")
    out, report = quantize(src, d / "int8_ov", runtime="openvino", calib_data=str(d / "data"), quiet=True)
    return {"dir": d, "onnx": src, "ov": out, "report": report, "data": d / "data"}


def test_openvino_folder_round_trips_through_predict_eval_and_bench(ov_tiny: dict) -> None:
    import vitshrink
    from vitshrink.bench import bench

    out, rep = ov_tiny["ov"], ov_tiny["report"]
    assert rep["runtime"] == "openvino" and rep["chosen"] == "openvino-int8"
    assert {"model.xml", "model.bin", "vitshrink.json", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert rep["fidelity"]["agreement"] >= 0.8 and rep["fidelity"]["rel_error"] < 0.2
    assert rep["drop"] <= 0.005 + 1e-9  # the default max_drop holds, as for onnxruntime's int8
    meta = json.loads((out / "vitshrink.json").read_text())
    assert meta["history"][-1]["runtime"] == "openvino" and meta["runtime"]["name"] == "openvino"
    imgs = sorted(ov_tiny["data"].rglob("*.png"))[:12]
    p_onnx = vitshrink.predict(ov_tiny["onnx"], imgs, quiet=True)["results"]
    p_ov = vitshrink.predict(out, imgs, quiet=True)["results"]
    assert [r["label"] for r in p_ov][0] in meta["class_names"]
    same = np.mean([a["label"] == b["label"] for a, b in zip(p_onnx, p_ov)])
    assert same >= 0.8
    acc_onnx = vitshrink.evaluate(ov_tiny["onnx"], str(ov_tiny["data"]), split="val")["accuracy"]
    acc_ov = vitshrink.evaluate(out, str(ov_tiny["data"]), split="val")["accuracy"]
    assert abs(acc_onnx - acc_ov) <= 0.1
    res = bench([ov_tiny["onnx"], out], runs=3, rounds=1, warmup=1, batch=2, quiet=True)["results"]
    assert [r["runtime"] for r in res] == ["onnxruntime", "openvino"]
    assert res[1]["format"] == "openvino" and res[1]["latency_ms"]["p50"] > 0
    assert res[1]["peak_rss_mb"] > 0 and res[1]["size_mb"] > 0  # (a tiny IR is mostly its .xml)


def test_auto_keeps_the_runtime_measured_faster(ov_tiny: dict, monkeypatch, tmp_path: Path) -> None:
    from vitshrink.quantize import ov, quantize_onnx

    x, _ = gratings(32, seed=7)
    calib = [x[i : i + 16] for i in range(0, 32, 16)]
    timings: list[float] = []
    monkeypatch.setattr(ov, "time_runtimes", lambda paths, ctx, threads: list(timings))

    def run(fake: list[float], name: str) -> dict:
        timings[:] = fake
        return quantize_onnx(
            ov_tiny["onnx"],
            tmp_path / f"{name}.onnx",
            mode="int8",
            calib=calib,
            runtime="auto",
            openvino_out=tmp_path / name,
            max_drop=1.0,  # the choice is under test, not the fallback (test_quantize covers it)
            quiet=True,
        )

    rep = run([10.0, 5.0], "fast_ov")  # onnxruntime 10 ms, OpenVINO 5 ms
    assert rep["runtime"] == "openvino" and rep["runtime_choice"]["kept"] == "openvino"
    assert "5.00 ms" in rep["kept_because"] and (tmp_path / "fast_ov" / "model.xml").is_file()
    assert not (tmp_path / "fast_ov.onnx").exists()
    rep = run([5.0, 5.1], "tie")  # within noise: onnxruntime (standard ONNX) stays
    assert rep["runtime"] == "onnxruntime" and rep["runtime_choice"]["openvino_ms"] == 5.1
    assert (tmp_path / "tie.onnx").is_file() and not (tmp_path / "tie").exists()
    # --target-cpu for another machine: today's rules, nothing built or timed for OpenVINO
    rep = quantize_onnx(
        ov_tiny["onnx"],
        tmp_path / "avx2.onnx",
        mode="int8",
        calib=calib,
        target_cpu="avx2",
        runtime="auto",
        openvino_out=tmp_path / "avx2",
        max_drop=1.0,
        quiet=True,
    )
    assert rep["runtime"] == "onnxruntime" and "another machine" in rep["runtime_choice"]["why"]


def test_predict_with_openvino_imports_no_torch(ov_tiny: dict) -> None:
    img = next(ov_tiny["data"].rglob("*.png"))
    code = (
        "import json, sys\n"
        "import vitshrink\n"
        f"r = vitshrink.predict({str(ov_tiny['ov'])!r}, [{str(img)!r}], quiet=True)\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnx', 'nncf') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'label': r['results'][0]['label']}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [] and got["label"].startswith("c")


def test_without_openvino_one_line_and_auto_says_it_skipped(ov_tiny: dict, tmp_path: Path) -> None:
    img = next(ov_tiny["data"].rglob("*.png"))
    # openvino made unimportable in a fresh CLI process (None in sys.modules: ImportError on import)
    code = (
        "import sys; sys.modules['openvino'] = None; sys.modules['nncf'] = None\n"
        "from vitshrink.cli import main\n"
        f"sys.exit(main(['predict', {str(ov_tiny['ov'])!r}, {str(img)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "OpenVINO is not installed" in err[0] and "Traceback" not in proc.stderr
    code = (
        "import sys, json; sys.modules['openvino'] = None; sys.modules['nncf'] = None\n"
        "import numpy as np\n"
        "from vitshrink.quantize import quantize_onnx\n"
        "x = np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32)\n"
        f"r = quantize_onnx({str(ov_tiny['onnx'])!r}, {str(tmp_path / 'q.onnx')!r}, calib=[x], runtime='auto', "
        f"openvino_out={str(tmp_path / 'q')!r}, max_drop=1.0, quiet=True)\n"
        "print(json.dumps(r['runtime_choice']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    choice = json.loads(proc.stdout.strip().splitlines()[-1])
    assert choice["kept"] == "onnxruntime" and choice["why"].startswith("OpenVINO skipped: openvino")


def test_fallback_layers_stay_float_through_nncf_ignored_scope(ov_tiny: dict, tmp_path: Path) -> None:
    """The names the sensitivity fallback excludes are the ones NNCF leaves unquantized."""
    import openvino as ov

    from vitshrink.quantize.context import Ctx
    from vitshrink.quantize.ov import OpenVinoBuilder

    x, _ = gratings(16, seed=3)
    ctx = Ctx(
        tmp_path, [x[i : i + 1] for i in range(16)], None, None, None, True, "minmax", True, "cpu", print
    )
    builder = OpenVinoBuilder(ov_tiny["onnx"], ctx)
    assert len(builder.candidates) >= 8 and all(
        any(op in c for op in ("MatMul", "Conv", "Gemm")) for c in builder.candidates
    )
    kept = builder.candidates[1]
    ops = {
        op.get_friendly_name(): op
        for op in ov.Core().read_model(str(builder.build(excluded=[kept]))).get_ordered_ops()
    }

    def quantized(name: str) -> bool:  # NNCF quantizes a layer's input (FakeQuantize) and its weight (int8)
        act = ops[name].input_value(0).get_node().get_type_name() == "FakeQuantize"
        return act and ops[name].input_value(1).get_node().get_type_name() != "Constant"

    assert not quantized(kept)
    assert all(quantized(c) for c in builder.candidates if c != kept)
