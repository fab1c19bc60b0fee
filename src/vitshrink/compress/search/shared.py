"""A search shared by several workers (`compress --storage URL --study NAME`).

Optuna does the coordination: the study lives in a relational database (PostgreSQL, MySQL, SQLite) or
a journal file on a shared folder; with a database, every running trial records a heartbeat and a
trial whose worker stopped beating for `grace` seconds is failed and enqueued once more
(`RetryHeartbeatStaleTrialCallback`), so another worker runs it. The first worker creates the study (the
database's unique study name decides which) and stores the plan in it; the others wait for it.
Workers register in the study's user attributes (`worker:ID`, each written only by its owner, so no
read-modify-write races) with a heartbeat of their own, which tells the last worker that it is last.
Trial files (the ONNX of every stage and state.json) go to an Optuna artifact store (a folder, or S3
through boto3) so that the last worker, or `compress --finish`, can measure and ship the chosen one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import socket
import threading
import time
import types
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...artifacts import read_json, write_json
from ...errors import VitshrinkError

HEARTBEAT_S = 15  # a killed worker's trial is failed after 3 missed beats: under a minute
PLAN_WAIT_S = 1800.0  # how long a joining worker waits for the first one's plan
RETRIES = 6  # a dropped database connection: 6 tries, 0.5 s doubling (about 30 s in all)
WORKER_FILE = "worker.json"  # OUT's owner: two workers never write one OUT


class SharedStoreError(VitshrinkError):
    """The shared study or its artifact store cannot be used as given."""


def _is_journal(url: str) -> bool:
    return url.startswith("journal:") or ("://" not in url and url.endswith((".log", ".journal")))


def _retrying(fn: Any) -> Any:
    """A storage call retried with back-off when the database connection drops (Optuna wraps
    SQLAlchemy's errors in StorageInternalError); pool_pre_ping replaces dead pooled connections."""
    import optuna
    import sqlalchemy.exc

    transient = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError)

    @functools.wraps(fn)
    def call(*args: Any, **kw: Any) -> Any:
        for i in range(RETRIES):
            try:
                return fn(*args, **kw)
            except transient:
                if i == RETRIES - 1:
                    raise
                time.sleep(0.5 * 2**i * (0.5 + random.random()))
        raise AssertionError("unreachable")

    return call


@functools.cache
def _retrying_rdb() -> type:
    """RDBStorage with every public method retried (a subclass, so Optuna's isinstance checks for
    RDB storage and heartbeats still hold)."""
    from optuna.storages import RDBStorage

    names = [
        n for n, v in vars(RDBStorage).items() if isinstance(v, types.FunctionType) and not n.startswith("_")
    ]
    return type("RetryingRDBStorage", (RDBStorage,), {n: _retrying(getattr(RDBStorage, n)) for n in names})


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S) -> Any:
    """An Optuna storage for URL: `journal:PATH` (or a *.log / *.journal path) is a journal file for a
    shared folder (no heartbeats: see the README); anything else is an SQLAlchemy URL.
    `postgresql://` uses psycopg 3 (the `distributed` extra)."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if _is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        path = url.removeprefix("journal:").removeprefix("//")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # the open(2)-based lock works on NFS, where the default symlink lock may not
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("postgresql+psycopg"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise SharedStoreError(
                "--storage postgresql:// needs psycopg: pip install 'vitshrink[distributed]'"
            ) from None
    import sqlalchemy.exc

    transient = (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError)
    for i in range(RETRIES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return _retrying_rdb()(
                    url,
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat_s,
                    grace_period=3 * heartbeat_s,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
            except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors vary: one line names the URL
                # Workers starting together on an empty database race to create Optuna's tables (a
                # unique violation for the loser), and a server may be briefly unreachable: retry.
                if i < RETRIES - 1 and isinstance(e, transient):
                    time.sleep(0.5 * 2**i * (0.5 + random.random()))
                    continue
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise SharedStoreError(f"--storage {url}: {msg}") from None
    raise AssertionError("unreachable")


def open_artifacts(spec: str | None) -> Any:
    """An Optuna artifact store: a folder, or s3://bucket/prefix (boto3, credentials from the usual
    AWS environment)."""
    if spec is None:
        return None
    from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore

    if spec.startswith("s3://"):
        try:
            import boto3  # noqa: F401
        except ImportError:
            raise SharedStoreError("--artifacts s3://... needs boto3: pip install boto3") from None
        bucket, _, prefix = spec[5:].partition("/")
        store = Boto3ArtifactStore(bucket)
        if prefix:  # Boto3ArtifactStore keys by artifact id only: keep them under the prefix
            store = _Prefixed(store, prefix.rstrip("/") + "/")
        return store
    Path(spec).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(spec)


class _Prefixed:
    """An artifact store whose ids live under a key prefix (S3 folders)."""

    def __init__(self, inner: Any, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def open_reader(self, artifact_id: str) -> Any:
        return self.inner.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: Any) -> None:
        self.inner.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.inner.remove(self.prefix + artifact_id)


# ---------------------------------------------------------------------------------------- the study


def create_or_join(storage: Any, name: str, sampler: Any, pruner: Any) -> tuple[Any, bool]:
    """The study NAME: created here (True: this worker plans the search) or joined (False)."""
    import optuna

    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner), False


def wait_for_plan(study: Any, log: Any, timeout_s: float = PLAN_WAIT_S) -> None:
    """A joining worker: wait until the worker that created the study has stored its plan."""
    t0, said = time.time(), False
    while "plan" not in study.user_attrs:
        if time.time() - t0 > timeout_s:
            raise SharedStoreError(
                f"study {study.study_name}: no plan after {timeout_s / 60:.0f} min (did the worker that "
                "created it stop? start a new study)"
            )
        if not said:
            log("waiting for the plan of the worker that created the study")
            said = True
        time.sleep(1.0)


# -------------------------------------------------------------------------------------- the workers


@dataclass
class Worker:
    """This process in a shared study: its id, its OUT, and a thread that keeps its registration fresh."""

    study: Any
    out: Path
    heartbeat_s: int = HEARTBEAT_S
    role: str = "worker"  # or "measurer" (vitshrink measure-worker)
    id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}")
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.info: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "out": str(self.out.resolve()),
            "started": round(time.time(), 1),
            "state": "running",
            "heartbeat_s": self.heartbeat_s,
        }

    @property
    def key(self) -> str:
        return f"{self.role}:{self.id}"

    def start(self) -> None:
        """Claim OUT (refused while another live worker of the study owns it) and start beating."""
        own = self.out / WORKER_FILE
        if self.role == "worker" and own.is_file():
            prev = read_json(own)
            if prev.get("study") == self.study.study_name and prev.get("worker") in alive_workers(self.study):
                raise SharedStoreError(
                    f"{self.out} belongs to worker {prev['worker']} of study {self.study.study_name}, still "
                    "running: give each worker its own --out"
                )
        if self.role == "worker":
            write_json(own, {"study": self.study.study_name, "worker": self.id})
        self.beat()
        self._thread = threading.Thread(target=self._run, name="vitshrink-worker-beat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next one
                self.beat()

    def beat(self, **update: Any) -> None:
        self.info.update(update, seen=round(time.time(), 1))
        self.study.set_user_attr(self.key, dict(self.info))

    def stop(self, state: str = "done") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.beat(state=state, done_at=time.time())


def is_last(study: Any, me: str) -> bool:
    """Whether this (stopped) worker ships the model: no other worker is alive, and of those that
    finished, it finished last (each writes `done_at` before it looks, so of two finishing together
    the second sees the first's, and exactly one is last)."""
    if alive_workers(study) - {me}:
        return False
    done = {w: float(v.get("done_at", 0)) for w, v in workers(study).items() if v.get("state") == "done"}
    return not done or max(done, key=lambda w: (done[w], w)) == me


def workers(study: Any, role: str = "worker") -> dict[str, dict[str, Any]]:
    """Every worker (or measure-worker) that joined the study: id -> its registration."""
    return {k.split(":", 1)[1]: v for k, v in study.user_attrs.items() if k.startswith(role + ":")}


def alive_workers(study: Any, role: str = "worker") -> set[str]:
    """Workers still running: registered as running and beating within 3 of their own beats."""
    now = time.time()
    return {
        w
        for w, v in workers(study, role).items()
        if v.get("state") == "running"
        and now - float(v.get("seen", 0)) < 3 * float(v.get("heartbeat_s", HEARTBEAT_S))
    }


def fail_stale(study: Any) -> None:
    """Fail the trials of workers whose heartbeat stopped (and enqueue each once more)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def fail_orphans(study: Any) -> list[int]:
    """At the end: RUNNING trials whose worker is gone (a journal file has no heartbeats) are failed,
    so no trial stays RUNNING after the search; returns their numbers."""
    import optuna

    fail_stale(study)
    live = alive_workers(study)
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("worker") not in live:
            try:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                out.append(t.number)
            except (ValueError, RuntimeError):  # finished meanwhile by its worker
                pass
    return out


def trained_node(p: dict[str, Any]) -> tuple[str, float, int]:
    """What a candidate trains before quantizing: (student, prune ratio, extra-training factor)."""
    return (str(p.get("student")), float(p.get("prune_ratio", 0.0)), int(p.get("extend", 0)))


def claimed(study: Any, me: str) -> tuple[set[Any], set[tuple[str, float, int]]]:
    """Keys of candidates other workers run or wait to run, and the models they are training."""
    import optuna

    from ..schedule import key

    states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    keys, busy = set(), set()
    for t in study.get_trials(deepcopy=False, states=states):
        p = t.system_attrs.get("fixed_params") or t.params  # enqueued, or a retry (params copied)
        if not {"student", "prune_ratio", "quant"} <= set(p):
            continue
        keys.add(key({"extend": 0, **p}))
        if t.user_attrs.get("worker") != me:
            busy.add(trained_node(p))
    return keys, busy


# -------------------------------------------------------------------------------------- artifacts


def upload_trial(store: Any, trial: Any, root: Path, records: list[dict[str, Any]]) -> dict[str, str]:
    """Upload a measured trial's stage ONNX files and state.json; returns {relative path: artifact id}."""
    from optuna.artifacts import upload_artifact

    paths = ["state.json"] + [r["artifact"] for r in records[1:]]
    ids: dict[str, str] = {}
    for rel in paths:
        for p in (root / rel, root / (rel + ".data")):  # ONNX external data beside its file, if any
            if p.is_file():
                name = os.path.relpath(p, root)
                ids[name] = upload_artifact(artifact_store=store, file_path=str(p), study_or_trial=trial)
    return ids


def fetch_trial(store: Any, uploads: dict[str, str], dest: Path) -> Path:
    """A trial uploaded by another worker, downloaded under dest (its stage files in one folder);
    returns dest, whose state.json lists the downloaded artifacts (the teacher: this worker's own)."""
    from optuna.artifacts import download_artifact

    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for i, (rel, aid) in enumerate(sorted(uploads.items())):
        local = "state.json" if rel == "state.json" else f"stage-{i}-{Path(rel).name}"
        if rel.endswith(".onnx.data"):  # external data keeps the name its ONNX file refers to
            local = Path(rel).name
        target = tmp / local
        target.unlink(missing_ok=True)
        download_artifact(artifact_store=store, file_path=str(target), artifact_id=aid)
        names[rel] = local
    state = read_json(tmp / "state.json")
    for r in state["stages"][1:]:
        r["artifact"] = names[r["artifact"]]
        r["model_dir"] = None  # weights stay on the worker that trained them
        r["checksums"] = {}
    write_json(tmp / "state.json", state)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


# ------------------------------------------------------------------------------ a finished trial


def share_trial(
    run: Any, trial: Any, root: Path, records: list[dict[str, Any]], final: Path
) -> dict[str, Any]:
    """A measured trial in a shared study: its files uploaded (with --artifacts) and, with a latency
    budget and a live measure-worker, the device's latency instead of this machine's. Returns what
    replaces or adds to the trial's measurements."""
    extra: dict[str, Any] = {"worker": run.worker.id}
    ids: dict[str, str] = {}
    if run.artifacts is not None:
        ids = upload_trial(run.artifacts, trial, root, records)
        trial.set_user_attr("uploads", ids)
    if "latency_ms" in run.budget and alive_workers(run.study, role="measurer"):
        rel = os.path.relpath(final, root)
        got = wait_for_latency(run, trial, str(final), ids.get(rel))
        if got is not None:
            extra.update(got)
    return extra


def latency_key(number: int) -> str:
    return f"latency:{number}"


def wait_for_latency(run: Any, trial: Any, path: str, artifact_id: str | None) -> dict[str, Any] | None:
    """Ask the measure-workers for this trial's latency and wait for it (None after latency_wait_s:
    this machine's figure stands, and the trial says so)."""
    trial.set_user_attr("latency_wanted", {"path": path, "artifact_id": artifact_id, "since": time.time()})
    run.progress.say(f"trial {trial.number}: waiting for a measure-worker's latency")
    t0 = time.time()
    while time.time() - t0 < run.latency_wait_s:
        got = run.study.user_attrs.get(latency_key(trial.number))
        if got is not None:
            trial.set_user_attr("latency_source", got["source"])
            return {
                "p50": got["p50"],
                "peak_rss_mb": got.get("peak_rss_mb"),
                "latency_source": got["source"],
            }
        time.sleep(1.0)
    trial.set_user_attr("latency_source", "this machine (no measure-worker answered)")
    return None


@dataclass(frozen=True)
class SharedOptions:
    """compress --storage/--study/--artifacts: the shared study this worker joins."""

    storage: str
    study: str
    artifacts: str | None = None
    heartbeat_s: int = HEARTBEAT_S
    latency_wait_s: float = 600.0  # how long a trial waits for a measure-worker's latency

    def __post_init__(self) -> None:
        if not self.study:
            raise SharedStoreError("--storage needs --study NAME (every worker names the same study)")
        if self.heartbeat_s < 1:
            raise SharedStoreError(f"--heartbeat must be >= 1 second, got {self.heartbeat_s}")
