"""The run report: tables and ratios from known numbers, self-contained HTML, plots, real browser render."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitshrink.report as report_mod
from vitshrink.errors import DataError, VitshrinkError
from vitshrink.report import colorize, compare, load_results, pareto_front, report, save_example_panel
from vitshrink.report.plots import per_class_series
from vitshrink.report.screenshot import dump_dom, find_chromium, screenshot

PALETTE = [(0, 0, 255), (0, 200, 0), (255, 0, 0)]
FRONT_FILL = (230, 155, 165)  # plots.FRONT_COLOUR #d1495b at alpha 0.55 over white


def _count_colour(arr: np.ndarray, rgb, tol: int = 12) -> int:
    return int((np.abs(arr - np.array(rgb)).sum(axis=2) < tol).sum())


def _stage(name, metric, p50, size, params, macs, **extra):
    return {
        "name": name,
        "artifact": f"{name}/model.onnx",
        **metric,
        "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.25},
        "throughput": 1000.0 / p50,
        "peak_rss_mb": 100.0 + size,
        "size_mb": size,
        "params": params,
        "macs": macs,
        **extra,
    }


def _png(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path.name


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cls")
    # Front: teacher, fp16, int8. distill is dominated by fp16 (slower, same accuracy); prune by int8.
    stages = [
        _stage("teacher", {"accuracy": 0.90}, 20.0, 80.0, 20_000_000, 4_000_000_000),
        _stage("distill", {"accuracy": 0.89}, 10.0, 40.0, 10_000_000, 2_000_000_000),
        _stage("prune", {"accuracy": 0.86}, 8.0, 30.0, 7_500_000, 1_500_000_000),
        _stage("fp16", {"accuracy": 0.89}, 9.0, 20.0, 10_000_000, 2_000_000_000),
        _stage("int8", {"accuracy": 0.88}, 5.0, 10.0, 10_000_000, None, notes="dynamic | per-channel"),
    ]
    rng = np.random.default_rng(0)
    img = _png(d / "examples" / "0_image.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    results = {
        "task": "classification",
        "metric": "accuracy",
        "device": {"name": "test-cpu", "threads": 1},
        "class_names": ["cat", "dog"],
        "stages": stages,
        "extra_key": "ignored",
        "examples": [
            {
                "image": f"examples/{img}",
                "caption": "a cat",
                "labels": {"ground_truth": "cat", "teacher": "cat", "compressed": "dog"},
            }
        ],
    }
    (d / "results.json").write_text(json.dumps(results))
    return d


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("seg")
    classes = ["sky", "road", "car"]
    stages = [
        _stage(
            "teacher",
            {"miou": 0.60, "dice": 0.70, "per_class_iou": {"sky": 0.9, "road": 0.6, "car": 0.3}},
            40.0,
            100.0,
            30_000_000,
            8_000_000_000,
        ),
        _stage(
            "int8",
            {"miou": 0.55, "dice": 0.66, "per_class_iou": {"sky": 0.88, "road": 0.55, "car": 0.22}},
            10.0,
            25.0,
            15_000_000,
            4_000_000_000,
        ),
    ]
    mask = np.zeros((32, 32), np.uint8)
    mask[16:, :] = 1
    mask[20:28, 8:20] = 2
    mask[:2, :2] = 255
    ex = {"caption": "street"}
    ex["image"] = "examples/" + _png(d / "examples" / "0_image.png", np.full((32, 32, 3), 128, np.uint8))
    for role in ("ground_truth", "teacher", "compressed"):
        ex[role] = "examples/" + _png(d / "examples" / f"0_{role}.png", colorize(mask, PALETTE))
    results = {
        "task": "segmentation",
        "metric": "miou",
        "class_names": classes,
        "stages": stages,
        "examples": [ex],
    }
    (d / "results.json").write_text(json.dumps(results))
    return d


@pytest.fixture(scope="module")
def cls_out(cls_run) -> dict[str, Path]:
    return report(cls_run, quiet=True)


@pytest.fixture(scope="module")
def seg_out(seg_run) -> dict[str, Path]:
    return report(seg_run, quiet=True)


# ------------------------------------------------------------------------------------------------ numbers


def test_pareto_front_known_points():
    # (latency, metric): 1 dominates 2 (faster, better); 3 ties 0 on metric but is slower.
    pts = [(5.0, 0.8), (10.0, 0.9), (12.0, 0.85), (6.0, 0.8), (20.0, 0.95)]
    assert pareto_front(pts) == [0, 1, 4]
    assert pareto_front([(1.0, 0.5)]) == [0]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # identical points do not dominate each other


def test_compare_ratios(cls_run):
    res = load_results(cls_run)
    comps = compare(res.stages)
    int8 = comps[-1]
    assert int8.speedup == pytest.approx(4.0)
    assert int8.size_reduction == pytest.approx(8.0)
    assert int8.params_reduction == pytest.approx(2.0)
    assert int8.metric_delta == pytest.approx(-0.02)
    assert int8.score == pytest.approx(0.88 / 5.0)
    assert int8.score_ratio == pytest.approx((0.88 / 5.0) / (0.90 / 20.0))
    assert [c.pareto for c in comps] == [True, False, False, True, True]
    assert comps[0].speedup == 1.0 and comps[0].metric_delta == 0.0


# ------------------------------------------------------------------------------------------------ markdown


def test_markdown_tables_classification(cls_out, cls_run):
    assert set(cls_out) == {"markdown", "html", "pareto"}
    md = cls_out["markdown"].read_text()
    # Stage table: the metric as %, latencies, sizes, params; MACs missing -> dash. Front rows in bold.
    assert "| **int8** | 88.00% | 5.00 | 5.50 | 6.25 | 200.0 | 110.0 | 10.0 | 10.00 M | — |" in md
    assert "| **teacher** | 90.00% | 20.00 | 22.00 | 25.00 | 50.0 | 180.0 | 80.0 | 20.00 M | 4.00 G |" in md
    assert "| distill | 89.00% | 10.00 |" in md  # dominated: not bold
    # Versus table: speed-up, size x, params x, delta, score, score ratio, Pareto.
    assert "| **int8** | 4.00× | 8.00× | 2.00× | -2.00 pp | 0.1760 | 3.91× | yes |" in md
    assert "| **teacher** | 1.00× | 1.00× | 1.00× | +0.00 pp | 0.04500 | 1.00× | yes |" in md
    assert "| prune | 2.50× | 2.67× | 2.67× | -4.00 pp | 0.1075 | 2.39× |  |" in md
    assert "![Accuracy vs latency](pareto.png)" in md
    assert "![example 0 Input](examples/0_image.png)" in md
    assert "`cat` ✓" in md and "`dog` ✗" in md and "a cat" in md
    assert "dynamic \\| per-channel" in md  # a '|' in notes must not break the list/table
    assert "Per-class IoU" not in md  # classification has none
    # Every file lands atomically: no temp leftovers in the run directory.
    assert not [p.name for p in cls_run.iterdir() if p.name.startswith(".")]


def test_markdown_segmentation(seg_out):
    assert set(seg_out) == {"markdown", "html", "pareto", "per_class_iou"}
    md = seg_out["markdown"].read_text()
    assert "| Stage | mIoU | Dice | p50 (ms) |" in md
    # 40/10 = 4x faster, 100/25 = 4x smaller, 30M/15M = 2x params, -5 pp mIoU, -4 pp Dice,
    # score 0.55/10 = 0.055 vs 0.6/40 = 0.015 -> 3.67x.
    assert "| **int8** | 4.00× | 4.00× | 2.00× | -5.00 pp | -4.00 pp | 0.05500 | 3.67× | yes |" in md
    assert "| Class | teacher | int8 | Δ (int8 − teacher) |" in md
    assert "| car | 30.00% | 22.00% | -8.00 pp |" in md
    assert md.index("| sky |") < md.index("| road |") < md.index("| car |")  # dataset order
    assert "![Per-class IoU](per_class_iou.png)" in md
    assert "![example 0 Ground truth](examples/0_ground_truth.png)" in md


# ------------------------------------------------------------------------------------------------ html


def _check_self_contained(page: str) -> None:
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page
    assert "Content-Security-Policy" in page  # the browser itself would refuse any external fetch
    for src in re.findall(r'src="([^"]*)"', page):
        assert src.startswith("data:image/"), src[:40]


def test_html_self_contained_classification(cls_out):
    page = cls_out["html"].read_text()
    _check_self_contained(page)
    imgs = re.findall(r"<img [^>]*>", page)
    assert any('class="pareto"' in t and 'id="pareto"' in t for t in imgs)
    assert sum('class="example"' in t for t in imgs) == 1
    # The embedded Pareto plot is byte-identical to pareto.png.
    m = re.search(r'<img class="pareto"[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert base64.b64decode(m.group(1)) == cls_out["pareto"].read_bytes()
    assert "3.91×" in page and '<td class="neg">-2.00 pp</td>' in page
    assert '<tr class="front"><td>int8</td>' in page and "<tr><td>distill</td>" in page
    assert "dynamic | per-channel" in page
    assert '<div class="pred-label wrong">dog ✗</div>' in page and '<div class="pred-label">cat</div>' in page


def test_html_self_contained_segmentation(seg_out):
    page = seg_out["html"].read_text()
    _check_self_contained(page)
    assert len(re.findall(r'<img class="per-class-iou"', page)) == 1
    assert len(re.findall(r'<img class="example"', page)) == 4
    assert "-8.00 pp" in page


# ------------------------------------------------------------------------------------------------ plots


def test_plots_are_real_pngs(cls_out, seg_out):
    for path in (cls_out["pareto"], seg_out["pareto"], seg_out["per_class_iou"]):
        with Image.open(path) as im:
            assert im.format == "PNG"
            w, h = im.size
            arr = np.asarray(im.convert("RGB"))
        assert w > 300 and h > 200
        assert arr.std() > 10  # something was drawn
    # Front markers are filled with the front colour.
    arr = np.asarray(Image.open(cls_out["pareto"]).convert("RGB")).astype(int)
    assert _count_colour(arr, FRONT_FILL) > 500


def test_colorize_and_panel(tmp_path):
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    out = colorize(mask, PALETTE)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [0, 0, 255] and out[1, 0].tolist() == [255, 0, 0]
    assert out[1, 1].tolist() == [0, 0, 0]  # ignore -> black
    with pytest.raises(DataError, match="class id 3"):
        colorize(np.array([[3]]), PALETTE)
    with pytest.raises(DataError, match="2-D"):
        colorize(np.zeros((2, 2, 3), np.uint8), PALETTE)

    big = np.zeros((64, 64), np.uint8)
    big[32:] = 2
    img = np.linspace(0, 1, 64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)  # float [0, 1] accepted
    panel = tmp_path / "panel.png"
    save_example_panel(
        panel, img, {"ground truth": big, "compressed": big}, PALETTE, class_names=["a", "b", "c"]
    )
    arr = np.asarray(Image.open(panel).convert("RGB")).astype(int)
    h, w = arr.shape[:2]
    assert w > 2 * h  # three panels side by side
    for colour in (PALETTE[0], PALETTE[2]):  # both mask classes appear in their palette colours
        assert (np.abs(arr - np.array(colour)).sum(axis=2) < 6).sum() > 200
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_per_class_many_classes_and_missing_example(tmp_path):
    classes = [f"c{i}" for i in range(30)]
    rng = np.random.default_rng(0)
    stages = [
        {
            "name": n,
            "miou": 0.5,
            "latency_ms": {"p50": p},
            "per_class_iou": {c: float(rng.uniform()) for c in classes},
        }
        for n, p in (("teacher", 30.0), ("distill", 20.0), ("int8", 10.0))
    ]
    obj = {
        "task": "segmentation",
        "class_names": classes,
        "stages": stages,
        "examples": [{"image": "gone.png"}],
    }
    with pytest.warns(UserWarning, match="gone.png"):
        out = _report_of(tmp_path, obj)
    res = load_results(tmp_path)
    # 30 classes: horizontal bars (taller than wide) comparing only the first and last stage.
    assert [s.name for s in per_class_series(res.stages, len(classes))] == ["teacher", "int8"]
    with Image.open(out["per_class_iou"]) as im:
        assert im.size[1] > im.size[0]
    # The table still lists every stage; a missing example image is flagged, not fatal.
    assert "| Class | teacher | distill | int8 | Δ (int8 − teacher) |" in out["markdown"].read_text()
    assert '<span class="missing">missing: gone.png</span>' in out["html"].read_text()


def _report_of(d: Path, obj) -> dict[str, Path]:
    (d / "results.json").write_text(json.dumps(obj))
    return report(d, quiet=True)


# ------------------------------------------------------------------------------------------------ errors


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _write(d: Path, obj) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return d


def test_errors(tmp_path):
    with pytest.raises(VitshrinkError) as e:
        report(tmp_path / "nope", quiet=True)
    assert "not found" in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        report(tmp_path / "empty", quiet=True)
    assert "no results.json" in _one_line(e)
    with pytest.raises(DataError) as e:
        report(_write(tmp_path / "corrupt", '{"task": "classif'), quiet=True)
    assert "corrupt" in _one_line(e)
    ok = {"task": "classification", "stages": [{"name": "t", "accuracy": 0.9, "latency_ms": {"p50": 1.0}}]}
    cases = {
        "task": ({**ok, "task": "detection"}, "'task' must be one of"),
        "stages": ({**ok, "stages": []}, "non-empty list"),
        "metric": (
            {**ok, "stages": [{"name": "t", "latency_ms": {"p50": 1.0}}]},
            "stage 0 ('t') accuracy is missing",
        ),
        "percent": (
            {**ok, "stages": [{"name": "t", "accuracy": 90, "latency_ms": {"p50": 1}}]},
            "not percentages",
        ),
        "latency": (
            {**ok, "stages": [{"name": "t", "accuracy": 0.9, "latency_ms": {"p50": 0}}]},
            "must be > 0",
        ),
    }
    for name, (obj, msg) in cases.items():
        with pytest.raises(DataError) as e:
            report(_write(tmp_path / name, obj), quiet=True)
        assert msg in _one_line(e), name
    # The minimal valid file reports (missing optional fields show as dashes), through the callable module.
    out = report_mod(_write(tmp_path / "ok", ok), quiet=True)
    assert "| **t** | 90.00% | 1.00 | — | — | — | — | — | — |" in out["markdown"].read_text()


# ------------------------------------------------------------------------------------------------ browser


def test_screenshot_without_browser(tmp_path, monkeypatch, cls_out):
    monkeypatch.setenv("VITSHRINK_CHROMIUM", str(tmp_path / "no-such-browser"))
    with pytest.raises(VitshrinkError, match="no Chromium found"):
        screenshot(cls_out["html"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="chromium binary not found on PATH")


@needs_chromium
def test_browser_renders_report(seg_out, tmp_path):
    dom = dump_dom(seg_out["html"])
    assert re.search(r'<img class="pareto" id="pareto"', dom)
    assert re.search(r'<img class="per-class-iou" id="per-class-iou"', dom)
    assert len(re.findall(r'<img class="example"', dom)) == 4
    assert "<table>" in dom

    png = screenshot(seg_out["html"], tmp_path / "shot.png", width=1200, height=1600)
    assert png.stat().st_size > 10_000
    with Image.open(png) as im:
        assert im.size == (1200, 1600)
        arr = np.asarray(im.convert("RGB")).astype(int)
    assert arr.std() > 20  # not a blank page
    # The Pareto markers' fill shows on screen, so the embedded image really rendered (a broken image
    # shows only its alt text, with no such pixels).
    assert _count_colour(arr, FRONT_FILL) > 500
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_search_rows_show_each_resolution_tried():
    """compress --budget with search resolutions: per size inside the graph, its best and fastest trial."""
    from vitshrink.report.render import _search_rows

    def trial(n, res, miou, ms):
        return {"number": n, "params": {"resolution": res, "quant": "int8"}, "metric": miou, "p50": ms}

    s = {
        "trials": [
            trial(0, None, 0.41, 32.0),
            trial(1, 384, 0.40, 23.0),
            trial(2, 384, 0.39, 21.0),
            trial(3, None, 0.40, 30.0),
        ]
    }
    rows = dict(_search_rows(s, "mIoU"))
    assert rows["resolution the model's own"] == (
        "best mIoU 0.4100 at 32.00 ms (trial 0); fastest 30.00 ms at mIoU 0.4000 (trial 3); 2 trial(s)"
    )
    assert rows["resolution 384"].startswith("best mIoU 0.4000 at 23.00 ms (trial 1); fastest 21.00 ms")
    # one size only (or none searched): no per-resolution rows
    one = {"trials": [trial(0, None, 0.4, 1.0), trial(1, None, 0.3, 0.5)]}
    assert not any(k.startswith("resolution") for k, _ in _search_rows(one, "mIoU"))
