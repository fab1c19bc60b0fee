"""Budget mode: search recipes (student, prune ratio, quant mode) with Optuna and keep what meets the budget.

Each Optuna trial is one candidate recipe run end to end under DIR/trials/NNN, its stage outputs shared
through DIR/cache (a student distilled once serves every trial that differs only later in the chain),
and its final artifact measured, not estimated: the task metric on the validation split (the test
split is kept for the final report) and the p50 latency, file size and peak RSS from `bench`. The
study maximises the metric with the budget as Optuna constraints (single-objective, so Optuna's
pruners apply; latency and size are measured for every candidate and form the Pareto front), stored
in sqlite:///DIR/search.db so an interrupted search resumes. Feasibility is recomputed from the
stored measurements at the end, so re-running with another budget re-selects without re-training.

Order (`schedule`): a trained student's cheap variants (every quant mode, then the prune ratios with
recovery) run before another student is distilled, ordered by the budget's binding constraint; every
candidate is enqueued, so none runs twice (a repeat is answered from the study). Students come from
every family the registry has for the task, the CNN included (`auto_students`).

Time budget: before the first trial the search measures throughput here and plans the distillation
subset and epochs to fit (`plan`); the plan, the time spent so far and every trial live in the study,
so a search killed and started again continues the same plan on the same clock. The time budget ends
the search, not a trial count (`trials` is an optional cap): the next candidate starts while its
estimated time fits, and once nothing is left to try, the time left re-trains the most promising
candidate on more images (`schedule.extension`). A trial that runs past the budget is stopped at its
next epoch once some candidate exists. Every training epoch reports the validation metric to the
pruner (successive halving by default), which stops trials that do worse than smaller candidates at
the same step. The teacher's logits on the distillation subset (both views) are computed once into
DIR/cache/teacher-logits and read by every distillation and recovery.

Modules: `space` (the budget, students, ratios, modes), `study_setup` (storage, sampler, pruner, the
clock, the plan stored in the study), `run` (the search's shared state and time estimates),
`objective` (one trial), `progress` (bar and printing), `loop` (the budget loop and its summary),
`select` (choice, Pareto front, verdicts), `measure` (cached metrics, violations).
"""

from .loop import search_budget
from .measure import _EvalCache, _pareto, _pareto_front, violations
from .select import _select, describe_miss
from .space import (
    BUDGET_KEYS,
    DEFAULT_DISTILL,
    DEFAULT_PRUNE,
    DEFAULT_RATIOS,
    PRUNERS,
    SEARCH_KEYS,
    STUDENT_SHARE,
    BudgetNotMetError,
    Space,
    auto_students,
    build_space,
    parse_budget,
)
from .study_setup import PLAN_TRIALS, STUDY_NAME, _pruner

__all__ = [
    "BUDGET_KEYS",
    "DEFAULT_DISTILL",
    "DEFAULT_PRUNE",
    "DEFAULT_RATIOS",
    "PLAN_TRIALS",
    "PRUNERS",
    "SEARCH_KEYS",
    "STUDENT_SHARE",
    "STUDY_NAME",
    "BudgetNotMetError",
    "Space",
    "_EvalCache",
    "_pareto",
    "_pareto_front",
    "_pruner",
    "_select",
    "auto_students",
    "build_space",
    "describe_miss",
    "parse_budget",
    "search_budget",
    "violations",
]
