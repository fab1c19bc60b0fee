"""Fuzzing `predict` and `eval` with random and corrupted images and ONNX files (seeded, ~70 runs).

Every run must end with exit code 0 (the damage happened to be harmless) or 2 with one `error:` line
(after one-line `warning:`s, e.g. Pillow's about a truncated file): never a traceback, never an "unexpected" error (exit 1), never a hang. The cases run in one child
interpreter (this file, run as a script) so a crash in native code or a hang cannot take pytest down:
each case has an alarm, and the child as a whole a timeout.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
SEED = 20240817
CASE_TIMEOUT_S = 20  # one predict/eval of a 16 px model takes well under a second
TOTAL_TIMEOUT_S = 240
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp"}
CLASSES = ["top", "bottom", "none"]


# ------------------------------------------------------------------------------------- inputs


def _image_bytes(fmt: str, rng: np.random.Generator, mode: str = "RGB") -> bytes:
    from PIL import Image

    shape = (int(rng.integers(12, 40)), int(rng.integers(12, 40)))
    px = rng.integers(0, 256, (*shape, 3) if mode == "RGB" else shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header announcing a huge image, with almost no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _mutate(raw: bytes, how: str, rng: np.random.Generator) -> bytes:
    b = bytearray(raw)
    if how == "truncate":
        return bytes(b[: int(rng.integers(1, max(2, len(b))))])
    if how == "flip":
        for i in rng.integers(0, len(b), int(rng.integers(1, 24))):
            b[i] ^= int(rng.integers(1, 256))
        return bytes(b)
    if how == "splice":  # overwrite a span (often inside the compressed data) with noise
        start = int(rng.integers(0, len(b)))
        n = int(rng.integers(1, 64))
        b[start : start + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        return bytes(b)
    if how == "insert":
        at = int(rng.integers(0, len(b)))
        return (
            bytes(b[:at])
            + rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
            + bytes(b[at:])
        )
    if how == "magic+noise":  # the right signature, then garbage
        return bytes(b[:12]) + rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8).tobytes()
    raise ValueError(how)


def _onnx_variants(good: Path, rng: np.random.Generator) -> dict[str, bytes]:
    """Damaged copies of a valid export: byte-level damage, then hostile 'vitshrink' metadata."""
    import onnx

    raw = good.read_bytes()
    out: dict[str, bytes] = {}
    for i in range(4):
        out[f"onnx-truncate-{i}"] = _mutate(raw, "truncate", rng)
    for i in range(4):
        out[f"onnx-flip-{i}"] = _mutate(raw, "flip", rng)
    out["onnx-splice"] = _mutate(raw, "splice", rng)
    out["onnx-noise"] = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    out["onnx-empty"] = b""
    meta = json.loads(next(p.value for p in onnx.load(str(good)).metadata_props if p.key == "vitshrink"))
    hostile = {
        "meta-not-json": "{'task': classification",
        "meta-list": "[1, 2, 3]",
        "meta-nan-std": json.dumps({**meta, "preprocess": {**meta["preprocess"], "std": [float("nan")]}}),
        "meta-zero-std": json.dumps({**meta, "preprocess": {**meta["preprocess"], "std": [0.0]}}),
        "meta-channels": json.dumps({**meta, "preprocess": {**meta["preprocess"], "channels": 7}}),
        "meta-size": json.dumps({**meta, "preprocess": {**meta["preprocess"], "size": [0, -4]}}),
        "meta-classes": json.dumps({**meta, "class_names": ["only-one"]}),
        "meta-task": json.dumps({**meta, "task": "detection"}),
    }
    for name, text in hostile.items():
        proto = onnx.load(str(good))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = "vitshrink", text
        out[name] = proto.SerializeToString()
    return out


@pytest.fixture(scope="module")
def fuzz_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    import torch
    from PIL import Image

    from vitshrink.export import export_onnx
    from vitshrink.models import build_model

    root = tmp_path_factory.mktemp("fuzz")
    torch.set_num_threads(1)
    net, meta = build_model(
        "vit-micro",
        image_size=16,
        num_channels=1,
        class_names=CLASSES,
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
    )
    model, _ = export_onnx(net, root / "model.onnx", meta=meta)
    rng = np.random.default_rng(SEED)

    # a small data set with explicit splits, so a damaged file put in test/ is always read by eval
    data = root / "data"
    for split in ("train", "val", "test"):
        for c in CLASSES:
            (data / split / c).mkdir(parents=True)
            for i in range(2):
                (data / split / c / f"{i}.png").write_bytes(_image_bytes("PNG", rng, "L"))
    good_img = data / "test" / "top" / "0.png"

    cases: list[dict[str, Any]] = []
    files = root / "files"
    files.mkdir()

    def predict_case(cid: str, content: bytes, ext: str) -> None:
        path = files / f"{cid}{ext}"
        path.write_bytes(content)
        cases.append({"id": cid, "argv": ["predict", str(model), str(path), "--quiet"]})

    # damaged images (every format x every kind of damage, extension sometimes lying)
    for fmt, ext in IMAGE_FORMATS.items():
        raw = _image_bytes(fmt, rng)
        for how in ("truncate", "flip", "splice", "insert", "magic+noise"):
            lie = rng.random() < 0.2
            predict_case(f"img-{fmt}-{how}", _mutate(raw, how, rng), ".png" if lie else ext)
    predict_case("img-noise", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), ".jpg")
    predict_case("img-empty", b"", ".png")
    predict_case("img-one-byte", b"\x89", ".png")
    predict_case("img-bomb", _png_claiming(40_000, 40_000), ".png")
    predict_case("img-near-bomb", _png_claiming(10_000, 10_000), ".png")
    predict_case("img-zero-size", _png_claiming(0, 0), ".png")
    predict_case("img-text", b"P6\n16 16\n255\n" + b"\xff" * 10, ".ppm")

    # eval over a data folder holding one damaged image
    for i, how in enumerate(("truncate", "flip", "splice", "magic+noise", "insert")):
        folder = root / f"data-{how}"
        shutil.copytree(data, folder)
        (folder / "test" / "none" / f"bad{i}.png").write_bytes(
            _mutate(_image_bytes("PNG", rng, "L"), how, rng)
        )
        cases.append(
            {"id": f"eval-data-{how}", "argv": ["eval", str(model), "--data", str(folder), "--quiet"]}
        )

    # damaged ONNX files, each through predict and eval
    for cid, content in _onnx_variants(model, rng).items():
        path = files / f"{cid}.onnx"
        path.write_bytes(content)
        cases.append({"id": f"predict-{cid}", "argv": ["predict", str(path), str(good_img), "--quiet"]})
        cases.append({"id": f"eval-{cid}", "argv": ["eval", str(path), "--data", str(data), "--quiet"]})

    Image.new("L", (16, 16)).save(files / "control.png")
    cases.append({"id": "control", "argv": ["predict", str(model), str(files / "control.png"), "--quiet"]})
    return cases, root


# ------------------------------------------------------------------------------------- driver


def _driver(cases_path: str) -> None:
    """Child process: run each case through the CLI in-process; one JSON line per case on stdout."""
    import contextlib
    import signal
    import time

    import torch

    from vitshrink.cli import main

    torch.set_num_threads(1)

    class Hang(BaseException):  # BaseException: the CLI's own `except Exception` must not swallow it
        pass

    def on_alarm(*_: Any) -> None:
        raise Hang

    signal.signal(signal.SIGALRM, on_alarm)
    real_stdout = sys.stdout
    for case in json.loads(Path(cases_path).read_text()):
        print(json.dumps({"start": case["id"]}), file=real_stdout, flush=True)
        out, err = io.StringIO(), io.StringIO()
        t0 = time.monotonic()
        signal.alarm(CASE_TIMEOUT_S)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc: Any = main(case["argv"])
        except Hang:
            rc = "hang"
        except BaseException as e:  # noqa: BLE001 - main() must never raise; report what escaped
            rc = f"raised {type(e).__name__}: {e}"
        finally:
            signal.alarm(0)
        rec = {
            "id": case["id"],
            "rc": rc,
            "stderr": err.getvalue(),
            "seconds": round(time.monotonic() - t0, 2),
        }
        print(json.dumps(rec), file=real_stdout, flush=True)


# -------------------------------------------------------------------------------------- test


def test_fuzz_predict_and_eval(fuzz_cases: tuple[list[dict[str, Any]], Path]) -> None:
    cases, root = fuzz_cases
    assert len(cases) >= 50
    (root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "VITSHRINK_QUIET": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(root / "cases.json")],
            capture_output=True,
            text=True,
            env=env,
            timeout=TOTAL_TIMEOUT_S,
        )
        stdout, native_err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        native_err, rc = "", "timeout"
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    results = {r["id"]: r for r in lines if "rc" in r}
    started = [r["start"] for r in lines if "start" in r]
    if len(results) != len(cases):
        pytest.fail(
            f"fuzz driver stopped (rc {rc}) in case {started[-1] if started else None}:\n{native_err[-3000:]}"
        )
    assert rc == 0, native_err[-3000:]

    problems = []
    for cid, r in results.items():
        err_lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        if r["rc"] not in (0, 2):
            problems.append(f"{cid}: rc {r['rc']}: {r['stderr'].strip()[:300]}")
        elif (
            r["rc"] == 2
            and (
                not err_lines[-1:]
                or not err_lines[-1].startswith("error: ")
                # before the error, only one-line library warnings (Pillow on damaged files)
                or not all(ln.startswith("warning: ") for ln in err_lines[:-1])
            )
        ):
            problems.append(f"{cid}: expected one 'error:' line, got {err_lines}")
        elif r["rc"] == 0 and not all(ln.startswith("warning: ") for ln in err_lines):
            problems.append(f"{cid}: unexpected stderr {err_lines}")
        elif "Traceback" in r["stderr"]:
            problems.append(f"{cid}: traceback on stderr")
    assert not problems, "\n".join(problems)
    # native code (onnxruntime, image codecs) wrote nothing to the real stderr either
    assert native_err.strip() == "", native_err[-2000:]

    # the damage is really detected, not just survived: all unreadable inputs fail, the control passes
    assert results["control"]["rc"] == 0
    must_fail = [
        "img-noise",
        "img-empty",
        "img-one-byte",
        "img-bomb",
        "img-near-bomb",
        "img-zero-size",
        "predict-onnx-noise",
        "eval-onnx-empty",
        "eval-meta-nan-std",
        "predict-meta-zero-std",
        "predict-meta-channels",
        "eval-meta-size",
        "predict-meta-classes",
        "eval-meta-task",
        "predict-meta-not-json",
        "eval-meta-list",
    ] + [
        c["id"] for c in cases if "truncate" in c["id"] and c["id"].startswith(("predict-onnx", "eval-onnx"))
    ]
    assert {cid: results[cid]["rc"] for cid in must_fail} == dict.fromkeys(must_fail, 2)
    failed = sum(r["rc"] == 2 for r in results.values())
    assert failed >= 0.7 * len(results), f"only {failed}/{len(results)} damaged inputs were rejected"
    assert max(r["seconds"] for r in results.values()) < CASE_TIMEOUT_S


if __name__ == "__main__":  # the child interpreter of test_fuzz_predict_and_eval
    _driver(sys.argv[1])
