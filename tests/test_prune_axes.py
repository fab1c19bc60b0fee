"""`prune --granularity auto`: the axis subset whose one-shot pruning changes the outputs least."""

from __future__ import annotations

import json

import pytest
import torch

from vitshrink.errors import VitshrinkError
from vitshrink.models import build_model, load_model, save_model
from vitshrink.prune import prune
from vitshrink.prune.axes import axis_groups, choose_axes
from vitshrink.prune.core import count_params
from vitshrink.prune.target import pruned_architecture

torch.set_num_threads(1)


def test_choose_axes_meets_the_budget_and_ranks_by_output_kl():
    torch.manual_seed(0)
    net, _ = build_model("segformer-micro", image_size=32, num_channels=3, num_labels=5)
    net.eval()
    assert axis_groups(net) == [("heads", "embed"), ("mlp",), ("channels",)]
    x = torch.randn(1, 3, 32, 32)
    samples = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    target = count_params(pruned_architecture(net, 0.25))
    gran, ratio, rows = choose_axes(net, x, samples, target_params=target)
    assert rows and list(gran) == rows[0]["granularity"] and ratio == rows[0]["ratio"]
    assert [r["kl"] for r in rows] == sorted(r["kl"] for r in rows)
    for r in rows:
        assert 0.85 * target <= r["params"] <= target and r["kl"] >= 0, r
    with pytest.raises(VitshrinkError, match="no set of pruning axes"):
        choose_axes(net, x, samples, target_params=10)


def test_prune_granularity_auto_records_the_choice(tmp_path):
    net, meta = build_model("vit-micro", image_size=16, num_channels=1, num_labels=3, hidden_size=32)
    save_model(net, meta, tmp_path / "m")
    out, m = prune(tmp_path / "m", tmp_path / "p", ratio=0.5, granularity="auto", quiet=True)
    back, _ = load_model(out)
    assert m["params_after"] == count_params(back) < count_params(net)
    rec = json.loads((out / "vitshrink.json").read_text())["history"][-1]["options"]
    assert rec["axes"] == {"granularity": "auto", "ratio": 0.5}
    assert rec["granularity"] == m["axes_candidates"][0]["granularity"]
    with pytest.raises(VitshrinkError, match="granularity 'auto' needs"):
        prune(tmp_path / "m", tmp_path / "q", target_macs=1000, granularity="auto", quiet=True)
