"""Latency timing, one owner: how vitshrink times a model for `bench`, `quantize` and `prune`.

Medians of single-batch calls (wall clock, `time.perf_counter`); several models are timed round-robin
so that load changes on a shared machine hit every model alike. numpy and onnxruntime only at import:
the bench worker times ONNX models without torch.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SPEED_TIE = 0.05  # latencies within 5% of each other count as equal: noise on a shared CPU


def within_speed_tie(ms: float, reference_ms: float) -> bool:
    """`ms` counts as no slower than `reference_ms` (at most SPEED_TIE slower)."""
    return ms <= reference_ms * (1 + SPEED_TIE)


def time_ms(fn: Callable[[], Any], n: int) -> list[float]:
    """Wall-clock milliseconds of `n` calls of `fn`."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def seconds_per_item(
    fn: Callable[..., Any], batches: Sequence[Sequence[Any]], *, sync: Callable[[], Any] | None = None
) -> float:
    """Throughput: wall-clock seconds per item of `fn(*batch)` over one pass through `batches` (items:
    the length of each batch's first argument), after one untimed warm-up call on the first batch.

    One span over the whole pass, `sync` (e.g. torch.cuda.synchronize) at both ends so device work the
    loop queued counts. With a single batch, that batch is timed again after its warm-up.
    """
    fn(*batches[0])  # warm-up: allocator, kernels, lazy init
    if sync is not None:
        sync()
    t0, seen = time.perf_counter(), 0
    for batch in batches[1:] or batches:
        fn(*batch)
        seen += len(batch[0])
    if sync is not None:
        sync()
    return (time.perf_counter() - t0) / max(1, seen)


def round_robin_ms(
    fns: Sequence[Callable[[], Any]],
    *,
    runs: int,
    budget_s: float,
    warmup: int = 3,
    min_runs: int = 5,
    gap_s: float = 0.0,
) -> list[list[float]]:
    """Per function, the milliseconds of up to `runs` calls made in turn with the others.

    Stops early once every function has `min_runs` calls and `budget_s` seconds have passed (gaps not
    counted). `gap_s`: an untimed pause before each call, so the thread pools of the previous runtime
    (which spin after their work) are idle when the next one starts.
    """
    for fn in fns:
        time_ms(fn, warmup)
    times: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    while len(times[0]) < runs and (len(times[0]) < min_runs or spent < budget_s):
        for fn, t in zip(fns, times):
            if gap_s:
                time.sleep(gap_s)
            t.extend(time_ms(fn, 1))
            spent += t[-1] / 1e3
    return times


def interleaved_ms(fns: Sequence[Callable[[], Any]], *, rounds: int = 5, calls: int = 5) -> list[float]:
    """Per function, the best over `rounds` of the median of `calls` calls in a row, functions taken in
    turn (order reversed every other round against drift): what it costs on a quiet moment.

    For ranking models against each other where the deployed session spins (the default): each block
    runs as the model would alone, where `round_robin_ms`'s single calls pay the previous session's
    spinning workers. Best-of-rounds drops rounds that other processes on the machine disturbed.
    """
    for fn in fns:
        time_ms(fn, 2)
    best = [float("inf")] * len(fns)
    for r in range(rounds):
        order = list(range(len(fns)))[:: 1 if r % 2 == 0 else -1]
        for i in order:
            best[i] = min(best[i], statistics.median(time_ms(fns[i], calls)))
    return best


def onnx_latencies_ms(
    paths: Sequence[str | os.PathLike],
    sample: np.ndarray,
    *,
    runs: int = 30,
    budget_s: float = 4.0,
    threads: int | None = 1,
) -> list[float]:
    """Median latency (ms) of one batch for each ONNX model (onnxruntime CPU) or OpenVINO IR (OpenVINO
    CPU), `threads` intra-op threads (None: each runtime's default)."""
    from ..deploy.ov_runtime import OvSession, is_openvino
    from ..deploy.runtime import cpu_session

    # Several sessions with worker threads: each pool spins for a while after its run and steals the
    # cores from the next session (SegFormer-B0 at 512, 2 threads: 58 ms alone, 90 ms in turn with two
    # others). Without spinning every model runs as alone (+2 %), so the comparison stays fair.
    spin = threads == 1 or len(paths) == 1
    sessions = [
        OvSession(p, threads) if is_openvino(p) else cpu_session(p, threads=threads, spin=spin) for p in paths
    ]
    calls = [
        (lambda s=s, f={s.get_inputs()[0].name: sample}: s.run(None, f))  # noqa: B008
        for s in sessions
    ]
    # OpenVINO's (TBB) workers also stay busy for a moment after a call and cannot be told not to:
    # with several threads, a short untimed pause lets them sleep before the next model runs.
    gap = 0.1 if threads != 1 and len(paths) > 1 and any(is_openvino(p) for p in paths) else 0.0
    times = round_robin_ms(calls, runs=runs, budget_s=budget_s, gap_s=gap)
    return [statistics.median(t) for t in times]


def torch_latency_ms(model: Any, x: Any, runs: int = 10) -> float:
    """Median single-batch latency of a transformers model here (PyTorch eager).

    Subnormals are flushed while timing, as the exported model and vitshrink's onnxruntime sessions
    do, so Swin's shifted-window blocks are not timed on x86's subnormal slow path.
    """
    import torch

    torch.set_flush_denormal(True)
    try:
        with torch.no_grad():
            return statistics.median(time_ms(lambda: model(pixel_values=x), runs + 1)[1:])
    finally:
        torch.set_flush_denormal(False)
