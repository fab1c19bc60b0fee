"""Structured pruning: every family shrinks, reloads with plain transformers and exports to ONNX."""

from __future__ import annotations

import copy
import gzip

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers as T
from torch import nn

from vitshrink.errors import UnsupportedFamilyError, VitshrinkError
from vitshrink.models.families.widths import kept_heads, kept_width
from vitshrink.prune.core import count_macs, count_params, prune_model, pruned_config
from vitshrink.prune.sparsity import unstructured_sparsity
from vitshrink.prune.target import pruned_architecture, ratio_for_target, ratio_from_latency_table

torch.set_num_threads(1)
ROUND = 8


def _vit(cls=T.ViTForImageClassification, cfg_cls=T.ViTConfig):
    cfg = cfg_cls(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    return cls(cfg), 32


def _swin():
    cfg = T.SwinConfig(
        image_size=32,
        patch_size=2,
        embed_dim=32,
        depths=[1, 1],
        num_heads=[2, 4],
        window_size=4,
        mlp_ratio=2.0,
        num_labels=3,
    )
    return T.SwinForImageClassification(cfg), 32


def _mobilevit():
    cfg = T.MobileViTConfig(
        image_size=64,
        hidden_sizes=[32, 48, 64],
        neck_hidden_sizes=[16, 16, 24, 32, 48, 64, 96],
        num_attention_heads=4,
        mlp_ratio=2.0,
        expand_ratio=2.0,
        num_labels=5,
    )
    model = T.MobileViTForImageClassification(cfg)
    # MobileViT's init (N(0, 0.02) conv and BatchNorm weights) makes activations vanish (logits ~1e-9),
    # which would make every comparison below vacuous; PyTorch's default init keeps them O(1).
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            m.reset_parameters()
    return model, 64


def _segformer():
    cfg = T.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[32, 64],
        patch_sizes=[3, 3],
        strides=[2, 2],
        num_attention_heads=[2, 4],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
        num_labels=4,
    )
    return T.SegformerForSemanticSegmentation(cfg), 32


def _upernet():
    bb = T.SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[2, 4, 8, 16],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = T.UperNetConfig(
        backbone_config=bb, hidden_size=32, auxiliary_channels=16, num_labels=4, pool_scales=[1, 2]
    )
    return T.UperNetForSemanticSegmentation(cfg), 64


FAMILIES = {
    "vit": (_vit, T.AutoModelForImageClassification),
    "deit": (lambda: _vit(T.DeiTForImageClassification, T.DeiTConfig), T.AutoModelForImageClassification),
    "swin": (_swin, T.AutoModelForImageClassification),
    "mobilevit": (_mobilevit, T.AutoModelForImageClassification),
    "segformer": (_segformer, T.AutoModelForSemanticSegmentation),
    "upernet": (_upernet, T.AutoModelForSemanticSegmentation),
}


def _widths(cfg) -> list[int]:
    """Every width in a config that round_to should apply to (heads and ratios excluded)."""
    t = cfg.model_type
    if t in ("vit", "deit"):
        return [cfg.hidden_size, cfg.intermediate_size]
    if t == "swin":
        return [cfg.embed_dim * 2**i for i in range(len(cfg.depths))] + [int(cfg.embed_dim * cfg.mlp_ratio)]
    if t == "mobilevit":
        return [*cfg.hidden_sizes, *cfg.neck_hidden_sizes, int(cfg.hidden_sizes[0] * cfg.mlp_ratio)]
    if t == "segformer":
        return [
            *cfg.hidden_sizes,
            cfg.decoder_hidden_size,
            *(h * m for h, m in zip(cfg.hidden_sizes, cfg.mlp_ratios)),
        ]
    if t == "upernet":
        return [cfg.hidden_size, cfg.auxiliary_channels, *_widths(cfg.backbone_config)]
    raise AssertionError(t)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pruned(request, tmp_path_factory):
    torch.manual_seed(0)
    build, auto = FAMILIES[request.param]
    model, size = build()
    model.eval()
    x = torch.randn(2, 3, size, size)
    before = {
        "params": count_params(model),
        "macs": count_macs(model, x),
        "config": copy.deepcopy(model.config),
        "heads": _heads(model),
    }
    out = prune_model(model, ratio=0.5, round_to=ROUND, example_inputs=x)
    d = tmp_path_factory.mktemp(request.param)
    out.save_pretrained(d)
    return request.param, out, auto, d, x, before


def test_pruned_model_reloads_with_plain_transformers(pruned):
    name, model, auto, d, x, _ = pruned
    reloaded = auto.from_pretrained(d).eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(_logits(reloaded, x), _logits(model, x), atol=1e-5, rtol=0)


def test_pruning_halves_widths_and_shrinks_params(pruned):
    name, model, _, _, x, before = pruned
    params = count_params(model)
    assert params < 0.7 * before["params"], f"{name}: {before['params']} -> {params}"
    assert count_macs(model, x) < 0.7 * before["macs"]
    old, new = _widths(before["config"]), _widths(model.config)
    assert all(w % ROUND == 0 for w in new), f"{name}: widths {new} not multiples of {ROUND}"
    assert sum(new) <= 0.6 * sum(old), f"{name}: {old} -> {new}"


def _heads(model: nn.Module) -> dict[str, tuple[int, int]]:
    """attention module name -> (heads, head size), read from the q projection and the module."""
    out = {}
    for name, m in model.named_modules():
        heads = getattr(m, "num_attention_heads", None)
        q = getattr(m, "q_proj", None) or getattr(m, "query", None)
        if isinstance(heads, int) and isinstance(q, nn.Linear):
            size = getattr(m, "head_dim", None) or m.attention_head_size
            assert q.out_features == heads * size, name
            out[name] = (heads, size)
    return out


def test_heads_are_removed_whole(pruned):
    name, model, _, _, _, before = pruned
    after = _heads(model)
    assert after.keys() == before["heads"].keys() and after
    for key, (heads, size) in after.items():
        old_heads, old_size = before["heads"][key]
        assert size == old_size, f"{name}:{key} head size changed"
        assert heads == max(1, old_heads // 2), f"{name}:{key} {old_heads} -> {heads} heads"


def test_onnx_export_matches_pytorch(pruned, tmp_path):
    name, model, _, _, x, _ = pruned
    path = tmp_path / f"{name}.onnx"
    expected = _logits(model, x).numpy()
    # the wrapper must be in eval mode: export restores the wrapper's mode onto the model afterwards
    torch.onnx.export(
        _Logits(model).eval(),
        (x,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["pixel_values"],
        output_names=["logits"],
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"pixel_values": x.numpy()})
    assert np.abs(expected).max() > 1e-3  # a vanishing output would make the comparison vacuous
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert not model.training


def test_magnitude_keeps_the_strong_heads_and_neurons():
    torch.manual_seed(0)
    model, _ = _vit()
    layer = model.vit.layers[0]
    with torch.no_grad():
        for lin in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj):
            lin.weight[16:32] *= 10  # head 1 dominates
            lin.weight[48:64] *= 10  # head 3 dominates
        layer.mlp.fc1.weight[:64] *= 10  # first half of the MLP dominates
        kept_q = layer.attention.q_proj.weight[16:32].clone()
    prune_model(
        model.eval(), ratio=0.5, granularity=["heads", "mlp"], example_inputs=torch.randn(1, 3, 32, 32)
    )
    assert model.config.num_attention_heads == 2 and model.config.hidden_size == 64
    q = model.vit.layers[0].attention.q_proj.weight
    torch.testing.assert_close(q[:16], kept_q)
    assert (
        model.vit.layers[0].mlp.fc1.weight.abs().mean() > 5 * model.vit.layers[1].mlp.fc1.weight.abs().mean()
    )


def test_taylor_and_random_importance_prune_to_the_same_architecture():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    shapes = set()
    for importance in ("taylor", "random"):
        model, _ = _vit()
        batches = [(x, torch.tensor([0, 1, 2, 3]))] if importance == "taylor" else None
        prune_model(model.eval(), ratio=0.5, importance=importance, example_inputs=x, calib_batches=batches)
        shapes.add(tuple(tuple(p.shape) for p in model.parameters()))
        assert all(p.grad is None for p in model.parameters())
    assert len(shapes) == 1
    with pytest.raises(VitshrinkError, match="calib_batches"):
        prune_model(_vit()[0], ratio=0.5, importance="taylor", example_inputs=x)


def test_taylor_seg_uses_ignore_index():
    torch.manual_seed(0)
    model, size = _segformer()
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, 4, (2, size, size))
    y[:, :4] = 255
    prune_model(model.eval(), ratio=0.5, importance="taylor", example_inputs=x, calib_batches=[(x, y)])
    assert model.config.hidden_sizes == [16, 32]


def test_unsupported_family_and_bad_options():
    beit = T.BeitForImageClassification(
        T.BeitConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    )
    with pytest.raises(UnsupportedFamilyError, match="beit"):
        prune_model(beit, ratio=0.5, example_inputs=torch.randn(1, 3, 32, 32))
    model, _ = _vit()
    x = torch.randn(1, 3, 32, 32)
    for kwargs in (
        {"ratio": 1.0},
        {"ratio": 0.5, "granularity": ["rows"]},
        {"ratio": 0.5, "importance": "l7"},
    ):
        with pytest.raises(VitshrinkError):
            prune_model(model, example_inputs=x, **kwargs)
    with pytest.raises(VitshrinkError, match="together"):
        prune_model(_swin()[0], ratio=0.5, granularity=["heads"], example_inputs=x)


def test_swin_keeps_head_size_and_whole_heads_per_stage():
    cfg = pruned_config(_swin()[0], 1 / 3)
    # 32-d with heads [2, 4] (head size 16): a third of 2 heads rounds to 1 head removed
    assert (cfg.embed_dim, list(cfg.num_heads), cfg.hidden_size) == (16, [1, 2], 32)
    swin_t = T.SwinConfig()  # Swin-T: 96-d, heads [3, 6, 12, 24], head size 32
    fake = type("M", (), {"config": swin_t})()
    cfg = pruned_config(fake, 1 / 3)
    assert (cfg.embed_dim, list(cfg.num_heads)) == (64, [2, 4, 8, 16])
    assert int(cfg.mlp_ratio * 64) == 256


def test_width_helpers():
    assert kept_width(384, 0.5, 8) == 192
    assert kept_width(1536, 0.25, 8) == 1152
    assert kept_width(20, 0.9, 8) == 8  # never below one step
    assert kept_width(6, 0.5, 8) == 3  # below round_to: plain rounding
    assert kept_heads(6, 0.5, [64], 8) == 3
    assert kept_heads(3, 0.5, [32], 8) in (1, 2)
    assert kept_heads(1, 0.9, [32], 8) == 1


def test_ratio_for_target_params_macs_latency():
    torch.manual_seed(0)
    model, _ = _vit()
    x = torch.randn(1, 3, 32, 32)
    p0 = count_params(model)
    r = ratio_for_target(model, x, target_params=p0 // 2)
    assert (
        count_params(pruned_architecture(model, r))
        <= p0 // 2
        < count_params(pruned_architecture(model, r - 0.02))
    )
    pruned = prune_model(copy.deepcopy(model).eval(), ratio=r, example_inputs=x)
    assert count_params(pruned) == count_params(pruned_architecture(model, r))
    m0 = count_macs(model, x)
    r = ratio_for_target(model, x, target_macs=m0 // 3)
    assert count_macs(pruned_architecture(model, r), x) <= m0 // 3
    # latency via a callable: a fake device whose latency is proportional to parameters
    r = ratio_for_target(
        model, x, measure_latency_ms=lambda m: count_params(m) / 1000, target_latency_ms=p0 / 4000
    )
    assert count_params(pruned_architecture(model, r)) <= p0 / 4
    assert ratio_for_target(model, x, target_params=p0 * 2) == 0.0
    with pytest.raises(VitshrinkError, match="exactly one"):
        ratio_for_target(model, x, target_params=1, target_macs=1)
    with pytest.raises(VitshrinkError, match="out of reach"):
        ratio_for_target(model, x, target_params=10)


def test_latency_table_interpolation(tmp_path):
    table = {"0.0": 40.0, "0.5": 20.0, "0.75": 12.0}
    assert ratio_from_latency_table(table, 30.0) == pytest.approx(0.25)
    assert ratio_from_latency_table(table, 16.0) == pytest.approx(0.625)
    assert ratio_from_latency_table(table, 50.0) == 0.0
    path = tmp_path / "jetson.json"
    path.write_text('{"0.0": 40.0, "0.5": 20.0}')
    model, _ = _vit()
    assert ratio_for_target(
        model, torch.randn(1, 3, 32, 32), target_latency_ms=30.0, latency_table=path
    ) == pytest.approx(0.25)
    with pytest.raises(VitshrinkError, match="below every entry"):
        ratio_from_latency_table(table, 5.0)
    with pytest.raises(VitshrinkError, match="not found"):
        ratio_from_latency_table(tmp_path / "missing.json", 5.0)


def test_unstructured_sparsity_bakes_zeros_and_shrinks_only_compressed_size(tmp_path):
    torch.manual_seed(0)
    model, _ = _vit()
    x = torch.randn(1, 3, 32, 32)
    rep = unstructured_sparsity(model, 0.6)
    assert rep["zero_fraction"] == pytest.approx(0.6, abs=0.01)
    assert rep["dense_bytes"] == rep["dense_bytes_before"]
    assert rep["gzip_bytes"] < 0.75 * rep["gzip_bytes_before"]
    assert not any(n.endswith("_orig") or n.endswith("_mask") for n, _ in model.named_parameters())
    assert not model.vit.layers[0].mlp.fc1._forward_pre_hooks  # masks removed, zeros baked in
    # the zeros survive a save/reload and the saved file compresses better than a dense one
    model.save_pretrained(tmp_path / "sparse")
    dense, _ = _vit()
    dense.save_pretrained(tmp_path / "dense")
    sparse_gz = len(gzip.compress((tmp_path / "sparse" / "model.safetensors").read_bytes()))
    dense_gz = len(gzip.compress((tmp_path / "dense" / "model.safetensors").read_bytes()))
    assert sparse_gz < 0.75 * dense_gz
    reloaded = T.ViTForImageClassification.from_pretrained(tmp_path / "sparse").eval()
    torch.testing.assert_close(_logits(reloaded, x), _logits(model.eval(), x))
    with pytest.raises(VitshrinkError):
        unstructured_sparsity(model, 1.5)


# -- stage API ----------------------------------------------------------------------------------------
def _image_folder(root, n: int = 12, size: int = 32):
    """Two colour classes (dark / bright), train and val splits, as PNG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for ci, name in enumerate(("dark", "bright")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 100, (size, size, 3)) + 150 * ci
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from vitshrink.models import build_model, save_model

    model, meta = build_model("vit-micro", image_size=32, class_names=["bright", "dark"])
    return save_model(model, meta, tmp_path_factory.mktemp("vit") / "vit")


@pytest.mark.parametrize("split_score", [0.9, 0.1])
def test_the_default_keeps_dropped_blocks_only_if_they_recover_as_well_as_widths_only(
    vit_dir, tmp_path, monkeypatch, split_score
):
    import vitshrink.prune as P
    from vitshrink.models import load_model
    from vitshrink.prune.recovery import Recovery

    data = _image_folder(tmp_path / "data")
    # the probe stands in for onnxruntime: fewer blocks run faster, so the default drops some
    monkeypatch.setattr(P, "_latencies_ms", lambda ms, x: [float(m.config.num_hidden_layers) for m in ms])
    real, seen = Recovery.recover, []

    def scored(self, net, *a, **k):  # the real recovery runs; its score is set per candidate
        val = real(self, net, *a, **k)
        seen.append(net.config.num_hidden_layers)
        return {**val, "accuracy": split_score if net.config.num_hidden_layers < 4 else 0.5}

    monkeypatch.setattr(Recovery, "recover", scored)
    kw = {"ratio": 0.5, "recover_epochs": 1, "data": str(data), "batch_size": 8, "quiet": True}
    out, m = P.prune(vit_dir, tmp_path / "p", **kw)
    assert seen == [2, 4]  # the split (half the blocks) recovered first, then widths only at its MACs
    kept = "split" if split_score >= 0.5 else "widths only"
    assert m["shape_check"] == {"metric": "accuracy", "split": split_score, "widths_only": 0.5, "kept": kept}
    model, meta = load_model(out)
    opts = meta["history"][-1]["options"]
    assert model.config.num_hidden_layers == (2 if kept == "split" else 4)
    assert opts["depth_ratio"] == (0.5 if kept == "split" else 0.0) and ("depth" in m) == (kept == "split")
    assert m["recovery"]["accuracy"] == (split_score if kept == "split" else 0.5)
    if kept == "widths only":
        assert opts["ratio"] == opts["ratio_mlp"] == 0.5 and m["params_after"] == count_params(model)
    # an explicit "auto" is the fastest split, unchecked (the budget search measures accuracy itself)
    seen.clear()
    _, m = P.prune(vit_dir, tmp_path / "auto", depth_ratio="auto", **kw)
    assert seen == [2] and "shape_check" not in m


def test_recovery_takes_feature_losses(vit_dir, tmp_path):
    """Hint distillation in recovery: both models run with their hidden states, the width projections
    train with the student (the pruned model is narrower than its teacher)."""
    from vitshrink.prune import prune

    data = _image_folder(tmp_path / "data")
    kw = {"ratio": 0.5, "recover_epochs": 1, "data": str(data), "batch_size": 8, "depth_ratio": 0.0}
    _, m = prune(vit_dir, tmp_path / "p", recover_losses={"kd": 1.0, "feature": 1.0}, quiet=True, **kw)
    assert 0.0 <= m["recovery"]["accuracy"] <= 1.0 and m["params_after"] < m["params_before"]


def test_stage_api_iterative_prune_with_recovery_and_sparsity(vit_dir, tmp_path):
    import vitshrink
    from vitshrink.models import load_model

    data = _image_folder(tmp_path / "data")
    out, metrics = vitshrink.prune(
        vit_dir,
        tmp_path / "pruned",
        ratio=0.5,
        steps=2,
        recover_epochs=1,
        importance="taylor",
        data=str(data),
        unstructured=0.3,
        batch_size=8,
        depth_ratio=0.0,  # widths only: the default may also drop blocks where that measures faster
        quiet=True,
    )
    model, meta = load_model(out)  # checksums verified, plain from_pretrained underneath
    assert meta["history"][-1]["stage"] == "prune"
    assert meta["history"][-1]["options"]["steps"] == 2
    assert meta["history"][-1]["options"]["recover_temperature"] == 4.0  # classification: Hinton's T
    assert metrics["params_after"] == count_params(model) < 0.35 * metrics["params_before"]
    assert model.config.hidden_size == 32 and model.config.num_attention_heads == 1
    assert metrics["unstructured"]["zero_fraction"] == pytest.approx(0.3, abs=0.01)
    assert 0.0 <= metrics["recovery"]["accuracy"] <= 1.0  # validation after the last recovery epoch
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.3, abs=0.01)  # the sparsity survived save + reload


def test_stage_api_budget_and_errors(vit_dir, tmp_path):
    from vitshrink.models import load_model
    from vitshrink.prune import prune

    _, m0 = prune(vit_dir, tmp_path / "a", ratio=0.0, quiet=True)
    assert m0["params_after"] == m0["params_before"]  # ratio 0 is a faithful copy
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(_logits(load_model(tmp_path / "a")[0], x), _logits(load_model(vit_dir)[0], x))
    target = m0["params_before"] // 2
    out, m = prune(vit_dir, tmp_path / "b", target_params=target, quiet=True)
    assert m["params_after"] <= target and 0 < m["ratio"] < 1
    assert (out / "config.json").exists() and not list(tmp_path.glob(".b.*"))  # atomic, no leftovers
    with pytest.raises(VitshrinkError, match="exactly one"):
        prune(vit_dir, tmp_path / "c", ratio=0.5, target_params=target, quiet=True)
    with pytest.raises(VitshrinkError, match="need data"):
        prune(vit_dir, tmp_path / "c", ratio=0.5, recover_epochs=1, quiet=True)
    with pytest.raises(VitshrinkError, match="recover temperature must be > 0"):
        prune(vit_dir, tmp_path / "c", ratio=0.5, recover_temperature=0.0, quiet=True)
    with pytest.raises(VitshrinkError, match="latency"):
        prune(
            vit_dir, tmp_path / "c", target_latency_ms=1e-6, latency_table={"0": 5.0, "0.9": 1.0}, quiet=True
        )
    assert not (tmp_path / "c").exists()


def test_recovery_distils_at_the_requested_temperature(vit_dir, tmp_path, monkeypatch):
    from vitshrink.distill import losses
    from vitshrink.prune import prune
    from vitshrink.prune.recovery import temperature_option as _temperature_option

    assert _temperature_option("kd:1,ce:1", 1.0) == {"temperature": 1.0}
    assert _temperature_option("ce", 1.0) == {}  # labels only: no loss takes a temperature
    seen = []
    init = losses.KDLoss.__init__

    def spy(self, temperature=4.0, alpha=0.5):
        seen.append(temperature)
        init(self, temperature, alpha)

    monkeypatch.setattr(losses.KDLoss, "__init__", spy)
    data = _image_folder(tmp_path / "data")
    out, _ = prune(
        vit_dir, tmp_path / "p", ratio=0.25, recover_epochs=1, data=str(data), recover_temperature=2.0,
        recover_losses="kd:1,ce:1", batch_size=8, quiet=True,
    )  # fmt: skip
    assert seen and set(seen) == {2.0}
