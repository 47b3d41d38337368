"""Run metrics: one JSON object per line in `workdir/metrics.jsonl`, written by process 0 only,
and mirrored to TensorBoard event files and Weights & Biases when `config.logging` says so.

A restarted run appends to the same file; each record carries its step, so readers can keep the
last record per (step, kind) if a step was logged twice around a restart. In an object store
(workdir gs://...), which cannot append, the file is one object rewritten whole by
`paths.AppendFile` (at most every few seconds, and when the writer closes).

Record kinds (`record_kind`): training records have no "kind"; eval records have "kind": "eval"
(older ones: no kind but an "eval_loss"); everything else names its kind ("start", "samples",
"generation_before", "loss_spike", ...). Every numeric field of a record becomes a scalar named
`<prefix>/<field>`: prefix "train" for training records, "eval" for eval records (the field's
"eval_" prefix dropped: eval/loss, eval/perplexity), the kind otherwise. A record's "samples" list
({"prompt", "reference", "output", "correct"} each) becomes a text table `samples/<kind>`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax

from sft_jax import paths
from sft_jax.config import ConfigError, LoggingSection

# Fields that identify a record rather than measure anything; never logged as scalars.
_ID_FIELDS = frozenset({"step", "time", "run", "kind"})
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
WANDB_ID_FILE = "wandb_run_id.txt"


def record_kind(record: dict[str, Any]) -> str:
    """The record's kind: "train", "eval", or its own "kind" (start, samples, ...)."""
    kind = record.get("kind")
    if kind is not None:
        return str(kind)
    return "eval" if "eval_loss" in record else "train"


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(field, value) for every numeric field; "nan"/"inf" strings (how metrics.jsonl stores
    non-finite numbers) come back as floats. Booleans, strings, lists and dicts are skipped."""
    for key, value in record.items():
        if key in _ID_FIELDS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            yield key, float(value)
        elif isinstance(value, str) and value in _NONFINITE:
            yield key, _NONFINITE[value]


def scalar_tag(kind: str, field: str) -> str:
    """The TensorBoard / W&B name of a field: train/loss, eval/perplexity, start/resumed_from."""
    if kind == "eval" and field.startswith("eval_"):
        field = field[len("eval_") :]
    return f"{kind}/{field}"


def sample_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The generation samples a record carries (possibly none)."""
    samples = record.get("samples")
    if not isinstance(samples, list):
        return []
    return [s for s in samples if isinstance(s, dict)]


class TensorBoardBackend:
    """Scalars and sample tables as TensorBoard event files in `logdir`.

    The writer opens on the first record: when that is a resumed start, TensorBoard is told to
    discard the steps after the restored checkpoint that the interrupted run had logged
    (`purge_step`), so curves show each step once.

    A `logdir` in an object store gets this start's event file when the writer closes: it is
    written in a local temporary directory meanwhile (tensorboardX would upload the whole file at
    every flush, more often than a store lets one object be replaced), so a start killed outright
    leaves no events there; metrics.jsonl has every record.
    """

    def __init__(self, logdir: str):
        self.logdir = logdir
        self.writer = None
        self.staging = tempfile.mkdtemp(prefix="sft_jax_tb_") if paths.is_url(logdir) else None

    def write(self, step: int, record: dict[str, Any], walltime: float) -> None:
        if self.writer is None:
            from tensorboardX import SummaryWriter

            resumed = record.get("resumed_from") if record.get("kind") == "start" else None
            purge = int(resumed) + 1 if isinstance(resumed, int) and resumed > 0 else None
            # tensorboardX names files by the second and opens them "wb": the nanosecond suffix
            # keeps a restart within the same second from erasing the earlier file, in order.
            self.writer = SummaryWriter(
                self.staging or self.logdir,
                purge_step=purge,
                flush_secs=30,
                filename_suffix=f".{time.time_ns()}",
            )
        kind = record_kind(record)
        for field, value in scalars(record):
            self.writer.add_scalar(scalar_tag(kind, field), value, step, walltime=walltime)
        rows = sample_rows(record)
        if rows:
            self.writer.add_text(f"samples/{kind}", _markdown_table(rows), step, walltime=walltime)
        self.writer.flush()  # records are rare (every log_every steps); a kill loses none

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.staging is not None:  # the event files go to the store now (class docstring)
            for name in sorted(os.listdir(self.staging)):
                with open(os.path.join(self.staging, name), "rb") as f:
                    paths.write_bytes(paths.join(self.logdir, name), f.read())
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    """Samples as a Markdown table (TensorBoard renders text summaries as Markdown)."""

    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    columns = ["prompt", "reference", "output", "correct"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def import_wandb() -> Any:
    """The wandb module, or ConfigError saying how to get it (`logging.wandb=True` needs it)."""
    try:
        return importlib.import_module("wandb")
    except ImportError as e:
        raise ConfigError(
            "config key 'logging.wandb' is true but the wandb package is not installed "
            "(pip install wandb, or set --config.logging.wandb=False)"
        ) from e


class WandbBackend:
    """One W&B run per workdir: its id is kept in `workdir/wandb_run_id.txt` and passed with
    resume="allow", so every restart of the workdir continues the same W&B run.

    Metrics are plotted against our own "step" field (define_metric), not W&B's internal step,
    which must only grow: after a restart from an earlier checkpoint, steps repeat.
    """

    def __init__(
        self,
        workdir: str,
        logging: LoggingSection,
        run_config: dict[str, Any] | None,
        wandb: Any,
    ):
        self.wandb = wandb
        run_id = _persistent_run_id(paths.join(workdir, WANDB_ID_FILE))
        self.run = wandb.init(
            project=logging.wandb_project,
            entity=logging.wandb_entity or None,
            name=logging.wandb_run_name or paths.basename(paths.absolute(workdir)),
            id=run_id,
            resume="allow",
            dir=None if paths.is_url(workdir) else workdir,  # W&B's own files are local
            config=run_config,
            mode=logging.wandb_mode,
        )
        self.run.define_metric("step")
        self.prefixes: set[str] = set()

    def write(self, step: int, record: dict[str, Any], walltime: float) -> None:
        del walltime  # W&B stamps its own time
        kind = record_kind(record)
        data: dict[str, Any] = {}
        for field, value in scalars(record):
            data[scalar_tag(kind, field)] = value
        rows = sample_rows(record)
        if rows:
            columns = ["prompt", "reference", "output", "correct"]
            table = [[row.get(c) for c in columns] for row in rows]
            data[f"samples/{kind}"] = self.wandb.Table(columns=columns, data=table)
        if not data:
            return
        for prefix in {name.split("/", 1)[0] for name in data} - self.prefixes:
            self.run.define_metric(f"{prefix}/*", step_metric="step")
            self.prefixes.add(prefix)
        self.run.log({"step": step, **data})

    def close(self) -> None:
        self.run.finish()


def _persistent_run_id(path: str) -> str:
    """The run id stored at `path`, or a new one written there before W&B sees it."""
    if paths.exists(path):
        run_id = paths.read_text(path).strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(6)
    paths.write_text(path, run_id + "\n")
    return run_id


class MetricsWriter:
    """Appends flat metric records (floats, ints, strings) to metrics.jsonl, and mirrors them to
    TensorBoard / W&B per `logging` (None: metrics.jsonl only). Call `close()` at the end (or use
    it as a context manager) so buffered events are written and the W&B run is finished."""

    def __init__(
        self,
        workdir: str,
        logging: LoggingSection | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        self.path = paths.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self.file = paths.AppendFile(self.path) if self.enabled else None
        self.backends: list[TensorBoardBackend | WandbBackend] = []
        # Checked on every process, so that a multi-host job fails everywhere alike.
        wandb = import_wandb() if logging is not None and logging.wandb else None
        if not self.enabled or logging is None:
            return
        if logging.tensorboard:
            self.backends.append(TensorBoardBackend(paths.join(workdir, "tensorboard")))
        if wandb is not None:
            self.backends.append(WandbBackend(workdir, logging, run_config, wandb))

    def write(self, step: int, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        clean = {"step": int(step), "time": round(time.time(), 3)}
        for key, value in record.items():
            clean[key] = _plain(value)
        self.file.append(json.dumps(clean) + "\n")
        for backend in self.backends:
            backend.write(clean["step"], clean, clean["time"])

    def close(self) -> None:
        """Flushes metrics.jsonl and closes every backend; safe to call twice."""
        if self.file is not None:
            self.file.close()
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, (list, dict)):
        return value
    number = float(value)
    return number if math.isfinite(number) else str(number)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of a run, in file order."""
    text = paths.read_text(paths.join(workdir, "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
