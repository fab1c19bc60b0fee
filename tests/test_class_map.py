"""Segmentation graphs that end in a uint8 class map (--argmax) and run their network at a lower
resolution inside a graph that takes any photo size (--resolution). segformer-micro at 64 px only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from vitshrink.deploy import OnnxModel, trt_recipe
from vitshrink.deploy.runtime import cpu_session
from vitshrink.errors import ModelError, VitshrinkError
from vitshrink.export import export_onnx
from vitshrink.models import build_model, save_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    model, meta = build_model("segformer-micro", task="segmentation", image_size=64, num_labels=5)
    root = tmp_path_factory.mktemp("classmap")
    save_model(model, meta, root / "m")
    out = {"dir": root / "m"}
    for name, kw in {
        "logits": {},
        "ids": {"argmax": True},
        "inside64": {"resolution": 64},  # the native size: must match the plain path
        "inside32": {"resolution": 0.5, "argmax": True},
    }.items():
        out[name], _ = export_onnx(root / "m", root / f"{name}.onnx", **kw)
    return out


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def test_argmax_export_gives_the_class_map_of_the_logits(seg):
    logits, ids = cpu_session(seg["logits"]), cpu_session(seg["ids"])
    out = ids.get_outputs()[0]
    assert (out.name, out.type) == ("class_ids", "tensor(uint8)")
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal((1, 3, 64, 64)).astype(np.float32)
        want = logits.run(None, {"pixel_values": x})[0].argmax(1)
        got = ids.run(None, {"pixel_values": x})[0]
        assert got.dtype == np.uint8 and got.shape == (1, 64, 64)
        np.testing.assert_array_equal(got, want)

    # the runtime: same masks as from the logits model; tiling refused in one line, auto resizes
    a, b = OnnxModel(seg["logits"], threads=1), OnnxModel(seg["ids"], threads=1)
    assert b.class_ids and b.class_names == a.class_names
    photo = _photo(96, 80)
    np.testing.assert_array_equal(a.predict([photo])[0]["mask"], b.predict([photo])[0]["mask"])
    with pytest.raises(ModelError, match="class map"):
        b.segment(_photo(200, 200), "tile")
    res = b.segment(_photo(200, 200))
    assert res["inference"]["mode"] == "resized" and "argmax" in res["inference"]["reason"]
    assert res["mask"].shape == (200, 200)


def test_resized_inside_model_returns_masks_at_the_photos_size(seg):
    inside = OnnxModel(seg["inside32"], threads=1)
    assert inside.inner_size == (32, 32) and inside.size == (64, 64)
    for w, h in ((100, 80), (64, 64), (40, 56)):
        res = inside.segment(_photo(w, h))
        assert res["mask"].shape == (h, w) and res["mask"].dtype == np.uint8
        assert res["inference"]["input"] == [h, w] and res["inference"]["inner"] == [32, 32]
        assert inside.predict([_photo(w, h)])[0]["mask"].shape == (h, w)
    # a photo >= 2x the deployed size is shrunk on the host (antialiased) before the graph's bilinear
    assert inside.segment(_photo(160, 140))["inference"]["input"] == [64, 64]

    # at the native resolution the resized-inside graph is the plain one, pixel for pixel
    plain, same = OnnxModel(seg["logits"], threads=1), OnnxModel(seg["inside64"], threads=1)
    x = plain.preprocess(_photo(64, 64, seed=3))
    np.testing.assert_allclose(same.run(x), plain.run(x), atol=1e-5)
    for photo in (_photo(64, 64, seed=4), _photo(120, 90, seed=5)):
        p, s = plain.segment(photo, "resize")["mask"], same.segment(photo, "resize")["mask"]
        assert p.shape == s.shape == (photo.height, photo.width)
        if photo.size == (64, 64):
            np.testing.assert_array_equal(p, s)


def test_refusals_and_the_int8_class_map(seg, tmp_path):
    from vitshrink.quantize import quantize

    # int8: calibrated/scored on logits, then the class map appended; a class map cannot be quantized
    q, rep = quantize(seg["logits"], tmp_path / "q.onnx", mode="int8-dynamic", argmax=True, quiet=True)
    assert rep["output"] == "class_ids"
    assert cpu_session(q).get_outputs()[0].type == "tensor(uint8)"
    assert OnnxModel(q, threads=1).segment(_photo(70, 50))["mask"].shape == (50, 70)
    with pytest.raises(VitshrinkError, match="class map"):
        quantize(seg["ids"], tmp_path / "q2.onnx", mode="int8-dynamic", quiet=True)
    with pytest.raises(VitshrinkError, match="model directory"):
        quantize(seg["logits"], tmp_path / "q3.onnx", mode="int8-dynamic", resolution=32, quiet=True)

    vit, meta = build_model("vit-micro", task="classification", image_size=32, num_labels=3)
    with pytest.raises(ModelError, match="segmentation"):
        export_onnx(vit, tmp_path / "v.onnx", meta=meta, argmax=True)
    with pytest.raises(ModelError, match=r"\(0, 1\]"):
        export_onnx(seg["dir"], tmp_path / "r.onnx", resolution=1.5)


def test_trt_recipe_builds_int32_class_ids(seg, tmp_path):
    with pytest.warns(UserWarning, match="LayerNormalization"):  # the Nano's TensorRT 8.2: opset 17
        folder = trt_recipe(seg["ids"], tmp_path / "trt")
    copy = next(folder.glob("*_int32ids.onnx"))
    m = onnx.load(str(copy))
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
    runner = (folder / "run_engine.py").read_text()
    assert "CLASS_IDS = True" in runner and copy.name in (folder / "build_engine.sh").read_text()
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    got = cpu_session(copy).run(None, {"pixel_values": x})[0]
    np.testing.assert_array_equal(got, cpu_session(seg["ids"]).run(None, {"pixel_values": x})[0])


def test_eval_scores_a_class_map_like_its_logits():
    from vitshrink.evaluate import _Scorer

    logits = torch.randn(2, 4, 8, 8)
    targets = torch.randint(0, 4, (2, 16, 16))
    a, b = _Scorer("segmentation", list("abcd")), _Scorer("segmentation", list("abcd"))
    big = torch.nn.functional.interpolate(logits, size=(16, 16), mode="nearest")
    a.add(big, targets)
    b.add(logits.argmax(1).float(), targets)  # ids at 8 px: resized nearest to the 16 px masks
    assert a.result()["miou"] == b.result()["miou"]


def test_resolution_is_a_search_variable_of_the_quantize_and_export_stages():
    from vitshrink.compress.schedule import Tried, key, queue
    from vitshrink.compress.search import Space

    space = Space(
        students={"none": None}, prune_ratios=[0.0], quant_modes=["none", "int8"], resolutions=[None, 0.5]
    )
    (q,) = space.stages({"student": "none", "prune_ratio": 0.0, "quant": "int8", "resolution": 0.5})
    assert (q.kind, q.options["resolution"], q.options["mode"]) == ("quantize", 0.5, "int8")
    (e,) = space.stages({"student": "none", "prune_ratio": 0.0, "quant": "none", "resolution": 384})
    assert (e.kind, e.options) == ("export", {"resolution": 384})
    assert space.stages({"student": "none", "prune_ratio": 0.0, "quant": "none"}) == []

    # a distilled student learns at the size its network runs at inside the graph, which then runs it
    # there in pixels: 0.5 of a 512 px teacher is 256, and 0.3 rounds to the 32 px step (160)
    st = Space(
        students={"micro": {"student": "segformer-micro"}, "none": None},
        prune_ratios=[0.0],
        quant_modes=["int8"],
        resolutions=[None, 0.5, 0.3, "384x256"],
        base_size=512,
    )
    p = {"student": "micro", "prune_ratio": 0.0, "quant": "int8"}
    d, q = st.stages({**p, "resolution": 0.5})
    assert (d.kind, d.options["image_size"], q.options["resolution"]) == ("distill", 256, 256)
    assert st.stages({**p, "resolution": 0.3})[0].options["image_size"] == 160
    d, q = st.stages(p)  # the model's own size: trained at the teacher's
    assert "image_size" not in d.options and "resolution" not in q.options
    d, q = st.stages({**p, "resolution": "384x256"})  # not square: the student keeps its size
    assert "image_size" not in d.options and q.options["resolution"] == "384x256"
    (q,) = st.stages({**p, "student": "none", "resolution": 0.5})  # no student: nothing retrained
    assert q.options["resolution"] == 0.5

    # every (quant, resolution) pair is a candidate once; without resolutions the params are as before
    sizes = {"none": 1000}
    todo = queue(["none"], [0.0], ["int8"], {"latency_ms": 5}, 0.8, sizes, [], resolutions=[None, 0.5]).todo
    assert [p.get("resolution") for p in todo] == [None, 0.5]
    done = [Tried(0, todo[1], "complete", 0.8, {"latency_ms": -1.0})]
    left = queue(["none"], [0.0], ["int8"], {"latency_ms": 5}, 0.8, sizes, done, resolutions=[None, 0.5]).todo
    assert [key(p) for p in left] == [key(todo[0])]
    plain = queue(["none"], [0.0], ["int8"], {"latency_ms": 5}, 0.8, sizes, []).todo
    assert plain == [{"student": "none", "prune_ratio": 0.0, "quant": "int8", "extend": 0}]
