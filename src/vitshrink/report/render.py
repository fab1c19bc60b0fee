"""Turn validated results into report content, then render it as Markdown and as self-contained HTML.

Both outputs come from the same `Content`, so the two files cannot disagree. The HTML is assembled
with f-strings and `html.escape` rather than a template engine: the page is one fixed layout, and the
stdlib keeps the report free of another dependency.
"""

from __future__ import annotations

import base64
import html
import json
import mimetypes
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..safeio import MAX_IMAGE_BYTES, read_limited
from .analysis import Comparison
from .plots import class_order
from .results import EXAMPLE_ROLES, Example, Results, StageResult

METRIC_LABELS = {"accuracy": "Accuracy", "miou": "mIoU"}
ROLE_TITLES = {
    "image": "Input",
    "ground_truth": "Ground truth",
    "teacher": "Teacher",
    "compressed": "Compressed",
}
DASH = "—"
VERDICT_MARK = {"ok": " ✓", "wrong": " ✗"}


# ---------------------------------------------------------------------------------------------- content


@dataclass(frozen=True)
class Cell:
    text: str
    kind: str = "text"  # "text" | "num" | "pos" | "neg" (numbers coloured by sign in HTML)


@dataclass(frozen=True)
class Table:
    headers: list[Cell]
    rows: list[list[Cell]]
    highlight: list[bool] = field(default_factory=list)  # rows shown emphasised (the Pareto front)
    compact: bool = False  # HTML: as wide as its content instead of the page


@dataclass(frozen=True)
class Image:
    path: Path  # absolute, for embedding
    link: str  # as written in the Markdown (relative to the run dir when possible)
    alt: str
    css_class: str
    id: str


@dataclass(frozen=True)
class ExampleCell:
    title: str
    image: Image | None
    label: str | None = None  # predicted / true class name (classification)
    verdict: str = ""  # "ok" | "wrong" against the ground-truth label, "" when not comparable


@dataclass(frozen=True)
class ExampleView:
    cells: list[ExampleCell]
    caption: str


@dataclass(frozen=True)
class Content:
    title: str
    subtitle: str
    highlights: list[tuple[str, str]]  # (label, value) headline numbers
    device: list[tuple[str, str]]
    stages: Table
    versus: Table
    pareto: Image
    per_class: Table | None
    per_class_plot: Image | None
    examples: list[ExampleView]
    artifacts: list[tuple[str, str, str]]  # (stage, artifact, notes)
    notes: list[str]
    search: list[tuple[str, str]] = field(default_factory=list)  # budget search summary rows


def fmt_pct(v: float | None) -> str:
    return DASH if v is None else f"{v * 100:.2f}%"


def fmt_pp(v: float | None) -> str:
    return DASH if v is None else f"{v * 100:+.2f} pp"


def fmt_ms(v: float | None) -> str:
    return DASH if v is None else f"{v:.2f}"


def fmt_mb(v: float | None) -> str:
    return DASH if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def fmt_ratio(v: float | None) -> str:
    return DASH if v is None else f"{v:.2f}×"


def fmt_count(n: int | None) -> str:
    """Human count with SI prefixes (params, MACs): 5722000 -> '5.72 M'."""
    if n is None:
        return DASH
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def fmt_score(v: float) -> str:
    return f"{v:#.4g}"  # '#' keeps trailing zeros, so every score shows 4 significant digits


def _num(text: str) -> Cell:
    return Cell(text, "num")


def _signed(v: float | None, text: str) -> Cell:
    if v is None or abs(v) < 5e-5:  # shows as +0.00: not worth colouring
        return Cell(text, "num")
    return Cell(text, "pos" if v > 0 else "neg")


def _link(path: Path, run_dir: Path) -> str:
    try:
        return path.relative_to(run_dir).as_posix()
    except ValueError:
        return path.as_posix()


def _device_rows(device: dict[str, Any]) -> list[tuple[str, str]]:
    return [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in device.items()]


def build_content(
    res: Results, comps: list[Comparison], pareto_png: Path, per_class_png: Path | None
) -> Content:
    mlabel = METRIC_LABELS.get(res.metric, res.metric)
    seg = res.task == "segmentation"
    has = {
        "dice": any(s.dice is not None for s in res.stages),
        "throughput": any(s.throughput is not None for s in res.stages),
    }
    ref, last, last_cmp = res.stages[0], res.stages[-1], comps[-1]

    head = [Cell("Stage"), _num(mlabel)] + ([_num("Dice")] if has["dice"] else [])
    head += [_num("p50 (ms)"), _num("p90 (ms)"), _num("p99 (ms)")]
    head += [_num("Throughput (img/s)")] if has["throughput"] else []
    head += [_num("Peak RSS (MB)"), _num("Size (MB)"), _num("Params"), _num("MACs")]
    rows = []
    for s in res.stages:
        row = [Cell(s.name), _num(fmt_pct(s.metric))] + ([_num(fmt_pct(s.dice))] if has["dice"] else [])
        row += [_num(fmt_ms(s.p50)), _num(fmt_ms(s.p90)), _num(fmt_ms(s.p99))]
        if has["throughput"]:
            row.append(_num(DASH if s.throughput is None else f"{s.throughput:.1f}"))
        row += [_num(fmt_mb(s.peak_rss_mb)), _num(fmt_mb(s.size_mb)), _num(fmt_count(s.params))]
        row.append(_num(fmt_count(s.macs)))
        rows.append(row)
    highlight = [c.pareto for c in comps]
    stages = Table(head, rows, highlight)

    vhead = [Cell("Stage"), _num("Speed-up"), _num("Size reduction"), _num("Params reduction")]
    vhead += [_num(f"Δ {mlabel}")] + ([_num("Δ Dice")] if has["dice"] else [])
    vhead += [_num(f"Score ({mlabel}/ms)"), _num("Score ratio"), Cell("Pareto")]
    vrows = []
    for s, c in zip(res.stages, comps):
        row = [Cell(s.name), _num(fmt_ratio(c.speedup)), _num(fmt_ratio(c.size_reduction))]
        row += [_num(fmt_ratio(c.params_reduction)), _signed(c.metric_delta, fmt_pp(c.metric_delta))]
        if has["dice"]:
            row.append(_signed(c.dice_delta, fmt_pp(c.dice_delta)))
        row += [_num(fmt_score(c.score)), _num(fmt_ratio(c.score_ratio)), Cell("yes" if c.pareto else "")]
        vrows.append(row)
    versus = Table(vhead, vrows, highlight)

    best = max(range(len(comps)), key=lambda i: comps[i].score)
    highlights = [
        (f"speed-up, {last.name} vs {ref.name}", fmt_ratio(last_cmp.speedup)),
        ("size reduction", fmt_ratio(last_cmp.size_reduction)),
        (f"Δ {mlabel}", fmt_pp(last_cmp.metric_delta)),
        ("score ratio", fmt_ratio(last_cmp.score_ratio)),
        ("best score (metric/ms)", res.stages[best].name),
    ]

    per_class = per_class_plot = None
    if seg:
        per_class, per_class_plot = _per_class(res, per_class_png)

    examples = [_example_view(i, ex, res.run_dir) for i, ex in enumerate(res.examples)]
    artifacts = [(s.name, s.artifact or DASH, s.notes) for s in res.stages if s.artifact or s.notes]
    notes = [
        f"Ratios compare each stage with the original ({ref.name}): original ÷ stage, higher is better.",
        f"Δ is stage − original in percentage points; score = {mlabel} (fraction) ÷ p50 latency in ms "
        "(LPCVC-style: accuracy per millisecond).",
        "Stages in bold are on the Pareto front: no other stage is both at least as fast and at least as "
        "accurate (and strictly better in one).",
    ]
    notes += _baseline_verdict(res.stages, mlabel)
    return Content(
        title=f"vitshrink report: {res.task}",
        subtitle=f"{len(res.stages)} stages, {ref.name} → {last.name}, metric {mlabel}",
        highlights=highlights,
        device=_device_rows(res.device),
        stages=stages,
        versus=versus,
        pareto=Image(pareto_png, _link(pareto_png, res.run_dir), f"{mlabel} vs latency", "pareto", "pareto"),
        per_class=per_class,
        per_class_plot=per_class_plot,
        examples=examples,
        artifacts=artifacts,
        notes=notes,
        search=_search_rows(res.search, mlabel),
    )


def _baseline_verdict(stages: list[StageResult], mlabel: str) -> list[str]:
    """Which wins at the deployed latency: the last pipeline stage or the CNN baseline (if the run has one)."""
    base = next((s for s in stages if s.baseline), None)
    deployed = next((s for s in reversed(stages) if not s.baseline), None)
    if base is None or deployed is None:
        return []
    from ..baseline import baseline_winner

    who = {
        "compressed": f"the compressed model ({deployed.name})",
        "baseline": f"the CNN baseline ({base.name})",
        None: "neither outright (one is faster, the other more accurate)",
    }[baseline_winner((deployed.p50, deployed.metric), (base.p50, base.metric))]
    return [
        f"At the deployed latency ({fmt_ms(deployed.p50)} p50) the winner is {who}: {mlabel} "
        f"{fmt_pct(deployed.metric)} vs {fmt_pct(base.metric)} for the CNN baseline at {fmt_ms(base.p50)}, "
        "trained from scratch for the distillation's wall-clock time."
    ]


def _search_rows(s: dict[str, Any], mlabel: str) -> list[tuple[str, str]]:
    """compress --budget: the budget, whether it was met, the trials, what bound the result, the front."""
    if not s:
        return []
    rows: list[tuple[str, str]] = []
    budget = s.get("budget") or {}
    if isinstance(budget, dict) and budget:
        rows.append(
            (
                "budget",
                ", ".join(
                    f"{k} = {v:g}" if isinstance(v, (int, float)) else f"{k} = {v}" for k, v in budget.items()
                ),
            )
        )
    if "met" in s:
        rows.append(("budget met", "yes" if s["met"] else "NO (the closest candidate was kept)"))
    t = s.get("time") or {}
    counts = [f"{s.get('trials_run', DASH)} run", f"{len(s.get('trials') or [])} measured"]
    counts += [
        f"{len(s.get('pruned_trials') or [])} stopped early",
        f"{len(s.get('failed_trials') or [])} failed",
    ]
    rows.append(("trials", ", ".join(counts)))
    if isinstance(t, dict) and t.get("budget_s"):
        took = f"{t.get('elapsed_s', 0) / 60:.1f} of {t['budget_s'] / 60:.1f} min"
        stop = {
            "time": "; stopped by the time budget",
            "trials": "; stopped by the --trials cap",
            "exhausted": f"; {t.get('unused_s', 0) / 60:.1f} min unused: nothing left worth trying",
        }.get(t.get("stopped"), "")
        rows.append(("time", took + stop))
    if "chosen_trial" in s:
        rows.append(("chosen", f"trial {s['chosen_trial']} {s.get('chosen_params', '')}"))
    rows += _search_accounting(s)
    binding = s.get("binding") or {}
    if isinstance(binding, dict):
        rows.append(
            ("bound by", "; ".join(f"{k}: {v}" for k, v in binding.items()) or "nothing (all limits slack)")
        )
    rows += _per_resolution(s, mlabel)
    for r in s.get("pareto_front") or []:
        if isinstance(r, dict):
            rows.append(
                (
                    f"Pareto: trial {r.get('number')}",
                    f"{mlabel} {r.get('metric', 0):.4f}, {r.get('p50', 0):.2f} ms, {r.get('size_mb', 0):.2f} MB"
                    + ("" if r.get("feasible") else " (over budget)"),
                )
            )
    return rows


def _per_resolution(s: dict[str, Any], mlabel: str) -> list[tuple[str, str]]:
    """Where the search tried several sizes inside the graph: per size, its most accurate and its
    fastest measured trial (what resolution buys and costs, next to each other)."""
    trials = [r for r in s.get("trials") or [] if isinstance(r, dict) and isinstance(r.get("params"), dict)]
    sizes = {str(r["params"].get("resolution")) for r in trials if "resolution" in r["params"]}
    if len(sizes) < 2:
        return []
    rows = []
    for size in sorted(sizes, key=lambda v: (v != "None", v)):
        at = [r for r in trials if str(r["params"].get("resolution")) == size]
        best = max(at, key=lambda r: r.get("metric", 0))
        fast = min(at, key=lambda r: r.get("p50", float("inf")))
        label = "the model's own" if size == "None" else size
        text = f"best {mlabel} {best.get('metric', 0):.4f} at {best.get('p50', 0):.2f} ms (trial {best.get('number')})"
        if fast is not best:
            text += f"; fastest {fast.get('p50', 0):.2f} ms at {mlabel} {fast.get('metric', 0):.4f} (trial {fast.get('number')})"
        rows.append((f"resolution {label}", f"{text}; {len(at)} trial(s)"))
    return rows


def _search_accounting(s: dict[str, Any]) -> list[tuple[str, str]]:
    """compress --budget's own accounting: which family won, int8's choice, what extra time bought,
    and per trial its time, why it ran, the stages it reused, why it stopped or was skipped."""
    rows: list[tuple[str, str]] = []
    fam = s.get("families")
    if isinstance(fam, dict) and fam.get("line"):
        rows.append(("families", str(fam["line"])))
    q = s.get("int8_variants")
    if isinstance(q, dict) and q.get("variants"):
        built = ", ".join(
            f"{v.get('kind')} {v.get('size_mb') or 0:.2f} MB / {v.get('latency_ms') or 0:.3f} ms / {v.get('metric') or 0:.4f}"
            for v in q["variants"]
        )
        rows.append(("int8 variants", f"built {built}; kept {q.get('kept')}: {q.get('why')}"))
    for e in s.get("extra_time") or []:
        if isinstance(e, dict) and e.get("line"):
            rows.append(("extra time", str(e["line"])))
    trials = [
        r
        for key in ("trials", "pruned_trials", "failed_trials")
        for r in s.get(key) or []
        if isinstance(r, dict)
    ]
    for r in sorted(trials, key=lambda r: r.get("number", 0)):
        parts = [f"{r.get('seconds') or 0:.0f} s", str(r.get("why") or "")]
        if r.get("worker"):  # a shared study (compress --storage): who ran it, where its latency came from
            parts.insert(0, f"worker {r['worker']}")
        if r.get("latency_source"):
            parts.append(f"latency from {r['latency_source']}")
        reused = [
            f"{st.get('kind')} from trial {st['reused_from']}"
            for st in r.get("stages") or []
            if "reused_from" in st
        ]
        if reused:
            parts.append("reused " + ", ".join(reused))
        if r.get("state") == "pruned":
            parts.append(f"stopped: {r.get('reason')}")
        if r.get("error"):
            parts.append(f"failed: {r['error']}")
        rows.append((f"trial {r.get('number')} {r.get('params', '')}", "; ".join(p for p in parts if p)))
    skipped = s.get("skipped") or []
    if skipped:
        rows.append(("skipped", f"{len(skipped)} candidates that cannot win (reasons in search.json)"))
    untried = s.get("untried") or []
    if untried:
        rows.append(("untried", f"{len(untried)} candidates ({untried[0].get('reason') or 'not reached'})"))
    return rows


def _per_class(res: Results, png: Path | None) -> tuple[Table | None, Image | None]:
    with_iou: list[StageResult] = [s for s in res.stages if s.per_class_iou]
    if not with_iou:
        return None, None
    classes = class_order(with_iou, res.class_names)  # same order as the plot
    delta = len(with_iou) > 1
    head = [Cell("Class")] + [_num(s.name) for s in with_iou]
    head += [_num(f"Δ ({with_iou[-1].name} − {with_iou[0].name})")] if delta else []
    rows = []
    for c in classes:
        vals = [s.per_class_iou.get(c) for s in with_iou]
        row = [Cell(c)] + [_num(fmt_pct(v)) for v in vals]
        if delta:
            d = vals[-1] - vals[0] if vals[-1] is not None and vals[0] is not None else None
            row.append(_signed(d, fmt_pp(d)))
        rows.append(row)
    img = None
    if png is not None:
        img = Image(png, _link(png, res.run_dir), "Per-class IoU", "per-class-iou", "per-class-iou")
    return Table(head, rows, compact=True), img


def _example_view(i: int, ex: Example, run_dir: Path) -> ExampleView:
    truth = ex.labels.get("ground_truth")
    cells = []
    for role in EXAMPLE_ROLES:
        path, label = ex.paths.get(role), ex.labels.get(role)
        if path is None and label is None:
            continue
        img = None
        if path is not None:
            img = Image(
                path,
                _link(path, run_dir),
                f"example {i} {ROLE_TITLES[role]}",
                "example",
                f"example-{i}-{role.replace('_', '-')}",
            )
            if not path.is_file():
                warnings.warn(f"report: example image not found: {path}", stacklevel=2)
        verdict = ""
        if role in ("teacher", "compressed") and truth and label:
            verdict = "ok" if label == truth else "wrong"
        cells.append(ExampleCell(ROLE_TITLES[role], img, label, verdict))
    return ExampleView(cells, ex.caption)


# --------------------------------------------------------------------------------------------- markdown


def _md_escape(text: str) -> str:
    # Table cells: a raw '|' would split the cell, a newline would end the row.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_link(link: str) -> str:
    # CommonMark needs <...> around destinations with spaces or parentheses.
    return f"<{link}>" if any(ch in link for ch in " ()") else link


def _md_table(t: Table) -> list[str]:
    align = ["---:" if h.kind == "num" else ":---" for h in t.headers]
    lines = ["| " + " | ".join(_md_escape(h.text) for h in t.headers) + " |", "| " + " | ".join(align) + " |"]
    for i, row in enumerate(t.rows):
        cells = [_md_escape(c.text) for c in row]
        if i < len(t.highlight) and t.highlight[i]:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _md_image(img: Image) -> str:
    return f"![{_md_escape(img.alt)}]({_md_link(img.link)})"


def to_markdown(c: Content) -> str:
    out = [f"# {c.title}", "", f"_{c.subtitle}_", ""]
    out += [f"- **{_md_escape(label)}**: {_md_escape(value)}" for label, value in c.highlights] + [""]
    if c.device:
        out += ["## Device", ""] + [f"- {_md_escape(k)}: {_md_escape(v)}" for k, v in c.device] + [""]
    out += ["## Stages", ""] + _md_table(c.stages) + [""]
    out += ["## Compared with the original", ""] + _md_table(c.versus) + [""]
    out += [f"- {n}" for n in c.notes] + [""]
    if c.search:
        out += ["## Budget search", ""] + [f"- {_md_escape(k)}: {_md_escape(v)}" for k, v in c.search] + [""]
    out += ["## Pareto plot", "", _md_image(c.pareto), ""]
    if c.per_class is not None:
        out += ["## Per-class IoU", ""]
        out += ([_md_image(c.per_class_plot), ""] if c.per_class_plot else []) + _md_table(c.per_class) + [""]
    if c.examples:
        out += ["## Examples", ""]
        titles: list[str] = []
        for ex in c.examples:
            titles += [cell.title for cell in ex.cells if cell.title not in titles]
        has_caption = any(ex.caption for ex in c.examples)
        out.append("| # | " + " | ".join(titles) + (" | Caption |" if has_caption else " |"))
        out.append("| ---: | " + " | ".join(":---:" for _ in titles) + (" | :--- |" if has_caption else " |"))
        for i, ex in enumerate(c.examples):
            by_title = {cell.title: cell for cell in ex.cells}
            cells = []
            for t in titles:
                cell = by_title.get(t)
                parts = []
                if cell and cell.image:
                    parts.append(_md_image(cell.image))
                if cell and cell.label:
                    parts.append(f"`{_md_escape(cell.label)}`" + VERDICT_MARK.get(cell.verdict, ""))
                cells.append("<br>".join(parts))
            cap = f" | {_md_escape(ex.caption)}" if has_caption else ""
            out.append(f"| {i} | " + " | ".join(cells) + cap + " |")
        out.append("")
    if c.artifacts:
        out += ["## Artifacts", ""]
        for name, artifact, notes in c.artifacts:
            out.append(
                f"- **{_md_escape(name)}**: `{artifact}`" + (f" ({_md_escape(notes)})" if notes else "")
            )
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- html

CSS = """
:root { --fg: #1f2933; --muted: #616e7c; --border: #d9e2ec; --head: #f0f4f8; --accent: #30638e;
        --front: #fff4e5; --pos: #1b7f3b; --neg: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; background: #eef2f6; color: var(--fg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1140px; margin: 0 auto; padding: 28px 36px 48px; background: #fff; min-height: 100vh; }
h1 { font-size: 26px; margin: 0 0 2px; }
h2 { font-size: 19px; margin: 34px 0 12px; padding-bottom: 4px; border-bottom: 2px solid var(--border); }
.subtitle { color: var(--muted); margin: 0 0 18px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--border); border-left: 4px solid var(--accent); border-radius: 6px;
        padding: 10px 14px; }
.card .value { font-size: 22px; font-weight: 650; white-space: nowrap; overflow: hidden;
               text-overflow: ellipsis; }
.card .label { color: var(--muted); font-size: 13px; }
dl.device { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.device dt { color: var(--muted); }
dl.device dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; font-variant-numeric: tabular-nums; }
table.compact { width: auto; min-width: 50%; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--border); text-align: left; white-space: nowrap; }
th { background: var(--head); font-weight: 600; }
th.num, td.num, td.pos, td.neg { text-align: right; }
td.pos { color: var(--pos); }
td.neg { color: var(--neg); }
tr.front { background: var(--front); }
tr.front td:first-child { font-weight: 650; }
ul.notes { color: var(--muted); font-size: 13px; padding-left: 20px; }
figure.plot { margin: 8px 0; text-align: center; }
img.pareto, img.per-class-iou { max-width: 100%; height: auto; }
.examples { display: grid; gap: 14px; }
.example-row { border: 1px solid var(--border); border-radius: 8px; padding: 12px; }
.example-cells { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 12px;
                 align-items: center; }
.example-cells figure { margin: 0; text-align: center; }
img.example { width: 100%; max-width: 260px; height: auto; image-rendering: pixelated; border-radius: 4px;
              background: #000; }
figcaption { font-size: 13px; color: var(--muted); }
.pred-label { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 16px; color: var(--fg); }
.pred-label.ok { color: var(--pos); }
.pred-label.wrong { color: var(--neg); font-weight: 650; }
.missing { color: var(--neg); font-size: 13px; }
.example-caption { margin: 0 0 8px; font-weight: 600; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; background: var(--head);
       padding: 1px 4px; border-radius: 3px; }
"""

# Forbids every fetch except inline data: images and the inline stylesheet, so the page provably works
# offline and a stray external reference fails visibly in development instead of silently in the field.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    raw = read_limited(path, what="image", max_bytes=MAX_IMAGE_BYTES)  # regular files only, bounded
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _html_img(img: Image) -> str:
    if not img.path.is_file():
        return f'<span class="missing">missing: {_esc(img.link)}</span>'
    return (
        f'<img class="{img.css_class}" id="{_esc(img.id)}" alt="{_esc(img.alt)}" src="{data_uri(img.path)}">'
    )


def _html_table(t: Table) -> str:
    def cell(tag: str, c: Cell) -> str:
        cls = f' class="{c.kind}"' if c.kind != "text" else ""
        return f"<{tag}{cls}>{_esc(c.text)}</{tag}>"

    table = '<table class="compact">' if t.compact else "<table>"
    out = [f'<div class="table-wrap">{table}', "<thead><tr>" + "".join(cell("th", h) for h in t.headers)]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(t.rows):
        cls = ' class="front"' if i < len(t.highlight) and t.highlight[i] else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", c) for c in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def to_html(c: Content) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(c.title)}</title><style>{CSS}</style></head>",
        "<body><main>",
        f"<h1>{_esc(c.title)}</h1>",
        f'<p class="subtitle">{_esc(c.subtitle)}</p>',
        '<div class="cards">',
    ]
    for label, value in c.highlights:
        parts.append(
            f'<div class="card"><div class="value" title="{_esc(value)}">{_esc(value)}</div>'
            f'<div class="label">{_esc(label)}</div></div>'
        )
    parts.append("</div>")
    if c.device:
        parts.append('<h2>Device</h2><dl class="device">')
        parts += [f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in c.device]
        parts.append("</dl>")
    parts += ["<h2>Stages</h2>", _html_table(c.stages)]
    parts += ["<h2>Compared with the original</h2>", _html_table(c.versus)]
    parts.append('<ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in c.notes) + "</ul>")
    if c.search:
        parts.append('<h2>Budget search</h2><dl class="device">')
        parts += [f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in c.search]
        parts.append("</dl>")
    parts += ["<h2>Pareto plot</h2>", f'<figure class="plot">{_html_img(c.pareto)}</figure>']
    if c.per_class is not None:
        parts.append("<h2>Per-class IoU</h2>")
        if c.per_class_plot is not None:
            parts.append(f'<figure class="plot">{_html_img(c.per_class_plot)}</figure>')
        parts.append(_html_table(c.per_class))
    if c.examples:
        parts.append('<h2>Examples</h2><div class="examples">')
        for ex in c.examples:
            parts.append('<div class="example-row">')
            if ex.caption:
                parts.append(f'<p class="example-caption">{_esc(ex.caption)}</p>')
            parts.append('<div class="example-cells">')
            for cell in ex.cells:
                body = _html_img(cell.image) if cell.image else ""
                lab = ""
                if cell.label:
                    mark = _esc(VERDICT_MARK.get(cell.verdict, ""))
                    cls = f"pred-label {cell.verdict}".strip()
                    lab = f'<div class="{cls}">{_esc(cell.label)}{mark}</div>'
                parts.append(f"<figure>{body}<figcaption>{_esc(cell.title)}</figcaption>{lab}</figure>")
            parts.append("</div></div>")
        parts.append("</div>")
    if c.artifacts:
        parts.append("<h2>Artifacts</h2><ul>")
        for name, artifact, notes in c.artifacts:
            extra = f" ({_esc(notes)})" if notes else ""
            parts.append(f"<li><strong>{_esc(name)}</strong>: <code>{_esc(artifact)}</code>{extra}</li>")
        parts.append("</ul>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"
