from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from vitshrink.errors import ModelError
from vitshrink.models import build_model, family_for, load_model, save_model

CASES = [
    ("vit-micro", "classification", 28, 1),
    ("deit-micro", "classification", 32, 3),
    ("swin-micro", "classification", 32, 3),
    ("mobilevit-micro", "classification", 64, 3),
    ("mobilevit-micro", "segmentation", 64, 3),
    ("segformer-micro", "segmentation", 64, 3),
    ("upernet-swin-micro", "segmentation", 64, 3),
    ("upernet-mobilevit-micro", "segmentation", 64, 3),
]


@pytest.mark.parametrize("preset, task, size, ch", CASES)
def test_build_save_reload_through_transformers(tmp_path, preset, task, size, ch):
    model, meta = build_model(preset, task=task, image_size=size, num_channels=ch, num_labels=5)
    x = torch.randn(2, ch, size, size)
    with torch.no_grad():
        y = family_for(model).logits(model, x)
    assert y.shape == ((2, 5) if task == "classification" else (2, 5, size, size))
    save_model(model, meta, tmp_path / "m", stage="test")
    auto = (
        T.AutoModelForImageClassification if task == "classification" else T.AutoModelForSemanticSegmentation
    )
    reloaded = auto.from_pretrained(tmp_path / "m").eval()  # transformers alone, no vitshrink loader
    # What save/reload promises: the very same weights and the same function. Not bit-equal logits: on
    # some CPUs (AVX2-only EPYC) oneDNN picks a conv algorithm per call from the tensors' memory
    # alignment, so float sums run in another order (seen: ~1e-7 relative). Rounding-level tolerance.
    want = model.state_dict()
    got = reloaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        a, b = model(pixel_values=x).logits, reloaded(pixel_values=x).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))
    side = json.loads((tmp_path / "m" / "vitshrink.json").read_text())
    assert side["task"] == task and side["history"][-1]["stage"] == "test"
    assert "model.safetensors" in side["checksums"]
    pre = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": size, "width": size}


def test_plain_hf_directory_honours_preprocessor_config(tmp_path):
    cfg = T.ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "x", 1: "y", 2: "z"},
    )
    T.ViTForImageClassification(cfg).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.1, 0.2, 0.3],
                "image_std": [0.5, 0.6, 0.7],
                "size": {"height": 32, "width": 32},
                "do_normalize": True,
            }
        )
    )
    _, meta = load_model(tmp_path)
    assert meta["preprocess"] == {
        "mean": [0.1, 0.2, 0.3],
        "std": [0.5, 0.6, 0.7],
        "size": [32, 32],
        "channels": 3,
    }
    assert meta["class_names"] == ["x", "y", "z"] and meta["family"] == "vit"


def test_tampered_weights_fail_checksum(tmp_path):
    model, meta = build_model("vit-micro", image_size=28, num_channels=1, num_labels=3)
    save_model(model, meta, tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_model(tmp_path / "m")


def test_edited_config_fails_checksum(tmp_path):
    model, meta = build_model("vit-micro", image_size=28, num_channels=1, num_labels=3)
    save_model(model, meta, tmp_path / "m")
    side = json.loads((tmp_path / "m" / "vitshrink.json").read_text())
    assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= set(side["checksums"])
    cfg = tmp_path / "m" / "config.json"
    edited = cfg.read_text().replace('"num_hidden_layers": 4', '"num_hidden_layers": 3')
    assert edited != cfg.read_text()
    cfg.write_text(edited)
    with pytest.raises(ModelError, match=r"checksum mismatch for .*config\.json"):
        load_model(tmp_path / "m")


def test_unknown_preset_and_missing_model_are_clear(tmp_path):
    with pytest.raises(ModelError, match="unknown model preset 'vit-huge'.*vit-micro"):
        build_model("vit-huge", num_labels=2)
    with pytest.raises(ModelError, match="model not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_save_is_atomic_on_failure(tmp_path):
    model, meta = build_model("vit-micro", image_size=28, num_channels=1, num_labels=3)
    save_model(model, meta, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    bad = dict(meta, preprocess=None)  # fails while writing the preprocessor config
    with pytest.raises(TypeError):
        save_model(model, bad, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind
