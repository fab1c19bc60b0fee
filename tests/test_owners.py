"""Shared concepts with one owner each: ONNX metadata, latency timing, ignore index / colours, batch helpers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import vitshrink
from vitshrink.batch import segmentation_ce
from vitshrink.bench import onnx_meta
from vitshrink.bench.timing import SPEED_TIE, round_robin_ms, seconds_per_item, time_ms, within_speed_tie
from vitshrink.deploy._meta import META_KEY, read_meta_props, read_onnx_meta, write_meta_props
from vitshrink.errors import ModelError
from vitshrink.labels import IGNORE_COLOUR, IGNORE_INDEX
from vitshrink.outputs import is_vitshrink_onnx
from vitshrink.quantize.files import copy_metadata, read_meta


def _identity(meta_value: str | None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["logits"])], "g", [x], [y])
    )
    if meta_value is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "vitshrink", meta_value
    return model


def _save(model: onnx.ModelProto, path):
    onnx.save(model, str(path))
    return path


def test_metadata_has_one_reader_and_one_error_behaviour(tmp_path):
    model = _identity(None)
    assert read_meta_props(model.metadata_props, "m") == {} and read_meta(model) is None
    write_meta_props(model.metadata_props, {"task": "classification", "n": np.int64(3)})
    write_meta_props(model.metadata_props, {"task": "classification", "n": np.int64(4)})  # replaces
    assert [p.key for p in model.metadata_props] == ["vitshrink"]
    assert read_meta(model) == {"task": "classification", "n": 4}
    copy = _identity(None)
    copy_metadata(model, copy, history={"stage": "quantize"})
    stamped = {"stage": "quantize", "version": vitshrink.__version__}  # every history entry names the version
    assert read_meta(copy)["history"] == [stamped] and "history" not in read_meta(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert onnx_meta(path)["n"] == 4 and read_onnx_meta(path) == read_meta(model)
    assert META_KEY == "vitshrink"
    # the output guard recognises vitshrink's ONNX by the same key (it used to spell it out itself)
    assert is_vitshrink_onnx(path) and not is_vitshrink_onnx(_save(_identity(None), tmp_path / "plain.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    assert not is_vitshrink_onnx(tmp_path / "junk.onnx")
    with pytest.raises(ModelError, match="not a valid ONNX file"):
        read_onnx_meta(tmp_path / "junk.onnx")
    # corrupt metadata: the same ModelError from every reader (it used to be None, or a bare JSONDecodeError)
    bad = _identity("{not json")
    onnx.save(bad, str(path))
    for read in (
        lambda: read_meta(bad),
        lambda: onnx_meta(path),
        lambda: read_onnx_meta(path),
        lambda: read_meta_props({"vitshrink": "[1"}, "x"),
    ):
        with pytest.raises(ModelError, match="metadata"):
            read()
    assert json.loads(json.dumps(read_meta_props({}, "x"))) == {}


def test_timing_helpers():
    calls = []
    assert len(time_ms(lambda: calls.append(1), 4)) == 4 and len(calls) == 4
    assert min(time_ms(lambda: time.sleep(0.01), 2)) >= 10  # wall-clock milliseconds of each call
    order = []
    slow, fast = (lambda: (order.append("s"), time.sleep(0.01))), (lambda: order.append("f"))
    times = round_robin_ms([slow, fast], runs=6, budget_s=0.0, warmup=1, min_runs=3)
    assert [len(t) for t in times] == [3, 3] and order == ["s", "f"] + ["s", "f"] * 3  # warm-up, then in turn
    assert min(times[0]) >= 10 and max(times[1]) < min(times[0])  # each call timed as itself
    # the pause between calls (for the previous runtime's threads to go idle) is not timed
    times = round_robin_ms([lambda: None], runs=3, budget_s=0.0, warmup=0, min_runs=3, gap_s=0.05)
    assert len(times[0]) == 3 and max(times[0]) < 25


def test_throughput_is_one_span_over_the_batches_after_a_warm_up():
    seen, syncs = [], []

    def step(x: list, y: None) -> None:
        seen.append(len(x))
        time.sleep(0.002 * len(x))

    batches = [([0] * 4, None), ([0] * 2, None), ([0] * 3, None)]
    s = seconds_per_item(step, batches, sync=lambda: syncs.append(1))
    assert seen == [4, 2, 3] and len(syncs) == 2  # first batch only warms up; a sync at each end
    assert 0.002 <= s < 0.02  # seconds per item over the 5 timed items
    seen.clear()
    seconds_per_item(step, batches[:1])
    assert seen == [4, 4]  # a single batch is timed again after its warm-up


def test_one_speed_tie():
    assert SPEED_TIE == 0.05
    assert within_speed_tie(10.5, 10.0) and not within_speed_tie(10.51, 10.0)


def test_one_peak_memory_reader(monkeypatch):
    import builtins

    from vitshrink import _proc

    hwm = _proc.peak_rss_mb()
    assert hwm is None or 10 < hwm < 1e6  # MiB: this python process, torch loaded
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise OSError("no /proc here")
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert _proc.peak_rss_mb() is None  # the deploy side reports "unknown"
    assert _proc.peak_rss_mb(rusage_fallback=True) > 10  # quantize falls back to getrusage


def test_task_metric_has_one_owner():
    """The headline metric of each task is written once (tasks.TASK_METRIC)."""
    import re
    from pathlib import Path

    from vitshrink.tasks import TASK_METRIC, TASKS

    assert tuple(TASK_METRIC) == TASKS == ("classification", "segmentation")
    root = Path(vitshrink.__file__).parent
    pattern = re.compile(r"""["']accuracy["']\s+if\b|["']classification["']\s*:\s*["']accuracy""")
    found = [str(p.relative_to(root)) for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert found == ["tasks.py"], found


def test_sessions_timed_in_turn_with_threads_do_not_spin():
    from vitshrink.deploy.runtime import session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(2, spin=False).get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError):  # unset: deployed sessions keep onnxruntime's default (spinning)
        session_options(2).get_session_config_entry(key)


def test_segmentation_ce_is_the_one_seg_loss():
    logits = torch.randn(2, 4, 4, 4)
    masks = torch.randint(0, 4, (2, 8, 8))
    masks[0, :2] = IGNORE_INDEX
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    want = F.cross_entropy(up, masks, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(segmentation_ce(logits, masks), want)
    assert float(segmentation_ce(logits, torch.full((2, 8, 8), IGNORE_INDEX))) == 0.0  # not NaN


def test_one_module_decides_the_colours():
    from vitshrink.data import aerial
    from vitshrink.deploy import PALETTE as DEPLOY_PALETTE
    from vitshrink.labels import AERIAL_PALETTE, PALETTE, palette_for
    from vitshrink.report import default_palette

    assert aerial.PALETTE is AERIAL_PALETTE and DEPLOY_PALETTE is PALETTE
    assert palette_for(14, "aerial") == list(AERIAL_PALETTE)
    assert palette_for(15, "aerial") == [tuple(c) for c in PALETTE[:15].tolist()]  # does not fit: generic
    assert palette_for(3) == default_palette(3) == [(230, 25, 75), (60, 180, 75), (255, 225, 25)]
    assert len(set(palette_for(255))) == 255 and tuple(IGNORE_COLOUR) not in palette_for(255)


def test_ignore_label_is_drawn_alike_everywhere():
    from vitshrink.data import aerial
    from vitshrink.deploy.predict import PALETTE
    from vitshrink.report import colorize

    mask = np.array([[0, IGNORE_INDEX]], np.uint8)
    assert colorize(mask, [(10, 20, 30)])[0, 1].tolist() == list(IGNORE_COLOUR)
    assert aerial.colorize(mask)[0, 1].tolist() == list(IGNORE_COLOUR)
    assert PALETTE[IGNORE_INDEX].tolist() == list(IGNORE_COLOUR)


def test_evaluate_does_not_import_train():
    code = "import sys, vitshrink.evaluate; sys.exit('vitshrink.train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- stages ask the family ------------------------------------------------------------------------------
_STAGES = ("prune", "distill", "compress", "export", "quantize", "train.py", "evaluate.py")


def _stage_sources() -> list:
    from pathlib import Path

    root = Path(vitshrink.__file__).parent
    files = []
    for stage in _STAGES:
        path = root / stage
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_no_stage_names_a_family():
    """Family knowledge lives in models/families: no stage holds a family's name, model type or preset."""
    import io
    import tokenize

    from vitshrink.models.families import all_presets, families

    names = {f.name for f in families()} | {t for f in families() for t in f.model_types}
    presets = set(all_presets())
    found = []
    for path in _stage_sources():
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type != tokenize.STRING or tok.string[:1] not in "'\"":
                continue
            text = tok.string.strip("'\"")
            if text.lower() in names or text in presets:
                found.append(f"{path.name}:{tok.start[0]} {tok.string}")
    assert not found, found


def test_stages_take_logits_from_the_family():
    """`model(pixel_values=x).logits` is the family's hook (Family.model_logits / logits), nowhere else."""
    import re

    pattern = re.compile(r"pixel_values=[^()]*\)\s*\.logits")
    found = [str(p) for p in _stage_sources() if pattern.search(p.read_text())]
    assert not found, found


def test_one_segmentation_cross_entropy():
    """Cross-entropy with the ignore index is written once (batch.segmentation_ce)."""
    from pathlib import Path

    root = Path(vitshrink.__file__).parent
    users = [str(p.relative_to(root)) for p in root.rglob("*.py") if "ignore_index=" in p.read_text()]
    assert users == ["batch.py"], users
