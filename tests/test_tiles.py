"""Any input size on the deploy path: export size policy, dynamic height/width, sliding-window inference.

Small models and images only: the export tests use segformer-micro, the tiling tests a hand-built ONNX
graph whose logits are known in closed form.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch import nn

from vitshrink.deploy import OnnxModel, predict, tiling
from vitshrink.errors import ModelError
from vitshrink.export import export_onnx
from vitshrink.models import build_model, family_for, save_model

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def segformer_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model, meta = build_model("segformer-micro", task="segmentation", image_size=64, num_labels=5)
    d = tmp_path_factory.mktemp("segf") / "m"
    save_model(model, meta, d)
    return d


def test_dynamic_size_export_matches_pytorch_at_two_sizes(segformer_dir, tmp_path):
    out, r = export_onnx(segformer_dir, tmp_path / "d.onnx", image_size=256, dynamic_size=True)
    assert set(r["parity_sizes"]) == {"256x256", "384x384"}
    for size, p in r["parity_sizes"].items():
        assert p["max_abs_diff"] < 1e-4 and p["argmax_agreement"] >= 0.999, size
    assert r["image_size"] == [256, 256] and r["dynamic_size"] is True

    # independently: the runtime takes both sizes and agrees with PyTorch on an image-like input
    m = OnnxModel(out, threads=1)
    assert m.size == (256, 256) and m.size_multiple == 1
    model, _ = __import__("vitshrink.models", fromlist=["load_model"]).load_model(segformer_dir)
    wrapper = family_for(model).export_wrapper(model).eval()
    for hw in ((256, 256), (384, 384), (192, 320)):
        x = np.random.default_rng(1).standard_normal((1, 3, *hw)).astype(np.float32)
        with torch.no_grad():
            ref = wrapper(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(m.run(x), ref, atol=1e-4)

    # MACs follow the size the graph is benchmarked at: the export's count holds only at 256
    from vitshrink.bench import model_stats

    at_384 = model_stats(out, (384, 384))["macs"]
    assert at_384 == model_stats(segformer_dir, (384, 384))["macs"] > 2 * model_stats(out)["macs"]

    # a fixed-size export at another size
    out2, r2 = export_onnx(segformer_dir, tmp_path / "f.onnx", image_size="96x128")
    assert r2["image_size"] == [96, 128] and "parity_sizes" not in r2
    f = OnnxModel(out2)
    assert f.size == (96, 128) and f.size_multiple is None and not f.takes((128, 128))


def test_bare_hf_dir_without_size_is_one_line_error(tmp_path):
    import transformers as T

    from vitshrink.models.presets import PRESETS

    # what a user's plain save_pretrained gives: config.json (no image_size) + weights, no preprocessor
    cfg = T.SegformerConfig(**PRESETS["segformer-micro"].config, num_labels=3)
    T.SegformerForSemanticSegmentation(cfg).save_pretrained(tmp_path / "bare")
    assert "image_size" not in json.loads((tmp_path / "bare" / "config.json").read_text())
    with pytest.raises(ModelError, match="no input size known") as e:
        export_onnx(tmp_path / "bare", tmp_path / "b.onnx")
    assert "\n" not in str(e.value) and "--image-size" in str(e.value)
    assert not (tmp_path / "b.onnx").exists()
    _, r = export_onnx(tmp_path / "bare", tmp_path / "b.onnx", image_size=64)
    assert r["image_size"] == [64, 64] and r["max_abs_diff"] < 1e-4


def test_dynamic_size_refused_where_the_graph_freezes_it(tmp_path):
    model, meta = build_model("vit-micro", image_size=32, num_channels=3, num_labels=4)
    save_model(model, meta, tmp_path / "vit")
    with pytest.raises(ModelError, match="--dynamic-size is not supported for vit") as e:
        export_onnx(tmp_path / "vit", tmp_path / "v.onnx", dynamic_size=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="cannot run at 48x48"):  # position embeddings made for 32
        export_onnx(tmp_path / "vit", tmp_path / "v.onnx", image_size=48)


def test_dynamic_size_swin_at_window_multiples(tmp_path):
    """UperNet-Swin (the paper's teacher family): exact at multiples of patch x window x 2^(stages-1)
    from two multiples up (below that transformers clamps the last stage's window); refused elsewhere."""
    torch.manual_seed(0)
    model, meta = build_model("upernet-swin-micro", task="segmentation", image_size=128, num_labels=5)
    fam = family_for(model)
    assert fam.size_multiple(model.config) == 64 and fam.size_floor(model.config) == 128
    save_model(model, meta, tmp_path / "m")
    with pytest.raises(ModelError, match="exact from 128 px") as e:
        export_onnx(tmp_path / "m", tmp_path / "small.onnx", image_size=64, dynamic_size=True)
    assert "\n" not in str(e.value) and not (tmp_path / "small.onnx").exists()
    with pytest.raises(ModelError, match="multiples of 64"):
        export_onnx(tmp_path / "m", tmp_path / "odd.onnx", image_size=160, dynamic_size=True)
    out, r = export_onnx(tmp_path / "m", tmp_path / "d.onnx", dynamic_size=True)
    assert set(r["parity_sizes"]) == {"128x128", "192x192"}
    assert all(v["max_abs_diff"] < 1e-4 for v in r["parity_sizes"].values())
    m = OnnxModel(out)
    assert m.takes((128, 256)) and m.takes((192, 192))
    assert not m.takes((64, 64)) and not m.takes((160, 128))
    with pytest.raises(Exception, match="at least 128"):
        m.run(np.zeros((1, 3, 64, 64), np.float32))


# ----------------------------------------------------------------------------------------------- tiling


def _tile_mean_model(path: Path, c: float) -> Path:
    """logits[0] = the mean of the tile's first channel everywhere, logits[1] = c: per-pixel averages
    over overlapping tiles are then known in closed form."""
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, "H", "W"])
    init = [
        helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("s1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("c", TensorProto.FLOAT, [], [c]),
    ]
    nodes = [
        helper.make_node("Slice", ["pixel_values", "s0", "s1", "s1"], ["x0"]),
        helper.make_node("ReduceMean", ["x0"], ["m"], axes=[2, 3], keepdims=1),
        helper.make_node("Mul", ["x0", "zero"], ["z"]),
        helper.make_node("Add", ["z", "m"], ["l0"]),
        helper.make_node("Add", ["z", "c"], ["l1"]),
        helper.make_node("Concat", ["l0", "l1"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(nodes, "tilemean", [x], [y], init)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    meta = {
        "task": "segmentation",
        "class_names": ["mean", "const"],
        "preprocess": {"mean": [0.0], "std": [1.0], "size": [8, 8], "channels": 3, "size_multiple": 1},
    }
    helper.set_model_props(proto, {"vitshrink": json.dumps(meta)})
    onnx.save(proto, str(path))
    return path


def _gradient(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    r = ((xx * 11 + yy * 7) % 256).astype(np.uint8)
    return Image.fromarray(np.stack([r, r // 2, 255 - r], axis=2))


def test_tiles_cover_the_frame_like_mmseg():
    assert tiling.starts(14, 8, 4) == [0, 4, 6]  # the last tile moved back to end at the edge
    assert tiling.starts(20, 8, 4) == [0, 4, 8, 12]
    assert tiling.starts(8, 8, 6) == [0] and tiling.starts(5, 8, 6) == [0]
    p = tiling.plan((1536, 2048), (512, 512), overlap=0.25)
    assert p.stride == (384, 384) and p.rows == (0, 384, 768, 1024) and p.cols[-1] == 2048 - 512
    assert tiling.should_tile((1536, 2048), (512, 512)) and not tiling.should_tile((600, 800), (512, 512))


def test_overlap_averaging_on_a_known_model(tmp_path):
    img = _gradient(20, 14)
    px = np.asarray(img, np.float32) / 255.0
    tp = tiling.plan((14, 20), (8, 8), overlap=0.5)
    assert tp.rows == (0, 4, 6) and tp.cols == (0, 4, 8, 12)
    want = np.zeros((14, 20))
    cnt = np.zeros((14, 20))
    for y0 in tp.rows:
        for x0 in tp.cols:
            want[y0 : y0 + 8, x0 : x0 + 8] += px[y0 : y0 + 8, x0 : x0 + 8, 0].mean()
            cnt[y0 : y0 + 8, x0 : x0 + 8] += 1
    want /= cnt
    assert cnt.min() == 1 and cnt.max() == 6  # 1 to 6 tiles overlap (the last row moved back)
    c = float(np.median(want)) + 1e-4
    m = OnnxModel(_tile_mean_model(tmp_path / "tm.onnx", c), threads=1)

    avg = tiling.average(m._pixels(img), m.run, m._normalise, tp)
    np.testing.assert_allclose(avg[0], want, atol=1e-6)
    np.testing.assert_allclose(avg[1], c, atol=1e-6)
    for batch in (1, 3, 16):  # strip-by-strip reduction and tile batching give the same mask
        res = m.segment(img, mode="tile", tile=8, overlap=0.5, batch_size=batch)
        np.testing.assert_array_equal(res["mask"], (want <= c).astype(np.uint8))
    assert res["inference"]["tiles"] == 12 and res["inference"]["mode"] == "tiled"
    assert 0 < res["class_fractions"]["mean"] < 1
    # a frame smaller than the tile: one padded tile, logits cropped back
    small = m.segment(_gradient(6, 5), mode="tile", tile=8)
    assert small["mask"].shape == (5, 6) and small["inference"]["tiles"] == 1


class TinySeg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def fixed_seg(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fixed") / "seg.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TinySeg().eval(),
            torch.randn(1, 3, 40, 48),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(path))
    meta = {
        "task": "segmentation",
        "class_names": ["a", "b", "c", "d"],
        "preprocess": {"mean": [0.5] * 3, "std": [0.25] * 3, "size": [40, 48], "channels": 3},
    }
    helper.set_model_props(proto, {"vitshrink": json.dumps(meta)})
    onnx.save(proto, str(path))
    return path


def test_tiled_equals_plain_at_model_size_and_auto_choice(fixed_seg, tmp_path):
    m = OnnxModel(fixed_seg, threads=1)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    plain = m.predict([img])[0]
    tiled = m.segment(img, mode="tile")
    np.testing.assert_array_equal(tiled["mask"], plain["mask"])
    assert tiled["class_fractions"] == plain["class_fractions"] and tiled["inference"]["tiles"] == 1

    big = Image.fromarray(np.random.default_rng(4).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    auto = m.segment(big)  # 2.5x the model input both ways: tiled automatically, at full resolution
    assert auto["inference"]["mode"] == "tiled" and "2x the model input" in auto["inference"]["reason"]
    assert auto["mask"].shape == (100, 120)
    assert m.segment(big, mode="resize")["inference"]["mode"] == "resized"
    assert m.segment(img)["inference"]["mode"] == "resized"
    with pytest.raises(ModelError, match="cannot run 64x64 tiles"):
        m.segment(big, mode="tile", tile=64)

    # predict: the JSON says how each frame ran and how long it took; masks at the photo's size
    (tmp_path / "in").mkdir()
    big.save(tmp_path / "in" / "big.png")
    img.save(tmp_path / "in" / "small.png")
    rep = predict(fixed_seg, [tmp_path / "in"], out=tmp_path / "out", quiet=True)
    by = {Path(r["file"]).name: r for r in rep["results"]}
    assert by["big.png"]["inference"]["mode"] == "tiled" and by["small.png"]["inference"]["mode"] == "resized"
    assert all(r["latency_ms"] > 0 for r in rep["results"])
    assert Image.open(tmp_path / "out" / "big_mask.png").size == (120, 100)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "big_mask.png")), auto["mask"])
    rep = predict(fixed_seg, [tmp_path / "in" / "big.png"], quiet=True, mode="resize")
    assert rep["results"][0]["inference"]["mode"] == "resized"


# ----------------------------------------------------------------------------------------------- video


def _write_video(path: Path, frames: int, size: tuple[int, int], rate: int = 10) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            px = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(px, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def _read_video(path: Path) -> tuple[int, tuple[int, int]]:
    import av

    with av.open(str(path)) as c:
        frames = [f.to_image() for f in c.decode(video=0)]
    return len(frames), frames[0].size


def test_video_round_trip(fixed_seg, tmp_path):
    from vitshrink.deploy import predict_video

    _write_video(tmp_path / "flight.mp4", 12, (96, 80))
    rep = predict_video(fixed_seg, tmp_path / "flight.mp4", tmp_path / "out", threads=1, quiet=True)
    assert rep["frames_read"] == 12 and rep["frames_processed"] == 12
    assert _read_video(tmp_path / "out" / rep["overlay_video"]) == (12, (96, 80))
    lines = (tmp_path / "out" / "flight_frames.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 12 and first["frame"] == 0 and first["inference"] == "tiled"  # 2x the 48x40 input
    assert sum(first["class_fractions"].values()) == pytest.approx(1.0)
    assert rep["sustained_fps"] > 0 and (rep["peak_rss_mb"] is None or rep["peak_rss_mb"] > 10)
    assert json.loads((tmp_path / "out" / "flight_video.json").read_text()) == rep

    # keeping up with a feed: every 3rd frame; at most 5 of the 10 frames per second
    rep = predict_video(fixed_seg, tmp_path / "flight.mp4", tmp_path / "o3", every=3, quiet=True)
    assert rep["frames_processed"] == 4 and _read_video(tmp_path / "o3" / rep["overlay_video"])[0] == 4
    rep = predict_video(fixed_seg, tmp_path / "flight.mp4", tmp_path / "o5", max_fps=5, quiet=True)
    assert rep["frames_processed"] == 6 and rep["output_fps"] == 5

    # a folder of frames is a video too (odd sides lose a pixel: 4:2:0 needs even sides)
    (tmp_path / "frames").mkdir()
    for i in range(5):
        _gradient(51, 41).save(tmp_path / "frames" / f"{i:03d}.png")
    rep = predict_video(fixed_seg, tmp_path / "frames", tmp_path / "of", mode="resize", quiet=True)
    assert rep["frames_processed"] == 5
    assert _read_video(tmp_path / "of" / rep["overlay_video"]) == (5, (50, 40))


def test_int8_of_a_dynamic_size_graph_keeps_its_sizes(tmp_path, monkeypatch):
    """Calibrated at the deployed size (128) it is deployed at 128 (recorded), and still runs at other
    sizes with the same int8 error as at 128."""
    from vitshrink.quantize import quantize

    torch.manual_seed(0)
    model, meta = build_model("segformer-micro", task="segmentation", image_size=64, num_labels=14)
    save_model(model, meta, tmp_path / "m")
    src, _ = export_onnx(tmp_path / "m", tmp_path / "d.onnx", dynamic_size=True)
    opts = {"size": 128, "n_train": 4, "n_val": 8, "n_test": 4}
    cwd = tmp_path / "cwd"  # onnxruntime's shape inference dumps files into the working directory
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out, rep = quantize(
        src,
        tmp_path / "q.onnx",
        mode="int8-static",
        calib_data="aerial",
        data_options=opts,
        image_size=128,
        quiet=True,
    )
    f, q = OnnxModel(src, threads=1), OnnxModel(out, threads=1)
    assert q.size == (128, 128) and q.size_multiple == 1
    err = {}
    for hw in ((128, 128), (64, 192), (256, 256)):
        x = np.random.default_rng(2).standard_normal((1, 3, *hw)).astype(np.float32)
        a, b = f.run(x), q.run(x)
        assert b.shape == a.shape == (1, 14, *hw)
        err[hw] = np.abs(a - b).mean() / np.abs(a).mean()
    # a graph whose shapes were frozen at 128 would be far off elsewhere; int8 noise is the same at any size
    assert list(cwd.iterdir()) == []  # nothing left in the user's working directory
    assert max(err.values()) < 2 * err[(128, 128)] + 0.05, err
