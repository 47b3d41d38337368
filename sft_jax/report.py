"""A run report a person can open: `python -m sft_jax.report --workdir W [--out FILE]`.

Writes W/report/*.png (matplotlib, Agg) and one self-contained HTML page (default
W/report/index.html; the PNGs are embedded as base64, no external URL) with the training and
validation loss, learning rate, gradient norm and tokens/s over steps, the before/after table of
summary.json, the eval records over steps, and sample generations.

It reads what the run wrote, finished or not: metrics.jsonl is appended by every start of a
workdir: what a later start superseded (steps after the checkpoint it resumed from, told apart
by the "run" field) is dropped, then the last record per (step, kind) wins; a truncated last line
(a killed process) is skipped; a missing summary.json means the run is in progress or was
interrupted. What is missing is said on the page instead of failing.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import html
import json
import math
import os
import sys
from typing import Any

from sft_jax.metrics import record_kind, sample_rows, scalars

EVAL_COLUMNS = ("eval_loss", "eval_perplexity", "eval_token_accuracy")
SAMPLE_KINDS_SHOWN = 4  # sample records on the page: the first and the last three
SAMPLE_ROWS_SHOWN = 8


@dataclasses.dataclass
class RunData:
    """What a workdir holds, cleaned up: records deduplicated and sorted by step."""

    workdir: str
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    starts: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: dict[str, Any] | None
    baseline: dict[str, Any] | None  # the "before" metrics of a `kind: baseline` record
    notes: list[str]  # what is missing or unreadable, said on the page


@dataclasses.dataclass
class Chart:
    title: str
    filename: str
    png: bytes


# ----------------------------------------------------------------------------- reading


def read_records(path: str, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of metrics.jsonl in file order; unreadable lines are noted and skipped."""
    if not os.path.exists(path):
        notes.append("metrics.jsonl not found: the run has not logged anything yet.")
        return []
    records, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                bad.append(number)
    if bad:
        notes.append(
            f"metrics.jsonl: skipped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:5]))}"
            f"{', ...' if len(bad) > 5 else ''}); a process killed mid-write leaves one."
        )
    return records


def last_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records that describe the run as it stands, by step.

    A start that resumed from step s discards what earlier starts logged after s (their state
    was never checkpointed), told apart by the "run" field every record carries; then the last
    record per (step, kind) wins, which also covers older records without "run".
    """
    resumes = [
        (r["run"], r["resumed_from"])
        for r in records
        if record_kind(r) == "start"
        and isinstance(r.get("run"), int)
        and isinstance(r.get("resumed_from"), int)
    ]

    def superseded(record: dict[str, Any]) -> bool:
        run = record.get("run")
        if not isinstance(run, int):
            return False
        return any(later > run and record["step"] > step for later, step in resumes)

    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for record in records:
        if not superseded(record):
            latest[(record["step"], record_kind(record))] = record
    return [latest[key] for key in sorted(latest)]


def read_json(path: str, name: str, notes: list[str]) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"{name} is unreadable ({e}); shown without it.")
        return None
    if not isinstance(value, dict):
        notes.append(f"{name} is not a JSON object; shown without it.")
        return None
    return value


def load_run(workdir: str) -> RunData:
    notes: list[str] = []
    records = last_per_step(read_records(os.path.join(workdir, "metrics.jsonl"), notes))
    summary = read_json(os.path.join(workdir, "summary.json"), "summary.json", notes)
    config = read_json(os.path.join(workdir, "config.json"), "config.json", notes)
    data = RunData(
        workdir=workdir,
        train=[r for r in records if record_kind(r) == "train" and "loss" in r],
        evals=[r for r in records if record_kind(r) == "eval"],
        samples=[r for r in records if sample_rows(r)],
        starts=[r for r in records if record_kind(r) == "start"],
        summary=summary,
        config=config,
        baseline=next((r["before"] for r in records if isinstance(r.get("before"), dict)), None),
        notes=notes,
    )
    if records and not data.train:
        notes.append("No training records yet (one is logged every train.log_every steps).")
    if records and not data.evals:
        notes.append(
            "No validation records: no eval data, or the run has not reached an evaluation "
            "(eval.every_steps=0 evaluates only at the end)."
        )
    if records and not data.samples:
        notes.append("No sample generations (eval.generate_examples=0, or none generated yet).")
    if summary_is_stale(data):
        notes.append(
            f"summary.json is from an earlier start that ended at step {summary['steps']}; "
            f"training has since logged step {data.train[-1]['step']} (in progress or interrupted)."
        )
    if summary is None and not any("summary.json" in n for n in notes):
        notes.append("No summary.json: the run is in progress, or was interrupted before its end.")
    return data


def summary_is_stale(data: RunData) -> bool:
    """True when a later start (a workdir trained further) has logged past summary.json."""
    ended = data.summary.get("steps") if data.summary else None
    return isinstance(ended, int) and bool(data.train) and data.train[-1]["step"] > ended


def restarts_of(data: RunData) -> list[dict[str, Any]]:
    """The start records of every start after the first."""
    return [
        s
        for s in data.starts
        if (number(s.get("run")) or 0) > 0 or (number(s.get("resumed_from")) or 0) > 0
    ]


def number(value: Any) -> float | None:
    """A record field as a float (the "nan"/"inf" strings of metrics.jsonl included), or None."""
    got = dict(scalars({"v": value}))
    return got.get("v")


# ----------------------------------------------------------------------------- charts


def series(records: list[dict[str, Any]], field: str) -> tuple[list[int], list[float]]:
    """Steps and values of `field`; non-finite values stay in as gaps (NaN)."""
    steps, values = [], []
    for record in records:
        value = number(record.get(field))
        if value is not None:
            steps.append(record["step"])
            values.append(value if math.isfinite(value) else math.nan)
    return steps, values


def plot(
    title: str, ylabel: str, lines: list[tuple[str, list[int], list[float]]], restarts: list[int]
) -> bytes:
    """One line chart as PNG bytes. Matplotlib's object API: no pyplot state, no GUI backend."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 3.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, steps, values in lines:
        axes.plot(
            steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=label
        )
    for i, step in enumerate(restarts):
        axes.axvline(step, color="0.5", linestyle=":", label="restart" if i == 0 else None)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(lines) > 1 or restarts:
        axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def make_charts(data: RunData) -> list[Chart]:
    """Loss (train and validation), learning rate, gradient norm, tokens/s, and validation token
    accuracy; each only when some record has it. Restarts are dotted vertical lines."""
    restarts = [r["step"] for r in restarts_of(data)]
    specs = [
        (
            "Loss",
            "loss",
            "loss.png",
            [("train", data.train, "loss"), ("validation", data.evals, "eval_loss")],
        ),
        (
            "Learning rate",
            "learning rate",
            "learning_rate.png",
            [("train", data.train, "learning_rate")],
        ),
        ("Gradient norm", "global norm", "grad_norm.png", [("train", data.train, "grad_norm")]),
        ("Throughput", "tokens / s", "tokens_per_s.png", [("train", data.train, "tokens_per_s")]),
        (
            "Validation token accuracy",
            "accuracy",
            "eval_token_accuracy.png",
            [("validation", data.evals, "eval_token_accuracy")],
        ),
    ]
    charts = []
    for title, ylabel, filename, wanted in specs:
        lines = [(label, *series(records, field)) for label, records, field in wanted]
        lines = [line for line in lines if line[1]]
        if lines:
            charts.append(Chart(title, filename, plot(title, ylabel, lines, restarts)))
    return charts


# ----------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-family: monospace; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.charts figure { margin: 0; border: 1px solid #ddd; }
.notes li { color: #8a4b00; } td.empty { color: #888; font-style: italic; }
pre { white-space: pre-wrap; margin: 0; max-width: 520px; font-size: 12px; }
"""


CURVES_NOTE = (
    "<p>Tokens/s counts real (non-padding) tokens over each logging interval; the first interval"
    " after each start includes compilation. Dotted lines mark restarts.</p>"
)


def fmt(value: Any) -> str:
    """A table cell's text: floats to 4 significant digits, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]], css_id: str) -> str:
    """An HTML table; every cell is escaped, numbers are right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            css = ' class="num"' if numeric else ""
            cells.append(f"<td{css}>{html.escape(fmt(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table id="{css_id}"><tr>{head}</tr>{"".join(body)}</table>'


def status_section(data: RunData) -> str:
    """One line on how far the run got, and its restarts."""
    summary, parts = data.summary, []
    if summary is not None and not summary_is_stale(data):
        parts.append(
            f"Finished: {fmt(summary.get('steps'))} steps, stopped: {fmt(summary.get('stopped'))}, "
            f"wall time {fmt(summary.get('wall_s'))} s."
        )
    elif data.train:
        parts.append(f"In progress or interrupted: last logged step {data.train[-1]['step']}.")
    resumed = restarts_of(data)
    if resumed:
        where = ", ".join(f"run {fmt(s.get('run'))} from step {s['step']}" for s in resumed)
        parts.append(f"Restarted {len(resumed)} time(s): {where}.")
    return "".join(f"<p>{html.escape(p)}</p>" for p in parts)


def comparison_rows(summary: dict[str, Any]) -> list[list[Any]]:
    """summary.json's "comparison" rows [metric, before, after, change]; older summaries only
    had accuracy_before / accuracy_after."""
    rows = summary.get("comparison")
    if not isinstance(rows, list):
        rows = []
        if "accuracy_after" in summary:
            before, after = summary.get("accuracy_before"), summary["accuracy_after"]
            rows = [{"metric": "held-out generation accuracy", "before": before, "after": after}]
    out = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        before, after = number(row.get("before")), number(row.get("after"))
        change = after - before if before is not None and after is not None else None
        out.append([row.get("metric"), row.get("before"), row.get("after"), change])
    return out


def eval_section(data: RunData) -> str:
    parts = ["<h2>Evaluation</h2>"]
    rows = comparison_rows(data.summary) if data.summary else []
    if rows:
        headers = ["metric", "before", "after", "change"]
        parts.append("<h3>Before and after training</h3>" + table(headers, rows, "comparison"))
    elif data.baseline:
        rows = [[k, v] for k, v in data.baseline.items()]
        parts.append(
            "<h3>Before training (no summary.json yet)</h3>"
            + table(["metric", "before"], rows, "baseline")
        )
    elif data.summary is not None:
        parts.append("<p>summary.json has no before/after comparison.</p>")
    if data.evals:
        fields = [f for f in EVAL_COLUMNS if any(f in r for r in data.evals)]
        extra = {f for r in data.evals for f, _ in scalars(r)} - set(fields)
        fields += sorted(extra)
        rows = [[r["step"], r.get("run"), *(r.get(f) for f in fields)] for r in data.evals]
        parts.append(
            "<h3>Validation over steps</h3>" + table(["step", "run", *fields], rows, "evals")
        )
    return "".join(parts)


def text_cell(value: Any) -> str:
    """Prompt or generation text verbatim (escaped, whitespace kept); an empty generation is
    marked, since an invisible cell reads as a rendering bug."""
    if value is None or value == "":
        return '<td class="empty">(empty)</td>'
    return f"<td><pre>{html.escape(str(value))}</pre></td>"


def samples_section(data: RunData) -> str:
    """The first sample record and the last few; prompts and outputs escaped, shown verbatim."""
    parts = ["<h2>Sample generations</h2>"]
    records = data.samples
    if len(records) > SAMPLE_KINDS_SHOWN:
        omitted = len(records) - SAMPLE_KINDS_SHOWN
        records = [records[0], *records[-(SAMPLE_KINDS_SHOWN - 1) :]]
        parts.append(f"<p>{omitted} other sample record(s) not shown.</p>")
    for record in records:
        rows = sample_rows(record)
        measured = ", ".join(f"{k} {fmt(v)}" for k, v in scalars(record))
        heading = f"step {record['step']}: {record_kind(record)}"
        parts.append(f"<h3>{html.escape(heading + (f' ({measured})' if measured else ''))}</h3>")
        cells = []
        for row in rows[:SAMPLE_ROWS_SHOWN]:
            texts = [text_cell(row.get(c)) for c in ("prompt", "reference", "output")]
            correct = html.escape(fmt(row.get("correct")))
            cells.append("".join(texts) + f"<td>{correct}</td>")
        head = "<tr><th>prompt</th><th>reference</th><th>output</th><th>correct</th></tr>"
        body = "".join(f"<tr>{c}</tr>" for c in cells)
        parts.append(f'<table class="samples">{head}{body}</table>')
        if len(rows) > SAMPLE_ROWS_SHOWN:
            parts.append(f"<p>{SAMPLE_ROWS_SHOWN} of {len(rows)} samples shown.</p>")
    return "".join(parts)


def summary_section(data: RunData) -> str:
    """Flat scalar fields of summary.json and a few config keys, as key/value tables."""
    parts = []
    if data.summary:
        rows = [[k, v] for k, v in data.summary.items() if isinstance(v, (int, float, str))]
        parts.append("<h2>Summary</h2>" + table(["field", "value"], rows, "summary"))
    if data.config:
        keys = [
            ("model", "path"),
            ("data", "train_files"),
            ("optim", "learning_rate"),
            ("train", "global_batch_size"),
            ("train", "epochs"),
            ("train", "max_steps"),
            ("lora", "enabled"),
        ]
        rows = [
            [f"{a}.{b}", data.config[a][b]]
            for a, b in keys
            if isinstance(data.config.get(a), dict) and b in data.config[a]
        ]
        parts.append("<h2>Config</h2>" + table(["key", "value"], rows, "config"))
    return "".join(parts)


def render_html(data: RunData, charts: list[Chart]) -> str:
    """The whole page: no scripts, no external resources (charts are data: URIs)."""
    title = f"Run report: {os.path.abspath(data.workdir)}"
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    figures = "".join(
        f'<figure><img alt="{html.escape(c.title)}" src="data:image/png;base64,'
        f'{base64.b64encode(c.png).decode()}"></figure>'
        for c in charts
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Made {made} by python -m sft_jax.report.</p>"
        f"{status_section(data)}"
        + (f'<h2>Missing or incomplete</h2><ul class="notes">{notes}</ul>' if notes else "")
        + (f'<h2>Curves</h2>{CURVES_NOTE}<div class="charts">{figures}</div>' if charts else "")
        + (eval_section(data) if data.evals or data.summary or data.baseline else "")
        + (samples_section(data) if data.samples else "")
        + summary_section(data)
        + "</body></html>"
    )


def build_report(workdir: str, out: str | None = None) -> str:
    """Writes the PNGs into workdir/report/ and the HTML page to `out` (default
    workdir/report/index.html); returns the page's path."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir not found: {workdir}")
    data = load_run(workdir)
    charts = make_charts(data)
    report_dir = os.path.join(workdir, "report")
    os.makedirs(report_dir, exist_ok=True)
    for chart in charts:
        with open(os.path.join(report_dir, chart.filename), "wb") as f:
            f.write(chart.png)
    out = out or os.path.join(report_dir, "index.html")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(render_html(data, charts))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sft_jax.report",
        description="Writes WORKDIR/report/*.png and a self-contained HTML page of a run: loss, "
        "learning rate, gradient norm, tokens/s, evaluation tables and sample generations.",
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir (metrics.jsonl, ...)")
    parser.add_argument("--out", default=None, help="HTML file (default WORKDIR/report/index.html)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.workdir, args.out)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
