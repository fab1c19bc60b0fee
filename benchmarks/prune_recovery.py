"""Does prune + distillation recover better than one-shot pruning or Torch-Pruning + fine-tuning?

On the demo's tasks, starting from the demo's distilled student (``demo-out/<task>/distill``) at the
demo's prune ratio (0.25; the full run also tries 0.5), with the demo's data, subset, batch, lr,
augmentation and recovery epochs E for every variant:

1. unpruned    - the student as the demo left it;
2. one-shot    - ``vitshrink.prune(..., recover_epochs=0)``: magnitude pruning, no recovery;
3. ours + KD   - ``vitshrink.prune(..., recover_epochs=E, teacher=demo teacher)``, as the demo's
                 prune stage does;
4. TP + FT     - Torch-Pruning's own Hugging Face recipe (``prune_speed.tp_prune``: BasePruner, whole
                 heads), its ratio searched to give the SAME parameter count as ours, then E epochs of
                 label-only fine-tuning with the same trainer (``vitshrink.train.fit``) and no teacher.
                 Its one-shot score before fine-tuning is reported too.
   (``--control`` adds "ours + label-only fine-tuning", which separates the pruning method's share of
   the gain from distillation's.)

Every variant is scored on the test split with the same in-memory evaluator; the table gives params,
the metric (top-1 / mIoU), the gap to the unpruned model, wall time, and whether the result reloads
with ``from_pretrained`` (Torch-Pruning keeps the original config, so its model does not).

    PYTHONPATH=src .venv/bin/python benchmarks/prune_recovery.py            # both tasks, r=0.25 and 0.5
    PYTHONPATH=src .venv/bin/python benchmarks/prune_recovery.py --quick    # r=0.25, quick-demo budgets
    ... [--task classification|segmentation|all] [--ratio R] [--model-dir DIR --teacher DIR] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from prune_speed import reload_check, tp_prune  # noqa: E402 - Torch-Pruning's recipe, shared

from vitshrink.artifacts import write_json  # noqa: E402
from vitshrink.data import load_dataset  # noqa: E402
from vitshrink.demo import TaskConfig, configs  # noqa: E402
from vitshrink.errors import VitshrinkError  # noqa: E402
from vitshrink.evaluate import evaluate_model  # noqa: E402
from vitshrink.models import load_model  # noqa: E402
from vitshrink.prune import _datasets, count_params, prune  # noqa: E402 - _datasets: prune()'s own subset
from vitshrink.train import fit  # noqa: E402

TASKS = ("classification", "segmentation")
SEED = 0


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The class-prediction layers (`classifier`, `decode_head.classifier`, ...): Torch-Pruning keeps them."""
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "classifier"]


def tp_prune_to_params(
    model: nn.Module, x: torch.Tensor, target: int, tol: float = 0.005, max_ratio: float = 0.9
) -> tuple[nn.Module, float]:
    """Torch-Pruning's recipe at the ratio whose parameter count is closest to `target` (bisection).

    Its channel rounding makes the count a step function of the ratio, so the closest step wins.
    """

    def build(r: float) -> nn.Module:
        m = copy.deepcopy(model)
        return tp_prune(m, r, x, whole_heads=True, ignored_layers=output_layers(m))

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


def score(model: nn.Module, meta: dict[str, Any], test_ds: Any, metric: str) -> float:
    return float(evaluate_model(model, meta, test_ds, batch_size=128, device="cpu", quiet=True)[metric])


def run_task(
    task: str,
    cfg: TaskConfig,
    model_dir: Path,
    teacher_dir: Path,
    ratios: list[float],
    tmp: Path,
    *,
    control: bool,
    quiet: bool,
) -> list[dict[str, Any]]:
    metric = "accuracy" if task == "classification" else "miou"
    epochs = int(cfg.prune_recover_epochs)
    budget = {  # one budget for every recovered variant: the demo's prune stage settings
        "epochs": epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.extra.get("prune_lr", 5e-4),
        "limit": cfg.distill_limit,
        "augment": cfg.augment,
        "seed": SEED,
    }
    net0, meta = load_model(model_dir)
    pre = meta["preprocess"]
    x = torch.randn(1, pre["channels"], *pre["size"], generator=torch.Generator().manual_seed(SEED))
    test_ds = load_dataset(
        cfg.data, "test", size=pre["size"], limit=cfg.test_limit, data_options=cfg.data_options
    )
    train_ds, val_ds = _datasets(cfg.data, meta, cfg.distill_limit, SEED, cfg.data_options)
    rows: list[dict[str, Any]] = []

    def log(msg: str) -> None:
        print(f"[{task}] {msg}", flush=True)

    def add(ratio: float | None, variant: str, model: nn.Module, t0: float, reload: str, **kw: Any) -> None:
        rows.append(
            {
                "task": task,
                "metric_name": metric,
                "ratio": ratio,
                "variant": variant,
                "params": count_params(model),
                "metric": score(model, meta, test_ds, metric),
                "seconds": round(time.time() - t0, 1),
                "reload": reload,
                **kw,
            }
        )
        r = rows[-1]
        log(
            f"r={ratio} {variant}: {r['params'] / 1e6:.3f} M params, {metric} {r['metric']:.4f} ({r['seconds']}s)"
        )

    add(None, "unpruned", net0, time.time(), "yes (demo artifact)")
    base = rows[-1]["metric"]
    prune_kw = dict(
        data=cfg.data,
        data_options=cfg.data_options,
        limit=budget["limit"],
        batch_size=budget["batch_size"],
        lr=budget["lr"],
        augment=budget["augment"],
        seed=SEED,
        quiet=quiet,
    )
    for r in ratios:
        t0 = time.time()
        d, _ = prune(model_dir, tmp / f"{task}-{r}-oneshot", ratio=r, recover_epochs=0, **prune_kw)
        oneshot, _ = load_model(d)  # scored as reloaded from disk: what a user of `prune` gets
        add(r, "ours, one-shot (no recovery)", oneshot, t0, reload_check(oneshot, x))
        target = rows[-1]["params"]

        t0 = time.time()
        d, _ = prune(
            model_dir,
            tmp / f"{task}-{r}-kd",
            ratio=r,
            recover_epochs=epochs,
            teacher=teacher_dir,
            **prune_kw,
        )
        ours_kd, _ = load_model(d)
        add(r, f"ours + KD recovery ({epochs} ep)", ours_kd, t0, reload_check(ours_kd, x))

        if control:
            t0 = time.time()
            ours_ft = copy.deepcopy(oneshot)
            _finetune(ours_ft, meta, train_ds, val_ds, budget, quiet)
            add(r, f"ours + label-only FT ({epochs} ep)", ours_ft, t0, reload_check(ours_ft, x))

        t0 = time.time()
        try:
            theirs, r_tp = tp_prune_to_params(net0, x, target)
        except Exception as e:  # noqa: BLE001 - the recipe failing on a family is a result to report
            log(f"r={r} Torch-Pruning failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            rows.append(
                {
                    "task": task,
                    "metric_name": metric,
                    "ratio": r,
                    "variant": "Torch-Pruning + label-only FT",
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}",
                }
            )
            continue
        add(r, "Torch-Pruning, one-shot", theirs, t0, "-", tp_ratio=round(r_tp, 4))
        t0 = time.time()
        _finetune(theirs, meta, train_ds, val_ds, budget, quiet)
        add(
            r,
            f"Torch-Pruning + label-only FT ({epochs} ep)",
            theirs,
            t0,
            reload_check(theirs.eval(), x),
            tp_ratio=round(r_tp, 4),
        )
    for row in rows:
        if "metric" in row:
            row["gap"] = row["metric"] - base
    return rows


def _finetune(
    model: nn.Module, meta: dict[str, Any], train_ds: Any, val_ds: Any, budget: dict[str, Any], quiet: bool
) -> None:
    """Label-only fine-tuning with the trainer and schedule `prune`'s recovery uses, no teacher."""
    fit(
        model,
        meta,
        train_ds,
        val_ds,
        epochs=budget["epochs"],
        batch_size=budget["batch_size"],
        lr=budget["lr"],
        do_augment=budget["augment"],
        seed=budget["seed"],
        quiet=quiet,
        device=torch.device("cpu"),
        desc="fine-tune",
    )
    model.eval()


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| task | ratio | variant | params (M) | metric | gap to unpruned | time (s) | reloads with from_pretrained |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}"
        if "tp_ratio" in r:
            ratio += f" (TP {r['tp_ratio']:.3g})"
        if "error" in r:
            out.append(f"| {r['task']} | {ratio} | {r['variant']} | - | - | - | - | failed: {r['error']} |")
            continue
        out.append(
            f"| {r['task']} | {ratio} | {r['variant']} | {r['params'] / 1e6:.3f} | "
            f"{r['metric_name']} {r['metric']:.4f} | {r['gap']:+.4f} | {r['seconds']:.0f} | {r['reload']} |"
        )
    return "\n".join(out)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Per task and ratio: is prune + distillation closer to the unpruned model than both baselines?"""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for ratio in dict.fromkeys(r["ratio"] for r in rows if r["task"] == task and r["ratio"] is not None):
            sel = {r["variant"].split(" (")[0]: r for r in rows if r["task"] == task and r["ratio"] == ratio}
            kd, one = sel["ours + KD recovery"], sel["ours, one-shot"]
            tpft = sel["Torch-Pruning + label-only FT"]
            if "error" in tpft:
                lines.append(f"{task} r={ratio:g}: Torch-Pruning's recipe failed ({tpft['error']})")
                continue
            closer = abs(kd["gap"]) < abs(tpft["gap"]) and abs(kd["gap"]) < abs(one["gap"])
            lines.append(
                f"{task} r={ratio:g}: gap ours+KD {kd['gap']:+.4f}, TP+FT {tpft['gap']:+.4f}, "
                f"one-shot {one['gap']:+.4f} -> prune+distill closest: {'yes' if closer else 'NO'}"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="all", choices=[*TASKS, "all"])
    ap.add_argument("--quick", action="store_true", help="the quick demo's budgets, ratio 0.25 only")
    ap.add_argument("--ratio", type=float, help="one pruning ratio (default: the demo's, plus 0.5 in full)")
    ap.add_argument("--model-dir", type=Path, help="unpruned student (default demo-out/<task>/distill)")
    ap.add_argument("--teacher", type=Path, help="recovery teacher (default demo-out/<task>/teacher)")
    ap.add_argument("--demo-out", type=Path, default=Path("demo-out"))
    ap.add_argument("--control", action="store_true", help="also: ours + label-only fine-tuning")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the box is shared)")
    ap.add_argument("--verbose", action="store_true", help="show training progress")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(SEED)

    tasks = list(TASKS) if a.task == "all" else [a.task]
    if (a.model_dir or a.teacher) and len(tasks) != 1:
        ap.error("--model-dir/--teacher need a single --task")
    cfgs = configs(a.quick)
    jobs = []
    for t in tasks:
        model_dir = a.model_dir or a.demo_out / t / "distill"
        teacher = a.teacher or a.demo_out / t / "teacher"
        for what, p in (("student", model_dir), ("teacher", teacher)):
            if not (p / "config.json").exists():
                print(
                    f"{t}: no {what} model at {p}: run `vitshrink demo` first, or pass --model-dir/--teacher"
                )
                sys.exit(2)
        ratios = [a.ratio] if a.ratio is not None else [cfgs[t].prune_ratio]
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
                    control=a.control,
                    quiet=not a.verbose,
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
        f"\n{'quick' if a.quick else 'full'} budgets, torch threads={a.threads}, total {time.time() - t_start:.0f}s"
    )
    if a.json:
        write_json(a.json, {"quick": a.quick, "rows": rows, "verdicts": verdicts(rows)})


if __name__ == "__main__":
    main()
