"""`vitshrink measure-worker`: benchmark a shared search's candidates on the deployment device.

Runs on the target (a Jetson, an edge CPU) against the study the search workers share. A search
worker with a latency_ms budget that sees a live measure-worker asks for each measured candidate's
latency (the trial's `latency_wanted` attribute) and waits; this worker fetches the ONNX file (from
the artifact store, or the path when it can read it), runs `bench` on it here, and writes the figures
back as the study attribute `latency:N`. The search then judges the candidate on those figures.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from .devices import get_profile, threads_for
from .search.shared import (
    HEARTBEAT_S,
    SharedOptions,
    Worker,
    alive_workers,
    latency_key,
    open_artifacts,
    open_storage,
    workers,
)


def measure_worker(
    storage: str,
    study: str,
    *,
    artifacts: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    runs: int = 20,
    rounds: int = 3,
    idle_exit: float | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Serve latency requests until the search's workers have all finished (or `idle_exit` seconds
    pass with nothing to measure); returns {"measured": [trial numbers], "device": ...}."""
    import optuna

    opts = SharedOptions(storage, study, artifacts)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if not quiet:
        print(f"measure-worker: serving study {opts.study}", flush=True)
    st = _wait_for_study(open_storage(opts.storage, HEARTBEAT_S), opts.study, idle_exit)
    profile = get_profile(device)
    threads = threads_for(profile, threads)
    store = open_artifacts(artifacts)
    source = f"{profile.name} on {socket.gethostname()} (measure-worker)"
    me = Worker(st, Path(tempfile.gettempdir()), role="measurer")
    me.start()
    done: list[int] = []
    idle_since = time.time()
    try:
        while True:
            todo = _wanted(st)
            for t in todo:
                fig = _bench_one(t, store, threads, runs, rounds, profile.bench_device)
                st.set_user_attr(latency_key(t.number), {**fig, "source": source, "measurer": me.id})
                done.append(t.number)
                if not quiet:
                    print(f"trial {t.number}: p50 {fig['p50']:.2f} ms on {source}", flush=True)
            if todo:
                idle_since = time.time()
            elif _search_over(st) or (idle_exit is not None and time.time() - idle_since > idle_exit):
                break
            time.sleep(0.5)
    finally:
        me.stop()
    return {"measured": done, "device": source}


def _wait_for_study(storage: Any, name: str, idle_exit: float | None) -> Any:
    """The study, once the first search worker has created it (a measure-worker may start first)."""
    import optuna

    from .search.shared import SharedStoreError

    t0 = time.time()
    while True:
        try:
            return optuna.load_study(storage=storage, study_name=name)
        except KeyError:
            if idle_exit is not None and time.time() - t0 > idle_exit:
                raise SharedStoreError(f"measure-worker: no study {name} after {idle_exit:g} s") from None
            time.sleep(1.0)


def _wanted(study: Any) -> list[Any]:
    """Running trials that wait for a latency nobody wrote yet."""
    import optuna

    attrs = study.user_attrs
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return [t for t in running if "latency_wanted" in t.user_attrs and latency_key(t.number) not in attrs]


def _search_over(study: Any) -> bool:
    """Every search worker that joined has finished (and at least one joined)."""
    return bool(workers(study)) and not alive_workers(study)


def _bench_one(
    t: Any, store: Any, threads: int | None, runs: int, rounds: int, device: str
) -> dict[str, Any]:
    from optuna.artifacts import download_artifact

    from ..bench import bench_many

    want = t.user_attrs["latency_wanted"]
    with tempfile.TemporaryDirectory(prefix=f"vitshrink-measure-p{os.getpid()}-") as tmp:
        path = Path(want["path"])
        if store is not None and want.get("artifact_id"):
            path = Path(tmp) / "model.onnx"
            download_artifact(artifact_store=store, file_path=str(path), artifact_id=want["artifact_id"])
        b = bench_many([path], threads=threads, runs=runs, rounds=rounds, device=device)[0]
    return {"p50": b["latency_ms"]["p50"], "peak_rss_mb": b.get("peak_rss_mb"), "size_mb": b["size_mb"]}
