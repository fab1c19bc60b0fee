"""One budget-search worker for test_compress_shared.py, in its own process (so it can be killed).

argv[1]: JSON keyword arguments of `compress`, plus "stage_delay" (seconds each stage sleeps first, so
a trial lasts long enough to be killed in) and "wait_for" ({"worker": 2, "measurer": 1}: the search
loop starts once that many have joined the study, so that the workers' start-up times, which vary a
lot on a busy machine, do not decide who runs what). Throughput is not measured: a fixed fake stands
in (the plan is not what these tests check).
"""

from __future__ import annotations

import json
import sys
import time

import vitshrink.compress.search.loop as loop
import vitshrink.compress.search.study_setup as study_setup
from vitshrink.compress import KINDS, BudgetNotMetError, compress
from vitshrink.compress.plan import Throughput


def main() -> None:
    args = json.loads(sys.argv[1])
    delay = float(args.pop("stage_delay", 0))
    wait_for = args.pop("wait_for", {})
    inner = loop._loop

    def barrier(run, *a, **kw):
        from vitshrink.compress.search.shared import workers

        t0 = time.time()
        while any(len(workers(run.study, role)) < n for role, n in wait_for.items()):
            assert time.time() - t0 < 120, "the other workers never joined"
            time.sleep(0.2)
        return inner(run, *a, **kw)

    loop._loop = barrier
    study_setup.measure_throughput = lambda ctx, students, batch_size: Throughput(
        0.001, dict.fromkeys(students, 0.001), dict.fromkeys(students, 0.001), 1.0
    )
    for k in KINDS.values():

        def slow(stage, ctx, cur, sdir, _fn=k.run):
            time.sleep(delay)
            return _fn(stage, ctx, cur, sdir)

        k.run = slow
    try:
        res = compress(**args)
    except BudgetNotMetError as e:
        res = e.result
    print(json.dumps({"final": str(res.get("final")), "shipped": res.get("shipped", True)}), flush=True)


if __name__ == "__main__":
    main()
