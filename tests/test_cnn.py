"""CNN presets (ResNet, UperNet + ResNet) through every stage that applies to a CNN; the others say so.

Micro configs on 32-px inputs, a few images: what is checked is behaviour (the saved model scores what
training reported, the ONNX file computes what PyTorch does, pruning and int8 make it smaller, plain
transformers reloads it), not accuracy.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers as T

from tests.conftest import FMNIST
from vitshrink.distill import distill
from vitshrink.errors import UnsupportedFamilyError, VitshrinkError
from vitshrink.evaluate import evaluate
from vitshrink.export import export_onnx
from vitshrink.models import build_model, count_params, family_for, load_model, save_model
from vitshrink.models.families import families
from vitshrink.prune import prune
from vitshrink.prune.depth import drop_blocks
from vitshrink.quantize.files import read_meta
from vitshrink.tasks import TASK_METRIC
from vitshrink.train import train

AERIAL = {"size": 32, "n_train": 8, "n_val": 4, "n_test": 4}
# every CNN micro preset: the ResNet family's own and UperNet's with a ResNet backbone
CNN_MICRO = [
    name
    for fam in families()
    for name, p in fam.presets.items()
    if name.endswith("-micro") and (fam.name == "resnet" or p.backbone == "resnet")
]


def _data(preset: str) -> tuple[str, dict, int]:
    """(data spec, data options, image size) for the preset's task."""
    if family_for(build_model(preset, num_labels=2, image_size=32)[0]).name == "upernet":
        return "aerial", dict(AERIAL), 32
    if not FMNIST.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    return "fashion-mnist", {}, 32


def test_cnn_presets_are_registered():
    assert set(CNN_MICRO) == {"resnet-18-micro", "resnet-34-micro", "upernet-resnet-18-micro"}
    m, _ = build_model("resnet-18", image_size=224, num_labels=1000)
    assert isinstance(m, T.ResNetForImageClassification) and 11.6e6 < count_params(m) < 11.8e6
    m, _ = build_model("upernet-resnet-18", image_size=64, num_labels=4)
    assert isinstance(m.backbone, T.ResNetBackbone)


@pytest.mark.parametrize("preset", CNN_MICRO)
def test_cnn_trains_exports_prunes_and_reloads_plainly(tmp_path, preset):
    data, opts, size = _data(preset)
    out, m = train(
        preset,
        data,
        out=tmp_path / "m",
        epochs=1,
        batch_size=16,
        limit=32,
        val_limit=16,
        image_size=size,
        data_options=opts,
        quiet=True,
    )
    assert m["epochs"] == 1
    net, meta = load_model(out)
    channels = meta["preprocess"]["channels"]
    fresh, _ = build_model(
        preset, num_labels=len(meta["class_names"]), image_size=size, num_channels=channels
    )
    assert count_params(net) == count_params(fresh)  # the preset's architecture, its weights trained
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))
    # the saved model scores on the validation images what training reported for them
    metric = TASK_METRIC[meta["task"]]
    again = evaluate(out, data, split="val", limit=16, quiet=True, data_options=opts)[metric]
    assert 0.0 <= m[metric] <= 1.0 and again == pytest.approx(m[metric], abs=0.07)

    _, r = export_onnx(out, tmp_path / "m.onnx")
    assert r["max_abs_diff"] < 1e-4 and r["params"] == count_params(net)
    # and the ONNX file, run by onnxruntime, computes what PyTorch does
    x = torch.randn(1, channels, size, size)  # exported at batch 1
    fam = family_for(net)
    with torch.no_grad():
        want = fam.logits(net.eval(), x).numpy()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    pruned, pm = prune(out, tmp_path / "p", ratio=0.5, quiet=True)
    assert pm["params_after"] < 0.5 * pm["params_before"]
    small, _ = load_model(pruned)
    # plain transformers rebuilds the narrower network from the rewritten config alone
    plain = type(net).from_pretrained(pruned).eval()
    assert count_params(plain) == count_params(small) == pm["params_after"]
    with torch.no_grad():
        assert torch.equal(fam.logits(plain, x), fam.logits(small, x))
    _, r = export_onnx(pruned, tmp_path / "p.onnx")
    assert r["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("preset", ["resnet-18-micro", "upernet-resnet-18-micro"])
def test_cnn_distils_as_student_and_quantizes(tmp_path, preset):
    from vitshrink.quantize import quantize

    data, opts, size = _data(preset)
    teacher = "upernet-swin-micro" if data == "aerial" else "vit-micro"
    channels = 3 if data == "aerial" else 1
    t, tmeta = build_model(
        teacher, image_size=size, num_channels=channels, num_labels=14 if data == "aerial" else 10
    )
    save_model(t, tmeta, tmp_path / "t")
    # logits KD plus feature KD on the CNN's stage maps (projected to the teacher's widths)
    out, m = distill(
        tmp_path / "t",
        preset,
        data,
        out=tmp_path / "s",
        epochs=1,
        batch_size=16,
        limit=32,
        val_limit=16,
        losses={"kd": 1.0, "feature": 0.5},
        data_options=opts,
        quiet=True,
    )
    student, smeta = load_model(out)
    assert m["student_params"] == count_params(student)
    assert family_for(student).name == family_for(build_model(preset, num_labels=2, image_size=size)[0]).name
    # without calibration data the Convs (all of a CNN's weight multiply-adds) stay float, and it says so
    q, rep = quantize(out, tmp_path / "q.onnx", mode="int8", quiet=True)
    assert rep["chosen"] == "int8-dynamic" and any("the Convs" in w for w in rep["warnings"])
    assert rep["fidelity"]["finite"] and rep["fidelity"]["agreement"] >= 0.8, rep["fidelity"]
    # static (QDQ) int8 with calibration data quantizes the Convs too: well under half the fp32 file
    q, rep = quantize(
        out, tmp_path / "q8.onnx", mode="int8-static", calib_data=data, data_options=opts, quiet=True
    )
    assert rep["size_ratio"] < 0.5, rep["size_ratio"]
    assert rep["fidelity"]["finite"] and rep["fidelity"]["agreement"] >= 0.8, rep["fidelity"]
    assert read_meta(onnx.load(str(q), load_external_data=False))["task"] == smeta["task"]


def test_cnn_stages_that_do_not_apply_say_so(tmp_path):
    model, meta = build_model("resnet-18-micro", image_size=32, num_channels=3, num_labels=4)
    save_model(model, meta, tmp_path / "m")
    with pytest.raises(VitshrinkError, match="is a CNN: it has no attention heads") as e:
        prune(tmp_path / "m", tmp_path / "p", ratio=0.5, granularity="heads", quiet=True)
    assert "\n" not in str(e.value) and not (tmp_path / "p").exists()
    with pytest.raises(VitshrinkError, match="no attention maps"):
        family_for(model).forward_kd(model, torch.randn(1, 3, 32, 32), attentions=True)
    seg, _ = build_model("upernet-resnet-18-micro", image_size=32, num_labels=4)
    with pytest.raises(UnsupportedFamilyError, match="depth pruning"):
        drop_blocks(seg, 0.5, [torch.randn(1, 3, 32, 32)])


def test_resnet_depth_pruning_keeps_each_stage_first_block():
    model, _ = build_model("resnet-34-micro", image_size=32, num_labels=4)
    x = torch.randn(2, 3, 32, 32)
    kept = drop_blocks(model, 0.5, [x])["kept"]
    assert (
        model.config.depths == [k + 1 for k in kept] == [2, 3, 4, 2]
    )  # tails [2, 3, 5, 2] keep half, rounded
    rebuilt = T.ResNetForImageClassification(model.config)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert family_for(model).logits(model, x).shape == (2, 4)


@pytest.mark.parametrize("preset", ["upernet-mobilevit-micro", "upernet-resnet-18-micro"])
def test_from_scratch_students_get_he_init(preset):
    """transformers' N(0, 0.02) conv init left UperNet-MobileViT predicting one class for its first epochs
    (BatchNorm running statistics lagging 15%-per-step weight changes); He init as in the reference code."""
    model, _ = build_model(preset, image_size=64, num_labels=14)
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m is not model.decode_head.classifier
    ]
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]  # torch counts no groups
        want = (2.0 / fan_out) ** 0.5
        if conv.weight.numel() >= 256:  # enough samples for the std to mean something
            assert 0.7 * want < float(conv.weight.detach().std()) < 1.3 * want, conv
    assert float(model.decode_head.classifier.weight.detach().std()) < 0.02


def test_baseline_verdict_names_the_winner_at_the_deployed_latency():
    from vitshrink.baseline import baseline_preset, baseline_verdict

    assert baseline_preset("segmentation") == "upernet-resnet-18-micro"
    with pytest.raises(VitshrinkError, match="no CNN baseline"):
        baseline_preset("detection")
    stages = [
        {"name": "teacher", "miou": 0.5, "latency_ms": {"p50": 9.0}},
        {"name": "baseline", "miou": 0.4, "latency_ms": {"p50": 2.0}, "baseline": True},
        {"name": "int8", "miou": 0.45, "latency_ms": {"p50": 1.0}},
    ]
    assert "winner is the compressed ViT (int8)" in baseline_verdict(stages, "miou")
    stages[2].update(miou=0.3, latency_ms={"p50": 3.0})
    assert "winner is the CNN baseline (baseline)" in baseline_verdict(stages, "miou")
    stages[2].update(latency_ms={"p50": 1.0})
    assert "neither outright" in baseline_verdict(stages, "miou")
