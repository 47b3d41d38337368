"""Run metrics: one JSON object per line in `workdir/metrics.jsonl`, written by process 0 only.

A restarted run appends to the same file; each record carries its step, so readers can keep the
last record per (step, kind) if a step was logged twice around a restart.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax


class MetricsWriter:
    """Appends flat metric records (floats, ints, strings) to metrics.jsonl."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {"step": int(step), "time": round(time.time(), 3)}
        for key, value in record.items():
            clean[key] = _plain(value)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, (list, dict)):
        return value
    number = float(value)
    return number if math.isfinite(number) else str(number)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of a run, in file order."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def previous_baseline(workdir: str) -> dict[str, Any] | None:
    """The before-training generation record of an earlier (interrupted) run of this workdir."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "generation_before":
                return record
    return None
