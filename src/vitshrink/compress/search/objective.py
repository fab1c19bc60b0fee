"""One trial: run a candidate's stages (sharing what earlier trials built), report every training
epoch to the pruner, then measure its artifact."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...artifacts import write_json
from ..runner import run_stages
from ..schedule import MAX_EXTEND, QUANT_BYTES, key
from .progress import _params_label
from .run import SearchRun
from .shared import share_trial
from .study_setup import now


class Objective:
    """The Optuna objective of the budget search (one candidate, enqueued by the loop)."""

    def __init__(self, run: SearchRun) -> None:
        self.run = run
        self.distill_steps = int(run.space.distill.get("epochs", run.plan.epochs))

    def __call__(self, trial: Any) -> float:
        try:
            return self._trial(trial)
        except Exception as e:
            import optuna

            if not isinstance(e, optuna.TrialPruned) and "error" not in trial.user_attrs:
                # recorded, so the scheduler counts the candidate as tried (a trial failed without an
                # error is one whose worker was killed, and its candidate is run again)
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                trial.set_user_attr("error", f"{type(e).__name__}: {msg}")
            raise

    def _trial(self, trial: Any) -> float:
        import optuna

        r = self.run
        t0 = now()
        params = {
            "student": trial.suggest_categorical("student", list(r.space.students)),
            "prune_ratio": trial.suggest_categorical("prune_ratio", r.space.prune_ratios),
            "quant": trial.suggest_categorical("quant", r.space.quant_modes),
            "extend": trial.suggest_int("extend", 0, MAX_EXTEND),
        }
        if len(r.space.resolutions) > 1:  # only then a parameter: studies without it are unchanged
            params["resolution"] = trial.suggest_categorical("resolution", r.space.resolutions)
        retry = r.study.get_trials(deepcopy=False)[trial.number].system_attrs.get("failed_trial")
        why = (
            f"retry of trial {retry}: its worker stopped"
            if retry is not None
            else r.pending.get("why", "queued")
        )
        trial.set_user_attr("why", why)
        if "extends" in r.pending:
            trial.set_user_attr("extends", r.pending["extends"])
        label = f"trial {trial.number} {_params_label(params)}"
        if r.worker is not None:
            trial.set_user_attr("worker", r.worker.id)
            other = self._claimed_elsewhere(trial, params)
            if other is not None:  # two workers enqueued the same candidate at once: the later one yields
                why = f"claimed by trial {other.number} (worker {other.user_attrs.get('worker')})"
                trial.set_user_attr("duplicate_of", other.number)
                trial.set_user_attr("seconds", 0.0)
                trial.set_user_attr("pruned", {"stage": None, "reason": why})
                raise optuna.TrialPruned(why)
        owners, same = self._owners_and_same(trial, params)
        if same is not None:
            return self._answer_duplicate(trial, same, label)
        bytes_per = QUANT_BYTES.get(params["quant"], 1.0)
        trial.set_user_attr(
            "predicted_mb",
            r.sizes.get(params["student"], 0) * (1 - params["prune_ratio"]) * bytes_per / 2**20,
        )
        return self._run_candidate(trial, params, owners, label, t0)

    def _claimed_elsewhere(self, trial: Any, params: dict[str, Any]) -> Any:
        """An earlier trial of the same candidate still running (on another worker), if any."""
        import optuna

        running = self.run.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        same = [t for t in running if t.number < trial.number and key(t.params) == key(params)]
        return same[0] if same else None

    def _owners_and_same(self, trial: Any, params: dict[str, Any]) -> tuple[dict[str, int], Any]:
        """Stage key -> the trial that ran it; and an earlier trial of the same candidate, if any."""
        owners: dict[str, int] = {}
        for t in self.run.counted():
            if t.number == trial.number:
                continue
            for st in t.user_attrs.get("stages", []):
                if "reused_from" not in st:
                    owners.setdefault(st["key"], t.number)
            if key(t.params) == key(params) and "duplicate_of" not in t.user_attrs:
                return owners, t
        return owners, None

    def _answer_duplicate(self, trial: Any, t: Any, label: str) -> float:
        """The same candidate again: answered from the study, so the sampler sees its value again."""
        import optuna

        trial.set_user_attr("duplicate_of", t.number)
        trial.set_user_attr("seconds", 0.0)
        if t.state == optuna.trial.TrialState.COMPLETE and "measured" in t.user_attrs:
            self.run.record(trial, t.user_attrs["measured"])
            self.run.progress.say(f"{label}  same as trial {t.number}, measured already")
            return t.values[0]
        why = f"same candidate as trial {t.number}, which {'was stopped early' if t.state == optuna.trial.TrialState.PRUNED else 'failed'}"
        trial.set_user_attr("pruned", {"stage": None, "reason": why})
        raise optuna.TrialPruned(why)

    def _epoch_hook(self, trial: Any, params: dict[str, Any]) -> Any:
        r = self.run
        metric = r.ctx.metric

        def on_epoch(kind: str, rec: dict[str, Any]) -> None:
            import optuna

            value = (rec.get("val") or {}).get(metric)
            r.clock.save()
            if value is None:
                return
            # 1-based: successive halving's first rung is at step min_resource=1, i.e. right after the
            # first distillation epoch; recovery epochs follow the distillation epochs.
            step = rec["epoch"] + (self.distill_steps if kind != "distill" else 0)
            trial.report(value, step)
            r.progress.postfix(f"trial {trial.number}: {kind} epoch {rec['epoch']}, {metric} {value:.4f}")
            why = None
            if r.clock.elapsed() > r.time_budget - r.reserve and r.has_candidate():
                why = "time budget"
            # An extra-time run trains longer than its peers at every step: it is judged at the end.
            elif not params["extend"] and trial.should_prune():
                why = f"{metric} {value:.4f} after {kind} epoch {rec['epoch']}, below smaller candidates"
            if why is not None:
                trial.set_user_attr(
                    "pruned", {"stage": kind, "epoch": rec["epoch"], "value": value, "reason": why}
                )
                raise optuna.TrialPruned(why)

        return on_epoch

    def _run_candidate(
        self, trial: Any, params: dict[str, Any], owners: dict[str, int], label: str, t0: float
    ) -> float:
        import optuna

        from ...bench import bench_many

        r = self.run
        out, ctx = r.out, r.ctx
        tdir = out / "trials" / f"{trial.number:03d}"
        tctx = dataclasses.replace(
            ctx,
            quiet=True,
            logits_dir=out / "cache" / "teacher-logits",
            epoch_hook=self._epoch_hook(trial, params),
        )
        try:
            recs = run_stages(
                r.space.stages(params), tctx, tdir, cache_dir=out / "cache", teacher_dir=out / "teacher"
            )
            trial.set_user_attr("stages", _stage_accounting(recs, owners))
            trial.set_user_attr("cost_kind", _cost_kind(recs))
            kind = "distill" if r.space.students[params["student"]] else "prune"
            train = next((x for x in recs if x["kind"] == kind), None)
            if train is not None and not train.get("reused"):
                trial.set_user_attr("train_s", train.get("seconds"))
            final = (tdir / recs[-1]["artifact"]).resolve()
            metric = r.evals.get(final, ctx, r.split, r.eval_limit, r.threads)[ctx.metric]
            b = bench_many(
                [final],
                threads=r.threads,
                runs=r.bench_runs,
                rounds=r.bench_rounds,
                device=r.profile.bench_device,
            )[0]
        except optuna.TrialPruned as e:
            trial.set_user_attr("seconds", round(now() - t0, 1))
            r.progress.say(f"{label}  pruned: {e}  {r.progress.took(t0)}")
            raise
        except Exception as e:  # noqa: BLE001 - one failed candidate must not end the search; it is recorded
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            trial.set_user_attr("error", f"{type(e).__name__}: {msg}")
            trial.set_user_attr("seconds", round(now() - t0, 1))
            r.progress.say(f"{label}  failed: {msg}  {r.progress.took(t0)}")
            raise
        measured = {
            "metric": metric,
            "p50": b["latency_ms"]["p50"],
            "size_mb": b["size_mb"],
            "peak_rss_mb": b.get("peak_rss_mb"),
            "artifact": str(final),
            "root": str(tdir.resolve()),
        }
        if r.worker is not None:
            extra = share_trial(r, trial, tdir, recs, final)
            if "p50" in extra:  # the device's latency replaces this machine's (kept for the report)
                extra["local_p50"] = measured["p50"]
            measured.update(extra)
        v = r.record(trial, measured)
        trial.set_user_attr("seconds", round(now() - t0, 1))
        write_json(tdir / "trial.json", {"params": params, "measured": measured, "violations": v})
        ok = all(x <= 0 for x in v.values())
        r.progress.say(
            f"{label}  done  {r.progress.took(t0)}  {ctx.metric} {metric:.4f}  "
            f"{measured['size_mb']:.2f} MB  p50 {measured['p50']:.2f} ms  {'feasible' if ok else 'over budget'}"
        )
        return metric


_COST_ORDER = ("distill", "prune", "quantize")


def _stage_accounting(recs: list[dict[str, Any]], owners: dict[str, int]) -> list[dict[str, Any]]:
    """Per stage of a trial: its key, the seconds this trial paid, and the trial it was reused from."""
    out = []
    for r in recs[1:]:
        item: dict[str, Any] = {"kind": r["kind"], "key": r["key"]}
        if r.get("reused"):
            item.update(seconds=0.0, reused_from=owners.get(r["key"], "an earlier run"))
        else:
            item["seconds"] = r.get("seconds")
        out.append(item)
    return out


def _cost_kind(recs: list[dict[str, Any]]) -> str:
    """The dearest stage this trial ran itself (its time estimates the next trial of that kind)."""
    ran = {r["kind"] for r in recs[1:] if not r.get("reused")}
    return next((k for k in _COST_ORDER if k in ran), "measure")
