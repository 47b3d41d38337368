"""What a training run prints, and where (stated in README.md, "Output"):

* stdout: the run's record, one fact per line: setup (data, schedule, model), evaluations,
  warnings about the loss, the summary and the commands to run next. `> run.log` keeps it.
* stderr: the progress bar, warnings (`warning: ...`) and errors (`error: ...`), one line each.
* WORKDIR/train.log: the record, warnings and errors together, in order, appended by every start
  of the run (no progress bar).

Tools whose output is data (`data inspect --json`, `bench`'s JSON line) keep stdout for it.

Only process 0 prints. Lines written before the workdir is known (setup runs before the workdir
log is opened) are kept and written to train.log when it opens. Python `logging` records of
sft_jax modules (the data pipeline's skipped-row warnings) are routed through `warn` / `log`, so
they look like every other line.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import jax
from tqdm import tqdm

from sft_jax import paths

_run_log: list = [None]  # the open train.log, if any
_pending: list[str] = []  # lines logged before train.log opened


def log(message: str) -> None:
    """A line of the run's record: stdout (above the progress bar) and train.log."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
        _keep(message)


def warn(message: str) -> None:
    """A warning: stderr (above the progress bar) and train.log."""
    if jax.process_index() == 0:
        tqdm.write(f"warning: {message}", file=sys.stderr)
        _keep(f"warning: {message}")


def final(line: str) -> None:
    """The one line a command that did not finish ends with (an error, a preemption): stderr
    and, when open, train.log."""
    print(line, file=sys.stderr, flush=True)
    _keep(line)


def _keep(line: str) -> None:
    if _run_log[0] is None:
        _pending.append(line)
    else:
        _run_log[0].append(line + "\n")


def open_run_log(workdir: str) -> None:
    """Appends this start's record to WORKDIR/train.log (process 0), earlier lines first."""
    close_run_log()
    if jax.process_index() != 0:
        _pending.clear()
        return
    if not paths.is_url(workdir):  # a later change of directory must not move the record
        workdir = os.path.abspath(workdir)
    f = paths.AppendFile(paths.join(workdir, "train.log"))
    start = f"--- start {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n"
    f.append(start + "".join(line + "\n" for line in _pending))
    _pending.clear()
    _run_log[0] = f


def close_run_log() -> None:
    if _run_log[0] is not None:
        _run_log[0].close()
        _run_log[0] = None


def reset() -> None:
    """Forgets lines kept from an earlier run in this process (tests train several)."""
    close_run_log()
    _pending.clear()


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        (warn if record.levelno >= logging.WARNING else log)(message)


def route_logging() -> None:
    """sft_jax's `logging` warnings become `warning: ...` lines like the rest, instead of
    `WARNING:sft_jax.data.source:...` from Python's default handler."""
    logger = logging.getLogger("sft_jax")
    if not any(isinstance(h, _Handler) for h in logger.handlers):
        logger.addHandler(_Handler(logging.WARNING))
    logger.propagate = False
