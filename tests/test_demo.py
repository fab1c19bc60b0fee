"""`vitshrink demo --quick`, the README's first command, end to end on both tasks (~2 min on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

from vitshrink.compress.recipe import RecipeError
from vitshrink.compress.stages import KINDS, stage_label
from vitshrink.demo import TASKS, configs, demo, load_demo

from .conftest import needs_fmnist

STAGES = ["teacher", "distill", "baseline", "prune", "fp16", "int8"]
KEYS = {"name", "artifact", "dice", "latency_ms", "peak_rss_mb", "size_mb", "params", "macs"}


@needs_fmnist
def test_quick_demo_runs_every_stage_and_writes_its_results(tmp_path):
    res = demo(task="all", out=tmp_path / "out", quick=True, quiet=True)
    assert set(res) == {"classification", "segmentation"}
    for task, path in res.items():
        r = json.loads(path.read_text())
        metric = "accuracy" if task == "classification" else "miou"
        assert r["task"] == task and [s["name"] for s in r["stages"]] == STAGES
        for s in r["stages"]:
            assert (KEYS - {"dice"} if task == "classification" else KEYS) <= set(s), s.keys()
            assert {"p50", "p90", "p99"} <= set(s["latency_ms"]) and 0 <= s[metric] <= 1
            assert Path(s["artifact"]).exists(), s["artifact"]  # every stage's artifact is kept
        teacher, distilled, baseline, pruned, _, int8 = r["stages"]
        # the CNN baseline: trained beside the pipeline (pruning starts from the distilled student),
        # for the distillation's wall-clock time, and the report says which one wins
        assert baseline["kind"] == "baseline" and baseline["seconds"] > 0
        assert "CNN baseline" in (path.parent / "report.md").read_text()
        assert r["final_source"] == int8["artifact"]
        # the compression is real: fewer parameters at every structural stage, a much smaller file
        assert teacher["params"] > distilled["params"] > pruned["params"] == int8["params"]
        assert int8["size_mb"] < teacher["size_mb"] / 4 and int8["size_mb"] < pruned["size_mb"]
        assert abs(int8[metric] - pruned[metric]) < 0.02  # int8 keeps the pruned model's quality
        for f in ("report.md", "report.html", "pareto.png", "summary.txt"):
            assert (path.parent / f).stat().st_size > 0, f
    cls = json.loads(res["classification"].read_text())["stages"]
    assert cls[-1]["accuracy"] >= 0.6  # quick budget on real Fashion-MNIST (measured 0.77)


# Teacher cache keys of the demo before it became recipes (main at 6acda60): a cached teacher must
# still be found, so these may only change when the teacher's training really changes.
TEACHER_KEYS = {
    # (quick, native bf16): (classification, segmentation)
    (True, False): ("375e174be9", "be2a58b900"),
    (True, True): ("375e174be9", "4337262c9e"),
    (False, False): ("6c5cfd76a8", "9cd8c6b167"),
    (False, True): ("6c5cfd76a8", "d09e0cd738"),
}


@pytest.mark.parametrize("quick,bf16", sorted(TEACHER_KEYS))
def test_demo_recipes_keep_the_teacher_cache_keys_and_resolve_per_budget_and_machine(quick, bf16):
    with (
        mock.patch("vitshrink.train.native_bf16_cpu", return_value=bf16),
        mock.patch("torch.cuda.is_available", return_value=False),
    ):
        specs = configs(quick)
    assert tuple(specs[t].key() for t in TASKS) == TEACHER_KEYS[(quick, bf16)]
    cls, seg = specs["classification"], specs["segmentation"]
    # every demo stage is a compress recipe stage, run by the compress runner
    assert all(s.kind in KINDS for sp in specs.values() for s in sp.recipe.stages)
    assert [stage_label(s) for s in cls.recipe.stages] == STAGES[1:]
    assert cls.stage("distill")["epochs"] == (2 if quick else 6) and cls.eval_limit == (
        2000 if quick else None
    )
    assert seg.data_options["n_train"] == (240 if quick else 800) and seg.bench["runs"] == (
        10 if quick else 30
    )
    # machine-dependent: bf16 teacher training where native, and an online teacher where it is fast
    assert seg.teacher.amp == ("on" if bf16 else "auto") and seg.stage("distill")["cache_teacher"] is not bf16


def test_demo_recipe_conditions_are_checked(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text(
        "task: classification\ndata: fashion-mnist\n"
        "teacher: {model: vit-mini, epochs: 1, lr: 1.0e-3, batch_size: 8}\n"
        "stages: [{distill: {student: vit-micro, epochs: {native_bf16: 2}}}]\n"
    )
    with mock.patch("vitshrink.train.native_bf16_cpu", return_value=False):
        with pytest.raises(RecipeError, match="no condition of \\['native_bf16'\\] holds here"):
            load_demo(bad, quick=True)
        bad.write_text(bad.read_text().replace("{native_bf16: 2}", "{quick: 2, full: 0}"))
        with pytest.raises(RecipeError, match="'epochs' must be > 0"):
            load_demo(bad, quick=False)  # the chosen value is validated like any recipe value
        assert load_demo(bad, quick=True).stage("distill")["epochs"] == 2
