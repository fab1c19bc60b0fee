"""Time budget for budget mode: measure throughput here, then size the search so it fits.

`measure_throughput` times a few batches of the teacher's forward pass and of every candidate's
training step and inference on this machine at this thread count. `plan_search` (pure: fake numbers
in, plan out, unit-tested) turns those rates into the distillation subset, epochs and trial count:

    total = setup + teacher logits (once, every view) + distillation (once per student)
            + trials x (recovery + validation + export/quantize/bench overhead) + final measurement

It keeps the requested trials and 2 epochs and grows the subset up to the whole training split,
then (with the whole split) grows the epochs; when even the smallest subset does not fit it drops to
1 epoch, then to fewer trials, and finally returns the minimal plan marked `fits=False`. Values the
user fixed (search distill `limit` / `epochs`) are kept as given.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import VitshrinkError

if TYPE_CHECKING:
    from .context import Context

DEFAULT_TIME_BUDGET = "30m"
DEFAULT_EPOCHS = 2  # distillation epochs the plan starts from (grown only once the whole split fits)
MAX_EPOCHS = 10
MIN_SUBSET = 2000  # below this a student learns too little for the search to rank candidates
MIN_TRIALS = 2  # the two seed candidates (moderate, aggressive)
TRIAL_OVERHEAD_S = 20.0  # data loading, export, quantization, ONNX sessions and bench, per trial
VAL_LIMIT = (200, 2000)  # distillation's per-epoch validation: N/5 within these bounds
SAFETY = 0.9  # plan to 90 % of the budget: the rates come from a few batches and the overhead is a guess

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(h|hr|min|m|sec|s)?")


def parse_duration(value: str | float | int) -> float:
    """'90s', '30m', '2h', '1h30m' or plain seconds -> seconds (> 0)."""
    if isinstance(value, bool):
        raise VitshrinkError(f"time budget must be a duration like 30m, 2h or 90s, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = list(_PART.finditer(text))
        if (
            not text
            or "".join(m.group(0) for m in parts) != text
            or (len(parts) > 1 and not parts[-1].group(2))
        ):
            raise VitshrinkError(f"time budget must be a duration like 30m, 2h or 90s, got {value!r}")
        seconds = sum(float(m.group(1)) * _UNITS[m.group(2) or "s"] for m in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise VitshrinkError(f"time budget must be positive, got {value!r}")
    return seconds


def fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5940 else f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Throughput:
    """Seconds per image measured here; keys are candidate labels ('none': the teacher itself)."""

    teacher_s: float  # teacher forward pass (no gradients), one view
    train_s: dict[str, float]  # one training step (forward + backward + update) of each candidate
    eval_s: dict[str, float]  # inference of each candidate
    trial_overhead_s: float = TRIAL_OVERHEAD_S


@dataclass(frozen=True)
class Plan:
    trials: int
    subset: int  # distillation / recovery images per epoch
    epochs: int  # distillation epochs
    recover_epochs: int
    val_limit: int
    views: int  # teacher-logit views cached (2: plain + flipped, for flip augmentation)
    budget_s: float
    setup_s: float
    teacher_cache_s: float
    distill_s: float  # every student distilled once (the most expensive ones first, worst case)
    trial_s: float  # per trial after distillation: recovery, validation, overhead
    final_s: float
    fits: bool
    note: str = ""
    n_train: int = 0  # images in the training split (the subset is all of them when equal)

    @property
    def total_s(self) -> float:
        return (
            self.setup_s + self.teacher_cache_s + self.distill_s + self.trials * self.trial_s + self.final_s
        )

    @property
    def per_trial_s(self) -> float:
        """Average planned time of one trial, shared teacher logits and distillations included."""
        return (self.teacher_cache_s + self.distill_s + self.trials * self.trial_s) / max(1, self.trials)

    def line(self) -> str:
        n = f"{self.subset / 1000:.3g}k" if self.subset >= 1000 else str(self.subset)
        s = (
            f"{self.trials} trials, ~{fmt_minutes(self.per_trial_s)} each, distil on {n} images x "
            f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        )
        if self.recover_epochs:
            s += f", recover {self.recover_epochs} epoch{'s' if self.recover_epochs != 1 else ''}"
        s += f" (planned ~{fmt_minutes(self.total_s)} of {fmt_minutes(self.budget_s)})"
        return s + (f"; {self.note}" if self.note else "")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total_s": round(self.total_s, 1), "per_trial_s": round(self.per_trial_s, 1)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _val_limit(n: int, n_val: int) -> int:
    return max(1, min(n_val, max(VAL_LIMIT[0], min(VAL_LIMIT[1], n // 5))))


def plan_search(
    budget_s: float,
    tp: Throughput,
    *,
    n_train: int,
    n_val: int,
    max_trials: int,
    students: list[str] | None = None,
    epochs: int | None = None,
    subset: int | None = None,
    val_limit: int | None = None,
    recover_epochs: int = 1,
    views: int = 2,
    eval_limit: int | None = None,
    setup_s: float = 0.0,
    final_s: float = 0.0,
) -> Plan:
    """The largest search (trials, then subset, then epochs) whose worst case fits `budget_s`.

    students: the labels that are distilled (default: every key of tp.train_s but 'none'); trials
    are costed with the average candidate's rates, distillations with the most expensive students.
    epochs / subset / val_limit: fixed by the user (not planned). eval_limit: validation images per
    trial (default n_val).
    """
    if max_trials < 1:
        raise VitshrinkError(f"--trials must be >= 1, got {max_trials}")
    trained = sorted(
        students if students is not None else [k for k in tp.train_s if k != "none"],
        key=lambda s: tp.train_s[s],
        reverse=True,
    )
    labels = list(tp.train_s) or ["none"]
    mean_train = sum(tp.train_s[k] for k in labels) / len(labels) if tp.train_s else 0.0
    mean_eval = sum(tp.eval_s[k] for k in labels) / len(labels) if tp.eval_s else 0.0
    n_eval = min(eval_limit or n_val, n_val)
    uses_teacher = bool(trained) or recover_epochs > 0

    def build(trials: int, n: int, e: int) -> Plan:
        v = val_limit or _val_limit(n, n_val)
        distill = sum(
            e * (n * tp.train_s[s] + v * tp.eval_s.get(s, mean_eval))
            for s in trained[: min(trials, len(trained))]
        )
        recovery = recover_epochs * (n * mean_train + max(1, n // 4) * mean_eval)
        trial = recovery + n_eval * mean_eval + tp.trial_overhead_s
        return Plan(
            trials=trials,
            subset=n,
            epochs=e,
            recover_epochs=recover_epochs,
            val_limit=v,
            views=views,
            budget_s=budget_s,
            setup_s=setup_s,
            teacher_cache_s=n * views * tp.teacher_s if uses_teacher else 0.0,
            distill_s=distill,
            trial_s=trial,
            final_s=final_s,
            fits=True,
            n_train=n_train,
        )

    def fits(p: Plan) -> bool:
        return p.total_s <= SAFETY * budget_s

    lo_n = min(MIN_SUBSET, n_train) if subset is None else min(subset, n_train)
    hi_n = n_train if subset is None else lo_n
    first_e = epochs or DEFAULT_EPOCHS
    epoch_tries = [epochs] if epochs else list(range(first_e, 0, -1))
    for trials in range(max_trials, min(MIN_TRIALS, max_trials) - 1, -1):
        for e in epoch_tries:
            if not fits(build(trials, lo_n, e)):
                continue
            n = _largest(lambda n, t=trials, e=e: fits(build(t, n, e)), lo_n, hi_n)
            best = build(trials, n, e)
            if epochs is None and n == n_train:  # the whole split fits: spend what is left on epochs
                while best.epochs < MAX_EPOCHS and fits(build(trials, n, best.epochs + 1)):
                    best = build(trials, n, best.epochs + 1)
            return best
    p = build(min(MIN_TRIALS, max_trials), lo_n, epoch_tries[-1])
    return Plan(
        **{k: getattr(p, k) for k in Plan.__dataclass_fields__ if k not in ("fits", "note", "n_train")},
        n_train=n_train,
        fits=False,
        note=f"the time budget is too short: the smallest search needs ~{fmt_minutes(p.total_s)}",
    )


def _largest(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ok(n) (ok(lo) holds, ok is monotone), rounded down to 2 digits."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    if lo < 1000:
        return lo
    step = 10 ** (len(str(lo)) - 2)  # 12,345 -> 12,000: a plan line people can read
    return max(1000, lo // step * step)


# ------------------------------------------------------------------------------------- measurement


def measure_throughput(
    ctx: Context,
    students: dict[str, dict[str, Any] | None],
    *,
    batch_size: int,
    n_batches: int = 2,
    overhead_s: float = TRIAL_OVERHEAD_S,
) -> Throughput:
    """Time the teacher's forward pass and each candidate's training step and inference on a few
    batches of real images (one warm-up batch first), at torch's current thread count."""
    import torch

    from ..bench.timing import seconds_per_item
    from ..data import load_dataset
    from ..models import family_for, load_model
    from ..train import prepare, resolve_model, task_loss, teacher_forward

    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    pre = ctx.meta["preprocess"]
    n = batch_size * (n_batches + 1)
    ds = load_dataset(ctx.data, "train", size=pre["size"][0], limit=n, data_options=ctx.data_options)
    # Through the training loader, then held for timing. Decoding runs in worker processes beside the
    # training step, so a streamed photo set trains no faster than its loader delivers (`decode_s`).
    batches, t0, seen = [], 0.0, 0
    for b in ds.batches(batch_size, train=True, generator=torch.Generator()):
        if batches:
            seen += len(b.index)
        else:
            t0 = time.perf_counter()  # worker start-up is paid once per epoch, not per image
        batches.append((b.images, b.targets))
    decode_s = (time.perf_counter() - t0) / seen if seen and getattr(ds, "streaming", False) else 0.0
    task = ctx.meta["task"]

    def per_image(fn: Any) -> float:
        return seconds_per_item(fn, batches, sync=torch.cuda.synchronize if device.type == "cuda" else None)

    teacher, t_meta = load_model(ctx.teacher, verify=False)
    teacher.to(device).eval()
    teacher_s = per_image(lambda xb, yb: teacher_forward(teacher, prepare(xb, t_meta, device)))

    train_s: dict[str, float] = {}
    eval_s: dict[str, float] = {}
    for label, opts in students.items():
        try:
            if opts is None:
                model, meta = load_model(ctx.teacher, verify=False)
            else:
                model, meta = resolve_model(
                    opts["student"],
                    ctx.data,
                    image_size=opts.get("image_size") or pre["size"][0],
                    channels=pre["channels"],
                    data_options=ctx.data_options,
                    overrides=opts.get("student_options"),
                )
        except Exception:  # noqa: BLE001 - a student that cannot be built fails its own trials, with the reason
            model, meta = load_model(ctx.teacher, verify=False)  # planned at the teacher's rates meanwhile
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        family = family_for(model)

        def step(
            xb: Any, yb: Any, model: Any = model, meta: Any = meta, opt: Any = opt, fam: Any = family
        ) -> None:
            model.train()
            loss = task_loss(fam.model_logits(model, prepare(xb, meta, device)), yb.to(device), task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        @torch.no_grad()
        def infer(xb: Any, yb: Any, model: Any = model, meta: Any = meta, fam: Any = family) -> None:
            model.eval()
            fam.model_logits(model, prepare(xb, meta, device))

        train_s[label] = max(per_image(step), decode_s)
        eval_s[label] = per_image(infer)
        del model, opt
    return Throughput(teacher_s=teacher_s, train_s=train_s, eval_s=eval_s, trial_overhead_s=overhead_s)
