"""Does prune + distillation recover better than one-shot pruning or Torch-Pruning + fine-tuning?

On the demo's tasks, starting from the demo's distilled student (its `distill` stage in ``demo-out/<task>``) at the
demo's prune ratio (0.25; the full run also tries 0.5), with the demo's data, subset, batch, lr,
augmentation and recovery epochs E for every variant:

1. unpruned    - the student as the demo left it;
2. one-shot    - ``vitshrink.prune(..., recover_epochs=0)``: magnitude pruning, no recovery;
3. ours + KD   - ``vitshrink.prune(..., recover_epochs=E, teacher=demo teacher)``, as the demo's
                 prune stage does;
4. TP + FT     - Torch-Pruning's own Hugging Face recipe (``prune_speed.tp_prune``: BasePruner, whole
                 heads; single-head layers keep their head, see ``head_caps``), its ratio searched to give
                 the SAME parameter count as ours, then E epochs of label-only fine-tuning with the same
                 trainer (``vitshrink.train.fit``), lr, batch, subset and seed, and no teacher. Its
                 one-shot score before fine-tuning is reported too.

``--controls`` adds "ours + KD from the unpruned student" (``teacher=None``) and "ours + label-only
fine-tuning", which split the gain between the pruning method and distillation. Recovered variants run
``--seeds`` fine-tuning seeds (subset and shuffling; default 2, 1 with --quick) and report mean ± std:
a margin is "clear" when it exceeds twice the seed std. Every variant is scored on the test split with
the same in-memory evaluator; the table gives params, the metric (top-1 / mIoU), the gap to the unpruned
model, wall time, and whether the result reloads with ``from_pretrained`` (Torch-Pruning keeps the
original config, so its model does not).

    PYTHONPATH=src .venv/bin/python benchmarks/prune_recovery.py            # both tasks, r=0.25 and 0.5
    PYTHONPATH=src .venv/bin/python benchmarks/prune_recovery.py --quick    # r=0.25, quick-demo budgets
    ... [--task classification|segmentation|all] [--ratio R] [--model-dir DIR --teacher DIR]
        [--seeds N] [--controls] [--json F] [--granularity G] [--recover-loss L] [--recover-temperature T]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from prune_speed import head_caps, output_layers, reload_check, tp_prune  # noqa: E402 - Torch-Pruning's recipe, shared

from vitshrink.artifacts import write_json  # noqa: E402
from vitshrink.data import load_dataset  # noqa: E402
from vitshrink.demo import DemoSpec, configs, stage_dirs  # noqa: E402
from vitshrink.errors import VitshrinkError  # noqa: E402
from vitshrink.evaluate import evaluate_model  # noqa: E402
from vitshrink.models import load_model  # noqa: E402
from vitshrink.prune import count_params, prune  # noqa: E402
from vitshrink.prune.recovery import recovery_datasets  # noqa: E402 - prune()'s own subset
from vitshrink.tasks import TASK_METRIC  # noqa: E402
from vitshrink.train import fit  # noqa: E402

TASKS = ("classification", "segmentation")


def tp_prune_to_params(
    model: nn.Module, x: torch.Tensor, target: int, tol: float = 0.005, max_ratio: float = 0.9
) -> tuple[nn.Module, float]:
    """Torch-Pruning's recipe at the ratio whose parameter count is closest to `target` (bisection).

    Its channel rounding makes the count a step function of the ratio, so the closest step wins.
    """

    def build(r: float) -> nn.Module:
        m = copy.deepcopy(model)
        return tp_prune(
            m,
            r,
            x,
            whole_heads=True,
            ignored_layers=output_layers(m),
            head_pruning_ratio_dict=head_caps(m, r),
        )

    best: tuple[int, float, nn.Module] | None = None
    lo, hi = 0.0, max_ratio
    for _ in range(14):
        mid = (lo + hi) / 2
        m = build(mid)
        n = count_params(m)
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), mid, m)
        if abs(n - target) <= tol * target:
            break
        lo, hi = (mid, hi) if n > target else (lo, mid)
    assert best is not None
    return best[2], best[1]


def reloads(model: nn.Module, x: torch.Tensor) -> str:
    """prune_speed.reload_check, whose torch.save fallback can itself fail (transformers 5 installs
    output-capturing hooks, local functions pickle cannot store, on e.g. SegFormer)."""
    try:
        return reload_check(model, x)
    except Exception as e:  # noqa: BLE001 - only reached after from_pretrained failed
        return f"no; torch.save(model) fails too ({type(e).__name__}: {str(e).splitlines()[0][:60]})"


def score(model: nn.Module, meta: dict[str, Any], test_ds: Any, metric: str) -> float:
    return float(evaluate_model(model, meta, test_ds, batch_size=128, device="cpu", quiet=True)[metric])


def _finetune(
    model: nn.Module, seed: int, *, meta: dict, cfg: DemoSpec, epochs: int, bs: int, lr: float, aug: bool,
    limit: int | None, quiet: bool = True,
) -> nn.Module:  # fmt: skip
    """Label-only fine-tuning: the trainer, schedule and budget prune()'s recovery uses, no teacher."""
    train_ds, val_ds = recovery_datasets(cfg.data, meta, limit, seed, cfg.data_options)
    fit(model, meta, train_ds, val_ds, epochs=epochs, batch_size=bs, lr=lr, do_augment=aug, seed=seed,
        quiet=quiet, device=torch.device("cpu"), desc="fine-tune")  # fmt: skip
    return model.eval()


def run_task(
    task: str,
    cfg: DemoSpec,
    model_dir: Path,
    teacher_dir: Path,
    ratios: list[float],
    tmp: Path,
    *,
    seeds: int,
    controls: bool,
    quiet: bool,
    prune_kw: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """All variants of one task; every recovered variant gets the same budget and, per seed, the same
    training subset and shuffling (prune() draws its subset with its seed, so fine-tuning does too)."""
    metric = TASK_METRIC[task]
    opts = cfg.stage("prune")  # the demo's prune stage settings, for every recovered variant
    epochs = int(opts["recover_epochs"])
    lr, bs, limit, aug = opts["lr"], opts["batch_size"], opts.get("limit"), opts.get("augment", True)
    # ... and its pruning axes / recovery loss where the demo sets them (flags override)
    demo_kw = {k: opts[k] for k in ("granularity", "recover_losses") if k in opts}
    net0, meta = load_model(model_dir)
    pre = meta["preprocess"]
    x = torch.randn(1, pre["channels"], *pre["size"], generator=torch.Generator().manual_seed(0))
    test_ds = load_dataset(
        cfg.data, "test", size=pre["size"], limit=cfg.eval_limit, data_options=cfg.data_options
    )
    rows: dict[tuple[float | None, str], dict[str, Any]] = {}
    head = {"task": task, "metric_name": metric}  # every row's first keys

    def log(msg: str) -> None:
        print(f"[{task}] {msg}", flush=True)

    def add(ratio: float | None, variant: str, model: nn.Module, t0: float, reload: str, **kw: Any) -> None:
        row = rows.setdefault(
            (ratio, variant),
            {**head, "ratio": ratio, "variant": variant, "runs": [], **kw},
        )
        row.update(params=count_params(model), reload=reload)
        row["runs"].append(
            {"metric": score(model, meta, test_ds, metric), "seconds": round(time.time() - t0, 1)}
        )
        log(
            f"r={ratio} {variant}: {row['params'] / 1e6:.3f} M params, {metric} {row['runs'][-1]['metric']:.4f} "
            f"({row['runs'][-1]['seconds']}s)"
        )

    def ours(r: float, seed: int, name: str, **kw: Any) -> nn.Module:
        d, _ = prune(
            model_dir,
            tmp / f"{task}-{r}-{name}-{seed}",
            ratio=r,
            data=cfg.data,
            data_options=cfg.data_options,
            limit=limit,
            batch_size=bs,
            lr=lr,
            augment=aug,
            seed=seed,
            quiet=quiet,
            **{**demo_kw, **(prune_kw or {}), **kw},
        )
        return load_model(d)[0]  # scored as reloaded from disk: what a user of `prune` gets

    finetune = functools.partial(
        _finetune, meta=meta, cfg=cfg, epochs=epochs, bs=bs, lr=lr, aug=aug, limit=limit
    )

    add(None, "unpruned", net0, time.time(), "yes (demo artifact)")
    for r in ratios:
        t0 = time.time()
        oneshot = ours(r, 0, "oneshot", recover_epochs=0)  # magnitude pruning is deterministic
        add(r, "ours, one-shot (no recovery)", oneshot, t0, reloads(oneshot, x))
        target = rows[(r, "ours, one-shot (no recovery)")]["params"]
        t0 = time.time()
        try:
            theirs0, r_tp = tp_prune_to_params(net0, x, target)
        except Exception as e:  # noqa: BLE001 - the recipe failing on a family is a result to report
            theirs0, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            log(f"r={r} Torch-Pruning failed: {err}")
            rows[(r, "TP")] = {**head, "ratio": r, "variant": TP_FT.format(epochs), "error": err}
        else:
            add(r, "Torch-Pruning, one-shot (no recovery)", theirs0, t0, "-", tp_ratio=round(r_tp, 4))
        for seed in range(seeds):
            t0 = time.time()
            m = ours(r, seed, "kd", recover_epochs=epochs, teacher=teacher_dir)
            add(r, OURS_KD.format(epochs), m, t0, reloads(m, x))
            if controls:
                t0 = time.time()
                m = ours(r, seed, "kd-self", recover_epochs=epochs)  # teacher: the unpruned model itself
                add(r, OURS_KD_SELF.format(epochs), m, t0, reloads(m, x))
                t0 = time.time()
                m = finetune(copy.deepcopy(oneshot), seed, quiet=quiet)
                add(r, OURS_FT.format(epochs), m, t0, reloads(m, x))
            if theirs0 is not None:
                t0 = time.time()
                m = finetune(copy.deepcopy(theirs0), seed, quiet=quiet)
                add(r, TP_FT.format(epochs), m, t0, reloads(m, x), tp_ratio=round(r_tp, 4))
    return _summarise(list(rows.values()))


def _summarise(out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each variant's mean / std over its seeds and its gap to the unpruned model (the first row)."""
    base = out[0]["runs"][0]["metric"]
    for row in out:
        if "runs" in row:
            vals = [run["metric"] for run in row["runs"]]
            row["metric"] = statistics.fmean(vals)
            row["std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row["gap"] = row["metric"] - base
            row["seconds"] = statistics.fmean(run["seconds"] for run in row["runs"])
    return out


OURS_KD = "ours + KD from demo teacher ({} ep)"
OURS_KD_SELF = "ours + KD from unpruned student ({} ep)"
OURS_FT = "ours + label-only FT ({} ep)"
TP_FT = "Torch-Pruning + label-only FT ({} ep)"


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| task | ratio | variant | params (M) | metric (mean ± std over seeds) | gap to unpruned | time (s) | "
        "reloads with from_pretrained |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}"
        if "tp_ratio" in r:
            ratio += f" (TP {r['tp_ratio']:.3g})"
        if "error" in r:
            out.append(f"| {r['task']} | {ratio} | {r['variant']} | - | - | - | - | failed: {r['error']} |")
            continue
        n = len(r["runs"])
        spread = f" ± {r['std']:.4f} (n={n})" if n > 1 else ""
        out.append(
            f"| {r['task']} | {ratio} | {r['variant']} | {r['params'] / 1e6:.3f} | "
            f"{r['metric_name']} {r['metric']:.4f}{spread} | {r['gap']:+.4f} | {r['seconds']:.0f} | {r['reload']} |"
        )
    return "\n".join(out)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Per task and ratio: does prune + distillation end closer to the unpruned model than both baselines?

    Metrics are higher-is-better, so "closer" = a higher score; a margin is "clear" above twice the
    larger seed std of the two variants compared.
    """
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        sel = [r for r in rows if r["task"] == task and r["ratio"] is not None]
        for ratio in dict.fromkeys(r["ratio"] for r in sel):
            by = {r["variant"].split(" (")[0]: r for r in sel if r["ratio"] == ratio}
            kd, one = by[OURS_KD.split(" (")[0]], by["ours, one-shot"]
            tpft = by[TP_FT.split(" (")[0]]
            if "error" in tpft:
                lines.append(f"{task} r={ratio:g}: Torch-Pruning's recipe failed ({tpft['error']})")
                continue
            margin = kd["metric"] - tpft["metric"]
            noise = max(kd["std"], tpft["std"])
            closer = margin > 0 and kd["metric"] > one["metric"]
            verdict = "clearly closer" if closer and margin > 2 * noise else "closer, within noise"
            line = (
                f"{task} r={ratio:g}: gap ours+KD {kd['gap']:+.4f}, TP+FT {tpft['gap']:+.4f}, "
                f"one-shot {one['gap']:+.4f}; ours+KD - TP+FT = {margin:+.4f} (seed std {noise:.4f}) -> "
                + (verdict if closer else "NOT closer")
            )
            ft = by.get(OURS_FT.split(" (")[0])
            if ft is not None:  # the control: same pruned model, labels instead of the teacher
                line += f"; KD's own share (ours+KD - ours+label FT) {kd['metric'] - ft['metric']:+.4f}"
            lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="all", choices=[*TASKS, "all"])
    ap.add_argument("--quick", action="store_true", help="the quick demo's budgets, ratio 0.25, one seed")
    ap.add_argument("--ratio", type=float, help="one pruning ratio (default: the demo's, plus 0.5 in full)")
    ap.add_argument(
        "--model-dir", type=Path, help="unpruned student (default: the distill stage of demo-out/<task>)"
    )
    ap.add_argument("--teacher", type=Path, help="recovery teacher (default demo-out/<task>/teacher)")
    ap.add_argument("--demo-out", type=Path, default=Path("demo-out"))
    ap.add_argument(
        "--seeds", type=int, help="fine-tuning seeds per recovered variant (default 1 quick, 2 full)"
    )
    ap.add_argument(
        "--controls",
        action="store_true",
        help="also: ours + KD from the unpruned student, ours + label-only fine-tuning",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the box is shared)")
    ap.add_argument("--verbose", action="store_true", help="show training progress")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--granularity", help="our pruning axes, e.g. 'auto' (default: prune()'s, all axes)")
    ap.add_argument("--recover-loss", help="our recovery loss spec, e.g. kd:1,ce:1 (default: prune()'s, kd)")
    ap.add_argument(
        "--recover-temperature", type=float, help="our recovery KD temperature (default: prune()'s, by task)"
    )
    a = ap.parse_args()
    prune_kw: dict[str, Any] = {"granularity": a.granularity} if a.granularity else {}
    if a.recover_loss:
        prune_kw["recover_losses"] = dict(
            (k, float(w)) for k, w in (part.split(":") for part in a.recover_loss.split(","))
        )
    if a.recover_temperature:
        prune_kw["recover_temperature"] = a.recover_temperature
    torch.set_num_threads(a.threads)
    seeds = a.seeds or (1 if a.quick else 2)

    tasks = list(TASKS) if a.task == "all" else [a.task]
    if (a.model_dir or a.teacher) and len(tasks) != 1:
        ap.error("--model-dir/--teacher need a single --task")
    cfgs = configs(a.quick)
    jobs = []
    for t in tasks:
        done = (a.demo_out / t / "results.json").exists()
        model_dir = a.model_dir or (stage_dirs(a.demo_out / t)["distill"]["model_dir"] if done else None)
        teacher = a.teacher or a.demo_out / t / "teacher"
        for what, path in (("student", model_dir), ("teacher", teacher)):
            if path is None or not (path / "config.json").exists():
                print(
                    f"{t}: no {what} model at {path}: run `vitshrink demo` first, or pass --model-dir/--teacher"
                )
                sys.exit(2)
        ratios = [a.ratio] if a.ratio is not None else [cfgs[t].stage("prune")["ratio"]]
        if a.ratio is None and not a.quick and 0.5 not in ratios:
            ratios.append(0.5)
        jobs.append((t, model_dir, teacher, ratios))

    t_start = time.time()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for t, model_dir, teacher, ratios in jobs:
                rows += run_task(
                    t,
                    cfgs[t],
                    model_dir,
                    teacher,
                    ratios,
                    Path(tmp),
                    seeds=seeds,
                    controls=a.controls,
                    quiet=not a.verbose,
                    prune_kw=prune_kw,
                )
    except VitshrinkError as e:
        print(f"error: {e}")
        sys.exit(1)
    print()
    print(table(rows))
    print()
    for line in verdicts(rows):
        print(line)
    print(
        f"\n{'quick' if a.quick else 'full'} budgets, {seeds} seed(s), torch threads={a.threads}, "
        f"total {time.time() - t_start:.0f}s"
    )
    if a.json:
        write_json(a.json, {"quick": a.quick, "seeds": seeds, "rows": rows, "verdicts": verdicts(rows)})


if __name__ == "__main__":
    main()
