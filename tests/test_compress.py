"""`vitshrink compress`: recipe validation, end-to-end runs, resume, budget search, device profiles.

Tiny on purpose (2 shared CPU cores): a vit-micro teacher trained one epoch on 2,000 Fashion-MNIST
images, students of hidden size 32, a segformer-micro teacher on 32 px aerial scenes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vitshrink.compress import (
    KINDS,
    BudgetNotMetError,
    RecipeError,
    compress,
    get_profile,
    load_recipe,
    parse_budget,
)
from vitshrink.compress.devices import threads_for
from vitshrink.compress.schedule import distance as _distance
from vitshrink.compress.search import _pareto, violations
from vitshrink.errors import VitshrinkError

from .conftest import needs_fmnist

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}
DISTILL = {"epochs": 1, "limit": 1000, "val_limit": 200, "batch_size": 64}
FAST = {"threads": 1, "eval_limit": 300, "bench_runs": 5, "bench_rounds": 1, "quiet": True}
AERIAL = {"size": 32, "n_train": 24, "n_val": 8, "n_test": 8}


def _has_prune() -> bool:
    try:
        from vitshrink.prune import prune  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from vitshrink.train import train

    out = tmp_path_factory.mktemp("compress") / "teacher"
    train(
        "vit-micro",
        "fashion-mnist",
        out=out,
        epochs=1,
        limit=2000,
        val_limit=300,
        lr=2e-3,
        batch_size=64,
        quiet=True,
    )
    return out


def _recipe() -> list:
    stages = [{"distill": {"student": "vit-micro", "student_options": TINY_VIT, **DISTILL}}]
    if _has_prune():
        stages.append({"prune": {"ratio": 0.5}})
    stages.append({"quantize": {"mode": "int8-dynamic"}})
    return stages


@pytest.fixture(scope="module")
def recipe_run(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    return out, compress(teacher, "fashion-mnist", out=out, recipe=_recipe(), **FAST)


def _count_stage_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    for kind, k in KINDS.items():

        def wrapped(stage, ctx, cur, sdir, _fn=k.run, _kind=kind):
            calls.append(_kind)
            return _fn(stage, ctx, cur, sdir)

        monkeypatch.setattr(k, "run", wrapped)
    return calls


# ------------------------------------------------------------------------------------ validation

BAD_RECIPES = [
    ([{"distil": {"student": "vit-micro"}}], "unknown stage 'distil' (did you mean 'distill'?"),
    ([{"prune": {"ratoi": 0.5}}], "unknown option 'ratoi' (did you mean 'ratio'?"),
    ([{"prune": {"ratio": "half"}}], "option 'ratio' must be a number, got 'half'"),
    ([{"prune": {"ratio": 1.5}}], "option 'ratio' must be in [0, 1)"),
    ([{"prune": {"ratio": 0.2, "target_params": 1000}}], "give only one of"),
    ([{"distill": {"epochs": True, "student": "vit-micro"}}], "option 'epochs' must be an integer"),
    ([{"distill": {"epochs": 2}}], "missing required option 'student'"),
    ([{"quantize": {"mode": "int4"}}], "option 'mode' must be one of fp16, int8-dynamic"),
    ([{"quantize": {"mode": "fp16"}}, {"prune": {"ratio": 0.2}}], "stage 2 (prune) cannot follow a quantize"),
    ([{"prune": None, "ratio": 0.2}], "expected one stage name as key"),
    ([], "a recipe needs a non-empty list of stages"),
    ({"stages": [{"export": None}], "evalu_limit": 3}, "unknown key 'evalu_limit'"),
    (
        [{"prune": {"ratio": 0.2, "depth_ratio": 1.0}}],
        "option 'depth_ratio' must be a number in [0, 1) or 'auto'",
    ),
    ([{"prune": {"ratio": 0.2, "recover_losses": {"kd": "one"}}}], "must map loss names to numeric weights"),
    ([{"quantize": {"mode": "fp16", "name": ""}}], "option 'name' must be a non-empty string"),
]


def test_a_stage_name_labels_it_without_changing_its_key():
    from vitshrink.compress.recipe import stage_key
    from vitshrink.compress.stages import stage_label

    named, plain = load_recipe(
        [{"quantize": {"name": "int8", "mode": "int8"}}, {"quantize": {"mode": "int8"}}]
    ).stages
    assert (stage_label(named), stage_label(plain)) == ("int8", "quantize-int8")
    assert named.options == plain.options and stage_key("k", named) == stage_key("k", plain)
    assert load_recipe([named.to_json()]).stages[0] == named  # results.json's recipe reads back


def test_prune_recipe_takes_depth_and_recovery_losses():
    stages = load_recipe(
        [{"prune": {"ratio": 0.25, "depth_ratio": 0.25, "recover_losses": {"kd": 1, "ce": 1}}}]
    ).stages
    assert stages[0].options["depth_ratio"] == 0.25 and stages[0].options["recover_losses"] == {
        "kd": 1,
        "ce": 1,
    }


@pytest.mark.parametrize("recipe,fragment", BAD_RECIPES)
def test_invalid_recipe_is_a_one_line_error(recipe, fragment):
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    msg = str(e.value)
    assert fragment in msg, msg
    assert "\n" not in msg


def test_invalid_recipe_file_through_the_cli(tmp_path, capsys):
    from vitshrink.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("- distill:\n    student: vit-micro\n    lr: 3e-3\n")
    rc = main(
        [
            "compress",
            str(tmp_path),
            "--data",
            "fashion-mnist",
            "--out",
            str(tmp_path / "o"),
            "--recipe",
            str(bad),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "option 'lr' must be a number" in err and "3.0e-3" in err
    bad.write_text("- prune: {ratio: [0.2\n")
    assert (
        main(["compress", str(tmp_path), "--data", "x", "--out", str(tmp_path / "o"), "--recipe", str(bad)])
        == 2
    )
    assert "invalid YAML at line" in capsys.readouterr().err


def test_shipped_recipes_are_valid():
    uav = load_recipe(ROOT / "recipes" / "uav-segmentation.yaml")
    assert [s.kind for s in uav.stages] == ["distill", "prune", "quantize", "quantize"]
    assert uav.stages[0].options["student"].startswith("upernet-mobilevit-")
    assert [s.options["mode"] for s in uav.stages[2:]] == ["int8", "fp16"]
    cls = load_recipe(ROOT / "recipes" / "classification.yaml")
    assert [s.kind for s in cls.stages] == ["distill", "prune", "quantize"]


def test_budget_parsing_and_feasibility_math():
    assert parse_budget("latency_ms=5,size_mb=2.5,max_drop=0.01") == {
        "latency_ms": 5.0,
        "size_mb": 2.5,
        "max_drop": 0.01,
    }
    for bad, frag in (
        ("latncy_ms=3", "unknown budget key"),
        ("size_mb=-1", "positive"),
        ("", "at least one"),
    ):
        with pytest.raises(VitshrinkError, match=frag):
            parse_budget(bad)
    budget = {"latency_ms": 10.0, "max_drop": 0.02}
    m = {"metric": 0.85, "p50": 12.0, "size_mb": 1.0, "peak_rss_mb": 50.0}
    v = violations(m, budget, teacher_metric=0.9, memory_mb=None)
    assert v["latency_ms"] == pytest.approx(2.0) and v["max_drop"] == pytest.approx(0.03)
    assert _distance(v, budget, None) == pytest.approx(2 / 10 + 0.03 / 0.02)
    rows = [{"metric": 0.8, "p50": 5}, {"metric": 0.9, "p50": 9}, {"metric": 0.7, "p50": 6}]
    assert _pareto(rows) == rows[:2]  # (0.7, 6 ms) is beaten by (0.8, 5 ms) on both


def test_device_profiles():
    nano = get_profile("jetson-nano")
    assert threads_for(nano, None) <= 4 and threads_for(nano, 16) <= 4
    assert nano.memory_mb == 3072 and nano.trt and "re-measure" in nano.disclaimer
    assert threads_for(get_profile("cpu"), 3) == 3
    with pytest.raises(VitshrinkError, match="unknown device"):
        get_profile("tpu")


# ------------------------------------------------------------------------------------ recipe runs


@needs_fmnist
def test_recipe_end_to_end(recipe_run, teacher):
    import onnxruntime as ort

    from vitshrink.evaluate import evaluate

    out, res = recipe_run
    results = json.loads((out / "results.json").read_text())
    names = [s["name"] for s in results["stages"]]
    assert names[0] == "teacher" and names[1] == "distill" and names[-1] == "quantize-int8-dynamic"
    final = Path(results["stages"][-1]["artifact"])
    assert final.suffix == ".onnx" and final.is_file()
    # The deployable model sits at a fixed, obvious place: OUT/model.onnx (a copy of the last stage's).
    assert Path(res["final"]) == out / "model.onnx" == Path(results["final"])
    assert (out / "model.onnx").read_bytes() == final.read_bytes()
    logits = ort.InferenceSession(str(final)).run(
        None, {"pixel_values": np.zeros((1, 1, 28, 28), np.float32)}
    )[0]
    assert logits.shape == (1, 10)
    for s in results["stages"]:
        assert 0.0 <= s["accuracy"] <= 1.0 and s["latency_ms"]["p50"] > 0 and s["size_mb"] > 0
    # the teacher is well above chance (0.10), and the stored metric is what evaluate() measures
    assert results["stages"][0]["accuracy"] > 0.15
    again = evaluate(final, "fashion-mnist", split="test", limit=300, quiet=True)["accuracy"]
    assert again == pytest.approx(results["stages"][-1]["accuracy"])
    # the student is smaller than the teacher, and quantization shrinks the file further
    t, d, q = results["stages"][0], results["stages"][1], results["stages"][-1]
    assert d["params"] < t["params"] / 3 and q["size_mb"] < d["size_mb"]
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    # The report shows example predictions of the teacher and the final model.
    assert len(results["examples"]) == 3 and all((out / e["image"]).is_file() for e in results["examples"])
    assert "## Examples" in (out / "report.md").read_text()
    state = json.loads((out / "state.json").read_text())
    assert [r["name"] for r in state["stages"]] == names


@needs_fmnist
def test_resume_skips_finished_stages(recipe_run, tmp_path, monkeypatch):
    out, _ = recipe_run
    state_path = out / "state.json"
    state = json.loads(state_path.read_text())
    before = {r["name"]: r["checksums"] for r in state["stages"]}
    state["stages"] = state["stages"][:-1]  # as if killed during the last stage
    state_path.write_text(json.dumps(state))
    calls = _count_stage_calls(monkeypatch)
    compress(state["teacher"], "fashion-mnist", out=out, recipe=_recipe(), **FAST)
    assert calls == ["quantize"]
    after = json.loads(state_path.read_text())["stages"]
    assert {r["name"]: r["checksums"] for r in after} == before  # same files, quantization is deterministic
    # a changed option re-runs that stage and everything after it, nothing before
    if _has_prune():
        calls.clear()
        changed = _recipe()
        changed[1] = {"prune": {"ratio": 0.25}}
        copy = tmp_path / "changed"
        shutil.copytree(out, copy)  # keep the shared run as the recipe left it
        compress(state["teacher"], "fashion-mnist", out=copy, recipe=changed, **FAST)
        assert calls == ["prune", "quantize"]


@needs_fmnist
def test_corrupt_artifact_is_rebuilt(recipe_run, tmp_path, monkeypatch):
    src, _ = recipe_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)  # state.json paths are relative: a moved run directory still resumes
    teacher = json.loads((out / "state.json").read_text())["teacher"]
    last = sorted((out / "stages").glob("*-quantize"))[-1] / "model.onnx"
    last.write_bytes(b"not a model")
    calls = _count_stage_calls(monkeypatch)
    res = compress(teacher, "fashion-mnist", out=out, recipe=_recipe(), **FAST)
    assert calls == ["quantize"] and Path(res["final"]).read_bytes()[:4] != b"not "


# ------------------------------------------------------------------------------------ budget search

SEARCH = {
    "students": ["none", {"student": "vit-micro", "student_options": TINY_VIT, "label": "vit-h32"}],
    "prune_ratios": [0.0, 0.5] if _has_prune() else [0.0],
    "quant_modes": ["none", "int8-dynamic"],
    "distill": DISTILL,
    "prune": {"recover_epochs": 0},
}


@needs_fmnist
def test_budget_search_finds_a_recipe_then_reports_the_closest(teacher, tmp_path, monkeypatch):
    out = tmp_path / "search"
    teacher_mb = (teacher / "model.safetensors").stat().st_size / 2**20
    budget = {"size_mb": round(teacher_mb / 2, 4), "max_drop": 0.5}
    res = compress(teacher, "fashion-mnist", out=out, budget=budget, trials=2, search=SEARCH, **FAST)
    assert res["met"] and (out / "search.db").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["stages"][0]["name"] == "teacher" and results["search"]["met"]
    final = results["stages"][-1]
    assert str(res["final"]) == str(out / "model.onnx") and final["artifact"].endswith(".onnx")
    assert Path(res["final"]).read_bytes() == Path(final["artifact"]).read_bytes()
    md = (out / "report.md").read_text()
    assert "## Budget search" in md and "budget met: yes" in md and "Pareto: trial" in md
    assert final["size_mb"] <= budget["size_mb"]  # measured on the file itself
    chosen = results["search"]["chosen_trial"]
    assert chosen in results["search"]["pareto_trials"]
    assert len(results["search"]["trials"]) + len(results["search"]["failed_trials"]) <= 2

    # Same directory, impossible budget: the stored trials are re-judged without running anything.
    calls = _count_stage_calls(monkeypatch)
    with pytest.raises(BudgetNotMetError) as e:
        compress(
            teacher, "fashion-mnist", out=out, budget="latency_ms=0.0001", trials=2, search=SEARCH, **FAST
        )
    assert calls == []
    msg = str(e.value)
    assert "no recipe met the budget" in msg and "closest: trial" in msg and "\n" not in msg
    closest = json.loads((out / "results.json").read_text())
    assert closest["search"]["met"] is False
    assert Path(closest["stages"][-1]["artifact"]).is_file()
    assert isinstance(e.value, VitshrinkError)  # so the CLI exits non-zero with one line

    # Another teacher/space on the same search.db is refused instead of mixing results.
    with pytest.raises(VitshrinkError, match="belongs to another search"):
        compress(
            teacher,
            "fashion-mnist",
            out=out,
            budget=budget,
            trials=2,
            search={**SEARCH, "quant_modes": ["fp16"]},
            **FAST,
        )


# ------------------------------------------------------------------------------------ device profiles


def test_jetson_profile_segmentation_writes_trt_recipe_and_disclaimer(tmp_path):
    import onnx

    from vitshrink.train import train

    teacher, _ = train(
        "segformer-micro",
        "aerial",
        out=tmp_path / "seg-teacher",
        epochs=1,
        batch_size=8,
        quiet=True,
        data_options=AERIAL,
    )
    recipe = [
        {
            "distill": {
                "student": "segformer-micro",
                "student_options": {"hidden_sizes": [8, 16, 32, 48], "decoder_hidden_size": 32},
                "epochs": 1,
                "batch_size": 8,
            }
        },
        {"quantize": {"mode": "fp16"}},
    ]
    out = tmp_path / "run"
    res = compress(
        teacher, "aerial", out=out, recipe=recipe, device="jetson-nano", data_options=AERIAL, **FAST
    )
    results = json.loads((out / "results.json").read_text())
    dev = results["device"]
    assert dev["profile"] == "jetson-nano" and dev["threads"] <= 4
    assert "re-measure" in dev["disclaimer"] and "within the 3072 MB" in dev["memory_check"]
    assert results["task"] == "segmentation" and 0 <= results["stages"][-1]["miou"] <= 1
    trt = Path(res["trt"])
    for name in ("build_engine.sh", "build_engine.py", "run_engine.py", "README.txt"):
        assert (trt / name).is_file(), name
    assert (trt / "README.txt").read_text().startswith("NOTE: latency was measured on this machine")
    # TensorRT 8.2 cannot parse LayerNormalization: the recipe's model is exported below opset 17
    model = onnx.load(str(trt / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 16
    assert not any(n.op_type == "LayerNormalization" for n in model.graph.node)
    assert "disclaimer" in (out / "report.md").read_text()


@needs_fmnist
def test_budget_mode_honours_a_plain_hf_teachers_preprocessor_config(teacher, tmp_path):
    from vitshrink.bench import onnx_meta

    hf = tmp_path / "hf-teacher"
    shutil.copytree(teacher, hf)
    (hf / "vitshrink.json").unlink()  # a plain transformers directory
    pre = json.loads((hf / "preprocessor_config.json").read_text())
    pre.update(image_mean=[0.25], image_std=[0.75])
    (hf / "preprocessor_config.json").write_text(json.dumps(pre))
    search = {"students": ["none"], "prune_ratios": [0.0], "quant_modes": ["fp16"]}
    res = compress(
        hf, "fashion-mnist", out=tmp_path / "s", budget="max_drop=0.2", trials=1, search=search, **FAST
    )
    for stage in res["stages"]:
        p = onnx_meta(stage["artifact"])["preprocess"]
        assert p["mean"] == [0.25] and p["std"] == [0.75] and p["size"] == [28, 28]
    assert [s["name"] for s in res["stages"]] == ["teacher", "quantize-fp16"]
    # fp16 of the same network scores within a hair of it
    assert abs(res["stages"][1]["accuracy"] - res["stages"][0]["accuracy"]) <= 0.01


@needs_fmnist
def test_cli_resumes_a_finished_run(recipe_run, tmp_path, monkeypatch, capsys):
    import yaml

    from vitshrink.cli import main

    src, res = recipe_run
    out = tmp_path / "cli-run"
    shutil.copytree(src, out)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe()))
    teacher = json.loads((out / "state.json").read_text())["teacher"]
    import functools

    import vitshrink.compress as mod

    # The CLI's own options, plus this file's small evaluation/benchmark sizes.
    small = {k: v for k, v in FAST.items() if k != "quiet"}
    monkeypatch.setattr(mod, "compress", functools.partial(compress, **small))
    calls = _count_stage_calls(monkeypatch)
    rc = main(
        [
            "compress",
            teacher,
            "--data",
            "fashion-mnist",
            "--out",
            str(out),
            "--recipe",
            str(recipe),
            "--quiet",
        ]
    )
    assert rc == 0 and calls == []
    printed = capsys.readouterr().out
    assert f"final artifact: {out.resolve()}" in printed and printed.strip().endswith(".onnx")


def test_a_quantize_stage_refuses_the_openvino_runtime_when_the_recipe_loads():
    # stage artifacts are single .onnx files; an OpenVINO IR is a folder (vitshrink quantize writes those)
    with pytest.raises(RecipeError, match=r"stage 1 \(quantize\): quantize stages write one .onnx file"):
        load_recipe([{"quantize": {"mode": "int8", "runtime": "openvino"}}])
    assert (
        load_recipe([{"quantize": {"mode": "int8", "runtime": "auto"}}]).stages[0].options["runtime"]
        == "auto"
    )
