"""Quantization: fp16 without overflow, int8 that survives ViT outlier channels, fallback guarantee.

The fixture trains a tiny ViT on a synthetic 10-class grating task (a few seconds), then scales a
few LayerNorm gamma/beta channels by 40-100x and compensates in the next Linear: the float function
is unchanged but the activations carry the outlier channels trained ViTs have.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.quant_models import (  # _one_thread: autouse in every module that imports it
    CLASSES,
    META,
    SIZE,
    _one_thread,  # noqa: F401
    agree,
    export,
    gratings,
    inject_outliers,
    ort_ops,
    rel,
    run,
    train,
    vit,
)
from vitshrink.errors import DataError, ModelError, VitshrinkError
from vitshrink.quantize import quantize, quantize_onnx, quantize_torch, smooth_layernorm_outliers

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("quant")
    model = vit()
    train(model)
    x_test, y_test = gratings(64, seed=99)
    with torch.no_grad():
        before = model(pixel_values=torch.from_numpy(x_test)).logits.numpy()
        inject_outliers(model)
        after = model(pixel_values=torch.from_numpy(x_test)).logits.numpy()
    assert np.abs(before - after).max() < 1e-3  # outlier injection keeps the float function
    x_cal, _ = gratings(64, seed=7)
    return {
        "dir": d,
        "model": model,
        "onnx": export(model, d / "tiny.onnx"),
        "calib": [x_cal[i : i + 16] for i in range(0, 64, 16)],
        "x": x_test,
        "y": y_test,
    }


def test_minmax_static_hurts_vitshrink_int8_does_not(tiny: dict) -> None:
    src, x = tiny["onnx"], tiny["x"]
    ref = run(src, x)
    assert np.mean(ref.argmax(1) == tiny["y"]) > 0.75  # the model learned the task

    naive = tiny["dir"] / "naive.onnx"
    quantize_onnx(
        src,
        naive,
        mode="int8-static",
        calib=tiny["calib"],
        calib_method="minmax",
        vit_aware=False,
        quiet=True,
    )
    out_naive = run(naive, x)
    assert rel(ref, out_naive) > 0.2  # outlier channels wreck per-tensor min-max activations

    ours = tiny["dir"] / "int8.onnx"
    report = quantize_onnx(src, ours, mode="int8", calib=tiny["calib"], quiet=True)
    out = run(ours, x)
    assert agree(ref, out) >= 0.95
    assert rel(ref, out) < 0.05
    assert rel(ref, out) < rel(ref, out_naive) / 4
    assert report["chosen"] in ("int8-dynamic", "int8-static", "int8-mixed")
    assert report["drop"] <= report["settings"]["max_drop"]
    assert report["smoothing"]["applied"] and report["smoothing"]["max_outlier_ratio_before"] > 20
    assert "LayerNormalization" in report["kept_float"]["op_types"]
    assert report["size_after"] < 0.6 * report["size_before"]
    # metadata is carried over, with this stage appended to the history
    meta = json.loads({p.key: p.value for p in onnx.load(str(ours)).metadata_props}["vitshrink"])
    assert meta["class_names"] == META["class_names"] and meta["history"][0]["stage"] == "train"
    assert (
        meta["history"][-1]["stage"] == "quantize"
        and meta["history"][-1]["options"]["chosen"] == report["chosen"]
    )
    # the static path keeps LayerNorm / Softmax float: no QDQ pair feeds them
    static = tiny["dir"] / "static.onnx"
    rs = quantize_onnx(src, static, mode="int8-static", calib=tiny["calib"], quiet=True)
    g = onnx.load(str(static)).graph
    producers = {o: n.op_type for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert producers.get(n.input[0]) != "DequantizeLinear"
    assert agree(ref, run(static, x)) >= 0.95 and rs["chosen"] == "int8-static"


def test_smoothing_is_exact_in_float_and_flattens_outliers(tiny: dict) -> None:
    src, x = tiny["onnx"], tiny["x"]
    dst = tiny["dir"] / "smoothed.onnx"
    info = smooth_layernorm_outliers(src, dst, tiny["calib"])
    assert len(info["smoothed"]) == 5  # 2 blocks x 2 + final LayerNorm (through the CLS Gather)
    assert info["float_rel_error"] < 1e-5
    assert rel(run(src, x), run(dst, x)) < 1e-5
    for ln in info["smoothed"].values():
        assert ln["outlier_ratio_before"] > 20 and ln["outlier_ratio_after"] < 5
    # it is what makes dynamic int8 work: same quantizer, with and without smoothing
    a, b = tiny["dir"] / "dyn_raw.onnx", tiny["dir"] / "dyn_smooth.onnx"
    quantize_onnx(src, a, mode="int8-dynamic", vit_aware=False, quiet=True)
    quantize_onnx(src, b, mode="int8-dynamic", calib=tiny["calib"], quiet=True)
    ref = run(src, x)
    assert rel(ref, run(b, x)) < rel(ref, run(a, x)) / 4


def test_fallback_guarantees_max_drop(tiny: dict) -> None:
    src, x = tiny["onnx"], tiny["x"]
    ref = run(src, x)
    calls = []

    def fidelity(path: str) -> float:  # continuous metric, higher is better: -relative error vs fp32
        calls.append(path)
        return -rel(ref, run(path, x))

    dst = tiny["dir"] / "fallback.onnx"
    report = quantize_onnx(
        src,
        dst,
        mode="int8-dynamic",
        calib=tiny["calib"],
        vit_aware=False,
        max_drop=0.15,
        eval_fn=fidelity,
        quiet=True,
    )
    assert report["metric_before"] == pytest.approx(0.0, abs=1e-6)
    assert report["drop"] <= 0.15 + 1e-9
    assert rel(ref, run(dst, x)) <= 0.15 + 1e-6
    nodes = report["kept_float"]["nodes"]
    assert 0 < len(nodes) < report["quantized_nodes"] + len(nodes)  # some fell back, not all
    assert all("sensitivity" in why for why in nodes.values())
    assert len(calls) >= 3


def test_fp16_survives_activations_that_overflow_fp16_layernorm(tiny: dict) -> None:
    model, x = tiny["model"], tiny["x"][:16] * 1000.0  # |x - mean| reaches ~900 inside the LayerNorms
    with torch.no_grad():
        emb = model.vit.embeddings(torch.from_numpy(x)).numpy()
    dev = (emb - emb.mean(-1, keepdims=True)).astype(np.float16)
    with np.errstate(over="ignore"):
        assert not np.isfinite(
            (dev * dev).mean(-1, dtype=np.float16)
        ).all()  # a naive fp16 LayerNorm overflows
    # opset 16 decomposes LayerNorm into Pow / ReduceMean / Sqrt chains, each of which must stay fp32
    for src in (tiny["onnx"], export(model, tiny["dir"] / "decomposed.onnx", opset=16)):
        dst = src.with_name(src.stem + "_fp16.onnx")
        report = quantize_onnx(src, dst, mode="fp16", quiet=True)
        ref, out = run(src, x), run(dst, x)
        assert np.isfinite(out).all()
        assert rel(ref, out) < 0.01 and agree(ref, out) >= 0.95
        assert report["size_after"] < 0.65 * report["size_before"]
        assert {"LayerNormalization"} <= set(report["kept_float"]["op_types"]) or "Pow" in report[
            "kept_float"
        ]["op_types"]
        g = onnx.load(str(dst)).graph
        assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types


def test_int8_file_is_small_for_a_weight_heavy_model(tmp_path: Path) -> None:
    src = export(vit(hidden=128, layers=4), tmp_path / "mid.onnx")
    dst = tmp_path / "mid_int8.onnx"
    report = quantize_onnx(src, dst, mode="int8-dynamic", quiet=True)
    assert report["size_ratio"] <= 0.3
    assert os.path.getsize(dst) <= 0.3 * os.path.getsize(src)
    x, _ = gratings(8, seed=5)
    assert rel(run(src, x), run(dst, x)) < 0.1


def test_quantize_torch_fp16_and_int8_stay_close(tiny: dict) -> None:
    model, x = tiny["model"], torch.from_numpy(tiny["x"])
    with torch.no_grad():
        ref = model(pixel_values=x).logits.numpy()
        for mode in ("fp16", "int8-dynamic"):
            q = quantize_torch(model, mode)
            out = q(pixel_values=x).logits
            assert out.dtype == torch.float32
            assert agree(ref, out.numpy()) >= 0.95, mode
            assert rel(ref, out.numpy()) < 0.1, mode
        half = quantize_torch(model, "fp16")
        assert half.vit.layers[0].layernorm_before.weight.dtype == torch.float32
        assert half.vit.layers[0].attention.q_proj.weight.dtype == torch.float16
        big = half(pixel_values=x[:8] * 300.0).logits
        assert torch.isfinite(big).all()
    assert next(model.parameters()).dtype == torch.float32  # the input model is untouched
    with pytest.raises(VitshrinkError):
        quantize_torch(model, "int4")


def test_errors_are_one_line_and_leave_no_temp_files(tiny: dict, tmp_path: Path) -> None:
    before_tmp = {p.name for p in Path(tempfile.gettempdir()).glob("vitshrink-quant-*")}
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all" * 10)
    cases = [
        (ModelError, dict(src=bad, mode="int8-dynamic")),
        (ModelError, dict(src=tmp_path / "missing.onnx", mode="int8-dynamic")),
        (VitshrinkError, dict(src=tiny["onnx"], mode="int3")),
        (DataError, dict(src=tiny["onnx"], mode="int8-static")),  # no calibration data
        (DataError, dict(src=tiny["onnx"], mode="int8", calib=[np.zeros((2, 3, 28, 28), np.float32)])),
        (VitshrinkError, dict(src=tiny["onnx"], mode="int8-dynamic", dst=tmp_path / "out.bin")),
    ]
    for exc, kw in cases:
        dst = kw.pop("dst", tmp_path / "out.onnx")
        with pytest.raises(exc) as info:
            quantize_onnx(kw.pop("src"), dst, quiet=True, **kw)
        assert "\n" not in str(info.value) and str(info.value)
    # an already-quantized model is refused rather than quantized twice
    q = tmp_path / "q.onnx"
    quantize_onnx(tiny["onnx"], q, mode="int8-dynamic", quiet=True)
    with pytest.raises(ModelError, match="already quantized"):
        quantize_onnx(q, tmp_path / "qq.onnx", mode="int8-dynamic", quiet=True)
    # a metric callback failing mid-way (after the temp work dir is full) aborts without leftovers
    seen: list[str] = []

    def flaky(path: str) -> float:
        seen.append(path)
        if len(seen) > 1:
            raise RuntimeError("evaluation crashed")
        return 1.0

    with pytest.raises(RuntimeError):
        quantize_onnx(
            tiny["onnx"], tmp_path / "never.onnx", mode="int8", calib=tiny["calib"], eval_fn=flaky, quiet=True
        )
    assert len(seen) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "q.onnx"]
    assert {p.name for p in Path(tempfile.gettempdir()).glob("vitshrink-quant-*")} <= before_tmp


def test_stage_api_on_onnx_with_data_spec(tiny: dict, tmp_path: Path) -> None:
    from PIL import Image

    import vitshrink

    # A folder dataset in the layout vitshrink.data reads: <root>/<class>/*.png, split by file-name hash.
    x, y = gratings(300, seed=11)
    for i, (img, label) in enumerate(zip(x, y)):
        folder = tmp_path / "data" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        u8 = np.clip((img[0] * 0.25 + 0.5) * 255, 0, 255).astype(np.uint8)  # inverse of META's mean/std
        Image.fromarray(u8).save(folder / f"{i:04d}.png")
    out, report = vitshrink.quantize(
        tiny["onnx"], tmp_path / "stage.onnx", mode="int8", calib_data=str(tmp_path / "data"), quiet=True
    )
    assert out == tmp_path / "stage.onnx" and out.is_file()
    assert report["metric_name"] == "accuracy" and report["metric_before"] > 0.5
    assert report["drop"] <= 0.005 + 1e-9
    out2, rep2 = vitshrink.quantize(tiny["onnx"], tmp_path / "stage16.onnx", mode="fp16")
    assert out2.is_file() and rep2["chosen"] == "fp16"
    with pytest.raises(VitshrinkError):
        vitshrink.quantize(tmp_path / "nope.onnx", tmp_path / "x.onnx", mode="fp16")


def test_stage_api_exports_a_model_dir_first(tmp_path: Path) -> None:
    from vitshrink.models import build_model, save_model

    model, meta = build_model("vit-micro", image_size=SIZE, num_channels=1, num_labels=CLASSES)
    save_model(model, meta, tmp_path / "vit")
    out, report = quantize(tmp_path / "vit", tmp_path / "vit_int8.onnx", mode="int8-dynamic", quiet=True)
    assert report["chosen"] == "int8-dynamic" and report["size_ratio"] < 0.6
    meta_out = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["vitshrink"])
    assert [h["stage"] for h in meta_out["history"]][-1] == "quantize"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit", "vit_int8.onnx"]


def test_segmentation_model_keeps_its_output_and_tensorrt_gets_symmetric_qdq(tmp_path: Path) -> None:
    from vitshrink.export import export_onnx
    from vitshrink.models import build_model, save_model

    model, meta = build_model("segformer-micro", image_size=32, num_channels=3, num_labels=4)
    save_model(model, meta, tmp_path / "seg")
    src, _ = export_onnx(tmp_path / "seg", tmp_path / "seg.onnx")
    g = np.random.default_rng(0)
    calib = [g.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(8)]
    ref = run(src, calib[0])
    dst = tmp_path / "seg_trt.onnx"
    report = quantize_onnx(src, dst, mode="int8-static", calib=calib, target="tensorrt", quiet=True)
    out = run(dst, calib[0])
    assert out.shape == ref.shape == (1, 4, 32, 32)
    assert agree(ref, out) >= 0.9  # per-pixel argmax agreement
    assert report["settings_chosen"]["activations"].startswith("int8 symmetric")
    zero_points = [
        onnx.numpy_helper.to_array(i)
        for i in onnx.load(str(dst)).graph.initializer
        if i.name.endswith("_zero_point")
    ]
    # symmetric: every zero point is 0; activations/weights int8 (biases int32)
    assert zero_points and not any(z.any() for z in zero_points)
    assert {z.dtype for z in zero_points} <= {np.dtype(np.int8), np.dtype(np.int32)}
    with pytest.raises(VitshrinkError, match="TensorRT"):
        quantize_onnx(src, tmp_path / "x.onnx", mode="int8-dynamic", target="tensorrt", quiet=True)


def test_mixed_int8_quantizes_convs_that_dynamic_keeps_float(tmp_path: Path) -> None:
    # SegFormer is conv-heavy (overlapping patch embeddings, sequence reduction, decoder fuse): dynamic
    # int8 keeps every Conv in float; the mixed path stores them int8 (QDQ) as well.
    from vitshrink.export import export_onnx
    from vitshrink.models import build_model, save_model

    torch.manual_seed(0)
    model, meta = build_model("segformer-micro", image_size=64, num_channels=3, num_labels=4)
    save_model(model, meta, tmp_path / "seg")
    src, _ = export_onnx(tmp_path / "seg", tmp_path / "seg.onnx")
    g = np.random.default_rng(0)
    calib = [g.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(8)]
    dyn = quantize_onnx(src, tmp_path / "d.onnx", mode="int8-dynamic", quiet=True)
    # `int8` without calibration data says in one line what the float Convs leave on the table
    nodata = quantize_onnx(src, tmp_path / "n.onnx", mode="int8", quiet=True)
    assert nodata["chosen"] == "int8-dynamic"
    assert any("Convs (" in w and "stay float" in w and "at most" in w for w in nodata["warnings"])
    mixed = quantize_onnx(src, tmp_path / "m.onnx", mode="int8-mixed", calib=calib, quiet=True)
    assert "Conv" in dyn["kept_float"]["op_types"] and "Conv" not in mixed["kept_float"]["op_types"]
    assert mixed["size_after"] < 0.8 * dyn["size_after"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert {"MatMulInteger", "QuantizeLinear", "DequantizeLinear"} <= ops or "DynamicQuantizeMatMul" in ops
    ref = run(src, calib[0])
    assert agree(ref, run(tmp_path / "m.onnx", calib[0])) >= 0.9
    # depthwise convs are int8 too (channels-last: no float Conv, no NCHWc reorders), and the GELU
    # after each stays one op despite the quantize pair in front of it
    n_erf = [n.op_type for n in onnx.load(str(src)).graph.node].count("Erf")
    optimised = ort_ops(tmp_path / "m.onnx")
    assert "Conv" not in optimised and "ReorderInput" not in optimised
    assert n_erf >= 2 and mixed["rewrites"]["gelu_fused"] == n_erf
    assert optimised.count("Gelu") == n_erf and "Erf" not in optimised
    # "int8" measures the mixed path alongside dynamic and static
    auto = quantize_onnx(src, tmp_path / "a.onnx", mode="int8", calib=calib, quiet=True)
    assert {c["kind"] for c in auto["candidates"]} == {"int8-dynamic", "int8-static", "int8-mixed"}


def test_big_models_fall_back_whole_block_parts() -> None:
    from vitshrink.quantize.sensitivity import groups as _groups

    names = [f"/vit/layers.{i}/attention/{p}_proj/MatMul" for i in range(12) for p in "qkvo"]
    names += [f"/vit/layers.{i}/mlp/fc{j}/MatMul" for i in range(12) for j in (1, 2)] + ["/classifier/Gemm"]
    groups = _groups(names)
    assert len(groups) == 25 and sorted(n for g in groups for n in g) == sorted(names)
    assert ["/vit/layers.3/mlp/fc1/MatMul", "/vit/layers.3/mlp/fc2/MatMul"] in groups
    assert [[n] for n in names[:10]] == _groups(names[:10])  # small models: node by node
