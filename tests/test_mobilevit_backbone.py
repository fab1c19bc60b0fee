"""UperNet + MobileViT backbone: builds, right shapes/channels, and round-trips through transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModelForSemanticSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from vitshrink.errors import ModelError
from vitshrink.models.mobilevit_backbone import (
    MODEL_TYPE,
    UPERNET_MOBILEVIT_PRESETS,
    VitshrinkMobileViTBackbone,
    VitshrinkMobileViTBackboneConfig,
    build_upernet_mobilevit,
    register,
)

torch.set_num_threads(1)


def _calibrated(model: UperNetForSemanticSegmentation, size: int) -> UperNetForSemanticSegmentation:
    """Give BatchNorm real running stats so eval-mode logits are O(0.1), not ~1e-13 from fresh 0/1 stats.

    Otherwise a parity check at atol 1e-6 would pass even if the reloaded weights were garbage.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch gives exact stats
    model.train()
    with torch.no_grad():
        model(torch.randn(4, model.config.backbone_config.num_channels, size, size))
    return model.eval()


@pytest.fixture(scope="module")
def micro() -> UperNetForSemanticSegmentation:
    torch.manual_seed(0)
    return _calibrated(build_upernet_mobilevit(64, 3, 5, preset="micro"), 64)


def test_register_is_idempotent() -> None:
    register()
    register()
    assert AutoConfig.for_model(MODEL_TYPE).__class__ is VitshrinkMobileViTBackboneConfig
    backbone = AutoBackbone.from_config(VitshrinkMobileViTBackboneConfig(**_micro_widths()))
    assert isinstance(backbone, VitshrinkMobileViTBackbone)


def _micro_widths() -> dict:
    spec = dict(UPERNET_MOBILEVIT_PRESETS["micro"])
    spec.pop("decoder_hidden_size")
    return spec


def test_config_defaults_and_roundtrip() -> None:
    config = VitshrinkMobileViTBackboneConfig(**_micro_widths())
    assert config.out_features == ["stage2", "stage3", "stage4", "stage5"]
    assert config.out_indices == [2, 3, 4, 5]
    config.out_indices = [3, 5]
    assert config.out_features == ["stage3", "stage5"]
    restored = VitshrinkMobileViTBackboneConfig.from_dict(config.to_dict())
    assert restored.out_features == ["stage3", "stage5"]
    assert list(restored.hidden_sizes) == [32, 48, 64]
    with pytest.raises(ValueError, match="out_features"):
        VitshrinkMobileViTBackboneConfig(out_features=["stage9"])


@pytest.mark.parametrize("size", [32, 64])
def test_feature_maps_match_channels_and_strides(size: int) -> None:
    torch.manual_seed(0)
    config = VitshrinkMobileViTBackboneConfig(out_features=["stem", "stage2", "stage5"], **_micro_widths())
    backbone = VitshrinkMobileViTBackbone(config).eval()
    neck = config.neck_hidden_sizes
    assert backbone.channels == [neck[0], neck[2], neck[5]]
    assert backbone.num_features == list(neck[:6])
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, size, size), output_hidden_states=True)
    shapes = [tuple(f.shape) for f in out.feature_maps]
    assert shapes == [
        (2, neck[0], size // 2, size // 2),
        (2, neck[2], size // 4, size // 4),
        (2, neck[5], size // 32, size // 32),
    ]
    assert len(out.hidden_states) == 6  # stem + 5 stages
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, size, size)).hidden_states is None  # only on request


def test_fresh_backbone_is_not_collapsed() -> None:
    # MobileViT's own init draws BN weights ~N(0, 0.02), which crushes features to ~1e-5; ours must not.
    torch.manual_seed(0)
    backbone = VitshrinkMobileViTBackbone(VitshrinkMobileViTBackboneConfig(**_micro_widths())).train()
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 64, 64)).feature_maps
    assert all(f.std().item() > 0.1 for f in feats)


def test_upernet_forward_shape(micro: UperNetForSemanticSegmentation) -> None:
    assert micro.decode_head.in_channels == [24, 32, 48, 64]
    assert micro.auxiliary_head is None
    n_params = sum(p.numel() for p in micro.parameters())
    assert 200_000 < n_params < 1_000_000
    with torch.no_grad():
        for size in (64, 96):
            logits = micro(torch.randn(2, 3, size, size)).logits
            assert logits.shape == (2, 5, size, size)
            assert torch.isfinite(logits).all()


def test_save_reload_identical(micro: UperNetForSemanticSegmentation, tmp_path) -> None:
    micro.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "model.safetensors").is_file()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = micro(x).logits
    assert ref.abs().max() > 1e-3  # calibrated, so parity below is meaningful
    for cls in (UperNetForSemanticSegmentation, AutoModelForSemanticSegmentation):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, UperNetForSemanticSegmentation)
        assert isinstance(loaded.backbone, VitshrinkMobileViTBackbone)
        assert loaded.config.backbone_config.out_features == ["stage2", "stage3", "stage4", "stage5"]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, ref, atol=1e-6, rtol=0)


def test_upernet_config_accepts_backbone_config() -> None:
    config = UperNetConfig(
        backbone_config=VitshrinkMobileViTBackboneConfig(**_micro_widths()), hidden_size=16, num_labels=3
    )
    restored = UperNetConfig.from_dict(config.to_dict())
    assert isinstance(restored.backbone_config, VitshrinkMobileViTBackboneConfig)
    model = UperNetForSemanticSegmentation(restored).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3, 32, 32)


def test_builder_overrides_and_errors() -> None:
    model = build_upernet_mobilevit(
        32,
        1,
        4,
        preset="micro",
        decoder_hidden_size=16,
        pool_scales=[1, 2],
        out_indices=[3, 4, 5],
        id2label={0: "a", 1: "b", 2: "c", 3: "d"},
    )
    assert model.config.hidden_size == 16
    assert list(model.config.pool_scales) == [1, 2]
    assert model.backbone.channels == [32, 48, 64]
    assert model.config.id2label[3] == "d"
    assert model.config.backbone_config.num_channels == 1
    with pytest.raises(ModelError, match="preset"):
        build_upernet_mobilevit(32, 3, 4, preset="huge")
    with pytest.raises(ModelError, match="unknown option 'not_an_option'"):
        build_upernet_mobilevit(32, 3, 4, preset="micro", not_an_option=1)
    with pytest.raises(ModelError, match="divisible"):
        build_upernet_mobilevit(32, 3, 4, preset="micro", hidden_sizes=[30, 48, 64])
