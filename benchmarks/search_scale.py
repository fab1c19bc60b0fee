"""Does a shared study (`compress --storage`) buy more search in the same time? 1 vs 2 workers.

The teacher of `compress_time.py` (a 6-layer 192-d ViT on Fashion-MNIST; --teacher reuses one already
trained), a real PostgreSQL server started here (initdb into a temp folder, a unix socket, as `nobody`
when run as root), and for N in (1, 2) workers, each with one thread (OMP_NUM_THREADS=1) and its own OUT:

    vitshrink compress TEACHER --data fashion-mnist --out WORK/N/wI --budget BUDGET --time-budget T \
        --storage postgresql://... --study scaleN --artifacts WORK/N/artifacts

(through the Python API, for threads=1 in onnxruntime's evaluation and benchmarks as well)
all started at once and timed from the outside until the last exits. Reported per N: wall time, trials
completed (measured candidates, duplicates left out) and per worker, the chosen recipe, its val metric
in the search and its test top-1 (results.json of the worker that shipped).

    python benchmarks/search_scale.py [--teacher DIR] [--time-budget 4m] [--budget ...] [--work DIR]

Run it alone (flock /tmp/vitshrink-bench.lock): two workers on a 2-core machine use both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compress_time import _env, build_teacher  # noqa: E402


@contextmanager
def postgres() -> Any:
    """A throw-away PostgreSQL server on a unix socket; yields its SQLAlchemy URL."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins:
        raise SystemExit(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)"
        )
    d = Path(tempfile.mkdtemp(prefix="vitshrink-pg-"))
    as_user: list[str] = []
    if os.getuid() == 0:  # initdb refuses root
        nobody = pwd.getpwnam("nobody")
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    data, b = d / "data", bins[-1]
    subprocess.run(
        as_user + [str(b / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    ctl = as_user + [str(b / "pg_ctl"), "-D", str(data), "-l", str(d / "log")]
    subprocess.run(
        ctl + ["-o", f"-k {d} -c listen_addresses=''", "-w", "start"], check=True, capture_output=True
    )
    try:
        yield f"postgresql://postgres@/postgres?host={d}"
    finally:
        subprocess.run(ctl + ["-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def run_workers(n: int, teacher: Path, work: Path, url: str, a: argparse.Namespace) -> dict[str, Any]:
    """n workers on one study, started together; their wall time, trials and the shipped result."""
    base = work / f"workers-{n}"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    env = {**_env(), "OMP_NUM_THREADS": "1", "VITSHRINK_QUIET": "1"}
    t0 = time.monotonic()
    procs = []
    for i in range(n):
        kw = {
            "out": str(base / f"w{i + 1}"),
            "budget": a.budget,
            "time_budget": a.time_budget,
            "storage": url,
            "study": f"scale{n}",
            "artifacts": str(base / "artifacts"),
            "threads": 1,  # onnxruntime's evaluation and bench threads (the CLI has no --threads)
        }
        code = (
            "import json, sys\nfrom vitshrink.compress import BudgetNotMetError, compress\n"
            f"try:\n    compress({str(teacher)!r}, 'fashion-mnist', **json.loads(sys.argv[1]))\n"
            "except BudgetNotMetError:\n    pass\n"
        )
        cmd = [sys.executable, "-c", code, json.dumps(kw)]
        log = open(base / f"w{i + 1}.log", "w")  # noqa: SIM115 - closed when the worker exits
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        p.wait()
        log.close()
    wall = time.monotonic() - t0
    shipped = [base / f"w{i + 1}" for i in range(n) if (base / f"w{i + 1}" / "results.json").is_file()]
    if not shipped:
        raise SystemExit(f"no worker of {n} wrote results.json; see {base}/w*.log")
    res = json.loads((shipped[0] / "results.json").read_text())
    s = res["search"]
    per_worker: dict[str, int] = {}
    for t in s["trials"]:
        per_worker[t.get("worker", "?")] = per_worker.get(t.get("worker", "?"), 0) + 1
    final = next(st for st in reversed(res["stages"]) if st.get("kind") != "baseline")
    chosen = next(t for t in s["trials"] if t["number"] == s["chosen_trial"])
    return {
        "workers": n,
        "wall_s": round(wall, 1),
        "trials_measured": len(s["trials"]),
        "trials_run": s["trials_run"],
        "per_worker": sorted(per_worker.values(), reverse=True),
        "pruned": len(s["pruned_trials"]),
        "failed": len(s["failed_trials"]),
        "met": s["met"],
        "chosen": s["chosen_params"],
        "chosen_val": chosen["metric"],
        "test_top1": final.get("accuracy"),
        "size_mb": final.get("size_mb"),
        "teacher_test_top1": res["stages"][0].get("accuracy"),
        "shipped_by": shipped[0].name,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--teacher", type=Path, help="a trained teacher (default: compress_time's, built in WORK)"
    )
    ap.add_argument("--time-budget", default="4m")
    ap.add_argument("--budget", default="size_mb=1.5,max_drop=0.01")
    ap.add_argument("--work", type=Path, default=Path("search-scale-work"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    teacher = a.teacher or build_teacher(a.work, {"seed": 0}, quick=False, epochs=3)
    rows = []
    with postgres() as url:
        for n in (1, 2):
            print(f"{n} worker(s), --time-budget {a.time_budget} ...", flush=True)
            rows.append(run_workers(n, teacher, a.work, url, a))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| workers | wall | trials measured (per worker) | chosen | val | test top-1 | MB |")
    print("|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        c = r["chosen"]
        print(
            f"| {r['workers']} | {r['wall_s'] / 60:.1f} min | {r['trials_measured']} ({'+'.join(map(str, r['per_worker']))}) "
            f"| {c['student']}, prune {c['prune_ratio']:g}, {c['quant']}{', ' + str(c['extend']) + 'x' if c.get('extend') else ''} "
            f"| {r['chosen_val']:.4f} | {r['test_top1']:.4f} | {r['size_mb']:.2f} |"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
