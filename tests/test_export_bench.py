from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
from torch import nn

from vitshrink.bench import bench, model_stats
from vitshrink.errors import ModelError, VitshrinkError
from vitshrink.export import StaticAdaptiveAvgPool2d, export_onnx, make_exportable
from vitshrink.models import build_model, save_model

FAMILIES = [
    ("vit-micro", "classification", 28, 1),
    ("deit-micro", "classification", 32, 3),
    ("swin-micro", "classification", 32, 3),
    ("mobilevit-micro", "classification", 64, 3),
    ("segformer-micro", "segmentation", 64, 3),
    ("mobilevit-micro", "segmentation", 64, 3),
    ("upernet-swin-micro", "segmentation", 64, 3),
    ("upernet-mobilevit-micro", "segmentation", 64, 3),
]


@pytest.mark.parametrize("hw, bins", [((16, 16), 6), ((4, 4), 3), ((7, 9), 3), ((8, 8), 2), ((5, 5), 1)])
def test_static_adaptive_pool_matches_torch(hw, bins):
    x = torch.randn(2, 3, *hw)
    assert torch.allclose(StaticAdaptiveAvgPool2d(bins)(x), nn.AdaptiveAvgPool2d(bins)(x), atol=1e-6)


@pytest.mark.parametrize("preset, task, size, ch", FAMILIES)
def test_export_matches_pytorch(tmp_path, preset, task, size, ch):
    model, meta = build_model(preset, task=task, image_size=size, num_channels=ch, num_labels=6)
    for m in model.modules():  # non-trivial BatchNorm statistics so the parity check means something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    save_model(model, meta, tmp_path / "m")
    out, r = export_onnx(tmp_path / "m", tmp_path / "m.onnx", dynamic_batch=True)
    assert r["max_abs_diff"] < 1e-4 and r["argmax_agreement"] >= 0.999
    assert r["params"] == sum(p.numel() for p in model.parameters()) and r["macs"] > 0
    proto = onnx.load(str(out))
    side = json.loads(next(p.value for p in proto.metadata_props if p.key == "vitshrink"))
    assert side["task"] == task and side["preprocess"]["size"] == [size, size]
    assert [i.name for i in proto.graph.input] == ["pixel_values"]
    assert [o.name for o in proto.graph.output] == ["logits"]


def test_upernet_exports_at_512_with_psp_bins_that_do_not_divide(tmp_path):
    # 512 px -> 16x16 last map, pooled to 1/2/3/6 bins: the case both torch exporters reject as is
    model, meta = build_model("upernet-swin-micro", image_size=512, num_channels=3, num_labels=14)
    save_model(model, meta, tmp_path / "m")
    _, r = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    assert r["max_abs_diff"] < 1e-4


def test_export_rejects_bad_output_name(tmp_path):
    model, meta = build_model("vit-micro", image_size=28, num_channels=1, num_labels=3)
    save_model(model, meta, tmp_path / "m")
    with pytest.raises(VitshrinkError, match=r"must end in \.onnx"):
        export_onnx(tmp_path / "m", tmp_path / "m.bin")
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "m.bin").exists()


def test_bench_dir_and_onnx_in_one_run(tmp_path):
    model, meta = build_model("vit-micro", image_size=28, num_channels=1, num_labels=10)
    save_model(model, meta, tmp_path / "m")
    onnx_path, _ = export_onnx(tmp_path / "m", tmp_path / "m.onnx", dynamic_batch=True)
    rep = bench(
        [tmp_path / "m", onnx_path],
        threads=1,
        runs=5,
        rounds=1,
        batch=4,
        json_out=tmp_path / "b.json",
        quiet=True,
    )
    torch_res, ort_res = rep["results"]
    assert torch_res["runtime"] == "pytorch" and ort_res["runtime"] == "onnxruntime"
    for r in rep["results"]:
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["peak_rss_mb"] > 10 and r["throughput"] > 0 and r["params"] == torch_res["params"]
    # the ONNX-only process never imports torch, so it needs far less memory than the PyTorch one
    assert ort_res["peak_rss_mb"] < torch_res["peak_rss_mb"]
    assert ort_res["macs"] == torch_res["macs"]
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["model"] == str(tmp_path / "m")


def test_model_stats_rejects_missing_and_corrupt(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        model_stats(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="not a valid ONNX file"):
        model_stats(bad)


def _attention_probs(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    probs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: probs.append(out[1]))
        for m in model.modules()
        if type(m).__name__ == "SwinAttention"
    ]
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    for h in hooks:
        h.remove()
    return probs, logits


def test_exportable_swin_has_no_subnormal_attention_weights():
    # transformers masks shifted windows with -100: e^-100 is a float32 subnormal (x86's slow path)
    model, _ = build_model("swin-micro", task="classification", image_size=32, num_channels=3, num_labels=6)
    model.eval().set_attn_implementation("eager")  # eager attention returns its probabilities
    x = torch.randn(2, 3, 32, 32) * 3
    tiny = torch.finfo(torch.float32).tiny
    before, ref = _attention_probs(model, x)
    fast = make_exportable(copy.deepcopy(model))
    after, got = _attention_probs(fast, x)
    subnormal = [int(((p > 0) & (p < tiny)).sum()) for p in before]
    assert sum(subnormal) > 0 and subnormal[1] > 0  # block 1 of a stage is the shifted one
    assert all(int(((p > 0) & (p < tiny)).sum()) == 0 for p in after)
    assert torch.allclose(got, ref, atol=1e-6)
    # the patch is bound per block: a copy computes its mask from its own shift, not the original's
    twin = copy.deepcopy(fast)
    block = twin.swin.encoder.layers[0].blocks[1]
    block.shift_size = 0
    assert block.get_attn_mask(8, 8, torch.float32, torch.device("cpu")) is None
    assert fast.swin.encoder.layers[0].blocks[1].get_attn_mask(8, 8, torch.float32, "cpu").min() == -1e4
