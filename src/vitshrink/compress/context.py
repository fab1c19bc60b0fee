"""What every compress stage reads: the run's teacher, data and logging (`Context`), and the latest
full-precision model (`Current`). Kept apart from the runner so stage kinds (`compress.stages`) can
use them without importing the engine that runs them."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VitshrinkError
from ..tasks import TASK_METRIC


@dataclass
class Context:
    teacher: Path
    data: str
    data_options: dict[str, Any]
    meta: dict[str, Any]  # the teacher's meta (task, class names, preprocessing)
    quiet: bool = False
    # Budget search only: where teacher logits are shared between stages and trials, and a callback
    # fed each training epoch's record (stage kind, {"epoch", "val"}) so weak trials can stop early;
    # stages reused from the cache replay their stored epochs through it.
    logits_dir: Path | None = None
    epoch_hook: Callable[[str, dict[str, Any]], None] | None = None
    logger: Callable[..., None] | None = None  # where log() lines go (default: stderr, "[compress]")
    # Seconds each finished stage of this run took, by label (a baseline stage's time budget)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def log(self, *msg: Any) -> None:
        # Stage lines and summaries print even under --quiet, which silences progress bars and the
        # per-trial progress lines only: a quiet run still says what it did.
        if self.logger is not None:
            self.logger(*msg)
        else:
            print("[compress]", *msg, file=sys.stderr, flush=True)

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """The data folder's content key (names, sizes, mtimes), walked once per run, not per trial."""
        from ..data import fingerprint

        return fingerprint(self.data)

    @property
    def metric(self) -> str:
        return TASK_METRIC[self.meta["task"]]


def make_context(model: str | os.PathLike, data: str, data_options: dict[str, Any], quiet: bool) -> Context:
    """Check the teacher and the data agree before anything long starts."""
    from ..data import describe
    from ..hub import resolve_model
    from ..models import is_model_dir, load_model

    teacher = resolve_model(model)
    if not is_model_dir(teacher):
        if teacher.suffix == ".onnx":
            raise VitshrinkError(
                f"compress needs the teacher as a model directory, not an ONNX file: {teacher}"
            )
        raise VitshrinkError(f"teacher model directory not found (no config.json): {teacher}")
    _, meta = load_model(teacher)  # also verifies checksums and honours preprocessor_config.json
    info = describe(data, data_options=data_options)
    if info["task"] != meta["task"]:
        raise VitshrinkError(f"the teacher is a {meta['task']} model but data '{data}' is {info['task']}")
    if len(info["class_names"]) != len(meta["class_names"]):
        raise VitshrinkError(
            f"the teacher has {len(meta['class_names'])} classes but data '{data}' has {len(info['class_names'])}"
        )
    return Context(
        teacher=teacher.resolve(), data=str(data), data_options=data_options, meta=meta, quiet=quiet
    )


@dataclass
class Current:
    """The latest full-precision model: what distill/prune/export/quantize take as input."""

    model_dir: Path
    onnx: Path
    key: str
