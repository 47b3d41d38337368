"""The run report's HTML page: one self-contained file (no script, no external resource; charts
are data: URIs) that reads well at 1280 px and on a phone.

Choices a reader depends on: charts sit in a responsive grid (several columns on a wide screen,
one on a phone); numbers are written out, never in scientific notation (1.033e+04 is misread);
the before/after table says which direction is better for each metric and flags a large jump on
the forgetting check (general text) in red; chat prompts are shown as role-labelled turns; a
sample marked wrong says why (expected vs got and where they first differ, under the run's
primary eval.match rule).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import math
from collections.abc import Sequence
from typing import Any

from sft_jax import paths
from sft_jax.report.chat import chat_turns, explain_sample
from sft_jax.report.data import (
    RunData,
    match_rule,
    number,
    restarts_of,
    summary_is_stale,
)
from sft_jax.training.metrics import record_kind, sample_rows, scalars

EVAL_COLUMNS = ("eval_loss", "eval_perplexity", "eval_token_accuracy")
SAMPLE_KINDS_SHOWN = 4  # sample records on the page: the first and the last three
SAMPLE_ROWS_SHOWN = 8
# A forgetting-check metric (general_*) that moves this much (relative) in the bad direction is
# flagged: a 20% rise of general perplexity is already visible in the model's writing.
FORGETTING_JUMP = 0.2


@dataclasses.dataclass
class Chart:
    title: str
    filename: str
    png: bytes


STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 16px; color: #222;
       max-width: 1500px; line-height: 1.4; }
h1 { font-size: 20px; overflow-wrap: anywhere; } h2 { font-size: 18px; margin-top: 28px; }
h3 { font-size: 15px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.better td { background: #eef8ee; } tr.worse td { background: #fff6e0; }
tr.alarm td { background: #fde2e2; font-weight: 600; }
.alarm-note { border-left: 4px solid #c62828; background: #fdecec; padding: 8px 12px; }
.charts { display: grid; gap: 12px;
          grid-template-columns: repeat(auto-fill, minmax(min(100%, 420px), 1fr)); }
.charts figure { margin: 0; border: 1px solid #ddd; }
.charts img { display: block; width: 100%; height: auto; }
.notes li { color: #8a4b00; }
.samples { display: grid; gap: 12px;
           grid-template-columns: repeat(auto-fill, minmax(min(100%, 560px), 1fr)); }
.sample { border: 1px solid #ccc; border-radius: 6px; padding: 8px 10px; font-size: 13px; }
.sample.wrong { border-left: 5px solid #c62828; } .sample.right { border-left: 5px solid #2e7d32; }
.turn { margin: 4px 0; } .turn.assistant pre { background: #eaf2fb; }
.role { font-weight: 600; font-size: 11px; text-transform: uppercase; color: #555; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 2px 0; font-size: 12px;
      background: #f7f7f7; padding: 4px 6px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
.empty { color: #888; font-style: italic; } mark { background: #ffd0d0; }
.why { margin: 6px 0 0; }
"""

CURVES_NOTE = (
    "<p>Validation curves start at step 0, the model before training. Rate axes (accuracy) run "
    "from 0 to 1; loss uses a log axis when it spans more than two decades (labelled so). "
    "Tokens/s counts real (non-padding) tokens over each logging interval; the first interval "
    "after each start includes compilation. Dotted lines mark restarts. The stability-plasticity "
    "chart puts each measured checkpoint at its general-text perplexity (forgetting) and "
    "validation loss (the task; the generation score, higher better, when the rewind ranked by "
    "it): the star is the base model, the ring the checkpoint the rewind chose; lower left is "
    "better.</p>"
)


def fmt(value: Any) -> str:
    """A number as a person reads it: 4 significant digits, never scientific notation
    (10,328 and 0.003789, not 1.033e+04 and 3.789e-03); thousands separated; None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1):
        return f"{int(value):,}" if abs(value) >= 10000 else str(int(value))
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}" if magnitude >= 10000 else f"{value:.0f}"
    decimals = min(12, max(0, 3 - math.floor(math.log10(magnitude)))) if magnitude else 0
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def table(
    headers: list[str], rows: list[list[Any]], css_id: str, classes: Sequence[str] = ()
) -> str:
    """An HTML table (scrolls sideways on a narrow screen); every cell is escaped, numbers are
    right-aligned; `classes` gives each row a CSS class."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            css = ' class="num"' if numeric else ""
            cells.append(f"<td{css}>{html.escape(fmt(value))}</td>")
        css = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table id="{css_id}"><tr>{head}</tr>{"".join(body)}</table></div>'


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


# ----------------------------------------------------------------------------- before / after


def better_direction(metric: str) -> str | None:
    """ "lower" or "higher": which way a metric improves; None when it is a count, not a quality."""
    name = metric.lower()
    if "loss" in name or "perplexity" in name or "unmatched" in name:
        return "lower"
    if "accuracy" in name or name.startswith("generation_") or "match" in name:
        return None if name.endswith(("_n", "_tokens")) else "higher"
    return None


def verdict(metric: str, before: float | None, after: float | None) -> str:
    """ "better", "worse", "alarm" (a forgetting-check metric worse by FORGETTING_JUMP or more),
    or "" (no direction, or a value missing or unchanged)."""
    direction = better_direction(metric)
    if direction is None or before is None or after is None or before == after:
        return ""
    if not (math.isfinite(before) and math.isfinite(after)):  # a diverged run judges nothing
        return ""
    worse = after > before if direction == "lower" else after < before
    if not worse:
        return "better"
    relative = abs(after - before) / abs(before) if before else math.inf
    forgetting = metric.startswith("general_") and relative >= FORGETTING_JUMP
    return "alarm" if forgetting else "worse"


def comparison_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """summary.json's "comparison" rows as dicts with metric, before, after; older summaries only
    had accuracy_before / accuracy_after."""
    rows = summary.get("comparison")
    if not isinstance(rows, list):
        rows = []
        if "accuracy_after" in summary:
            before, after = summary.get("accuracy_before"), summary["accuracy_after"]
            rows = [{"metric": "held-out generation accuracy", "before": before, "after": after}]
    return [r for r in rows if isinstance(r, dict)]


def change_text(before: float | None, after: float | None) -> str:
    """after - before, with the factor when it is 2x or more either way (perplexities move by
    factors, and a bare difference hides that 5 -> 5,000 is x1,000; a fall shows as 1/N)."""
    if before is None or after is None:
        return "n/a"
    text = ("+" if after > before else "") + fmt(after - before)
    if before > 0 and after >= 2 * before:
        text += f" (x{fmt(after / before)})"
    elif after > 0 and before >= 2 * after:
        text += f" (1/{fmt(before / after)})"
    return text


def comparison_section(summary: dict[str, Any]) -> str:
    """The before/after table with the better direction and a verdict per metric, led by a
    warning when the forgetting check jumped."""
    rows, classes, alarms = [], [], []
    for row in comparison_rows(summary):
        metric = str(row.get("metric"))
        before, after = number(row.get("before")), number(row.get("after"))
        judged = verdict(metric, before, after)
        direction = better_direction(metric)
        shown = {"alarm": "worse: forgetting", "": "", "better": "better", "worse": "worse"}
        rows.append(
            [metric, before, after, change_text(before, after), direction or "", shown[judged]]
        )
        classes.append(judged)
        if judged == "alarm":
            alarms.append(f"{metric} went from {fmt(before)} to {fmt(after)}")
    if not rows:
        return "<p>summary.json has no before/after comparison.</p>"
    headers = ["metric", "before", "after", "change", "better when", "verdict"]
    note = ""
    if alarms:
        note = (
            '<p class="alarm-note">Forgetting: on general text (eval.general_text_files) '
            + html.escape("; ".join(alarms))
            + ". The fine-tuning cost the model general ability. A lower learning rate, LoRA, "
            "or train.kl_to_base reduce it.</p>"
        )
    return "<h3>Before and after training</h3>" + note + table(headers, rows, "comparison", classes)


def eval_section(data: RunData) -> str:
    parts = ["<h2>Evaluation</h2>"]
    if data.summary and comparison_rows(data.summary):
        parts.append(comparison_section(data.summary))
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


# ----------------------------------------------------------------------------- samples


def text_block(value: Any, mark_from: int | None = None) -> str:
    """Prompt or generation text verbatim (escaped, whitespace kept, wrapped); from `mark_from`
    on highlighted (where an output departs from the reference). An empty text is said, since
    an invisible block reads as a rendering bug."""
    if value is None or value == "":
        return '<div class="empty">(empty)</div>'
    text = str(value)
    if mark_from is None or mark_from >= len(text):
        return f"<pre>{html.escape(text)}</pre>"
    head, tail = html.escape(text[:mark_from]), html.escape(text[mark_from:])
    return f"<pre>{head}<mark>{tail}</mark></pre>"


def prompt_block(row: dict[str, Any]) -> str:
    """The prompt as role-labelled turns when it is a chat (ChatML, Llama 3, Gemma markers or a
    "messages" list), else as plain text."""
    turns = chat_turns(row)
    if turns is None:
        return text_block(row.get("prompt"))
    out = []
    for role, text in turns:
        body = text_block(text) if text else '<div class="empty">(generation starts here)</div>'
        css = "turn assistant" if role == "assistant" else "turn"
        out.append(f'<div class="{css}"><div class="role">{html.escape(role)}</div>{body}</div>')
    return "".join(out)


def sample_card(row: dict[str, Any], rule: str, pattern: str) -> str:
    correct = row.get("correct")
    why, differs_at = explain_sample(row.get("reference"), row.get("output"), rule, pattern)
    state = {True: "right", False: "wrong"}.get(correct, "")
    label = {True: f"correct ({rule})", False: f"wrong ({rule})"}.get(correct, "not scored")
    explanation = f'<p class="why">{html.escape(why)}</p>' if correct is False else ""
    return (
        f'<div class="sample {state}"><div class="role">prompt</div>{prompt_block(row)}'
        '<div class="pair"><div><div class="role">expected</div>'
        f"{text_block(row.get('reference'))}</div>"
        '<div><div class="role">got</div>'
        f"{text_block(row.get('output'), differs_at if correct is False else None)}</div></div>"
        f"<p><b>{html.escape(label)}</b></p>{explanation}</div>"
    )


def samples_section(data: RunData) -> str:
    """The first sample record and the last few, one card per sample."""
    parts = ["<h2>Sample generations</h2>"]
    rule, pattern = match_rule(data)
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
        cards = "".join(sample_card(row, rule, pattern) for row in rows[:SAMPLE_ROWS_SHOWN])
        parts.append(f'<div class="samples">{cards}</div>')
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
            ("eval", "match"),
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
    title = f"Run report: {paths.absolute(data.workdir)}"
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    figures = "".join(
        f'<figure><img alt="{html.escape(c.title)}" src="data:image/png;base64,'
        f'{base64.b64encode(c.png).decode()}"></figure>'
        for c in charts
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
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
