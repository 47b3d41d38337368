"""The end of a run as the user sees it: summary.json, the summary printed at the end (the
before/after table, sample generations), where the outputs are, and the commands to run next.

A start that finds its run already finished (the same workdir and steps) keeps summary.json as the
training wrote it (`read_finished_summary`), so its wall time and train loss are the training's,
not those of the start that had nothing to do.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any

from sft_jax import paths
from sft_jax.config import Config
from sft_jax.console import log
from sft_jax.evaluation import eval_loop


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    paths.write_text(paths.join(workdir, "summary.json"), json.dumps(summary, indent=2))


def read_finished_summary(workdir: str, step: int) -> dict[str, Any] | None:
    """summary.json of a run that already finished at `step`, or None (then finish runs again)."""
    try:
        summary = json.loads(paths.read_text(paths.join(workdir, "summary.json")))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == step else None


def print_summary(summary: dict[str, Any], config: Config, workdir: str) -> None:
    lines = [f"finished {summary['steps']} steps in {summary['wall_s']} s"]
    if summary.get("train_loss") is not None:
        lines.append(f"  final train loss: {summary['train_loss']:.4f}")
    if summary["comparison"]:
        lines.append("before / after training:")
        lines.append(eval_loop.format_comparison(summary["comparison"]))
    if "accuracy_after" in summary:
        lines.append(
            f"  held-out generation: n={summary['generated']}, rules {config.eval.match!r} "
            f"(first one decides 'correct')"
        )
        for sample in summary["samples"][:3]:
            mark = "ok" if sample["correct"] else "wrong"
            lines.append(
                f"    {tail_words(sample['prompt'], 60)!r} -> {sample['output']!r} ({mark})"
            )
    lines.extend(next_steps(workdir, summary["steps"], config.lora.enabled))
    log("\n".join(lines))


def tail_words(text: str, width: int) -> str:
    """The end of `text` in at most about `width` characters, starting at a word ("...word")."""
    if len(text) <= width:
        return text
    tail = text[-width:]
    cut = tail.find(" ")
    return "..." + (tail[cut + 1 :] if 0 <= cut < len(tail) - 1 else tail)


def next_steps(workdir: str, step: int, lora: bool) -> list[str]:
    """Where the run's files are and the commands that use them, with this workdir filled in."""
    prog = "sft-jax " if os.path.basename(sys.argv[0]) == "sft-jax" else "python -m sft_jax."
    w = shlex.quote(workdir)
    export = f"{prog}export --workdir {w} --out {shlex.quote(paths.join(workdir, 'hf'))}"
    return [
        f"outputs in {workdir}:",
        f"  train.log (this record), metrics.jsonl, summary.json, config.json, "
        f"checkpoints/ (step {step}), tensorboard/",
        "next:",
        f"  {prog}report --workdir {w}    # HTML page with charts: {w}/report/index.html",
        f"  {prog}generate --workdir {w}    # chat with the fine-tuned model",
        f"  {export}{' --peft' if lora else ''}    # "
        + ("a PEFT adapter (without --peft: the merged model)" if lora else "a Hugging Face model"),
    ]
