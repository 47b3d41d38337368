"""A workdir for the run report: metrics.jsonl, summary.json and config.json, cleaned up.

It reads what the run wrote, finished or not: metrics.jsonl is appended by every start of a
workdir: what a later start superseded (steps after the checkpoint it resumed from, told apart
by the "run" field) is dropped, then the last record per (step, kind) wins; a truncated last line
(a killed process) is skipped; a missing summary.json means the run is in progress or was
interrupted. What is missing becomes a note for the page instead of an error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sft_jax.training.metrics import record_kind, sample_rows, scalars
from sft_jax.workdir import CONFIG_FILE, SUMMARY_FILE, read_json, read_records


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
    # `general_after` records: the forgetting check on eval.general_text_files after training
    general: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- reading


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


def load_run(workdir: str) -> RunData:
    """What the report shows of `workdir`, read through sft_jax.workdir; never raises for a
    missing or unreadable file (see the module docstring)."""
    notes: list[str] = []
    records = last_per_step(read_records(workdir, notes))
    summary = read_json(workdir, SUMMARY_FILE, notes)
    config = read_json(workdir, CONFIG_FILE, notes)
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
        general=[r for r in records if record_kind(r) == "general_after"],
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


def validation_points(data: RunData) -> list[dict[str, Any]]:
    """The eval records, led by the step-0 baseline (the untrained model's validation metrics)
    when the run logged one: without it a curve starts at the first periodic evaluation and
    hides how far training moved the metric."""
    points = list(data.evals)
    if data.baseline and not any(r["step"] == 0 for r in points):
        points.insert(0, {**data.baseline, "step": 0, "kind": "baseline"})
    return points


def series(records: list[dict[str, Any]], field: str) -> tuple[list[int], list[float]]:
    """Steps and values of `field`; non-finite values stay in as gaps (NaN)."""
    steps, values = [], []
    for record in records:
        value = number(record.get(field))
        if value is not None:
            steps.append(record["step"])
            values.append(value if math.isfinite(value) else math.nan)
    return steps, values


def match_rule(data: RunData) -> tuple[str, str]:
    """(the primary eval.match rule, eval.answer_regex) of the run: the rule that decided each
    sample's "correct". "exact", the default, when config.json does not say."""
    section = (data.config or {}).get("eval")
    section = section if isinstance(section, dict) else {}
    rules = str(section.get("match") or "exact")
    return rules.split(",")[0].strip() or "exact", str(section.get("answer_regex") or "")
