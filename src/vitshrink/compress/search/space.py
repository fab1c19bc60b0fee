"""The search space: the budget, the candidate students, prune ratios and quant modes, and the stages
one candidate runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ...errors import VitshrinkError
from ...options import key_value_pairs
from ..context import Context
from ..devices import DeviceProfile
from ..plan import MAX_EPOCHS
from ..recipe import Stage, validate_stage

BUDGET_KEYS = ("latency_ms", "size_mb", "max_drop")
SEARCH_KEYS = (
    "students",
    "prune_ratios",
    "quant_modes",
    "resolutions",
    "distill",
    "prune",
    "quantize",
    "pruner",
)
PRUNERS = ("asha", "hyperband", "none")
# Base options of the searched stages; override with compress(search={"distill": {...}, ...}).
DEFAULT_DISTILL: dict[str, Any] = {"epochs": 2}
# depth_ratio "auto": the fastest split at equal MACs, unchecked: each trial's accuracy is measured by the
# search itself, so prune's default check against widths only (a second recovery) would only halve the trials
DEFAULT_PRUNE: dict[str, Any] = {"recover_epochs": 1, "depth_ratio": "auto"}
DEFAULT_RATIOS = (0.0, 0.25, 0.5)
# Pixels a fractional search resolution is rounded to for training (the segmentation families' size step).
RESOLUTION_STEP = 32
STUDENT_SHARE = 0.7  # an automatic student has fewer than this share of the teacher's parameters


class BudgetNotMetError(VitshrinkError):
    """No searched recipe met the budget; `.result` holds the closest one's results (also on disk)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def parse_budget(budget: str | dict[str, Any]) -> dict[str, float]:
    """`latency_ms=..,size_mb=..,max_drop=..` (or a dict) -> validated floats."""
    if isinstance(budget, str):
        try:
            budget = {k: v.strip() for k, v in key_value_pairs(budget, skip_empty=True)}
        except ValueError as e:
            raise VitshrinkError(f"budget: {e}") from None
    if not isinstance(budget, dict) or not budget:
        raise VitshrinkError(f"budget needs at least one of {', '.join(BUDGET_KEYS)}")
    out: dict[str, float] = {}
    for k, v in budget.items():
        if k not in BUDGET_KEYS:
            raise VitshrinkError(f"unknown budget key '{k}' (choose from {', '.join(BUDGET_KEYS)})")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise VitshrinkError(f"budget {k} must be a number, got {v!r}") from None
        if isinstance(v, bool) or not math.isfinite(f) or f < 0 or (f == 0 and k != "max_drop"):
            raise VitshrinkError(f"budget {k} must be a positive number, got {v!r}")
        out[k] = f
    return out


@dataclass
class Space:
    students: dict[str, dict[str, Any] | None]  # label -> distill student options (None: no distill)
    prune_ratios: list[float]
    quant_modes: list[str]
    distill: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)
    quantize: dict[str, Any] = field(default_factory=dict)
    pruner: str = "asha"
    int8_targets: dict[str, float] = field(default_factory=dict)  # size_mb / latency_ms for mode int8
    n_train: int | None = None  # training images (an extended distillation grows its subset up to it)
    # Sizes the network runs at inside the deployed graph (segmentation; `export --resolution`): None is
    # the model's own. With more than one, "resolution" is a trial parameter like "quant".
    resolutions: list[Any] = field(default_factory=lambda: [None])
    base_size: int | None = None  # the teacher's input side: a fractional resolution is a share of it

    def describe(self) -> dict[str, Any]:
        return {
            "students": self.students,
            "prune_ratios": self.prune_ratios,
            "quant_modes": self.quant_modes,
            **(
                {"resolutions": self.resolutions, "base_size": self.base_size}
                if self.resolutions != [None]
                else {}
            ),
            "distill": self.distill,
            "prune": self.prune,
            "quantize": self.quantize,
            "pruner": self.pruner,
        }

    def stages(self, params: dict[str, Any]) -> list[Stage]:
        out = []
        student = self.students[params["student"]]
        k = int(params.get("extend", 0))
        res = params.get("resolution")
        if student is not None:
            d = {**self.distill, **student}
            if k:
                d.update(self.more_training(d, k))
            side = self.train_size(res)
            if side is not None and "image_size" not in d:
                # the student learns at the size its network runs at inside the graph, and the graph
                # runs it at that size in pixels (a fraction of its own size would shrink it twice)
                d["image_size"], res = side, side
            out.append(validate_stage({"distill": d}, "search distill"))
        if params["prune_ratio"] > 0:
            pr = {**self.prune, "ratio": params["prune_ratio"]}
            if k and student is None:  # the teacher has no distillation: extra time goes to recovery
                pr["recover_epochs"] = min(MAX_EPOCHS, max(1, int(pr.get("recover_epochs", 0))) * k)
            out.append(validate_stage({"prune": pr}, "search prune"))
        if params["quant"] != "none":
            q = {**self.quantize, "mode": params["quant"]}
            if params["quant"] == "int8":
                q.update(self.int8_targets)
            if res is not None:  # quantize re-exports the stage's model to run at `res` inside
                q["resolution"] = res
            out.append(validate_stage({"quantize": q}, "search quantize"))
        elif res is not None:
            out.append(validate_stage({"export": {"resolution": res}}, "search export"))
        return out

    def train_size(self, res: Any) -> int | None:
        """The square side a distilled student trains at when its network runs at `res` inside the
        graph (None: its own size). Train where it runs: on the aerial demo student at 512 px, three
        epochs at the network's size inside took int8 mIoU at 320 from -0.018 to -0.003 and at 256 from
        -0.034 to -0.009 against 512 (benchmarks/seg_frontier.py)."""
        from ...options import parse_resolution

        if res is None:
            return None
        r = parse_resolution(res)
        if isinstance(r, float):
            if not self.base_size:
                return None
            return max(RESOLUTION_STEP, round(self.base_size * r / RESOLUTION_STEP) * RESOLUTION_STEP)
        return r[0] if r[0] == r[1] else None  # a non-square size: the student keeps its own

    def more_training(self, d: dict[str, Any], k: int) -> dict[str, Any]:
        """Distillation options for k x the planned images: a larger subset first (up to the whole
        training split), then more epochs (up to MAX_EPOCHS)."""
        n, e = int(d.get("limit") or self.n_train or 0), int(d.get("epochs", 1))
        if not n:
            return {"epochs": min(MAX_EPOCHS, e * k)}
        n2 = min(self.n_train or n * k, n * k)
        return {"limit": n2, "epochs": min(MAX_EPOCHS, max(e, round(n * e * k / n2)))}


def auto_students(ctx: Context, budget: dict[str, float] | None = None) -> dict[str, dict[str, Any] | None]:
    """'none' plus one preset per registered family for the task (the CNN included: logit KD works
    across families), the largest with under STUDENT_SHARE of the teacher's parameters. Order: those
    whose int8 weights fit the size budget first, then the larger (more capacity) first."""
    import torch

    from ...models import build_model, count_params, load_model
    from ...models.families import families

    task, pre = ctx.meta["task"], ctx.meta["preprocess"]
    teacher, _ = load_model(ctx.teacher, verify=False)
    t_params = count_params(teacher)
    best: dict[str, tuple[int, str]] = {}
    for fam in families():
        for name, p in fam.presets.items():
            if task not in p.tasks or name == ctx.meta.get("preset"):
                continue
            try:
                with torch.device("meta"):  # parameter count only: nothing allocated
                    net, _ = build_model(
                        name,
                        task=task,
                        image_size=pre["size"][0],
                        num_channels=pre["channels"],
                        class_names=ctx.meta["class_names"],
                    )
                n = count_params(net)
            except Exception:  # noqa: BLE001 - a preset that cannot take this input size is simply not a candidate
                continue
            if n < STUDENT_SHARE * t_params and n > best.get(fam.name, (0, ""))[0]:
                best[fam.name] = (n, name)
    limit = (budget or {}).get("size_mb", math.inf) * 2**20  # int8: about one byte per parameter
    chosen = sorted(best.values(), key=lambda x: (x[0] > limit, -x[0]))
    return {"none": None, **{name: {"student": name} for _, name in chosen}}


def build_space(
    ctx: Context,
    profile: DeviceProfile,
    search: dict[str, Any] | None,
    budget: dict[str, float] | None = None,
) -> Space:
    search = dict(search or {})
    unknown = [k for k in search if k not in SEARCH_KEYS]
    if unknown:
        raise VitshrinkError(f"unknown search option '{unknown[0]}' (allowed: {', '.join(SEARCH_KEYS)})")
    if "students" in search:
        students: dict[str, dict[str, Any] | None] = {}
        for s in search["students"]:
            if s in (None, "none"):
                students["none"] = None
            elif isinstance(s, str):
                students[s] = {"student": s}
            elif isinstance(s, dict) and "student" in s:
                label = s.get("label") or f"{s['student']}{_short(s.get('student_options'))}"
                students[str(label)] = {k: v for k, v in s.items() if k != "label"}
            else:
                raise VitshrinkError(
                    f"search students: expected a preset/directory or {{student: ..}}, got {s!r}"
                )
    else:
        students = auto_students(ctx, budget)
    try:
        from ...prune import prune  # noqa: F401

        ratios = [float(r) for r in search.get("prune_ratios", DEFAULT_RATIOS)]
    except ImportError:
        ratios = [0.0]
    modes = list(search.get("quant_modes", profile.quant_modes))
    resolutions = _resolutions(search, ctx)
    pruner = search.get("pruner", "asha")
    if pruner not in PRUNERS:
        raise VitshrinkError(f"search pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    space = Space(
        students=students,
        prune_ratios=ratios,
        quant_modes=modes,
        distill={**DEFAULT_DISTILL, **search.get("distill", {})},
        prune={**DEFAULT_PRUNE, **search.get("prune", {})},
        quantize=dict(search.get("quantize", {})),
        pruner=pruner,
        # int8 keeps the variant that fits the budget's size / latency best, not only the fastest
        int8_targets={k: budget[k] for k in ("size_mb", "latency_ms") if k in (budget or {})},
        resolutions=resolutions,
        base_size=int(ctx.meta["preprocess"]["size"][0]),
    )
    # Validate every option now, not an hour into the search.
    for st in students.values():
        if st is not None:
            validate_stage({"distill": {**space.distill, **st}}, "search distill")
    for r in ratios:
        if r > 0:
            validate_stage({"prune": {**space.prune, "ratio": r}}, "search prune")
    for m in modes:
        if m != "none":
            validate_stage({"quantize": {**space.quantize, "mode": m}}, "search quantize")
    return space


def _short(opts: dict[str, Any] | None) -> str:
    return "" if not opts else "(" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) + ")"


def _resolutions(search: dict[str, Any], ctx: Context) -> list[Any]:
    """The searched sizes inside the graph; [H, W] pairs as "HxW" (optuna's choices are scalars)."""
    resolutions = [
        "x".join(map(str, r)) if isinstance(r, (list, tuple)) else r
        for r in search.get("resolutions", [None])
    ]
    if not resolutions:
        raise VitshrinkError("search resolutions: give at least one (null: the model's own size)")
    if any(r is not None for r in resolutions) and ctx.meta["task"] != "segmentation":
        raise VitshrinkError(
            "search resolutions apply to segmentation (the network resized inside the graph)"
        )
    for r in resolutions:
        if r is not None:
            validate_stage({"export": {"resolution": r}}, "search resolutions")
    return resolutions
