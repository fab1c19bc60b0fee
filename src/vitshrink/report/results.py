"""Read and validate a run's `results.json` into typed records.

Validation is strict on what the report needs (a metric and a p50 latency per stage) and lenient on the
rest (missing sizes, MACs or throughput show as a dash), so a partially measured run still reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitshrink.artifacts import read_json
from vitshrink.errors import DataError, VitshrinkError
from vitshrink.safeio import inside
from vitshrink.tasks import TASK_METRIC

RESULTS_NAME = "results.json"
EXAMPLE_ROLES = ("image", "ground_truth", "teacher", "compressed")


@dataclass(frozen=True)
class StageResult:
    name: str
    metric: float  # the run's headline metric (accuracy or mIoU), a fraction in [0, 1]
    p50: float
    p90: float | None = None
    p99: float | None = None
    dice: float | None = None
    artifact: str | None = None
    throughput: float | None = None
    peak_rss_mb: float | None = None
    size_mb: float | None = None
    params: int | None = None
    macs: int | None = None
    per_class_iou: dict[str, float] = field(default_factory=dict)
    notes: str = ""
    baseline: bool = False  # the CNN baseline beside the pipeline (a `baseline` stage), not a step of it


@dataclass(frozen=True)
class Example:
    paths: dict[str, Path]  # role (see EXAMPLE_ROLES) -> resolved image path
    labels: dict[str, str]  # role -> class label (classification examples)
    caption: str = ""


@dataclass(frozen=True)
class Results:
    run_dir: Path
    task: str
    metric: str
    stages: list[StageResult]
    class_names: list[str] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)  # compress --budget's summary (search.json)


def _where(i: int, name: str | None) -> str:
    return f"results.json: stage {i}" + (f" ({name!r})" if name else "")


def _number(value: Any, what: str, *, required: bool, positive: bool = False) -> float | None:
    if value is None:
        if required:
            raise DataError(f"{what} is missing")
        return None
    # bool is an int subclass; a True latency is a bug upstream, not a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{what} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise DataError(f"{what} must be > 0, got {value!r}")
    if value < 0:
        raise DataError(f"{what} must be >= 0, got {value!r}")
    return float(value)


def _fraction(value: Any, what: str, *, required: bool) -> float | None:
    v = _number(value, what, required=required)
    # The project convention is fractions; catching 0-100 values here beats a report showing 9120%.
    if v is not None and v > 1.0:
        raise DataError(f"{what}={value!r} is outside [0, 1] (metrics are fractions, not percentages)")
    return v


def _int(value: Any, what: str) -> int | None:
    v = _number(value, what, required=False)
    return None if v is None else int(v)


def _stage(i: int, raw: Any, metric: str) -> StageResult:
    if not isinstance(raw, dict):
        raise DataError(f"{_where(i, None)} must be an object, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{_where(i, None)} has no 'name'")
    where = _where(i, name)
    lat = raw.get("latency_ms")
    if not isinstance(lat, dict):
        raise DataError(f"{where} has no 'latency_ms' object")
    per_class = raw.get("per_class_iou") or {}
    if not isinstance(per_class, dict):
        raise DataError(f"{where}: 'per_class_iou' must be an object")
    notes = raw.get("notes") or ""
    artifact = raw.get("artifact")
    baseline = raw.get("kind") == "baseline"
    if baseline and "baseline" not in name:
        name = f"{name} (CNN baseline)"
    return StageResult(
        baseline=baseline,
        name=name,
        metric=_fraction(raw.get(metric), f"{where} {metric}", required=True),
        p50=_number(lat.get("p50"), f"{where} latency_ms.p50", required=True, positive=True),
        p90=_number(lat.get("p90"), f"{where} latency_ms.p90", required=False),
        p99=_number(lat.get("p99"), f"{where} latency_ms.p99", required=False),
        dice=_fraction(raw.get("dice"), f"{where} dice", required=False),
        artifact=str(artifact) if artifact else None,
        throughput=_number(raw.get("throughput"), f"{where} throughput", required=False),
        peak_rss_mb=_number(raw.get("peak_rss_mb"), f"{where} peak_rss_mb", required=False),
        size_mb=_number(raw.get("size_mb"), f"{where} size_mb", required=False),
        params=_int(raw.get("params"), f"{where} params"),
        macs=_int(raw.get("macs"), f"{where} macs"),
        per_class_iou={
            str(k): _fraction(v, f"{where} per_class_iou[{k!r}]", required=True) for k, v in per_class.items()
        },
        notes=str(notes),
    )


def _example(i: int, raw: Any, run_dir: Path) -> Example:
    if not isinstance(raw, dict):
        raise DataError(f"results.json: example {i} must be an object")
    paths = {}
    for role in EXAMPLE_ROLES:
        rel = raw.get(role)
        if rel:
            p = Path(rel)
            p = p if p.is_absolute() else run_dir / p
            if not inside(p, run_dir):  # the report embeds these files: never /etc/hostname & co
                raise DataError(f"results.json: example {i} {role} {rel} is outside the run directory")
            paths[role] = p
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict):
        raise DataError(f"results.json: example {i} 'labels' must be an object")
    return Example(
        paths=paths,
        labels={str(k): str(v) for k, v in labels.items() if k in EXAMPLE_ROLES and v is not None},
        caption=str(raw.get("caption") or ""),
    )


def load_results(run_dir: str | Path) -> Results:
    """Parse `run_dir/results.json`; raise DataError with a one-line reason if it is unusable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    path = run_dir / RESULTS_NAME
    if not path.is_file():
        raise DataError(f"no {RESULTS_NAME} in {run_dir} (run `vitshrink compress` or `bench` first)")
    try:
        raw = read_json(path)
    except VitshrinkError as e:  # re-typed so callers can catch every bad-input case as DataError
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"corrupt {path}: top level must be an object")
    task = raw.get("task")
    if task not in TASK_METRIC:
        raise DataError(f"{path}: 'task' must be one of {sorted(TASK_METRIC)}, got {task!r}")
    metric = raw.get("metric") or TASK_METRIC[task]
    if metric not in TASK_METRIC.values():
        raise DataError(f"{path}: 'metric' must be one of {sorted(TASK_METRIC.values())}, got {metric!r}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise DataError(f"{path}: 'stages' must be a non-empty list")
    examples_raw = raw.get("examples") or []
    if not isinstance(examples_raw, list):
        raise DataError(f"{path}: 'examples' must be a list")
    device = raw.get("device") or {}
    class_names = raw.get("class_names") or []
    return Results(
        run_dir=run_dir,
        task=task,
        metric=metric,
        stages=[_stage(i, s, metric) for i, s in enumerate(stages_raw)],
        class_names=[str(c) for c in class_names] if isinstance(class_names, list) else [],
        device=device if isinstance(device, dict) else {"info": str(device)},
        examples=[_example(i, e, run_dir) for i, e in enumerate(examples_raw)],
        search=raw["search"] if isinstance(raw.get("search"), dict) else {},
    )
