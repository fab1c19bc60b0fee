"""A CNN baseline trained on the same data for the same wall-clock budget as a compressed student.

The method's paper justifies compressing a ViT by comparing it with its task's CNN baseline (FANet,
the LPCV 2023 sample solution, ResNet-18 class); `train_baseline` gives a user that comparison on
their own data: a ResNet (classification) or UperNet + ResNet (segmentation) trained from scratch on
the labels, with as many epochs as fit in `budget_s`.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import VitshrinkError

__all__ = ["BASELINES", "baseline_preset", "baseline_verdict", "baseline_winner", "train_baseline"]

# The CPU-sized baselines (`resnet-18`, `upernet-resnet-18` are the full-width ones).
BASELINES = {"classification": "resnet-18-micro", "segmentation": "upernet-resnet-18-micro"}


def baseline_preset(task: str) -> str:
    try:
        return BASELINES[task]
    except KeyError:
        raise VitshrinkError(
            f"no CNN baseline for task '{task}' (choose from {', '.join(BASELINES)})"
        ) from None


def train_baseline(
    data: str,
    *,
    out: str | os.PathLike,
    budget_s: float,
    task: str | None = None,
    preset: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    limit: int | None = None,
    val_limit: int | None = 2000,
    augment: bool = True,
    data_options: dict[str, Any] | None = None,
    probe_batches: int = 8,
    max_epochs: int = 200,
    seed: int = 0,
    quiet: bool = True,
    **overrides: Any,
) -> tuple[Path, dict[str, Any]]:
    """Train the CNN baseline (`preset`, default `BASELINES[task]`) on DATA for about `budget_s` seconds.

    The epoch count is planned, not cut short, so the learning-rate schedule runs to its end: a short
    probe run (`probe_batches` training batches) measures the seconds per image here, and the real run
    gets the epochs that fit in the budget (at least one). Returns (OUT, metrics) with the budget, the
    planned epochs and the measured wall time of the real run (`wall_s`, excluding the probe).
    """
    from .data import load_dataset
    from .train import train

    if budget_s <= 0:
        raise VitshrinkError(f"baseline time budget must be positive, got {budget_s}")
    if preset is None:
        if task is None:
            raise VitshrinkError("train_baseline needs task or preset")
        preset = baseline_preset(task)
    n_train = len(
        load_dataset(data, "train", size=image_size, limit=limit, seed=seed, data_options=data_options)
    )
    kw: dict[str, Any] = dict(
        batch_size=batch_size,
        lr=lr,
        image_size=image_size,
        augment=augment,
        data_options=data_options,
        seed=seed,
        quiet=quiet,
        **overrides,
    )
    probe_n = min(n_train, probe_batches * batch_size)
    with tempfile.TemporaryDirectory(prefix="vitshrink-probe-") as tmp:
        t0 = time.perf_counter()
        train(preset, data, out=Path(tmp) / "m", epochs=1, limit=probe_n, val_limit=batch_size, **kw)
        per_image = (time.perf_counter() - t0) / probe_n  # includes build/load/validation: errs short
    epochs = max(1, min(max_epochs, math.floor(budget_s / (per_image * n_train))))
    t0 = time.perf_counter()
    out, metrics = train(preset, data, out=out, epochs=epochs, limit=limit, val_limit=val_limit, **kw)
    wall = time.perf_counter() - t0
    return out, {**metrics, "preset": preset, "budget_s": budget_s, "epochs": epochs, "wall_s": wall}


def baseline_winner(deployed: tuple[float, float], base: tuple[float, float]) -> str | None:
    """Who wins at the deployed latency, from (p50 ms, metric) of the deployed stage and the baseline:
    "compressed" (at least as fast and as accurate), "baseline" (slower and less accurate deployed) or
    None (one is faster, the other more accurate). The one rule the report and `baseline_verdict` use."""
    faster, better = deployed[0] <= base[0], deployed[1] >= base[1]
    if faster and better:
        return "compressed"
    if not faster and not better:
        return "baseline"
    return None


def baseline_verdict(stages: list[dict[str, Any]], metric: str) -> str:
    """One sentence for a report: the deployed (last non-baseline) stage vs the stage marked `baseline`.

    `stages` are results.json stage records carrying `metric`, `latency_ms` ({"p50": ...} or a number)
    and, for the CNN, `"baseline": True`.
    """

    def p50(s: dict[str, Any]) -> float:
        lat = s["latency_ms"]
        return float(lat["p50"] if isinstance(lat, dict) else lat)

    base = next((s for s in stages if s.get("baseline")), None)
    deployed = next((s for s in reversed(stages) if not s.get("baseline")), None)
    if base is None or deployed is None:
        raise VitshrinkError("baseline_verdict needs a baseline stage and a compressed stage")
    who = {
        "compressed": f"the compressed ViT ({deployed['name']})",
        "baseline": f"the CNN baseline ({base['name']})",
        None: "neither outright",
    }[baseline_winner((p50(deployed), deployed[metric]), (p50(base), base[metric]))]
    return (
        f"At the deployed latency ({p50(deployed):.2f} ms p50) the winner is {who}: {metric} "
        f"{deployed[metric]:.4f} vs {base[metric]:.4f} for the CNN baseline at {p50(base):.2f} ms "
        f"({p50(base) / p50(deployed):.2f}x its latency)."
    )
