"""compress --storage: workers in separate processes share one study on a real PostgreSQL server (or a
journal file); a killed worker's trial is retried; a measure-worker supplies the latencies.

The server is started here (initdb into a temp folder, a unix socket in it, no TCP), as `nobody`
when the tests run as root (initdb refuses root). The teacher is an untrained 2-layer vit-micro and
the space is the teacher's quant modes (no distillation), so a trial is a few seconds; each stage
sleeps first (tests/shared_worker.py) so that the trials overlap and one can be killed mid-trial.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import needs_fmnist

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
needs_pg = pytest.mark.skipif(
    not PG_BIN,
    reason="no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)",
)
MODES = ["none", "fp16", "int8-dynamic"]
SEARCH = {"students": ["none"], "prune_ratios": [0.0], "quant_modes": MODES}
TIMEOUT = 150


@pytest.fixture(scope="module")
def postgres():
    bindir = PG_BIN[-1].parent
    d = Path(tempfile.mkdtemp(prefix="vitshrink-pg-"))
    as_user: list[str] = []
    if os.getuid() == 0:  # initdb refuses root: the server runs as nobody, in a folder nobody owns
        nobody = pwd.getpwnam("nobody")
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    data = d / "data"
    init = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"]
    subprocess.run(as_user + init, check=True, capture_output=True)
    opts = f"-k {d} -c listen_addresses='' -c fsync=off"
    ctl = as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(d / "log")]
    start = ctl + ["-o", opts, "-w", "start"]
    subprocess.run(start, check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@/postgres?host={d}", ctl, start
    finally:
        subprocess.run(ctl + ["-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pg(postgres) -> str:
    return postgres[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from vitshrink.models import build_model, save_model

    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}
    net, meta = build_model(
        "vit-micro", task="classification", image_size=28, num_channels=1, num_labels=10, **tiny
    )
    return save_model(net, meta, tmp_path_factory.mktemp("shared") / "teacher", stage="build", options={})


def _start(teacher: Path, out: Path, storage: str, study: str, **kw) -> subprocess.Popen:
    args = {
        "model": str(teacher),
        "data": "fashion-mnist",
        "out": str(out),
        "budget": "max_drop=1.0",
        "time_budget": "5m",
        "threads": 1,
        "eval_limit": 100,
        "bench_runs": 2,
        "bench_rounds": 1,
        "quiet": True,
        "storage": storage,
        "study": study,
        "artifacts": str(out.parent / "artifacts"),
        "heartbeat": 2,
        "stage_delay": 1,
        "wait_for": {"worker": 2},
        "search": SEARCH,
        **kw,
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "shared_worker.py"), json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _study(storage: str, name: str):
    import optuna

    from vitshrink.compress.search.shared import open_storage

    return optuna.load_study(storage=open_storage(storage), study_name=name)


def _check_shared_run(study, results: list[dict], outs: list[Path]) -> None:
    """Trials split between the workers, none RUNNING, exactly one worker shipped the model."""
    import optuna

    states = {t.number: t.state for t in study.trials}
    assert optuna.trial.TrialState.RUNNING not in states.values()
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({t.user_attrs["worker"] for t in done}) == 2
    assert sorted(t.params["quant"] for t in done if "duplicate_of" not in t.user_attrs) == sorted(MODES)
    shipped = [o for r, o in zip(results, outs) if r["shipped"]]
    assert len(shipped) == 1 and (shipped[0] / "model.onnx").is_file()
    summary = json.loads((shipped[0] / "search.json").read_text())
    assert len(summary["workers"]) == 2 and all(r["worker"] in summary["workers"] for r in summary["trials"])
    assert "worker" in (shipped[0] / "report.md").read_text()


@needs_fmnist
@needs_pg
def test_two_workers_share_one_study_one_ships_and_a_measure_worker_supplies_latencies(teacher, pg, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vitshrink.cli", "measure-worker", "--storage", pg, "--study", "two"]
    cmd += ["--artifacts", str(tmp_path / "artifacts"), "--runs", "2", "--rounds", "1", "--threads", "1"]
    measurer = subprocess.Popen(cmd + ["--idle-exit", "120"], stdout=subprocess.PIPE, text=True, env=env)
    outs = [tmp_path / "w1", tmp_path / "w2"]
    kw = {"budget": "latency_ms=1000,max_drop=1.0", "wait_for": {"worker": 2, "measurer": 1}}
    procs = [_start(teacher, o, pg, "two", **kw) for o in outs]
    results = [_result(p) for p in procs]
    study = _study(pg, "two")
    _check_shared_run(study, results, outs)

    out, _ = measurer.communicate(timeout=60)  # it stops once the search has ended
    assert measurer.returncode == 0 and f"measured {len(MODES)} candidates" in out
    summary = json.loads(next(o / "search.json" for o, r in zip(outs, results) if r["shipped"]).read_text())
    for r in summary["trials"]:  # the device's figures, not the worker's own
        device = study.user_attrs[f"latency:{r['number']}"]
        assert "measure-worker" in r["latency_source"] and r["p50"] == device["p50"]


@needs_fmnist
@needs_pg
def test_a_killed_workers_trial_is_retried_by_another(teacher, pg, tmp_path):
    import optuna

    outs = [tmp_path / "w1", tmp_path / "w2"]
    victim = _start(teacher, outs[0], pg, "kill", stage_delay=3)
    survivor = _start(teacher, outs[1], pg, "kill", stage_delay=3)
    t0, killed = time.time(), None
    while killed is None and time.time() - t0 < TIMEOUT:
        time.sleep(0.5)
        try:
            study = _study(pg, "kill")
        except KeyError:
            continue
        for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker", "")
            if f"-{victim.pid}-" in worker and t.params.get("quant", "none") != "none":
                victim.send_signal(signal.SIGKILL)  # mid-stage: no chance to tidy up
                killed = t.number
                break
    assert killed is not None, "the victim never ran a trial"
    victim.wait(timeout=10)
    result = _result(survivor)
    study = _study(pg, "kill")
    trials = {t.number: t for t in study.trials}
    assert trials[killed].state == optuna.trial.TrialState.FAIL
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == trials[killed].params
    assert f"-{survivor.pid}-" in retry.user_attrs["worker"] and "retry of trial" in retry.user_attrs["why"]
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
    assert result["shipped"] and (outs[1] / "model.onnx").is_file()
    summary = json.loads((outs[1] / "search.json").read_text())
    assert killed in summary["interrupted_trials"]


@needs_fmnist
def test_a_journal_file_works_too_and_finish_fetches_the_chosen_trial(teacher, tmp_path):
    import optuna

    from vitshrink.compress import compress

    storage = f"journal:{tmp_path / 'study.log'}"
    w = _start(teacher, tmp_path / "w", storage, "journal", wait_for={"worker": 1})
    assert _result(w)["shipped"] and (tmp_path / "w" / "model.onnx").is_file()
    study = _study(storage, "journal")
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    # --finish in another folder: the chosen trial's files come from the artifact store
    res = compress(
        teacher,
        "fashion-mnist",
        out=tmp_path / "finish",
        storage=storage,
        study="journal",
        artifacts=str(tmp_path / "artifacts"),
        finish_only=True,
        threads=1,
        eval_limit=100,
        bench_runs=2,
        bench_rounds=1,
        quiet=True,
    )
    assert res["met"] and Path(res["final"]).read_bytes() == (tmp_path / "w" / "model.onnx").read_bytes()
    fetched = [p.name for p in (tmp_path / "finish" / "trials").iterdir()]
    assert len(fetched) == 1 and "-" in fetched[0]  # NNN-WORKER: downloaded, not the worker's folder


@needs_pg
def test_a_dropped_database_connection_is_retried(postgres):
    import threading

    from vitshrink.compress.search.shared import open_storage

    url, ctl, start = postgres
    import optuna

    study = optuna.create_study(storage=open_storage(url), study_name="drop")
    study.set_user_attr("before", 1)
    subprocess.run(ctl + ["-m", "fast", "stop"], check=True, capture_output=True)  # every connection drops
    restart = threading.Timer(1.5, lambda: subprocess.run(start, check=True, capture_output=True))
    restart.start()
    try:
        study.set_user_attr("during", 2)  # refused at first, then retried with back-off until it is back
    finally:
        restart.join()
    assert study.user_attrs == {"before": 1, "during": 2}


def test_two_workers_never_share_an_out(tmp_path):
    import optuna

    from vitshrink.compress.search.shared import SharedStoreError, Worker, open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=open_storage(f"journal:{tmp_path / 's.log'}"), study_name="s")
    out = tmp_path / "out"
    out.mkdir()
    first = Worker(study, out, heartbeat_s=1)
    first.start()
    try:
        with pytest.raises(SharedStoreError, match="give each worker its own --out"):
            Worker(study, out, heartbeat_s=1).start()
    finally:
        first.stop()
    Worker(study, out, heartbeat_s=1).start()  # once the first has finished, the folder is free again


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"budget": "max_drop=0.1", "artifacts": "a"}, "--artifacts needs --storage"),
        ({"finish_only": True}, "--finish needs --storage"),
        (
            {"finish_only": True, "storage": "journal:x.log", "study": "s", "budget": "max_drop=0.1"},
            "--finish",
        ),
        ({"recipe": [{"export": None}], "storage": "journal:x.log", "study": "s"}, "budget mode only"),
        ({"budget": "max_drop=0.1", "storage": "journal:x.log"}, "--storage needs --study"),
    ],
)
def test_shared_options_are_checked_first(tmp_path, kw, message):
    from vitshrink.compress import compress
    from vitshrink.errors import VitshrinkError

    with pytest.raises(VitshrinkError, match=message):
        compress(tmp_path / "m", "fashion-mnist", out=tmp_path / "o", **kw)
