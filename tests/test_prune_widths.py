"""Pruned widths follow the target's kernels: the CPU's vector width, a device profile's tile, or --round-to."""

from __future__ import annotations

import pytest

from vitshrink.compress import Stage, device_widths, get_profile
from vitshrink.compress.devices import width_rule
from vitshrink.cpu import width_multiple

AVX512 = frozenset({"avx2", "avx512f", "avx512_vnni"})
AVX_VNNI = frozenset({"avx2", "avx_vnni"})  # client x86: VNNI on 256-bit vectors, no AVX-512


def test_the_cpu_vector_width_sets_the_multiple(monkeypatch) -> None:
    monkeypatch.delenv("VITSHRINK_CPU", raising=False)
    assert width_multiple("auto", flags=AVX512)[0] == 16
    assert width_multiple("auto", flags=AVX_VNNI)[0] == 8
    assert width_multiple("auto", flags=frozenset({"avx2"}))[0] == 8
    assert width_multiple("vnni")[0] == 16 and width_multiple("avx2")[0] == 8
    multiple, why = width_multiple("arm64")
    assert multiple == 8 and "NEON" in why
    monkeypatch.setenv("VITSHRINK_CPU", "arm64")  # detection follows the override
    assert width_multiple("auto", flags=AVX512) == (8, "detected CPU arm64: " + why.split(": ", 1)[1])


def test_device_profiles_own_the_rule_and_compress_applies_it() -> None:
    jetson, cpu = get_profile("jetson-nano"), get_profile("cpu")
    assert width_rule(jetson)[0] == 32 and "TensorRT" in width_rule(jetson)[1]
    assert width_rule(cpu, "avx2") == width_multiple("avx2")
    assert width_rule(cpu, "vnni")[0] == 16
    stages = [
        Stage("prune", {"ratio": 0.5}),
        Stage("prune", {"ratio": 0.3, "round_to": 4}),  # the user's --round-to still wins
        Stage("quantize", {"mode": "int8", "target_cpu": "avx2"}),
    ]
    assert [s.options.get("round_to") for s in device_widths(stages, jetson)] == [32, 4, None]
    # on a CPU profile the recipe's quantize target names the CPU
    assert [s.options.get("round_to") for s in device_widths(stages, cpu)] == [8, 4, None]


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory):
    from vitshrink.models import build_model, save_model

    # one block: no depth/width split to time, so the default prune stays widths-only and quick
    model, meta = build_model(
        "vit-micro",
        image_size=32,
        class_names=["a", "b"],
        hidden_size=96,
        num_attention_heads=3,
        intermediate_size=176,
        num_hidden_layers=1,
    )
    return save_model(model, meta, tmp_path_factory.mktemp("vit") / "vit")


def _widths(metrics: dict) -> list[int]:
    cfg = metrics["config"]
    return [cfg["hidden_size"], cfg["intermediate_size"]]


def test_prune_rounds_to_the_target_cpu_by_default_and_records_why(vit, tmp_path) -> None:
    from vitshrink.prune import prune

    _, m16 = prune(vit, tmp_path / "a", ratio=0.3, target_cpu="vnni", quiet=True)
    _, m8 = prune(vit, tmp_path / "b", ratio=0.3, target_cpu="avx2", quiet=True)
    assert all(w % 16 == 0 for w in _widths(m16)), _widths(m16)
    assert all(w % 8 == 0 for w in _widths(m8)) and any(w % 16 for w in _widths(m8)), _widths(m8)
    assert m16["round_to"] == {"multiple": 16, "why": width_multiple("vnni")[1]}
    _, m4 = prune(vit, tmp_path / "c", ratio=0.3, target_cpu="vnni", round_to=4, quiet=True)
    assert m4["round_to"] == {"multiple": 4, "why": "set by round_to"}
    assert any(w % 8 for w in _widths(m4)), _widths(m4)


def test_plain_prune_rounds_to_a_named_gpu_target(vit, tmp_path) -> None:
    """`prune --target-device` reads the same table as compress's profiles: 32 for a Jetson, 8 for CUDA."""
    from vitshrink.artifacts import read_json
    from vitshrink.cli import main
    from vitshrink.prune import prune

    assert (
        main(
            [
                "prune",
                str(vit),
                "--ratio",
                "0.3",
                "--target-device",
                "jetson-nano",
                "--out",
                str(tmp_path / "j"),
                "--quiet",
            ]
        )
        == 0
    )
    rec = read_json(tmp_path / "j" / "vitshrink.json")["history"][-1]
    assert rec["options"]["target_device"] == "jetson-nano"
    assert rec["metrics"]["round_to"] == {"multiple": 32, "why": width_rule(get_profile("jetson-nano"))[1]}
    assert all(w % 32 == 0 for w in _widths(rec["metrics"])), _widths(rec["metrics"])
    _, m = prune(vit, tmp_path / "c", ratio=0.3, target_device="cuda", target_cpu="vnni", quiet=True)
    assert m["round_to"]["multiple"] == 8 and "tensor-core" in m["round_to"]["why"]
    assert any(w % 16 for w in _widths(m)), _widths(m)  # not the CPU's 16: the device wins


def test_segformer_mlp_widths_never_grow_past_the_trained_ones() -> None:
    import transformers as T

    from vitshrink.prune.core import pruned_config

    model = T.SegformerForSemanticSegmentation(T.SegformerConfig(num_labels=3))  # B0: 32/64/160/256 x 4
    cfg = pruned_config(model, 0.4, ratio_mlp=0.0)  # 160 -> 96 wide: 640 / 96 = 6.67 must not round to 7
    widths = [h * r for h, r in zip(cfg.hidden_sizes, cfg.mlp_ratios)]
    assert all(w <= h * 4 for w, h in zip(widths, [32, 64, 160, 256])), widths
    assert widths[2] == 576
