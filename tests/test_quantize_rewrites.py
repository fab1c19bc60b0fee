"""Quantization graph rewrites: exact fusions (SegFormer decoder, channels-last tail, sum trees, erf GELU,
residual norms), int8 attention, pre-processing, and the builder registry."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.quant_models import (  # _one_thread: autouse in every module that imports it
    _one_thread,  # noqa: F401
    ort_ops,
    run,
)
from vitshrink.quantize import quantize_onnx

transformers = pytest.importorskip("transformers")


def test_segformer_decoder_fuse_conv_folds_into_the_stage_linears(tmp_path: Path) -> None:
    # Concat + 1x1 fuse conv (the largest layer of SegFormer at 512 px) becomes a Sum: same output as
    # PyTorch, one Conv and its multiply-adds fewer; quantize applies it and records it.
    from vitshrink.export import export_onnx
    from vitshrink.models import build_model, save_model
    from vitshrink.quantize.fusions import (
        channels_last_reshapes,
        channels_last_tail,
        fold_concat_conv,
        fuse_attention,
    )
    from vitshrink.quantize.graph import weight_macs
    from vitshrink.quantize.steps import preprocess

    torch.manual_seed(0)
    model, meta = build_model("segformer-micro", image_size=64, num_channels=3, num_labels=4)
    for p in model.parameters():  # trained-like non-zero biases, so the bias path is exercised too
        torch.nn.init.normal_(p, std=0.1) if p.dim() == 1 else None
    save_model(model, meta, tmp_path / "seg")
    src, _ = export_onnx(tmp_path / "seg", tmp_path / "seg.onnx")
    pre = preprocess(src, tmp_path / "pre.onnx", onnx.load(str(src)), lambda m: None)
    folded, info = fold_concat_conv(pre)
    assert info["folded"] == 1
    ops = lambda m: [n.op_type for n in m.graph.node]  # noqa: E731
    assert ops(folded).count("Conv") == ops(pre).count("Conv") - 1 and "Concat" not in ops(folded)
    assert weight_macs(folded)["Conv"] < weight_macs(pre)["Conv"]
    onnx.save(folded, str(tmp_path / "folded.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():  # export checked the ONNX against PyTorch; the fold keeps that output
        ref = model(pixel_values=torch.from_numpy(x)).logits
        ref = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)
    before, after = run(src, x), run(tmp_path / "folded.onnx", x)
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 1e-5
    assert np.linalg.norm(after - ref.numpy()) / np.linalg.norm(ref.numpy()) < 1e-3
    # then the upsample-and-sum tail runs channels-last: the 4 map transposes and the identity
    # Resize go, the classifier conv becomes a MatMul + one transpose of the class map
    tail, tinfo = channels_last_tail(folded)
    assert tinfo["channels_last_tails"] == 1
    assert ops(tail).count("Transpose") == ops(folded).count("Transpose") - 3
    assert ops(tail).count("Resize") == ops(folded).count("Resize") - 1
    assert ops(tail).count("Conv") == ops(folded).count("Conv") - 1
    onnx.save(tail, str(tmp_path / "tail.onnx"))
    after_tail = run(tmp_path / "tail.onnx", x)
    assert np.linalg.norm(after_tail - before) / np.linalg.norm(before) < 1e-5
    # token <-> map conversions become 4-D transposes: same output, and onnxruntime's optimised graph
    # (channels-last int8 / blocked float convs) keeps fewer transposes
    nhwc, linfo = channels_last_reshapes(tail)
    assert linfo["token_map_transposes"] >= 6  # 2 blocks x (dwconv + sr conv) in and out, patch embeds
    onnx.save(nhwc, str(tmp_path / "nhwc.onnx"))
    assert np.linalg.norm(run(tmp_path / "nhwc.onnx", x) - before) / np.linalg.norm(before) < 1e-5
    assert ort_ops(tmp_path / "nhwc.onnx").count("Transpose") < ort_ops(tmp_path / "tail.onnx").count(
        "Transpose"
    )
    # attention as onnxruntime's MultiHeadAttention: every block, same output
    mha, ainfo = fuse_attention(nhwc)
    n_attn = ops(nhwc).count("Softmax")
    assert n_attn >= 2 and ainfo["attention_fused"] == n_attn and "Softmax" not in ops(mha)
    onnx.save(mha, str(tmp_path / "mha.onnx"))
    assert np.linalg.norm(run(tmp_path / "mha.onnx", x) - before) / np.linalg.norm(before) < 1e-5
    q8 = quantize_onnx(src, tmp_path / "q8.onnx", mode="int8-dynamic", quiet=True)
    assert q8["rewrites"]["attention_fused"] == n_attn  # int8 for CPU: an onnxruntime model
    # ... whose attention runs as int8 products where that measured faster than float attention
    q8_ops = [n.op_type for n in onnx.load(str(tmp_path / "q8.onnx")).graph.node]
    att = q8["attention"]
    assert att["blocks"] == n_attn and att["int8_ms"] > 0 and att["float_ms"] > 0
    if att["kept"] == "int8":
        assert att["int8_ms"] < att["float_ms"] and q8["attention_int8"] == n_attn
        assert "MultiHeadAttention" not in q8_ops and "attention" in q8["settings_chosen"]
    else:
        assert att["kept"] == "float" and q8["attention_int8"] == 0
        assert q8_ops.count("MultiHeadAttention") == n_attn and "attention" not in q8["settings_chosen"]
    # the stages' last residual + norm stay out of onnxruntime's SkipLayerNormalization
    assert q8["rewrites"]["residual_norms_2d"] >= 2
    assert "SkipLayerNormalization" not in ort_ops(tmp_path / "q8.onnx")
    report = quantize_onnx(src, tmp_path / "f16.onnx", mode="fp16", quiet=True)
    assert "attention_fused" not in report["rewrites"]  # fp16 (GPU / TensorRT) stays standard ONNX
    assert report["rewrites"]["concat_conv_folded"] == 1
    assert report["rewrites"]["channels_last_tails"] == 1
    assert report["rewrites"]["token_map_transposes"] == linfo["token_map_transposes"]
    assert report["rewrites"]["sums_as_adds"] == 1


def test_channels_last_tail_leaves_other_patterns_alone() -> None:
    # a Sum of NCHW maps that no Transpose feeds, or a tail not ending in a 1x1 conv: nothing changes
    from onnx import TensorProto, helper, numpy_helper

    from vitshrink.quantize.fusions import channels_last_tail

    w = numpy_helper.from_array(np.ones((2, 4, 3, 3), np.float32), "w")
    x = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 8, 4]) for n in ("a", "b")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Transpose", ["a"], ["at"], perm=[0, 3, 1, 2]),
        helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 3, 1, 2]),
        helper.make_node("Sum", ["at", "bt"], ["s"]),
        helper.make_node("Conv", ["s", "w"], ["y"], pads=[1, 1, 1, 1]),  # 3x3: needs NCHW
    ]
    m = helper.make_model(helper.make_graph(nodes, "g", x, [y], [w]))
    out, info = channels_last_tail(m)
    assert info["channels_last_tails"] == 0 and [n.op_type for n in out.graph.node] == [
        "Transpose",
        "Transpose",
        "Sum",
        "Conv",
    ]


def test_preprocess_takes_relative_paths_and_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    # pre-processing runs in a scratch cwd (onnxruntime drops files into the cwd): relative paths must
    # still name the user's files, and the scratch folder goes afterwards
    from onnx import TensorProto, helper, numpy_helper

    from vitshrink.quantize.steps import preprocess

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    said: list[str] = []
    model = preprocess(Path("m.onnx"), Path("out/pre.onnx"), onnx.load("m.onnx"), said.append)
    assert said == [] and [n.op_type for n in model.graph.node] == ["Conv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pre.onnx"]


@pytest.mark.parametrize("k", [3, 4, 5])
def test_sum_becomes_a_tree_of_adds(tmp_path: Path, k: int) -> None:
    from onnx import TensorProto, helper

    from vitshrink.quantize.fusions import sums_to_adds

    names = [f"x{i}" for i in range(k)]
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in names]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = helper.make_model(
        helper.make_graph([helper.make_node("Sum", names, ["y"])], "g", ins, [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    out, info = sums_to_adds(m)
    assert info["sums_as_adds"] == 1 and [n.op_type for n in out.graph.node] == ["Add"] * (k - 1)
    onnx.save(out, str(tmp_path / "t.onnx"))
    feeds = {n: np.full((2, 3), 10.0**i, np.float32) for i, n in enumerate(names)}
    got = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.array_equal(got[0], sum(feeds.values()))


def _attention_model(n: int, m: int, width: int, heads: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    ins = [
        helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, k, width])
        for t, k in (("q", n), ("k", m), ("v", m))
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, width])
    node = helper.make_node(
        "MultiHeadAttention", ["q", "k", "v"], ["y"], name="attn", domain="com.microsoft", num_heads=heads
    )
    return helper.make_model(
        helper.make_graph([node], "g", ins, [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )


def _attention_case(tmp_path: Path) -> tuple[Path, SimpleNamespace]:
    """A one-attention model on disk and the part of a quantize context the int8 builders read."""
    path = tmp_path / "attn.onnx"
    onnx.save(_attention_model(32, 8, 16, 2), str(path))
    ctx = SimpleNamespace(
        work=tmp_path,
        target="cpu",
        vit_aware=True,
        per_channel=True,
        reduce_range=False,
        calib_method="minmax",
    )
    ctx.path = lambda kind: tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}.onnx"  # a new file each build
    return path, ctx


@pytest.mark.parametrize("heads", [1, 2])
def test_int8_attention_matches_float_attention(tmp_path: Path, heads: int) -> None:
    # trained-like attention (each query close to one key): int8 products stay within a few percent
    from vitshrink.quantize.attention import attention_nodes, quantize_attention

    n, m, width = 64, 16, 8 * heads
    model = _attention_model(n, m, width, heads)
    q8, count = quantize_attention(model, attention_nodes(model))
    assert count == 1 and "MultiHeadAttention" not in [x.op_type for x in q8.graph.node]
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, m, width)).astype(np.float32)
    feeds = {
        "q": (2 * k[:, rng.integers(0, m, n)] + 0.5 * rng.standard_normal((1, n, width))).astype(np.float32),
        "k": k,
        "v": rng.standard_normal((1, m, width)).astype(np.float32),
    }
    sess = lambda mm: ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    ref, got = sess(model).run(None, feeds)[0], sess(q8).run(None, feeds)[0]
    assert got.shape == ref.shape == (1, n, width)
    assert 0 < np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05
    # all-zero keys and values (a dead head): zeros out, not 0 / 0
    zeros = {**feeds, "k": np.zeros_like(k), "v": np.zeros_like(k)}
    assert np.array_equal(sess(q8).run(None, zeros)[0], np.zeros_like(ref))
    # 7-bit k / v for x86 without VNNI (16-bit pair sums would saturate with full-range operands)
    for reduce, qmax in ((False, 127), (True, 63)):
        q, _ = quantize_attention(model, ["attn"], reduce_range=reduce)
        q.graph.output.extend([onnx.helper.make_tensor_value_info("attn_q8_k", onnx.TensorProto.INT8, None)])
        kq = sess(q).run(["attn_q8_k"], feeds)[0]
        assert np.abs(kq.astype(int)).max() == qmax
    # causal or masked attention is not what the rewrite computes: left alone
    causal = _attention_model(n, m, width, heads)
    causal.graph.node[0].attribute.append(onnx.helper.make_attribute("unidirectional", 1))
    assert attention_nodes(causal) == [] and quantize_attention(causal, ["attn"])[1] == 0
    # a second pass adds nothing; names it does not know are left alone
    assert quantize_attention(q8, ["attn"])[1] == 0 and quantize_attention(model, ["other"])[1] == 0


def test_int8_attention_is_a_fallback_unit(tmp_path: Path) -> None:
    # each attention node is a candidate of the int8 builders: kept float when excluded
    from vitshrink.quantize.builders import make_builder

    path, ctx = _attention_case(tmp_path)
    b = make_builder("int8-dynamic", path, ctx)
    assert b.attention == ["attn"] and "attn" in b.candidates
    ops = lambda p: [x.op_type for x in onnx.load(str(p)).graph.node]  # noqa: E731
    assert "MatMulIntegerToFloat" in ops(b.build())
    assert ops(b.build(excluded=["attn"])) == ["MultiHeadAttention"]
    ctx.target = "tensorrt"  # TensorRT builds never see onnxruntime's attention op rewritten
    assert make_builder("int8-static", path, ctx).attention == []


def test_residual_norm_runs_2d_outside_skip_layernorm(tmp_path: Path) -> None:
    # Add -> LayerNorm (sum used by the norm only) on 3-D tokens: onnxruntime would make it a
    # SkipLayerNormalization; rewritten 2-D it stays Add + LayerNorm, with the same output
    from onnx import TensorProto, helper, numpy_helper

    from vitshrink.quantize.fusions import residual_norms_2d

    shape = [1, 64, 8]
    ins = [helper.make_tensor_value_info(t, TensorProto.FLOAT, shape) for t in ("a", "b")]
    outs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, shape) for t in ("y", "z")]
    inits = [
        numpy_helper.from_array(np.linspace(0.5, 2, 8).astype(np.float32), "g"),
        numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"], name="ln", axis=-1, epsilon=1e-6),
        # a sum that is also used elsewhere keeps onnxruntime's fast fused form: left alone
        helper.make_node("Add", ["y", "b"], ["s2"], name="add2"),
        helper.make_node("LayerNormalization", ["s2", "g", "beta"], ["t"], name="ln2", axis=-1),
        helper.make_node("Add", ["t", "s2"], ["z"], name="add3"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", ins, outs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model = onnx.shape_inference.infer_shapes(model)
    new, info = residual_norms_2d(model)
    assert info == {"residual_norms_2d": 1}
    onnx.save(model, str(tmp_path / "before.onnx"))
    onnx.save(new, str(tmp_path / "after.onnx"))
    skips = ort_ops(tmp_path / "before.onnx").count("SkipLayerNormalization")
    assert skips >= 1 and ort_ops(tmp_path / "after.onnx").count("SkipLayerNormalization") == skips - 1
    assert [n for n in new.graph.node if n.name in ("add2", "ln2", "add3")] == list(model.graph.node)[2:]
    rng = np.random.default_rng(0)
    feeds = {t: rng.standard_normal(shape).astype(np.float32) for t in ("a", "b")}
    run_ = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    for ref, got in zip(run_(tmp_path / "before.onnx"), run_(tmp_path / "after.onnx")):
        assert got.shape == ref.shape and np.allclose(got, ref, atol=1e-5)


def test_int8_attention_leaves_no_unused_initializers() -> None:
    # onnxruntime warns about every initializer no node reads: one and several heads, both ranges
    from vitshrink.quantize.attention import quantize_attention

    for heads in (1, 2):
        for reduce in (False, True):
            q8, _ = quantize_attention(
                _attention_model(16, 4, 4 * heads, heads), ["attn"], reduce_range=reduce
            )
            read = {i for n in q8.graph.node for i in n.input}
            assert [i.name for i in q8.graph.initializer if i.name not in read] == []


@pytest.mark.parametrize("form", ["div", "mul"])
def test_erf_gelu_becomes_one_op(tmp_path: Path, form: str) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from vitshrink.quantize.fusions import fuse_gelu

    c = {"div": ("Div", 2**0.5), "mul": ("Mul", 2**-0.5)}[form]
    inits = [
        numpy_helper.from_array(np.array(c[1], np.float32), "c"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]

    def gelu(x: str, y: str, tag: str, one: str = "one") -> list[onnx.NodeProto]:
        return [
            helper.make_node(c[0], [x, "c"], [f"{tag}d"], name=f"{tag}d"),
            helper.make_node("Erf", [f"{tag}d"], [f"{tag}e"], name=f"{tag}e"),
            helper.make_node("Add", [f"{tag}e", one], [f"{tag}a"], name=f"{tag}a"),
            helper.make_node("Mul", [x, f"{tag}a"], [f"{tag}m"], name=f"{tag}m"),
            helper.make_node("Mul", [f"{tag}m", "half"], [y], name=f"{tag}h"),
        ]

    # the second is not a GELU (1 + erf is 2 + erf): left alone
    nodes = gelu("x", "y", "g") + gelu("y", "z", "n", one="two")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 8])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [z], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    new, info = fuse_gelu(model)
    assert info == {"gelu_fused": 1}
    assert [n.op_type for n in new.graph.node] == ["Gelu", c[0], "Erf", "Add", "Mul", "Mul"]
    feeds = {"x": np.linspace(-4, 4, 32, dtype=np.float32).reshape(4, 8)}
    sess = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    assert np.allclose(sess(new).run(None, feeds)[0], sess(model).run(None, feeds)[0], atol=1e-6)


@pytest.mark.parametrize(
    ("q_ms", "f_ms", "kept"), [(8.0, 10.0, "int8"), (9.9, 10.0, "float"), (12.0, 10.0, "float")]
)
def test_int8_attention_stays_only_where_it_is_faster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, q_ms: float, f_ms: float, kept: str
) -> None:
    # small maps: int8 attention's extra ops cost more than its products save; the float one stays
    from vitshrink.quantize import onnx_quant
    from vitshrink.quantize.builders import make_builder

    path, ctx = _attention_case(tmp_path)
    ctx.sample, ctx.base_metric, ctx.say = np.zeros(1), 1.0, lambda m: None
    ctx.metric = lambda p: 1.0
    timed: list[list[str]] = []
    monkeypatch.setattr(
        onnx_quant, "onnx_latencies_ms", lambda paths, sample: timed.append(paths) or [q_ms, f_ms]
    )
    b = make_builder("int8-dynamic", path, ctx)
    best = {"path": b.build(), "metric": 0.999, "fallback": {}, "builder": b, "latency_ms": None}
    chosen, info = onnx_quant._attention_choice(best, ctx, max_drop=0.005)
    assert info["kept"] == kept and (info["int8_ms"], info["float_ms"]) == (q_ms, f_ms)
    assert timed == [[best["path"], timed[0][1]]]  # the two variants, timed side by side
    ops = [n.op_type for n in onnx.load(str(chosen["path"])).graph.node]
    assert ("MultiHeadAttention" in ops) == (kept == "float")
    assert len(onnx_quant._quantized_attention(chosen)) == (1 if kept == "int8" else 0)


def test_builders_are_registered_under_the_declared_modes() -> None:
    # the int8 paths are chosen from a registry keyed by the modes vitshrink.options declares
    from vitshrink.options import QUANT_MODES
    from vitshrink.quantize.builders import BUILDERS, register_builder
    from vitshrink.quantize.fusions import FUSIONS

    assert set(BUILDERS) == {"int8-dynamic", "int8-static", "int8-mixed"} <= set(QUANT_MODES)
    assert all(cls.kind == mode for mode, cls in BUILDERS.items())
    with pytest.raises(ValueError, match="QUANT_MODES"):
        register_builder("int4")
    assert [f.key for f in FUSIONS if f.ort_only] == ["attention_fused", "gelu_fused"]
