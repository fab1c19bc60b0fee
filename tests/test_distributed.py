"""`vitshrink train` / `distill` under torchrun: 2 CPU processes (gloo) against 1 process.

With augmentation off, 2 ranks x batch 16 see exactly the samples 1 process x batch 32 sees (the shards
are perm[rank::2] of the same permutation) and DDP averages their gradients, so the two runs must end at
the same weights up to float summation order, and the same accuracy. Only rank 0 logs and writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitshrink.cli import main
from vitshrink.models import load_model

from .conftest import needs_fmnist

SRC = Path(__file__).resolve().parents[1] / "src"
COMMON = [
    "--data",
    "fashion-mnist",
    "--limit",
    "3000",
    "--epochs",
    "1",
    "--lr",
    "1e-3",
    "--no-augment",
    "--quiet",
]
# Measured (vit-micro, 3000 Fashion-MNIST images, one epoch, global batch 32): 1 process 0.364 val accuracy,
# 2 processes 0.364; chance is 0.10. Max |weight difference| 7e-5 (train) and 2e-4 (distill).
ACCURACY_FLOOR = 0.25
ACCURACY_TOL = 0.01
WEIGHT_TOL = 2e-3

pytestmark = needs_fmnist


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the torchrun ranks run with OMP_NUM_THREADS=1 too
    yield
    torch.set_num_threads(before)


def _torchrun(args: list[str], *, module: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "VITSHRINK_QUIET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "vitshrink.cli", *args] if module else args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _metrics(model_dir: Path) -> dict:
    return json.loads((model_dir / "vitshrink.json").read_text())["history"][-1]["metrics"]


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _check_rank0_outputs(parent: Path, name: str, stdout: str) -> None:
    """One model directory and one checkpoint directory, nothing else; one result line."""
    assert sorted(p.name for p in parent.iterdir()) == [name, f"{name}.ckpt"]
    assert stdout.count("saved ") == 1, stdout
    hist = json.loads((parent / f"{name}.ckpt" / "history.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1]
    net, meta = load_model(parent / name)  # checksums verified
    assert net(pixel_values=torch.zeros(1, 1, 28, 28)).logits.shape == (1, 10)
    # validation is sharded over the ranks and summed: the count is the whole split
    assert hist[0]["val"]["samples"] == _metrics(parent / name)["samples"] == 2000


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1-process reference (in-process, the same code path as the console script)."""
    out = tmp_path_factory.mktemp("one") / "model"
    torch.set_num_threads(1)
    assert main(["train", "--model", "vit-micro", *COMMON, "--batch-size", "32", "--out", str(out)]) == 0
    return out


def test_torchrun_train_matches_one_process(single: Path, tmp_path: Path) -> None:
    parent = tmp_path / "two"
    parent.mkdir()
    proc = _torchrun(
        ["train", "--model", "vit-micro", *COMMON, "--batch-size", "16", "--out", str(parent / "m")]
    )
    _check_rank0_outputs(parent, "m", proc.stdout)
    one, two = _metrics(single), _metrics(parent / "m")
    assert two["accuracy"] >= ACCURACY_FLOOR and one["accuracy"] >= ACCURACY_FLOOR
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=ACCURACY_TOL)
    assert _max_weight_diff(single, parent / "m") < WEIGHT_TOL


def test_torchrun_distill_matches_one_process(single: Path, tmp_path: Path) -> None:
    args = ["distill", "--teacher", str(single), "--student", "vit-micro", *COMMON]
    assert main([*args, "--batch-size", "32", "--out", str(tmp_path / "one" / "s")]) == 0
    parent = tmp_path / "two"
    parent.mkdir()
    proc = _torchrun([*args, "--batch-size", "16", "--out", str(parent / "s")])
    _check_rank0_outputs(parent, "s", proc.stdout)
    one, two = _metrics(tmp_path / "one" / "s"), _metrics(parent / "s")
    assert two["accuracy"] >= ACCURACY_FLOOR
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=ACCURACY_TOL)
    assert _max_weight_diff(tmp_path / "one" / "s", parent / "s") < WEIGHT_TOL
    assert json.loads((parent / "s" / "vitshrink.json").read_text())["history"][-1]["stage"] == "distill"


RANK_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from vitshrink.data import load_dataset
from vitshrink.models import build_model
from vitshrink.train import dist_info, finish_distributed, fit

torch.set_num_threads(1)
# 97 = 2 * 48 + 1: unpadded shards of 49 and 48 samples take 4 and 3 batches of 16, and the rank with
# the extra batch would wait forever (or abort) in DDP's gradient all-reduce.
ds = load_dataset("fashion-mnist", "train", limit=97, size=16)
net, meta = build_model("vit-micro", image_size=16, num_channels=1, class_names=ds.class_names,
                        hidden_size=32, num_hidden_layers=1, intermediate_size=64)
scale = torch.nn.Parameter(torch.ones(()))  # a loss-owned parameter, as distillation projections are

def loss_fn(model, x, xb, y, idx, aug):
    return F.cross_entropy(model(pixel_values=x).logits * scale, y)

res = fit(net, meta, ds, ds, epochs=2, batch_size=16, lr=1e-2, loss_fn=loss_fn, extra_params=[scale],
          quiet=True, ckpt_dir=sys.argv[1])
rank, world = dist_info()
flat = torch.cat([p.detach().flatten() for p in net.parameters()] + [scale.detach().view(1)])
everyone = [torch.zeros_like(flat) for _ in range(world)]
dist.all_gather(everyone, flat)
# one file per rank: two ranks printing to one pipe can interleave their lines
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as fh:
    json.dump({"rank": rank, "world": world, "scale": float(scale),
               "max_rank_diff": max(float((t - flat).abs().max()) for t in everyone),
               "samples": res["val"]["samples"], "epochs": len(res["history"])}, fh)
finish_distributed()
"""


def test_uneven_shards_and_loss_parameters_stay_in_sync(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    _torchrun([str(script), str(tmp_path / "ckpt"), str(out)], module=False, timeout=180)
    recs = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert sorted(r["rank"] for r in recs) == [0, 1] and all(r["world"] == 2 for r in recs)
    for r in recs:
        # every rank holds the same model and the same loss parameter, and that parameter was trained
        assert r["max_rank_diff"] == 0.0, recs
        assert r["scale"] != 1.0 and r["epochs"] == 2
        assert r["samples"] == 97  # the validation counts are summed over the shards, not padded
    assert recs[0]["scale"] == recs[1]["scale"]
    # rank 0 wrote the checkpoint, atomically: no temp files left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out", "rank.py"]
