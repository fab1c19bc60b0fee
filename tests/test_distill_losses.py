"""Distillation losses: known values, gradients, shape mismatches, ignore pixels and the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitshrink.distill.losses import (
    LOSSES,
    AttentionLoss,
    CombinedLoss,
    CWDLoss,
    FeatureLoss,
    HardDistillLoss,
    KDLoss,
    MSELogitLoss,
    build_loss,
    build_losses,
    pair_layers,
    parse_loss_spec,
    tokens_to_map,
)
from vitshrink.errors import VitshrinkError

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _nearest_up(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


# ------------------------------------------------------------------------------------------ known values


def test_kd_identical_logits_is_zero() -> None:
    loss = KDLoss(alpha=1.0)
    cls = torch.randn(4, 10)
    seg = torch.randn(2, 3, 8, 8)
    assert loss(
        {"logits": cls}, {"logits": cls.clone()}, torch.zeros(4, dtype=torch.long)
    ).item() == pytest.approx(0.0, abs=1e-6)
    assert loss({"logits": seg}, {"logits": seg.clone()}, None).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_two_class_matches_formula() -> None:
    temp, alpha = 2.0, 0.3
    s, t, y = [1.0, -0.5], [0.2, 2.0], 1
    # Hand-written softmax/KL so the test does not share code with the implementation.
    ps = [math.exp(v / temp) / sum(math.exp(u / temp) for u in s) for v in s]
    pt = [math.exp(v / temp) / sum(math.exp(u / temp) for u in t) for v in t]
    kd = temp**2 * sum(q * math.log(q / p) for p, q in zip(ps, pt))
    ce = -math.log(math.exp(s[y]) / sum(math.exp(u) for u in s))
    expected = alpha * kd + (1 - alpha) * ce
    got = KDLoss(temperature=temp, alpha=alpha)(
        {"logits": torch.tensor([s])}, {"logits": torch.tensor([t])}, torch.tensor([y])
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert kd > 0.1  # the example is not degenerate


def test_kd_uses_dist_token_for_teacher_term() -> None:
    t = torch.randn(3, 5)
    loss = KDLoss(alpha=1.0)
    # Distillation head equals the teacher, class head does not: KD term only sees the dist head.
    out = loss({"logits": torch.randn(3, 5), "dist_logits": t.clone()}, {"logits": t}, torch.zeros(3).long())
    assert out.item() == pytest.approx(0.0, abs=1e-6)


def test_mse_known_value() -> None:
    s, t, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 2.0]]), torch.tensor([1])
    assert MSELogitLoss(alpha=1.0)({"logits": s}, {"logits": t}, y).item() == pytest.approx(2.0)
    ce = math.log(1 + math.exp(-1.0))  # CE of logits (1, 2) for class 1
    assert MSELogitLoss(alpha=0.5)({"logits": s}, {"logits": t}, y).item() == pytest.approx(
        0.5 * 2.0 + 0.5 * ce
    )
    # Constant maps at different resolutions: resizing keeps constants, so MSE is (1.5 - -0.5)^2 = 4.
    s_map, t_map = torch.full((1, 2, 8, 8), 1.5), torch.full((1, 2, 16, 16), -0.5)
    assert MSELogitLoss(alpha=1.0)({"logits": s_map}, {"logits": t_map}, None).item() == pytest.approx(4.0)


def test_hard_distillation_known_value_and_alias() -> None:
    assert LOSSES["dist-token"] is LOSSES["hard"] is HardDistillLoss
    s, t, y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    expected = 0.5 * math.log(1 + math.exp(-2.0)) + 0.5 * math.log(1 + math.exp(2.0))
    assert HardDistillLoss()({"logits": s}, {"logits": t}, y).item() == pytest.approx(expected, rel=1e-6)
    # With a distillation head the teacher term uses it: dist head agrees with the teacher argmax.
    d = torch.tensor([[0.0, 3.0]])
    expected_d = 0.5 * math.log(1 + math.exp(-2.0)) + 0.5 * math.log(1 + math.exp(-3.0))
    got = build_loss("dist-token")({"logits": s, "dist_logits": d}, {"logits": t}, y)
    assert got.item() == pytest.approx(expected_d, rel=1e-6)


def test_cwd_zero_for_identical_maps_positive_otherwise_and_known_value() -> None:
    loss = CWDLoss()
    a = torch.randn(2, 3, 8, 8)
    assert loss({"logits": a}, {"logits": a.clone()}, None).item() == pytest.approx(0.0, abs=1e-6)
    assert loss({"logits": a}, {"logits": torch.randn(2, 3, 8, 8)}, None).item() > 1e-3
    # Teacher at 2x resolution made of 2x2 blocks: bilinear downsizing by 2 recovers the student exactly.
    assert loss({"logits": a}, {"logits": _nearest_up(a)}, None).item() == pytest.approx(0.0, abs=1e-6)
    # One channel, two pixels, T=1: student uniform, teacher softmax(log 3, 0) = (3/4, 1/4).
    s = torch.zeros(1, 1, 1, 2)
    t = torch.tensor([[[[math.log(3.0), 0.0]]]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert CWDLoss(temperature=1.0)({"logits": s}, {"logits": t}, None).item() == pytest.approx(
        expected, rel=1e-5
    )
    # T^2 scaling: the same maps at T=4 with logits scaled by 4 give 16x the value.
    assert CWDLoss(temperature=4.0)({"logits": 4 * s}, {"logits": 4 * t}, None).item() == pytest.approx(
        16 * expected, rel=1e-5
    )


# ------------------------------------------------------------------------------------------- gradients


def _gradcheck(fn, *inputs: torch.Tensor) -> None:
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_gradcheck_kd_classification_and_segmentation() -> None:
    t_cls = torch.randn(3, 4, dtype=torch.float64)
    y_cls = torch.tensor([0, 3, 1])
    kd = KDLoss(temperature=2.0, alpha=0.4)
    _gradcheck(
        lambda s: kd({"logits": s}, {"logits": t_cls}, y_cls),
        torch.randn(3, 4, dtype=torch.float64, requires_grad=True),
    )

    t_seg = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    y_seg = torch.randint(0, 3, (1, 8, 8), dtype=torch.uint8)
    y_seg[0, :2] = 255
    _gradcheck(
        lambda s: kd({"logits": s}, {"logits": t_seg}, y_seg),
        torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True),
    )


def test_gradcheck_cwd_logits_and_features() -> None:
    t = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    _gradcheck(
        lambda s: CWDLoss(temperature=2.0)({"logits": s}, {"logits": t}, None),
        torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True),
    )
    loss = CWDLoss(on="features", student_dims=[3], teacher_dims=[5]).double()
    t_feat = [torch.randn(1, 5, 4, 4, dtype=torch.float64)]
    _gradcheck(
        lambda s: loss({"features": [s]}, {"features": t_feat}, None),
        torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True),
    )


def test_gradcheck_feature_tokens_with_cls_and_projection() -> None:
    loss = FeatureLoss(student_dims=[4], teacher_dims=[6]).double()
    t = [torch.randn(2, 10, 6, dtype=torch.float64)]  # CLS + 3x3
    _gradcheck(
        lambda s: loss({"features": [s]}, {"features": t}, None),
        torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True),  # CLS + 2x2
    )


def test_gradcheck_attention_with_resampling() -> None:
    t = [torch.softmax(torch.randn(1, 3, 10, 10, dtype=torch.float64), dim=-1)]
    loss = AttentionLoss()
    _gradcheck(
        lambda scores: loss({"attentions": [torch.softmax(scores, dim=-1)]}, {"attentions": t}, None),
        torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True),
    )


# ------------------------------------------------------------------------------------- shape mismatches


def test_segmentation_student_16_vs_teacher_32() -> None:
    s = torch.randn(2, 4, 16, 16, requires_grad=True)
    y = torch.randint(0, 4, (2, 64, 64), dtype=torch.uint8)
    # Exact agreement after resizing gives zero KD/MSE/CWD.
    for loss in (KDLoss(alpha=1.0), MSELogitLoss(alpha=1.0), CWDLoss()):
        assert loss({"logits": s}, {"logits": _nearest_up(s.detach())}, y).item() == pytest.approx(
            0.0, abs=1e-6
        )
    t = torch.randn(2, 4, 32, 32, requires_grad=True)
    for name in ("kd", "mse", "hard", "cwd", "ce"):
        out = build_loss(name)({"logits": s}, {"logits": t}, y)
        assert out.dim() == 0 and torch.isfinite(out) and out.item() > 0
        s.grad = None
        out.backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert t.grad is None  # the teacher is never trained


def test_feature_tokens_50_vs_197_and_widths_64_vs_192() -> None:
    s = torch.randn(2, 50, 64, requires_grad=True)  # CLS + 7x7, width 64
    t = torch.randn(2, 197, 192)  # CLS + 14x14, width 192
    loss = FeatureLoss()
    out = loss({"features": [s]}, {"features": [t]}, None)
    proj = loss.proj.layers["0_0"]
    assert (proj.in_features, proj.out_features) == (64, 192)
    out.backward()
    assert torch.isfinite(out) and s.grad is not None and proj.weight.grad is not None
    # The CLS token is dropped when counts differ: changing it changes nothing.
    t2 = t.clone()
    t2[:, 0] += 100.0
    assert loss({"features": [s]}, {"features": [t2]}, None).item() == pytest.approx(out.item(), rel=1e-6)
    # Same width, teacher = CLS + bilinearly upsampled student grid -> plain MSE is exactly 0.
    s_eq = torch.randn(2, 50, 32)
    grid = F.interpolate(tokens_to_map(s_eq), size=(14, 14), mode="bilinear", align_corners=False)
    t_eq = torch.cat([torch.randn(2, 1, 32), grid.flatten(2).transpose(1, 2)], dim=1)
    plain = FeatureLoss(normalize=False)
    assert plain({"features": [s_eq]}, {"features": [t_eq]}, None).item() == pytest.approx(0.0, abs=1e-10)
    assert len(list(plain.parameters())) == 0  # no projection when widths match


def test_feature_maps_and_eager_projection() -> None:
    loss = FeatureLoss(student_dims=[16, 16], teacher_dims=[32, 32, 32, 32])
    assert sorted(loss.proj.layers) == ["0_1", "1_3"]  # relative-depth pairs
    s = [torch.randn(2, 16, 8, 8) for _ in range(2)]
    t = [torch.randn(2, 32, 16, 16) for _ in range(4)]
    params_before = [p.clone() for p in loss.parameters()]
    out = loss({"features": s}, {"features": t}, None)
    assert torch.isfinite(out)
    assert [p.shape for p in loss.parameters()] == [p.shape for p in params_before]  # nothing created lazily


def test_feature_projection_learns_a_linear_teacher() -> None:
    # The projection is an nn.Module parameter the trainer optimises: it can fit a linear teacher.
    w = torch.randn(24, 12)
    s = torch.randn(4, 17, 12)  # CLS + 4x4
    t = s @ w.T
    loss = FeatureLoss(student_dims=[12], teacher_dims=[24])
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    first = None
    for _ in range(150):
        value = loss({"features": [s]}, {"features": [t]}, None)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < 0.05 * first


def test_attention_mismatch_heads_and_tokens() -> None:
    s = torch.softmax(torch.randn(2, 2, 50, 50), dim=-1)
    t = torch.softmax(torch.randn(2, 3, 197, 197), dim=-1)
    loss = AttentionLoss()
    out = loss({"attentions": [s]}, {"attentions": [t]}, None)
    assert torch.isfinite(out) and out.item() > 0
    assert loss({"attentions": [s]}, {"attentions": [s.flip(1)]}, None).item() == pytest.approx(0.0, abs=1e-6)
    # The CLS query row and key column are dropped when N differs: changing them changes nothing.
    # (One teacher head, so rescaling rows commutes with the head average.)
    t1 = t[:, :1]
    base = loss({"attentions": [s]}, {"attentions": [t1]}, None).item()
    t2 = t1.clone()
    t2[:, :, 0, :] = torch.softmax(torch.randn(2, 1, 197), dim=-1)
    t2[:, :, :, 0] *= 5.0
    t2 = t2 / t2.sum(dim=-1, keepdim=True)
    assert loss({"attentions": [s]}, {"attentions": [t2]}, None).item() == pytest.approx(base, rel=1e-5)
    # Uniform attention on both sides stays uniform after dropping CLS, resampling and renormalising.
    uni_s, uni_t = torch.full((1, 2, 50, 50), 1 / 50), torch.full((1, 4, 197, 197), 1 / 197)
    assert loss({"attentions": [uni_s]}, {"attentions": [uni_t]}, None).item() == pytest.approx(0.0, abs=1e-6)


def test_mismatched_classes_and_missing_outputs_raise() -> None:
    with pytest.raises(VitshrinkError, match="same label set"):
        KDLoss()({"logits": torch.randn(2, 3)}, {"logits": torch.randn(2, 5)}, None)
    with pytest.raises(VitshrinkError, match="output_hidden_states"):
        FeatureLoss()({"logits": torch.randn(2, 3)}, {"logits": torch.randn(2, 3)}, None)
    with pytest.raises(VitshrinkError, match="segmentation logit maps"):
        CWDLoss()({"logits": torch.randn(2, 3)}, {"logits": torch.randn(2, 3)}, None)
    with pytest.raises(VitshrinkError, match="square patch grid"):
        FeatureLoss()({"features": [torch.randn(1, 7, 4)]}, {"features": [torch.randn(1, 17, 4)]}, None)


# ---------------------------------------------------------------------------------------- ignore pixels


@pytest.mark.parametrize("name", ["kd", "mse", "hard", "ce"])
def test_ignored_pixels_contribute_nothing_same_resolution(name: str) -> None:
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    y = torch.randint(0, 3, (2, 8, 8), dtype=torch.uint8)
    y[:, 2:5, 1:6] = 255
    ignored = (y == 255)[:, None].expand_as(s)
    loss = build_loss(name)
    base = loss({"logits": s}, {"logits": t}, y).item()
    s2 = torch.where(ignored, s + 50 * torch.randn_like(s), s)
    t2 = torch.where(ignored, t - 50 * torch.randn_like(t), t)
    assert loss({"logits": s2}, {"logits": t2}, y).item() == pytest.approx(base, rel=1e-6)
    # Control: changing a labelled pixel does change the loss (the check above can fail).
    s3 = s.clone()
    s3[:, 0, 7, 7] += 5.0  # one class only: softmax ignores a shift of all classes
    assert loss({"logits": s3}, {"logits": t}, y).item() != pytest.approx(base, rel=1e-6)


def test_ignored_pixels_contribute_nothing_mixed_resolution() -> None:
    s, t = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 32, 32)
    y = torch.randint(0, 3, (1, 32, 32), dtype=torch.uint8)
    y[:, 8:16, 8:16] = 255  # student pixels 4..7
    loss = KDLoss(alpha=0.5)
    base = loss({"logits": s}, {"logits": t}, y).item()
    # Student pixels 5..6 only reach target pixels 9..12 when upsampled, all ignored.
    s2 = s.clone()
    s2[:, :, 5:7, 5:7] += 30.0
    t2 = t.clone()
    t2[:, :, 10:14, 10:14] -= 30.0
    assert loss({"logits": s2}, {"logits": t2}, y).item() == pytest.approx(base, rel=1e-6)
    # Everything ignored: zero, not NaN.
    all_ignored = torch.full_like(y, 255)
    assert loss({"logits": s}, {"logits": t}, all_ignored).item() == 0.0


# --------------------------------------------------------------------------------------------- registry


def test_pair_layers() -> None:
    assert pair_layers(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert pair_layers(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert pair_layers(12, 4) == [(2, 0), (5, 1), (8, 2), (11, 3)]
    assert pair_layers(1, 5) == [(0, 4)]


def test_parse_and_build_losses() -> None:
    assert parse_loss_spec("kd") == {"kd": 1.0}
    assert parse_loss_spec("kd, feature") == {"kd": 1.0, "feature": 1.0}
    assert parse_loss_spec({"kd": 1.0, "feature": 0.5}) == {"kd": 1.0, "feature": 0.5}
    assert parse_loss_spec(["KD:2", "dist_token=0.25"]) == {"kd": 2.0, "dist-token": 0.25}
    for bad, msg in [("kd,kd", "twice"), ("", "empty"), ({"kd": -1}, ">= 0"), ("kd:x", "number")]:
        with pytest.raises(VitshrinkError, match=msg):
            parse_loss_spec(bad)
    with pytest.raises(VitshrinkError, match=r"unknown distillation loss 'kld' \(valid: attention, ce, cwd"):
        build_losses("kd,kld")

    combo = build_losses({"kd": 1.0, "cwd": 0.5}, temperature=2.0, alpha=0.7)
    assert isinstance(combo, CombinedLoss)
    assert combo.losses["kd"].temperature == combo.losses["cwd"].temperature == 2.0
    assert combo.losses["kd"].alpha == 0.7
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    y = torch.randint(0, 3, (2, 8, 8))
    total, parts = combo({"logits": s}, {"logits": t}, y)
    assert set(parts) == {"kd", "cwd"}
    assert total.item() == pytest.approx(parts["kd"] + 0.5 * parts["cwd"], rel=1e-6)

    per_loss = build_losses("feature,attention", feature={"pairs": [(0, 1)], "normalize": False})
    assert per_loss.losses["feature"].pairs == [(0, 1)] and per_loss.losses["attention"].pairs is None
    with pytest.raises(VitshrinkError, match="not accepted by any"):
        build_losses("kd", pairs=[(0, 0)])
    with pytest.raises(VitshrinkError, match="unknown option"):
        build_loss("kd", normalize=True)
    with pytest.raises(VitshrinkError, match="alpha"):
        build_loss("kd", alpha=1.5)


def test_prepare_creates_lazy_projections_for_the_optimiser() -> None:
    combo = build_losses("kd:1,feature:0.5")
    assert len(list(combo.parameters())) == 0
    s = {"logits": torch.randn(2, 4), "features": [torch.randn(2, 17, 8)] * 2}
    t = {"logits": torch.randn(2, 4), "features": [torch.randn(2, 65, 16)] * 4}
    combo.prepare(s, t, torch.tensor([0, 1]))
    params = list(combo.parameters())
    assert [tuple(p.shape) for p in params] == [(16, 8), (16,), (16, 8), (16,)]
    assert combo.requires == {"logits", "features"}
    total, _ = combo(s, t, torch.tensor([0, 1]))
    total.backward()
    assert all(p.grad is not None for p in params)
