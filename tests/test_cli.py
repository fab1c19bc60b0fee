from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vitshrink.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_presets_lists_every_family(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for fam in ("vit", "deit", "swin", "mobilevit", "segformer", "upernet"):
        assert f" {fam} " in out


def test_user_error_is_one_line_exit_2_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vitshrink.cli", "eval", str(tmp_path / "missing"), "--data", "fashion-mnist"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model not found: {tmp_path / 'missing'}"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--model", "vit-huge", "--data", "fashion-mnist", "--out", "OUT"],
            "unknown model preset 'vit-huge'",
        ),
        (
            ["train", "--model", "vit-micro", "--data", "/nonexistent/data", "--out", "OUT"],
            "neither a built-in dataset",
        ),
        (["bench", "pyproject.toml"], "expected a model directory, an .onnx file or an OpenVINO model"),
    ],
)
def test_cli_errors(capsys, tmp_path, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    argv = [str(ROOT / a) if a == "pyproject.toml" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()
