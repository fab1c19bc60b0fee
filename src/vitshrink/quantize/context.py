"""The state every int8 build shares (builders, sensitivity, the pipeline steps take it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cpu import reduce_range_for
from .measure import compare


@dataclass
class Ctx:
    work: Path
    batches: Sequence[np.ndarray]  # calibration (or generated probe) inputs, see calib.Batches
    ref: Sequence[np.ndarray] | None  # fp32 outputs per batch
    eval_fn: Callable[[str], float] | None
    base_metric: float | None
    per_channel: bool
    calib_method: str
    vit_aware: bool
    target: str
    say: Callable[[str], None]
    sample: np.ndarray | None = None  # one batch-1 input (or the fixed batch) for latency
    quiet: bool = False
    target_cpu: str = "vnni"  # concrete int8 CPU target (see vitshrink.cpu); "avx2" means 7-bit weights
    generated: bool = False  # `batches` are generated probe inputs, not calibration data
    pre: Path | None = None  # the pre-processed float model every candidate derives from
    rewrites: dict[str, Any] = field(default_factory=dict)  # exact graph rewrites applied to `pre`
    counter: list[int] = field(default_factory=lambda: [0])
    memo: dict[str, float | None] = field(default_factory=dict)
    compared: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def reduce_range(self) -> bool:
        # TensorRT runs symmetric int8 x int8 on the GPU: no 16-bit pair sums to protect.
        return self.target != "tensorrt" and reduce_range_for(self.target_cpu)

    def path(self, tag: str) -> Path:
        self.counter[0] += 1
        return self.work / f"{self.counter[0]:04d}-{tag}.onnx"

    def metric(self, path: Path) -> float | None:
        key = str(path)
        if key not in self.memo:
            if self.eval_fn is not None:
                self.memo[key] = float(self.eval_fn(key))
            else:
                self.memo[key] = None if self.ref is None else self.compare(path)["agreement"]
        return self.memo[key]

    def fidelity(self, path: Path) -> dict[str, float]:
        return {} if self.ref is None else dict(self.compare(path))

    def compare(self, path: Path) -> dict[str, float]:
        """Agreement / relative error / finiteness vs fp32 over all batches, streamed (see measure.compare)."""
        key = str(path)
        if key not in self.compared:
            assert self.ref is not None
            self.compared[key] = compare(path, self.batches, self.ref)
        return self.compared[key]
