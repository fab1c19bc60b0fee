"""One budget-search worker for test_compress_shared.py, in its own process (so it can be killed).

argv[1]: JSON keyword arguments of `compress`, plus "stage_delay" (seconds each stage sleeps first, so
a trial lasts long enough to be killed in). Throughput is not measured: a fixed fake stands in (the
plan is not what these tests check).
"""

from __future__ import annotations

import json
import sys
import time

import vitshrink.compress.search.study_setup as study_setup
from vitshrink.compress import STAGE_RUNNERS, BudgetNotMetError, compress
from vitshrink.compress.plan import Throughput


def main() -> None:
    args = json.loads(sys.argv[1])
    delay = float(args.pop("stage_delay", 0))
    study_setup.measure_throughput = lambda ctx, students, batch_size: Throughput(
        0.001, dict.fromkeys(students, 0.001), dict.fromkeys(students, 0.001), 1.0
    )
    for kind, fn in list(STAGE_RUNNERS.items()):

        def slow(stage, ctx, cur, sdir, _fn=fn):
            time.sleep(delay)
            return _fn(stage, ctx, cur, sdir)

        STAGE_RUNNERS[kind] = slow
    try:
        res = compress(**args)
    except BudgetNotMetError as e:
        res = e.result
    print(json.dumps({"final": str(res.get("final")), "shipped": res.get("shipped", True)}), flush=True)


if __name__ == "__main__":
    main()
