"""Progress: the trial bar, one line per trial, and the summary printed after the search."""

from __future__ import annotations

import os
import sys
from typing import Any

from ..context import Context
from ..plan import fmt_minutes
from .study_setup import _Clock, now


def _bar(total: int | None, initial: int, *, quiet: bool) -> Any:
    if quiet or os.environ.get("VITSHRINK_QUIET") == "1":
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="search", unit="trial", dynamic_ncols=True, file=sys.stderr
    )


def _params_label(p: dict[str, Any]) -> str:
    more = f", {p['extend']}x training" if p.get("extend") else ""
    more += f", at {p['resolution']} inside" if p.get("resolution") is not None else ""
    return f"[{p['student']}, prune {p['prune_ratio']:g}, {p['quant']}{more}]"


class Progress:
    """The bar (None under --quiet or VITSHRINK_QUIET=1) and the lines written around it."""

    def __init__(
        self, ctx: Context, clock: _Clock, time_budget: float, total: int | None, initial: int
    ) -> None:
        self.quiet, self.clock, self.time_budget = ctx.quiet, clock, time_budget
        self.bar = _bar(total, initial, quiet=ctx.quiet)

    def say(self, line: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def took(self, t0: float) -> str:
        """This trial's time and the search's so far."""
        elapsed, budget = self.clock.elapsed(), self.time_budget
        return (
            f"{fmt_minutes(now() - t0)} (search {elapsed / 60:.1f}/{budget / 60:.1f} min, "
            f"{fmt_minutes(max(0.0, budget - elapsed))} left)"
        )

    def postfix(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_summary(ctx: Context, summary: dict[str, Any], chosen: dict[str, Any]) -> None:
    t = summary["time"]
    ctx.log(
        f"search: {summary['trials_run']} trials ({len(summary['trials'])} measured, "
        f"{len(summary['pruned_trials'])} pruned, {len(summary['failed_trials'])} failed) in "
        f"{fmt_minutes(t['elapsed_s'])} of {fmt_minutes(t['budget_s'])}"
        + {"time": "; stopped by the time budget", "trials": "; stopped by the --trials cap"}.get(
            t["stopped"], ""
        )
        + (
            f"; {fmt_minutes(t['unused_s'])} unused: nothing left worth trying"
            if t["stopped"] == "exhausted"
            else ""
        )
    )
    for e in summary.get("extra_time", []):
        ctx.log(f"extra time: {e.get('line', e)}")
    if summary.get("families"):
        ctx.log(f"families: {summary['families']['line']}")
    q = summary.get("int8_variants")
    if q:
        ctx.log(f"int8: kept {q['kept']} ({q['why']})")
    bound = summary["binding"]
    ctx.log(
        "bound by: "
        + ("; ".join(f"{k} ({v})" for k, v in bound.items()) if bound else "nothing (all limits slack)")
    )
    ctx.log(f"Pareto front ({ctx.metric} / p50 / size):")
    for r in summary["pareto_front"]:
        mark = "*" if r["number"] == chosen["number"] else " "
        ctx.log(
            f" {mark} trial {r['number']} {_params_label(r['params'])}: {r['metric']:.4f}  {r['p50']:.2f} ms  "
            f"{r['size_mb']:.2f} MB  {'feasible' if r['feasible'] else 'over budget'}"
        )
