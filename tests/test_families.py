"""Every registered family, through every stage it declares: adding a family = one file in
`vitshrink/models/families/` plus its row in `CAPABILITIES` below."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

from vitshrink.errors import UnsupportedFamilyError
from vitshrink.export import export_onnx
from vitshrink.models import build_model, count_params, family_for, load_model, save_model
from vitshrink.models.families import (
    Family,
    Preset,
    efficient_families,
    families,
    family_names,
    register_family,
    unregister_family,
)
from vitshrink.models.presets import PRESETS
from vitshrink.prune import pruned_config, supported_families
from vitshrink.prune.depth import drop_blocks

torch.set_num_threads(1)

# What each family declares: width pruning, heads+embed coupled, depth pruning, depth in (plain, shifted)
# pairs, tasks where `compress` tries it as a student.
CAPABILITIES = {
    "vit": dict(width=True, coupled=False, depth=True, paired=False, efficient=()),
    "deit": dict(width=True, coupled=False, depth=True, paired=False, efficient=()),
    "swin": dict(width=True, coupled=True, depth=True, paired=True, efficient=()),
    "mobilevit": dict(width=True, coupled=True, depth=False, paired=False, efficient=("classification",)),
    "segformer": dict(width=True, coupled=True, depth=True, paired=False, efficient=("segmentation",)),
    "upernet": dict(width=True, coupled=False, depth=False, paired=False, efficient=("segmentation",)),
    "resnet": dict(width=True, coupled=False, depth=True, paired=False, efficient=()),
}
MICRO = [
    pytest.param(name, task, id=f"{name}-{task}")
    for fam in families()
    for name, preset in fam.presets.items()
    if name.endswith("-micro")
    for task in preset.tasks
]
SIZE = 64


def _micro(name: str, task: str) -> tuple[nn.Module, dict]:
    return build_model(name, task=task, image_size=SIZE, num_channels=3, num_labels=4)


def test_every_family_is_listed_and_has_a_micro_preset():
    assert set(CAPABILITIES) == set(family_names())
    for fam in families():
        assert any(p.endswith("-micro") for p in fam.presets), fam.name
        assert fam.classes and all(t in ("classification", "segmentation") for t in fam.classes)
    # PRESETS is the registry's view: every preset names the family that declares it
    assert all(family_for(p.family).presets[name] is p for name, p in PRESETS.items())


@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_declared_capabilities(name):
    fam, want = family_for(name), CAPABILITIES[name]
    got = dict(
        width=fam.width_pruning,
        coupled=fam.coupled_heads_embed,
        depth=fam.depth_pruning,
        paired=fam.paired_blocks,
        efficient=fam.efficient_for,
    )
    assert got == want
    assert (name in supported_families()) == want["width"]
    for task in ("classification", "segmentation"):
        assert (name in efficient_families(task)) == (task in want["efficient"])


@pytest.mark.parametrize("name, task", MICRO)
def test_micro_builds_reloads_and_exports(tmp_path, name, task):
    model, meta = _micro(name, task)
    fam = family_for(model)
    assert fam is family_for(PRESETS[name].family) is family_for(model.config)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        y = fam.logits(model, x)
        raw = fam.model_logits(model, x)  # what training and pruning use: the model's own resolution
    assert y.shape == ((2, 4) if task == "classification" else (2, 4, SIZE, SIZE))
    assert raw.shape[:2] == y.shape[:2] and (task != "classification" or torch.equal(raw, y))
    save_model(model, meta, tmp_path / "m")
    back, back_meta = load_model(tmp_path / "m")
    assert type(back) is type(model) and back_meta["family"] == fam.name
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    _, r = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    assert r["max_abs_diff"] < 1e-4 and r["params"] == count_params(model)


@pytest.mark.parametrize("name, task", MICRO)
def test_micro_prune_and_depth_rules(name, task):
    model, _ = _micro(name, task)
    fam = family_for(model)
    cfg = pruned_config(model, 0.5)  # the family's width rules: a narrower, buildable config
    assert count_params(type(model)(cfg)) < count_params(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    if not fam.depth_pruning:
        with pytest.raises(UnsupportedFamilyError, match="depth pruning"):
            drop_blocks(model, 0.5, [x])
        return
    stages = fam.depth_stages(model)
    assert stages and all(len(blocks) >= 1 for blocks, _ in stages)
    before = [len(b) for b, _ in stages]
    kept = drop_blocks(model, 0.5, [x])["kept"]
    assert len(kept) == len(before) and all(1 <= k <= n for k, n in zip(kept, before))
    rebuilt = type(model)(model.config)  # config depths and block lists agree
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


@pytest.fixture
def beit_family():
    """A family added by one class (what a new file in models/families/ holds), removed afterwards."""

    @register_family
    class BeitFamily(Family):
        name = "beit-test"
        model_types = ("beit",)
        classes = {"classification": T.BeitForImageClassification}
        presets = {
            "beit-test-micro": Preset(
                "beit-test",
                ("classification",),
                {
                    "hidden_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "intermediate_size": 64,
                },
            )
        }

        def config(self, preset, task, image_size, channels, num_labels, **overrides):
            kw = {**preset.config, "patch_size": 8, **overrides}
            return T.BeitConfig(image_size=image_size, num_channels=channels, num_labels=num_labels, **kw)

    yield BeitFamily
    unregister_family("beit-test")


def test_a_new_family_is_one_registered_class(tmp_path, beit_family):
    with pytest.raises(ValueError, match="already registered"):
        register_family(beit_family)
    assert "beit-test-micro" in PRESETS
    model, meta = build_model("beit-test-micro", image_size=32, num_channels=3, num_labels=3)
    assert family_for(model).name == "beit-test" and meta["family"] == "beit-test"
    save_model(model, meta, tmp_path / "m")
    assert load_model(tmp_path / "m")[1]["family"] == "beit-test"
    _, r = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    assert r["max_abs_diff"] < 1e-4
    # stages it declares nothing for say so
    with pytest.raises(UnsupportedFamilyError, match="prune"):
        pruned_config(model, 0.5)


def test_unknown_types_are_refused():
    with pytest.raises(UnsupportedFamilyError, match="no-such-family"):
        family_for("no-such-family")
    assert "beit-test-micro" not in PRESETS
