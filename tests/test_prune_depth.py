"""Depth pruning: whole blocks go, least influential first; the result reloads with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from vitshrink.errors import UnsupportedFamilyError, VitshrinkError
from vitshrink.models import build_model, load_model, save_model
from vitshrink.prune import prune
from vitshrink.prune.core import count_macs, count_params, prune_model
from vitshrink.prune.depth import block_influence, drop_blocks, kept_depth

torch.set_num_threads(1)


def _vit(cls=T.ViTForImageClassification, cfg_cls=T.ViTConfig, layers=4):
    cfg = cfg_cls(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    return cls(cfg).eval(), 32


def _swin():
    cfg = T.SwinConfig(
        image_size=32,
        patch_size=2,
        embed_dim=16,
        depths=[2, 4],
        num_heads=[1, 2],
        window_size=4,
        num_labels=3,
    )
    return T.SwinForImageClassification(cfg).eval(), 32


def _segformer():
    cfg = T.SegformerConfig(
        num_encoder_blocks=2,
        depths=[2, 3],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[3, 3],
        strides=[2, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=4,
    )
    return T.SegformerForSemanticSegmentation(cfg).eval(), 32


FAMILIES = {
    "vit": _vit,
    "deit": lambda: _vit(T.DeiTForImageClassification, T.DeiTConfig),
    "swin": _swin,
    "segformer": _segformer,
}


def _depths(cfg) -> list[int]:
    return [cfg.num_hidden_layers] if cfg.model_type in ("vit", "deit") else list(cfg.depths)


def test_kept_depth():
    assert kept_depth(12, 0.75) == 3 and kept_depth(12, 0.5) == 6 and kept_depth(12, 0.0) == 12
    assert kept_depth(6, 0.5) == 3 and kept_depth(2, 0.5) == 1  # Swin-T at 0.5: [1, 1, 3, 1]
    assert kept_depth(2, 0.25) == 2 and kept_depth(1, 0.9) == 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_drop_blocks_reloads_with_transformers(family, tmp_path):
    torch.manual_seed(0)
    model, size = FAMILIES[family]()
    x = torch.randn(2, 3, size, size)
    before = _depths(model.config)
    info = drop_blocks(model, 0.5, [x])
    after = _depths(model.config)
    assert after == info["kept"] and sum(after) < sum(before)
    with torch.no_grad():
        y = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()
    assert _depths(back.config) == after
    with torch.no_grad():
        assert torch.allclose(back(pixel_values=x).logits, y, atol=1e-5)


def test_the_block_that_changes_nothing_goes_first():
    torch.manual_seed(0)
    model, size = _vit(layers=4)
    x = torch.randn(2, 3, size, size)
    # zero both residual branches of block 2: it passes its input through unchanged
    layers = model.vit.layers
    for lin in (layers[2].attention.o_proj, layers[2].mlp.fc2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    scores = block_influence(model, [x])[0]
    assert scores[2] == pytest.approx(0.0, abs=1e-6) and min(scores[:2] + scores[3:]) > 1e-4
    kept_ids = [id(m) for i, m in enumerate(layers) if i != 2]
    info = drop_blocks(model, 0.25, [x])
    assert info["removed"] == [[2]] and [id(m) for m in model.vit.layers] == kept_ids


def test_swin_loses_pairs_then_its_last_block_and_every_kept_block_keeps_its_shift():
    torch.manual_seed(0)
    model, size = _swin()  # depths [2, 4]
    shift_of = {id(b): b.shift_size for st in model.swin.encoder.layers for b in st.blocks}
    info = drop_blocks(model, 0.5, [torch.randn(2, 3, size, size)])
    assert info["kept"] == [1, 2]
    assert info["removed"][0] == [1]  # the shifted block: the plain one keeps position 0
    assert info["removed"][1] in ([0, 1], [2, 3])  # a whole (plain, shifted) pair
    for stage in model.swin.encoder.layers:
        # from_pretrained shifts block i iff i is odd; the kept weights were trained that way too
        assert [b.shift_size > 0 for b in stage.blocks] == [i % 2 == 1 for i in range(len(stage.blocks))]
        assert all(b.shift_size == shift_of[id(b)] for b in stage.blocks)

    model, size = _swin()
    info = drop_blocks(model, 0.25, [torch.randn(2, 3, size, size)])
    assert info["kept"] == [2, 3] and info["removed"][1] == [3]  # odd count: the last block only


def test_depth_then_width_and_the_prune_stage(tmp_path):
    net, meta = build_model(
        "vit-micro", image_size=16, num_channels=1, num_labels=3, num_hidden_layers=4, hidden_size=32
    )
    save_model(net, meta, tmp_path / "m")
    params0 = count_params(net)
    out, m = prune(tmp_path / "m", tmp_path / "p", ratio=0.25, depth_ratio=0.5, quiet=True)
    back, _ = load_model(out)
    assert back.config.num_hidden_layers == 2 and m["depth"]["kept"] == [2]
    assert m["params_after"] == count_params(back) < params0
    rec = json.loads((out / "vitshrink.json").read_text())["history"][-1]
    assert rec["options"]["depth_ratio"] == 0.5 and rec["metrics"]["config"]["num_hidden_layers"] == 2
    # width pruning after depth pruning still checks itself against a fresh model of the final config
    model, size = _vit(layers=4)
    drop_blocks(model, 0.5, [torch.randn(1, 3, size, size)])
    prune_model(model, ratio=0.5, example_inputs=torch.randn(1, 3, size, size))
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 16


def test_depth_pruning_errors(tmp_path):
    model, size = _vit()
    with pytest.raises(VitshrinkError, match="depth ratio"):
        drop_blocks(model, 1.0, [torch.randn(1, 3, size, size)])
    mv = T.MobileViTForImageClassification(T.MobileViTConfig(image_size=32, num_labels=2))
    with pytest.raises(UnsupportedFamilyError, match="mobilevit"):
        drop_blocks(mv, 0.5, [torch.randn(1, 3, 32, 32)])


def test_shape_search_meets_the_budget_and_picks_the_fastest_split():
    from vitshrink.prune.shape import choose_shape
    from vitshrink.prune.target import pruned_architecture

    model, size = _vit(layers=4)
    x = torch.randn(1, 3, size, size)
    target = count_params(pruned_architecture(model, 0.5, round_to=1))  # fine steps for a toy width
    # a latency that counts blocks: the deepest cut that still meets the budget wins
    by_depth = lambda ms: [float(m.config.num_hidden_layers) for m in ms]  # noqa: E731
    d, w, _, rows = choose_shape(model, x, [x], by_depth, target_params=target, round_to=1)
    assert d == 0.5 and rows[0]["depth_ratio"] == 0.5 and rows[0]["latency_ms"] == 2.0
    assert {r["depth_ratio"] for r in rows} == {0.0, 0.25, 0.5}
    for r in rows:  # every candidate meets the same budget, none by far overshooting it
        assert 0.85 * target <= r["params"] <= target, r
    # equal speed: the shallower cut (keeps more of the trained network)
    d, w, _, _ = choose_shape(model, x, [x], lambda ms: [1.0] * len(ms), target_params=target, round_to=1)
    assert d == 0.0 and w == pytest.approx(0.5, abs=0.02)
    with pytest.raises(VitshrinkError, match="exactly one"):
        choose_shape(model, x, [x], by_depth)


def test_prune_depth_auto_records_the_choice(tmp_path):
    net, meta = build_model(
        "vit-micro", image_size=16, num_channels=1, num_labels=3, num_hidden_layers=4, hidden_size=32
    )
    save_model(net, meta, tmp_path / "m")
    out, m = prune(tmp_path / "m", tmp_path / "p", ratio=0.5, depth_ratio="auto", quiet=True)
    back, _ = load_model(out)
    assert m["params_after"] == count_params(back) and len(m["shape_candidates"]) >= 2
    rec = json.loads((out / "vitshrink.json").read_text())["history"][-1]["options"]
    assert rec["shape"] == {"depth_ratio": "auto", "ratio": 0.5}
    assert rec["depth_ratio"] in (0.0, 0.25, 0.5)
    with pytest.raises(VitshrinkError, match="'auto' needs ratio"):
        prune(tmp_path / "m", tmp_path / "q", target_latency_ms=1.0, depth_ratio="auto", quiet=True)


def test_the_default_drops_blocks_only_where_that_times_faster_at_equal_macs(tmp_path, monkeypatch):
    import vitshrink.prune as P

    net, meta = build_model(
        "vit-micro", image_size=16, num_channels=1, num_labels=3, num_hidden_layers=2, hidden_size=32
    )
    save_model(net, meta, tmp_path / "m")
    # the probe stands in for onnxruntime: first each block costs time, then nothing is faster
    monkeypatch.setattr(P, "_latencies_ms", lambda ms, x: [float(m.config.num_hidden_layers) for m in ms])
    out, m = prune(tmp_path / "m", tmp_path / "deep", ratio=0.5, quiet=True)
    rec = json.loads((out / "vitshrink.json").read_text())["history"][-1]["options"]
    assert (
        rec["depth_ratio"] == 0.5
        and m["config"]["num_hidden_layers"] == 1
        and rec["shape"] == {"depth_ratio": "auto (default)", "ratio": 0.5}
    )
    x = torch.randn(1, 1, 16, 16)
    widths_only = prune_model(
        load_model(tmp_path / "m")[0], ratio=0.5, round_to=rec["round_to"], example_inputs=x
    )
    assert m["macs_after"] <= count_macs(widths_only, x)  # equal MACs (within rounding), not fewer params
    assert all(r["macs"] >= 0.9 * count_macs(widths_only, x) for r in m["shape_candidates"])
    # depth 0.25 of 2-block stages keeps both: the same network as depth 0, not a candidate of its own
    assert sorted(r["depth_ratio"] for r in m["shape_candidates"]) == [0.0, 0.5]
    monkeypatch.setattr(P, "_latencies_ms", lambda ms, x: [1.0] * len(ms))  # a tie: widths only, the ratio
    out, m = prune(tmp_path / "m", tmp_path / "tie", ratio=0.5, quiet=True)
    rec = json.loads((out / "vitshrink.json").read_text())["history"][-1]["options"]
    assert rec["depth_ratio"] == 0.0 and rec["ratio"] == rec["ratio_mlp"] == 0.5
    assert m["params_after"] == count_params(widths_only)
    # where no split can be searched, the default is widths only and nothing is timed
    monkeypatch.setattr(P, "_latencies_ms", lambda ms, x: pytest.fail("timed"))
    table = {"0": 2.0, "0.9": 0.5}  # a latency budget from another device's table
    _, m = prune(tmp_path / "m", tmp_path / "lat", target_latency_ms=1.0, latency_table=table, quiet=True)
    assert "shape_candidates" not in m and m["config"]["num_hidden_layers"] == 2


def test_a_size_budget_gives_the_mlp_what_whole_heads_leave(tmp_path):
    from vitshrink.prune.target import fill_budget, pruned_architecture, ratio_for_target

    # 3 stage-0 heads of 16: embed widths 48 / 32 / 16 only, so the uniform ratio undershoots budgets
    net, meta = build_model(
        "swin-micro", image_size=32, num_labels=3, embed_dim=48, depths=[2, 2], num_heads=[3, 6]
    )
    x = torch.randn(1, 3, 32, 32)
    target = int(0.6 * count_params(net))
    r = ratio_for_target(net, x, target_params=target)
    uniform = count_params(pruned_architecture(net, r))
    m = fill_budget(net, r, x, target_params=target)
    filled = count_params(pruned_architecture(net, r, ratio_mlp=m))
    assert uniform < 0.9 * target and 0.95 * target <= filled <= target and m < r
    assert fill_budget(net, r, x, target_params=target, granularity=("heads", "embed")) == r  # no MLP axis

    save_model(net, meta, tmp_path / "m")
    out, metrics = prune(tmp_path / "m", tmp_path / "p", target_params=target, quiet=True)
    assert metrics["ratio_mlp"] == m and metrics["params_after"] == filled
    back, _ = load_model(out)
    assert count_params(back) == filled
    opts = json.loads((out / "vitshrink.json").read_text())["history"][-1]["options"]
    assert opts["ratio"] == r and opts["ratio_mlp"] == m


def test_latency_budgets_time_the_exported_model(tmp_path, monkeypatch):
    import vitshrink.export as export_mod
    from vitshrink.prune import _latency_ms

    net, meta = build_model("vit-micro", image_size=16, num_channels=1, num_labels=3)
    save_model(net, meta, tmp_path / "m")
    exported = []
    real = export_mod.export_onnx
    monkeypatch.setattr(export_mod, "export_onnx", lambda *a, **k: exported.append(a[1]) or real(*a, **k))
    # a budget the unpruned model already meets: nothing pruned, both latencies measured on ONNX
    out, m = prune(tmp_path / "m", tmp_path / "p", target_latency_ms=1e6, quiet=True)
    assert m["ratio"] == 0.0 and m["params_after"] == m["params_before"]
    assert m["latency_ms_before"] > 0 and m["latency_ms_after"] > 0 and len(exported) >= 2
    assert not any(p.exists() for p in exported)  # the probe's ONNX files are temporary

    def broken(*a, **k):
        raise VitshrinkError("no exporter")

    monkeypatch.setattr(export_mod, "export_onnx", broken)  # falls back to PyTorch timing
    assert _latency_ms(net, torch.randn(1, 1, 16, 16)) > 0


def test_width_pruning_after_depth_keeps_each_blocks_drop_path(monkeypatch):
    import vitshrink.prune.depth as D

    # SegFormer's drop-path rate grows with the block index: after depth pruning a kept block's rate
    # is not what a fresh config gives that position (block 0: Identity); widths must still prune
    cfg = T.SegformerConfig(
        num_labels=3, hidden_sizes=[16, 32, 32, 32], num_attention_heads=[1, 2, 2, 2], decoder_hidden_size=16
    )
    model = T.SegformerForSemanticSegmentation(cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    monkeypatch.setattr(D, "block_influence", lambda m, b: [[0.0, 1.0]] * 4)  # every stage keeps block 1
    drop_blocks(model, 0.5, [x])
    pruned = prune_model(model, ratio=0.25, example_inputs=x)
    assert pruned.config.depths == [1, 1, 1, 1]
    assert pruned(pixel_values=x).logits.shape[1] == 3
