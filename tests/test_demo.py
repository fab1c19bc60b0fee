"""`vitshrink demo --quick`, the README's first command, end to end on both tasks (~2 min on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

from vitshrink.demo import demo

from .conftest import needs_fmnist

STAGES = ["teacher", "distill", "prune", "fp16", "int8"]
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
        teacher, distilled, pruned, _, int8 = r["stages"]
        # the compression is real: fewer parameters at every structural stage, a much smaller file
        assert teacher["params"] > distilled["params"] > pruned["params"] == int8["params"]
        assert int8["size_mb"] < teacher["size_mb"] / 4 and int8["size_mb"] < pruned["size_mb"]
        assert abs(int8[metric] - pruned[metric]) < 0.02  # int8 keeps the pruned model's quality
        for f in ("report.md", "report.html", "pareto.png", "summary.txt"):
            assert (path.parent / f).stat().st_size > 0, f
    cls = json.loads(res["classification"].read_text())["stages"]
    assert cls[-1]["accuracy"] >= 0.6  # quick budget on real Fashion-MNIST (measured 0.77)
