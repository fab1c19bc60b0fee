"""Render the README's demo tables from demo-out/*/results.json (numbers measured by `vitshrink demo`).

python docs/make_tables.py [demo-out]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(results: dict) -> str:
    metric = results["metric"]
    stages = results["stages"]
    base = stages[0]
    head = f"| stage | {metric} | Δ vs teacher | p50 ms | p99 ms | speed-up | size MB | smaller | params | MACs | peak RSS MB |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in stages:
        lat = s["latency_ms"]
        lines.append(
            f"| {s['name']} | {s[metric]:.4f} | {s[metric] - base[metric]:+.4f} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
            f"{base['latency_ms']['p50'] / lat['p50']:.1f}× | {s['size_mb']:.2f} | {base['size_mb'] / s['size_mb']:.1f}× | "
            f"{s['params'] / 1e6:.3f} M | {s['macs'] / 1e6:.1f} M | {s['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out")
    for task in ("classification", "segmentation"):
        p = root / task / "results.json"
        if p.exists():
            r = json.loads(p.read_text())
            print(f"#### {task} ({r['data']}, {r['seconds'] / 60:.1f} min)\n\n{table(r)}\n")


if __name__ == "__main__":
    main()
