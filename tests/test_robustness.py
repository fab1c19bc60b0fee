"""Robustness: killed runs keep the previous artifact and resume to the same result; every CLI error path
exits non-zero with one line and leaves nothing half-written behind; `predict` keeps going over a folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitshrink.artifacts import FAIL_ENV, HANG_ENV, MATCH_ENV, atomic_dir, atomic_file, atomic_path
from vitshrink.cli import main
from vitshrink.deploy import OnnxModel
from vitshrink.export import export_onnx
from vitshrink.models import build_model, load_model, save_model

SRC = Path(__file__).resolve().parents[1] / "src"
PRESET_KW = {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64}


@pytest.fixture(autouse=True)
def _one_thread():
    # Deterministic float sums (and fair sharing of the 2 cores) for runs compared with subprocess ones.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "OMP_NUM_THREADS": "1",
        "VITSHRINK_QUIET": "1",
        **extra,
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitshrink.cli", *args]


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporaries the atomic writers use (`.<name>.<pid>@<host>.<rand>.tmp`, `.<name>.old-*`)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def _squares(root: Path, n_per_class: int = 80, size: int = 16, seed: int = 0) -> Path:
    """A learnable 3-class image folder: a bright square near the top, near the bottom, or none.

    (Invariant under the training augmentation's horizontal flips and small shifts.)
    """
    rng = np.random.default_rng(seed)
    for name in ("top", "bottom", "none"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 90, (size, size), dtype=np.uint8)
            if name != "none":
                y, x = (2 if name == "top" else 9), int(rng.integers(2, 9))
                img[y : y + 5, x : x + 5] = 230
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny grey 3-class model (directory + ONNX), a class folder and a few broken inputs."""
    root = tmp_path_factory.mktemp("assets")
    torch.set_num_threads(1)
    net, meta = build_model(
        "vit-micro", image_size=16, num_channels=1, class_names=["top", "bottom", "none"], **PRESET_KW
    )
    save_model(net, meta, root / "model")
    export_onnx(root / "model", root / "model.onnx")
    data = _squares(root / "squares", n_per_class=8)
    seg, seg_meta = build_model(
        "segformer-micro", image_size=32, num_channels=3, class_names=["bg", "road", "roof"]
    )
    export_onnx(seg, root / "seg.onnx", meta=seg_meta)
    return {
        "root": root,
        "model": root / "model",
        "onnx": root / "model.onnx",
        "data": data,
        "seg_onnx": root / "seg.onnx",
    }


# ------------------------------------------------------------------------------ killed mid-save


def _start_hanging(args: list[str], stderr_path: Path, at: int, match: str) -> subprocess.Popen:
    """Start the CLI with the save-hang hook armed for the `at`-th commit of an artifact named `match`."""
    with open(stderr_path, "w") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            _cli(*args),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_env(**{HANG_ENV: str(at), MATCH_ENV: match}),
        )


def _wait_for_hang(proc: subprocess.Popen, stderr_path: Path, timeout: float = 150) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = stderr_path.read_text()
        if f"{HANG_ENV}: holding" in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before reaching the save hook:\n{text}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"save hook not reached in {timeout}s:\n{stderr_path.read_text()}")


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_sigkill_during_checkpoint_save_then_resume_matches_straight_run(tmp_path: Path) -> None:
    data = _squares(tmp_path / "data")
    common = [
        "train",
        "--model",
        "vit-micro",
        "--data",
        str(data),
        "--epochs",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--seed",
        "5",
        "--quiet",
    ]
    # uninterrupted reference (in-process: same code path as the console script)
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "vitshrink.json").read_text())["history"][-1]["metrics"]

    # the same run, SIGKILLed while it holds the complete epoch-2 checkpoint in its temp dir
    runs = tmp_path / "runs"
    out = runs / "m"
    proc = _start_hanging([*common, "--out", str(out)], tmp_path / "err.txt", at=2, match="m.ckpt")
    _wait_for_hang(proc, tmp_path / "err.txt")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    ckpt = runs / "m.ckpt"
    temps = _leftovers(runs)
    assert len(temps) == 1 and temps[0].startswith(".m.ckpt.") and temps[0].endswith(".tmp"), temps
    assert (runs / temps[0] / "history.json").exists()  # the unrenamed epoch-2 checkpoint was complete
    assert not out.exists()
    # the previous good checkpoint (epoch 1) is intact and loads
    hist = json.loads((ckpt / "history.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1]
    net, meta = load_model(ckpt)
    assert meta["class_names"] == ["bottom", "none", "top"]
    assert net(pixel_values=torch.zeros(2, 1, 16, 16)).logits.shape == (2, 3)

    # --resume continues from epoch 2, sweeps the dead run's temp dir, and ends where the straight run did
    assert main([*common, "--out", str(out), "--resume"]) == 0
    assert _leftovers(runs) == []
    hist = json.loads((ckpt / "history.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    resumed = json.loads((out / "vitshrink.json").read_text())["history"][-1]["metrics"]
    assert resumed["accuracy"] == pytest.approx(straight["accuracy"], abs=0.02), (resumed, straight)
    a, b = _weights(tmp_path / "straight"), _weights(out)
    # measured: bit-identical (per-epoch seeds for order, augmentation and dropout; one thread everywhere)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert straight["accuracy"] > 0.6  # the task is learnable (measured 0.87); chance is 1/3


def test_sigkill_during_export_keeps_previous_onnx(assets: dict[str, Path], tmp_path: Path) -> None:
    good = tmp_path / "m.onnx"
    shutil.copy(assets["onnx"], good)
    before = good.read_bytes()
    other, meta = build_model(
        "vit-micro", image_size=16, num_channels=1, class_names=["a", "b", "c"], seed=7, **PRESET_KW
    )
    save_model(other, meta, tmp_path / "other")
    proc = _start_hanging(
        ["export", str(tmp_path / "other"), "--out", str(good)], tmp_path / "err.txt", at=1, match="m.onnx"
    )
    _wait_for_hang(proc, tmp_path / "err.txt")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert good.read_bytes() == before
    assert OnnxModel(good).class_names == ["top", "bottom", "none"]
    assert len(_leftovers(tmp_path)) == 1  # the dead export's complete-but-unrenamed temp file
    # the next export over the same path replaces it and sweeps the dead process's temp file
    assert main(["export", str(tmp_path / "other"), "--out", str(good), "--quiet"]) == 0
    assert OnnxModel(good).class_names == ["a", "b", "c"]
    assert _leftovers(tmp_path) == []


def test_atomic_writers_keep_old_artifact_on_failure(tmp_path: Path) -> None:
    for writer, target in (
        (atomic_dir, tmp_path / "d"),
        (atomic_path, tmp_path / "p"),
        (atomic_file, tmp_path / "f"),
    ):
        with writer(target) as first:
            if writer is atomic_dir:
                (first / "v").write_text("1")
            elif writer is atomic_path:
                first.write_text("1")
            else:
                first.write(b"1")
        with pytest.raises(RuntimeError), writer(target) as second:
            if writer is atomic_dir:
                (second / "v").write_text("2")
            elif writer is atomic_path:
                second.write_text("2")
            else:
                second.write(b"2")
            raise RuntimeError("killed mid-write")
        got = (target / "v").read_text() if writer is atomic_dir else target.read_text()
        assert got == "1"
    with atomic_dir(tmp_path / "d") as third:  # a complete write replaces the old directory whole
        (third / "w").write_text("3")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["w"]
    assert _leftovers(tmp_path) == []
    # outputs get ordinary permissions (mkstemp/mkdtemp would leave 0600/0700)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------- bad-input table


@dataclass
class Case:
    id: str
    argv: Callable[[dict[str, Path], Path], list[str]]  # (assets, this case's folder) -> CLI arguments
    message: str  # regex the one stderr line must match (after "error: ")
    prepare: Callable[[dict[str, Path], Path], None] = lambda a, d: None
    env: dict[str, str] = field(default_factory=dict)
    subprocess: bool = False
    check: Callable[[dict[str, Path], Path], None] = lambda a, d: None  # extra assertions


def _corrupt_copy(a: dict[str, Path], d: Path) -> None:
    shutil.copytree(a["model"], d / "m")
    w = d / "m" / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    w.write_bytes(bytes(raw))


def _no_meta_garbage_weights(a: dict[str, Path], d: Path) -> None:
    shutil.copytree(a["model"], d / "m")
    (d / "m" / "vitshrink.json").unlink()
    (d / "m" / "model.safetensors").write_bytes(b"\x00\x01garbage" * 40)


def _nan_std(a: dict[str, Path], d: Path) -> None:
    shutil.copytree(a["model"], d / "m")
    meta = json.loads((d / "m" / "vitshrink.json").read_text())
    meta["preprocess"]["std"] = [float("nan")]
    (d / "m" / "vitshrink.json").write_text(json.dumps(meta))  # json writes the NaN literal


def _nan_tiff_folder(a: dict[str, Path], d: Path) -> None:
    shutil.copytree(a["data"], d / "data")
    px = np.full((16, 16), 0.5, np.float32)
    px[3, 4] = np.nan
    for split_name in ("top", "bottom", "none"):  # whichever split the hash puts it in, eval sees one
        for i in range(12):
            Image.fromarray(px).save(d / "data" / split_name / f"nan{i}.tif")


def _mask_mismatch(a: dict[str, Path], d: Path) -> None:
    for sub in ("images", "masks"):
        (d / "seg" / "test" / sub).mkdir(parents=True)
        (d / "seg" / "train" / sub).mkdir(parents=True)
        (d / "seg" / "val" / sub).mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(d / "seg" / "test" / "images" / "a.png")
    Image.new("L", (12, 16)).save(d / "seg" / "test" / "masks" / "a.png")


def _bert_dir(a: dict[str, Path], d: Path) -> None:
    (d / "m").mkdir()
    (d / "m" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (d / "m" / "model.safetensors").write_bytes(b"")


def _truncated_state_ckpt(a: dict[str, Path], d: Path) -> None:
    shutil.copytree(a["model"], d / "o.ckpt")
    state = d / "o.ckpt" / "trainer_state.pt"
    torch.save({"epoch": 1, "optimizer": {}}, state)
    state.write_bytes(state.read_bytes()[:200])  # killed mid-write by something other than us
    (d / "o.ckpt" / "history.json").write_text('{"history": []}')


class _Payload:
    """Unpickling this runs code (creates a file): what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _hostile_state_ckpt(a: dict[str, Path], d: Path) -> None:
    shutil.copytree(a["model"], d / "o.ckpt")
    torch.save({"epoch": 1, "x": _Payload(d.parent / "pwned")}, d / "o.ckpt" / "trainer_state.pt")
    (d / "o.ckpt" / "history.json").write_text('{"history": []}')


def _not_unpickled(a: dict[str, Path], d: Path) -> None:
    assert not (d.parent / "pwned").exists()


def _good_onnx_in_place(a: dict[str, Path], d: Path) -> None:
    shutil.copy(a["onnx"], d / "x.onnx")


def _onnx_unchanged(a: dict[str, Path], d: Path) -> None:
    assert (d / "x.onnx").read_bytes() == a["onnx"].read_bytes()


def _small_image(a: dict[str, Path], d: Path) -> None:
    Image.new("L", (4, 4)).save(d / "tiny.png")


def _truncated_png(a: dict[str, Path], d: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(d / "cut.png")
    raw = (d / "cut.png").read_bytes()
    (d / "cut.png").write_bytes(raw[: len(raw) // 2])


def _float_image(a: dict[str, Path], d: Path) -> None:
    Image.fromarray(np.full((16, 16), np.nan, np.float32)).save(d / "nan.tif")


def _bad_recipe(a: dict[str, Path], d: Path) -> None:
    (d / "r.yaml").write_text("stages:\n  - nonsense: {ratio: 2}\n")


def _random_onnx(a: dict[str, Path], d: Path) -> None:
    (d / "bad.onnx").write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())


def _mobilevit_model(a: dict[str, Path], d: Path) -> None:
    net, meta = build_model("mobilevit-micro", image_size=32, num_channels=1, num_labels=3)
    save_model(net, meta, d / "mv")


def _model_in(sub: str) -> Callable[[dict[str, Path], Path], None]:
    def prep(a: dict[str, Path], d: Path) -> None:
        shutil.copytree(a["model"], d / sub)

    return prep


def _user_folder(a: dict[str, Path], d: Path) -> None:
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("irreplaceable")


def _user_ckpt(a: dict[str, Path], d: Path) -> None:
    (d / "o.ckpt").mkdir()
    (d / "o.ckpt" / "notes.txt").write_text("irreplaceable")


def _foreign_onnx(a: dict[str, Path], d: Path) -> None:
    (d / "x.onnx").write_bytes(b"someone else's model")


def _foreign_json(a: dict[str, Path], d: Path) -> None:
    (d / "b.json").write_text('{"mine": true}')


def _user_mask(a: dict[str, Path], d: Path) -> None:
    Image.new("RGB", (16, 16), (40, 90, 200)).save(d / "a.png")
    Image.new("L", (16, 16), 7).save(d / "a_mask.png")  # the user's own annotation


def _user_predictions(a: dict[str, Path], d: Path) -> None:
    Image.new("L", (16, 16), 40).save(d / "a.png")
    (d / "out").mkdir()
    (d / "out" / "predictions.json").write_text('{"labels": "hand-made"}')


def _nan_model(a: dict[str, Path], d: Path) -> None:
    net, meta = load_model(a["model"])
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = float("nan")
    save_model(net, meta, d / "m")


def _nan_onnx(a: dict[str, Path], d: Path) -> None:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(a["onnx"]))
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 16:
            arr = arr.copy()
            arr.flat[0] = np.nan
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            break
    onnx.save(proto, str(d / "nan.onnx"))
    Image.new("L", (16, 16), 40).save(d / "a.png")


def _nan_seg_onnx(a: dict[str, Path], d: Path) -> None:
    # Segmentation predicts through OnnxModel.segment (resize or tiles), not OnnxModel.predict.
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(a["seg_onnx"]))
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 16:
            arr = arr.copy()
            arr.flat[:] = np.nan
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            break
    onnx.save(proto, str(d / "nan_seg.onnx"))
    Image.new("RGB", (32, 32), (40, 80, 120)).save(d / "a.png")


def _alias_bomb(a: dict[str, Path], d: Path) -> None:
    rows = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        rows.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    (d / "r.yaml").write_text("\n".join(rows) + "\nstages: [*i]\n")  # 9^9 strings once expanded


def _hostile_report(a: dict[str, Path], d: Path) -> None:
    (d / "run").mkdir()
    stage = {"name": "teacher", "artifact": "m.onnx", "accuracy": 0.9, "latency_ms": {"p50": 1.0}}
    stage |= {"size_mb": 1.0, "params": 10, "macs": 10}
    results = {
        "task": "classification",
        "metric": "accuracy",
        "device": {"name": "cpu", "threads": 1},
        "class_names": ["a", "b"],
        "stages": [stage],
        "examples": [{"image": "/etc/hostname", "labels": {"teacher": "a"}}],
    }
    (d / "run" / "results.json").write_text(json.dumps(results))


def _escaping_checksum(a: dict[str, Path], d: Path) -> None:
    shutil.copytree(a["model"], d / "m")
    meta = json.loads((d / "m" / "vitshrink.json").read_text())
    meta["checksums"]["../../../../../../dev/zero"] = "0" * 64
    (d / "m" / "vitshrink.json").write_text(json.dumps(meta))


def _folder(root: Path, classes: list[str], n: int = 6) -> None:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (16, 16), 10 * i).save(root / c / f"{i}.png")


def _other_names(a: dict[str, Path], d: Path) -> None:
    _folder(d / "data", ["cat", "dog", "owl"], n=12)


def _one_class(a: dict[str, Path], d: Path) -> None:
    _folder(d / "data", ["only"], n=12)


def _val_extra_class(a: dict[str, Path], d: Path) -> None:
    _folder(d / "data" / "train", ["top", "bottom", "none"])
    _folder(d / "data" / "val", ["top", "bottom", "none", "side"])


def _seg_tree(d: Path, mask_value: int, mode: str = "L") -> None:
    for sub in ("images", "masks"):
        (d / "seg" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.new("RGB", (16, 16)).save(d / "seg" / "images" / f"{i}.png")
        m = np.zeros((16, 16), np.uint16 if mode == "I;16" else np.uint8)
        m[0, 0] = mask_value
        Image.fromarray(m).save(d / "seg" / "masks" / f"{i}.png")


def _dup_classes(a: dict[str, Path], d: Path) -> None:
    _seg_tree(d, 1)
    (d / "seg" / "classes.json").write_text('["road", "road", "roof"]')


def _mask_id_16bit(a: dict[str, Path], d: Path) -> None:
    _seg_tree(d, 300, mode="I;16")


def _trained_ckpt(a: dict[str, Path], d: Path) -> None:
    common = ["train", "--model", "vit-micro", "--data", str(a["data"]), "--out", str(d / "o"), "--quiet"]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the table asserts the case's own output only
        assert main([*common, "--epochs", "2", "--batch-size", "32", "--image-size", "16"]) == 0


def _resume_args(a: dict[str, Path], d: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(a["data"]),
        "--out",
        str(d / "o"),
        "--resume",
        "--image-size",
        "16",
        *extra,
    ]


CASES = [
    # ---- in a fresh interpreter, as a user runs it
    Case(
        "missing-model",
        lambda a, d: ["eval", str(d / "nope"), "--data", str(a["data"])],
        r"model not found: .*nope",
        subprocess=True,
    ),
    Case(
        "corrupt-onnx",
        lambda a, d: ["predict", str(d / "bad.onnx"), str(a["data"])],
        r"not a valid ONNX model: .*bad\.onnx",
        _random_onnx,
        subprocess=True,
    ),
    Case(
        "usage-error",
        lambda a, d: [
            "train",
            "--model",
            "vit-micro",
            "--data",
            str(a["data"]),
            "--out",
            str(d / "o"),
            "--lr",
            "nan",
        ],
        r"argument --lr: must be > 0, got 'nan' \(see 'vitshrink train --help'\)",
        subprocess=True,
    ),
    # ---- missing / corrupt model files
    Case(
        "checksum-mismatch",
        lambda a, d: ["eval", str(d / "m"), "--data", str(a["data"])],
        r"checksum mismatch for .*model\.safetensors",
        _corrupt_copy,
    ),
    Case(
        "garbage-weights",
        lambda a, d: ["export", str(d / "m"), "--out", str(d / "x.onnx")],
        r"cannot load model from .*: .*header",
        _no_meta_garbage_weights,
    ),
    Case(
        "empty-onnx",
        lambda a, d: ["eval", str(d / "e.onnx"), "--data", str(a["data"])],
        r"not an ONNX model \(empty file\)",
        lambda a, d: (d / "e.onnx").write_bytes(b""),
    ),
    Case(
        "corrupt-checkpoint",
        lambda a, d: [
            "train",
            "--model",
            str(a["model"]),
            "--data",
            str(a["data"]),
            "--out",
            str(d / "o"),
            "--resume",
        ],
        r"cannot resume from corrupt checkpoint .*o\.ckpt: PytorchStreamReader",
        _truncated_state_ckpt,
    ),
    Case(
        "hostile-checkpoint",
        lambda a, d: [
            "train",
            "--model",
            str(a["model"]),
            "--data",
            str(a["data"]),
            "--out",
            str(d / "o"),
            "--resume",
        ],
        r"cannot resume from .*trainer_state\.pt: corrupt or not a tensors-only checkpoint",
        _hostile_state_ckpt,
        check=_not_unpickled,
    ),
    # ---- NaN in inputs
    Case(
        "nan-preprocess",
        lambda a, d: ["eval", str(d / "m"), "--data", str(a["data"])],
        r"invalid .*vitshrink\.json: preprocess std must be 1 finite numbers, got \[nan\]",
        _nan_std,
    ),
    Case(
        "nan-pixels",
        lambda a, d: ["eval", str(a["model"]), "--data", str(d / "data"), "--split", "train"],
        r"image .*nan\d+\.tif contains NaN or infinite pixel values",
        _nan_tiff_folder,
    ),
    Case(
        "nan-image-predict",
        lambda a, d: ["predict", str(a["onnx"]), str(d / "nan.tif")],
        r"nan\.tif: unsupported image mode 'F'",
        _float_image,
    ),
    # ---- wrong channels / size, mask-image mismatch
    Case(
        "wrong-channels",
        lambda a, d: [
            "train",
            "--model",
            "vit-micro",
            "--data",
            str(a["data"]),
            "--out",
            str(d / "o"),
            "--channels",
            "2",
        ],
        r"cannot convert 1-channel images .* to 2 channels",
    ),
    Case(
        "wrong-size",
        lambda a, d: [
            "train",
            "--model",
            "vit-micro",
            "--data",
            str(a["data"]),
            "--out",
            str(d / "o"),
            "--image-size",
            "0",
        ],
        r"argument --image-size: must be >= 1, got '0'",
    ),
    Case(
        "image-too-small",
        lambda a, d: ["predict", str(a["onnx"]), str(d / "tiny.png")],
        r"tiny\.png: image too small \(4x4 px",
        _small_image,
    ),
    Case(
        "truncated-image",
        lambda a, d: ["predict", str(a["onnx"]), str(d / "cut.png")],
        r"cut\.png: (truncated|corrupt)",
        _truncated_png,
    ),
    Case(
        "mask-mismatch",
        lambda a, d: ["eval", str(a["model"]), "--data", str(d / "seg")],
        r"mask .*a\.png is 12x16 but image .*a\.png is 16x16",
        _mask_mismatch,
    ),
    Case(
        "task-mismatch",
        lambda a, d: ["eval", str(a["onnx"]), "--data", str(d / "seg")],
        r"is a classification model but the data is segmentation",
        lambda a, d: (
            _mask_mismatch(a, d),
            Image.new("L", (16, 16)).save(d / "seg" / "test" / "masks" / "a.png"),
        ),
    ),
    # ---- unknown names, invalid recipe / budget, unsupported family
    Case(
        "unknown-preset",
        lambda a, d: ["train", "--model", "vit-gigantic", "--data", str(a["data"]), "--out", str(d / "o")],
        r"unknown model preset 'vit-gigantic' \(choose from: vit-micro,",
    ),
    Case(
        "invalid-budget",
        lambda a, d: [
            "compress",
            str(a["model"]),
            "--data",
            str(a["data"]),
            "--out",
            str(d / "c"),
            "--budget",
            "latency_ms=-3",
        ],
        r"budget latency_ms must be a positive number",
    ),
    Case(
        "unknown-budget-key",
        lambda a, d: [
            "compress",
            str(a["model"]),
            "--data",
            str(a["data"]),
            "--out",
            str(d / "c"),
            "--budget",
            "speed=fast",
        ],
        r"unknown budget key 'speed'",
    ),
    Case(
        "invalid-recipe",
        lambda a, d: [
            "compress",
            str(a["model"]),
            "--data",
            str(a["data"]),
            "--out",
            str(d / "c"),
            "--recipe",
            str(d / "r.yaml"),
        ],
        r"r\.yaml",
        _bad_recipe,
    ),
    Case(
        "unsupported-family",
        lambda a, d: ["eval", str(d / "m"), "--data", str(a["data"])],
        r"does not support model family 'bert'",
        _bert_dir,
    ),
    Case(
        "missing-onnx",
        lambda a, d: ["bench", str(d / "gone.onnx")],
        r"not found: .*gone\.onnx",
    ),
    Case(
        "stage-refuses-family",
        lambda a, d: ["prune", str(d / "mv"), "--out", str(d / "p"), "--ratio", "0", "--depth-ratio", "0.5"],
        r"depth pruning does not support model family 'mobilevit' \(supported: vit, deit, swin, segformer[^)]*\)",
        _mobilevit_model,
    ),
    Case(
        "onnx-out-suffix",
        lambda a, d: ["export", str(a["model"]), "--out", str(d / "x.txt")],
        r"output must end in \.onnx",
    ),
    # ---- disk full while saving (OSError(ENOSPC) injected at the atomic commit)
    Case(
        "disk-full-train",
        lambda a, d: [
            "train",
            "--model",
            "vit-micro",
            "--data",
            str(a["data"]),
            "--out",
            str(d / "o"),
            "--image-size",
            "16",
            "--batch-size",
            "64",
        ],
        r"No space left on device: .*o\.ckpt",
        env={FAIL_ENV: "ENOSPC"},
    ),
    Case(
        "disk-full-export",
        lambda a, d: ["export", str(a["model"]), "--out", str(d / "x.onnx")],
        r"No space left on device: .*x\.onnx",
        _good_onnx_in_place,
        env={FAIL_ENV: "ENOSPC", MATCH_ENV: "x.onnx"},
        check=_onnx_unchanged,
    ),
    # ---- output policy: never replace what vitshrink did not write, never an input (issue 20)
    Case(
        "out-contains-input",
        lambda a, d: ["prune", str(d / "w" / "m"), "--out", str(d / "w"), "--ratio", "0.3", "--overwrite"],
        r"refusing to write .*w: it contains an input of this run",
        _model_in("w/m"),
    ),
    Case(
        "out-is-input",
        lambda a, d: ["prune", str(d / "m"), "--out", str(d / "m"), "--ratio", "0.3"],
        r"refusing to write .*m: it is an input of this run",
        _model_in("m"),
    ),
    Case(
        "out-user-folder",
        lambda a, d: ["prune", str(a["model"]), "--out", str(d / "mine"), "--ratio", "0.3", "--overwrite"],
        r"refusing to replace .*mine: an existing folder that vitshrink did not write",
        _user_folder,
    ),
    Case(
        "out-user-ckpt-sibling",
        lambda a, d: ["train", "--model", "vit-micro", "--data", str(a["data"]), "--out", str(d / "o")],
        r"refusing to replace .*o\.ckpt: an existing folder that vitshrink did not write",
        _user_ckpt,
    ),
    Case(
        "out-teacher",
        lambda a, d: [
            "distill",
            "--teacher",
            str(d / "t"),
            "--student",
            "vit-micro",
            "--data",
            str(a["data"]),
            "--out",
            str(d / "t"),
        ],
        r"refusing to write .*t: it is an input of this run",
        _model_in("t"),
    ),
    Case(
        "bench-json-over-input",
        lambda a, d: ["bench", str(d / "x.onnx"), "--json", str(d / "x.onnx"), "--overwrite"],
        r"refusing to write .*x\.onnx: it is an input of this run",
        _good_onnx_in_place,
    ),
    Case(
        "bench-json-foreign",
        lambda a, d: ["bench", str(a["onnx"]), "--json", str(d / "b.json")],
        r"refusing to overwrite .*b\.json: not a file vitshrink wrote \(or pass --overwrite\)",
        _foreign_json,
    ),
    Case(
        "export-over-foreign-file",
        lambda a, d: ["export", str(a["model"]), "--out", str(d / "x.onnx")],
        r"refusing to overwrite .*x\.onnx: not a file vitshrink wrote",
        _foreign_onnx,
    ),
    Case(
        "predict-over-user-mask",
        lambda a, d: ["predict", str(a["seg_onnx"]), str(d / "a.png"), "--out", str(d)],
        r"refusing to overwrite .*a_mask\.png: not a file vitshrink wrote",
        _user_mask,
    ),
    Case(
        "predict-mask-is-input",
        lambda a, d: [
            "predict",
            str(a["seg_onnx"]),
            str(d / "a.png"),
            str(d / "a_mask.png"),
            "--out",
            str(d),
            "--overwrite",
        ],
        r"refusing to overwrite .*a_mask\.png: it is an input of this run",
        _user_mask,
    ),
    Case(
        "predict-foreign-summary",
        lambda a, d: ["predict", str(a["onnx"]), str(d / "a.png"), "--out", str(d / "out")],
        r"refusing to overwrite .*out/predictions\.json: not a file vitshrink wrote",
        _user_predictions,
    ),
    # ---- export validates before the rename; opsets it cannot honour are refused up front
    Case(
        "export-bad-opset-keeps-good-onnx",
        lambda a, d: ["export", str(a["model"]), "--out", str(d / "x.onnx"), "--opset", "26"],
        r"the exported ONNX at opset 26 does not load in onnxruntime: .*nothing was written",
        _good_onnx_in_place,
        check=_onnx_unchanged,
    ),
    Case(
        "export-opset-too-old",
        lambda a, d: ["export", str(a["model"]), "--out", str(d / "x.onnx"), "--opset", "7"],
        r"opset 7 is not supported: vitshrink exports opset 14 or newer",
        subprocess=True,  # and no exporter output on the terminal
    ),
    # ---- bounded inputs: files named by other files
    Case(
        "latency-table-dev-zero",
        lambda a, d: [
            "prune",
            str(a["model"]),
            "--out",
            str(d / "p"),
            "--target-latency-ms",
            "1",
            "--latency-table",
            "/dev/zero",
        ],
        r"latency table /dev/zero is not a regular file",
    ),
    Case(
        "yaml-alias-bomb",
        lambda a, d: [
            "compress",
            str(a["model"]),
            "--data",
            str(a["data"]),
            "--out",
            str(d / "c"),
            "--recipe",
            str(d / "r.yaml"),
        ],
        r"r\.yaml: more than 16 YAML aliases",
        _alias_bomb,
        subprocess=True,  # and it returns at once (the table's 120 s timeout would catch a hang)
    ),
    Case(
        "report-embeds-outside-file",
        lambda a, d: ["report", str(d / "run")],
        r"results\.json: example 0 image /etc/hostname is outside the run directory",
        _hostile_report,
    ),
    Case(
        "checksum-outside-model",
        lambda a, d: ["eval", str(d / "m"), "--data", str(a["data"])],
        r"checksum entry '.*dev/zero' is outside the model directory",
        _escaping_checksum,
    ),
    # ---- labels that cannot silently shift
    Case(
        "class-names-mismatch",
        lambda a, d: ["eval", str(a["model"]), "--data", str(d / "data"), "--split", "train"],
        r"class names of .*model do not match data .*: data has \['cat', 'dog', 'owl'\]",
        _other_names,
    ),
    Case(
        "single-class-folder",
        lambda a, d: ["train", "--model", "vit-micro", "--data", str(d / "data"), "--out", str(d / "o")],
        r"only one class folder in .*data \(only\)",
        _one_class,
    ),
    Case(
        "val-class-missing-in-train",
        lambda a, d: ["train", "--model", "vit-micro", "--data", str(d / "data"), "--out", str(d / "o")],
        r"class folder .*val/side has no counterpart in the train split",
        _val_extra_class,
    ),
    Case(
        "duplicate-class-names",
        lambda a, d: ["eval", str(a["seg_onnx"]), "--data", str(d / "seg")],
        r"bad class list .*classes\.json: duplicate class name\(s\) \['road'\]",
        _dup_classes,
    ),
    Case(
        "mask-id-16bit",
        lambda a, d: ["eval", str(a["seg_onnx"]), "--data", str(d / "seg")],
        r"mask .*\.png has class id 300; ids must be below 255",
        _mask_id_16bit,
    ),
    Case(
        "resume-fewer-epochs",
        lambda a, d: _resume_args(a, d, "--model", "vit-micro", "--epochs", "1"),
        r"has already trained 2 epochs but --epochs is 1; pass --epochs 2 or more",
        _trained_ckpt,
    ),
    Case(
        "resume-other-preset",
        lambda a, d: _resume_args(a, d, "--model", "deit-micro", "--epochs", "3"),
        r"cannot resume from .*o\.ckpt: it was made with different settings \(model_type 'vit' vs 'deit'",
        _trained_ckpt,
    ),
    # ---- non-finite weights or outputs
    Case(
        "nan-weights-prune",
        lambda a, d: ["prune", str(d / "m"), "--out", str(d / "p"), "--ratio", "0.3"],
        r"model .*m has NaN or infinite values in ",
        _nan_model,
    ),
    Case(
        "nan-weights-export",
        lambda a, d: ["export", str(d / "m"), "--out", str(d / "x.onnx")],
        r"model .*m has NaN or infinite values in ",
        _nan_model,
    ),
    Case(
        "nan-weights-quantize",
        lambda a, d: ["quantize", str(d / "m"), "--out", str(d / "q.onnx"), "--mode", "fp16"],
        r"model .*m has NaN or infinite values in ",
        _nan_model,
    ),
    Case(
        "nan-weights-quantize-onnx",
        lambda a, d: ["quantize", str(d / "nan.onnx"), "--out", str(d / "q.onnx"), "--mode", "fp16"],
        r"model .*nan\.onnx has NaN or infinite values in ",
        _nan_onnx,
    ),
    Case(
        "nan-outputs-predict",
        lambda a, d: ["predict", str(d / "nan.onnx"), str(d / "a.png")],
        r"nan\.onnx: the model produced NaN or infinite outputs",
        _nan_onnx,
    ),
    Case(
        "nan-outputs-predict-segmentation",
        lambda a, d: ["predict", str(d / "nan_seg.onnx"), str(d / "a.png"), "--out", str(d / "p")],
        r"nan_seg\.onnx: the model produced NaN or infinite outputs",
        _nan_seg_onnx,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_error_paths(
    case: Case,
    assets: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = tmp_path / "case"
    d.mkdir()
    case.prepare(assets, d)
    before = {p.relative_to(d) for p in d.rglob("*")}
    contents = _contents(d)
    shared = _contents(assets["root"])
    argv = case.argv(assets, d)
    if case.subprocess:
        proc = subprocess.run(_cli(*argv), capture_output=True, text=True, env=_env(**case.env), timeout=120)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        for k, v in case.env.items():
            monkeypatch.setenv(k, v)
        rc = main(argv)
        out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err  # one line, no traceback, no warnings
    assert lines[0].startswith("error: ") and "Traceback" not in err and "unexpected" not in err, err
    assert re.search(case.message, lines[0]), lines[0]
    assert "saved" not in out and "wrote" not in out
    # nothing new (no half-written output, no temp file) in the output location
    after = {p.relative_to(d) for p in d.rglob("*")}
    assert after == before, sorted(map(str, after - before))
    assert _contents(d) == contents  # inputs and refused outputs byte-identical
    assert _contents(assets["root"]) == shared
    case.check(assets, d)


def _contents(root: Path) -> dict[str, bytes]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).digest()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 15 and len({c.id for c in CASES}) == len(CASES)
    assert sum(c.subprocess for c in CASES) >= 3


# ------------------------------------------------------------------------------ predict on folders


def test_predict_keeps_going_over_a_folder(assets: dict[str, Path], tmp_path: Path, capsys) -> None:
    imgs = tmp_path / "imgs"
    (imgs / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(imgs / "good.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(imgs / "deeper" / "rgb.jpg")
    (imgs / "text.jpg").write_text("not an image")
    (imgs / "empty.png").write_bytes(b"")
    Image.new("L", (3, 3)).save(imgs / "pixel.bmp")
    raw = (imgs / "good.png").read_bytes()
    (imgs / "half.png").write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"

    assert main(["predict", str(assets["onnx"]), str(imgs), "--out", str(out), "--quiet"]) == 0
    stdout, stderr = capsys.readouterr()
    results = [json.loads(line) for line in stdout.splitlines()]
    assert sorted(Path(r["file"]).name for r in results) == ["good.png", "rgb.jpg"]
    assert all(r["label"] in ("top", "bottom", "none") and 0 < r["score"] <= 1 for r in results)
    skipped = sorted(stderr.splitlines())
    assert len(skipped) == 4 and all(s.startswith("skipped ") for s in skipped), stderr
    reasons = {Path(s.split(":")[0].removeprefix("skipped ")).name: s for s in skipped}
    assert "empty file" in reasons["empty.png"] and "too small" in reasons["pixel.bmp"]
    assert "not an image" in reasons["text.jpg"] and re.search("truncated|corrupt", reasons["half.png"])
    saved = json.loads((out / "predictions.json").read_text())
    assert len(saved["predictions"]) == 2 and len(saved["errors"]) == 4
    assert _leftovers(out) == []

    # nothing predictable at all: exit 2, the skipped files, then one summary error line
    shutil.rmtree(imgs / "deeper")
    (imgs / "good.png").unlink()
    assert main(["predict", str(assets["onnx"]), str(imgs), "--quiet"]) == 2
    stderr = capsys.readouterr().err.splitlines()
    assert stderr[-1] == "error: none of the 4 inputs could be predicted" and len(stderr) == 5


# ------------------------------------------------------------------ signals, locks, stale temporaries


def test_recover_epochs_parses_as_int() -> None:
    from vitshrink.cli import build_parser

    a = build_parser().parse_args(["prune", "m", "--out", "p", "--recover-epochs", "1"])
    assert a.recover_epochs == 1 and isinstance(a.recover_epochs, int)


def test_concurrent_writer_of_the_same_out_fails_fast(
    assets: dict[str, Path], tmp_path: Path, capsys
) -> None:
    from vitshrink.outputs import lock_outputs

    out = tmp_path / "x.onnx"
    with lock_outputs([out]):  # another run holds it
        assert main(["export", str(assets["model"]), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"another vitshrink run is writing .*x\.onnx", err[0]), err
    assert not out.exists() and _leftovers(tmp_path) == []
    assert main(["export", str(assets["model"]), "--out", str(out), "--quiet"]) == 0  # released


def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path) -> None:
    data = _squares(tmp_path / "data", n_per_class=8)
    runs = tmp_path / "runs"
    args = ["train", "--model", "vit-micro", "--data", str(data), "--out", str(runs / "m"), "--quiet"]
    proc = _start_hanging(args, tmp_path / "err.txt", at=1, match="m.ckpt")
    _wait_for_hang(proc, tmp_path / "err.txt")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143
    lines = [ln for ln in (tmp_path / "err.txt").read_text().splitlines() if not ln.startswith(HANG_ENV)]
    assert lines == ["error: terminated"]
    assert _leftovers(runs) == [] and not (runs / "m").exists()  # the temp checkpoint was removed


def test_stale_temp_dirs_of_dead_runs_are_swept(tmp_path: Path) -> None:
    from vitshrink.outputs import sweep_stale_temps

    dead = subprocess.Popen(["true"])
    dead.wait()
    old = time.time() - 7 * 3600
    made = {}
    for name, pid, age in (
        ("dead-old", dead.pid, old),
        ("dead-new", dead.pid, time.time()),
        ("alive-old", os.getpid(), old),
    ):
        p = tmp_path / f"vitshrink-quant-p{pid}-{name.replace('-', '')}"
        (p / "sub").mkdir(parents=True)
        os.utime(p, (age, age))
        made[name] = p
    (tmp_path / "vitshrink-locks-u0").mkdir()  # not a temp dir of a run
    os.utime(tmp_path / "vitshrink-locks-u0", (old, old))
    assert sweep_stale_temps(tmp_path) == 1
    assert not made["dead-old"].exists() and made["dead-new"].exists() and made["alive-old"].exists()
    assert (tmp_path / "vitshrink-locks-u0").exists()


def test_dataset_labels_follow_the_model_and_outputs_in_the_data_root_are_not_classes(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    from vitshrink.data import align_classes, load_dataset

    data = tmp_path / "data"
    shutil.copytree(assets["data"], data)
    ds = load_dataset(str(data), "train")
    assert ds.class_names == ["bottom", "none", "top"]  # folder (alphabetical) order
    aligned = align_classes(ds, ["top", "bottom", "none"], model="m")  # the model's id2label order
    assert aligned.class_names == ["top", "bottom", "none"]
    back = {"bottom": 1, "none": 2, "top": 0}
    images, labels = ds.take(range(len(ds)))
    assert aligned.take(range(len(ds)))[1].tolist() == [back[ds.class_names[t]] for t in labels.tolist()]
    # Fashion-MNIST's "T-shirt/top" cannot be a folder name; "T-shirt_top" is the same class
    from vitshrink.data import VisionDataset

    ds2 = VisionDataset(images, labels, ds.task, ["T-shirt_top", "none", "top"], ds.source)
    assert align_classes(ds2, ["top", "T-shirt/top", "none"], model="m").targets.tolist() == [
        {0: 1, 1: 2, 2: 0}[t] for t in labels.tolist()
    ]
    # a model (and its checkpoint) saved inside the data root is not read as two new classes
    shutil.copytree(assets["model"], data / "my-model")
    (data / "my-model.ckpt").mkdir()
    assert load_dataset(str(data), "train").class_names == ["bottom", "none", "top"]


def test_compress_cache_key_covers_the_data_folder_content(assets: dict[str, Path], tmp_path: Path) -> None:
    from vitshrink.compress.runner import root_key
    from vitshrink.data import fingerprint

    data = tmp_path / "data"
    shutil.copytree(assets["data"], data)
    k0 = root_key("t", str(data), {})
    assert root_key("t", str(data), {}) == k0 and fingerprint("fashion-mnist") == ""
    (data / "run").mkdir()  # a compress run dir inside the data root does not change the key
    (data / "run" / "state.json").write_text("{}")
    assert root_key("t", str(data), {}) == k0
    Image.new("L", (16, 16)).save(data / "top" / "extra.png")
    assert root_key("t", str(data), {}) != k0


def test_disk_full_inside_safetensors_is_one_line_and_leaves_nothing(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # safetensors reports ENOSPC as its own SafetensorError (was: "unexpected SafetensorError", exit 1).
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", full)
    out = tmp_path / "pruned"
    rc = main(["prune", str(assets["model"]), "--out", str(out), "--ratio", "0.25", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "No space left on device" in err and "unexpected" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
