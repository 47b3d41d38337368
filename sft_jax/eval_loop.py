"""Evaluation as the training loop runs it: a baseline before any update, periodic evaluations with
sample generations, the final evaluation, the before/after comparison, and the rewind that
evaluates every kept checkpoint.

Records written to metrics.jsonl (every one also has "step", "time" and "run", the start number):

* `"kind": "baseline"` -- once per workdir, at step 0 before any update: "before": {...} with
  every metric measured on the untrained model (eval_loss, eval_perplexity, eval_token_accuracy,
  eval_tokens; generation_<rule> per rule of eval.match, generation_n, and
  regex_unmatched_references with the regex rule; general_loss, general_perplexity,
  general_token_accuracy, general_tokens), each present only when that evaluation is on. Nested,
  so readers that take every record with a top-level "eval_loss" as a validation point stay right.
* `"kind": "eval"` -- eval_loss, eval_perplexity, eval_token_accuracy, eval_tokens on the
  validation split, from periodic evals (eval.every_steps, or a save ranked by eval loss) and the
  final evaluation.
* `"kind": "samples"` -- "samples": [{"prompt", "reference", "output", "correct"}], the greedy
  generations of the first eval.samples held-out prompts ("correct" under the first rule of
  eval.match); at step 0, at every periodic eval (eval.every_steps) and at the end.
* `"kind": "generation_after"` -- held-out generation after training on eval.generate_examples
  prompts: generation_<rule> (fraction correct) per rule, "accuracy" (the first rule's), "n",
  and regex_unmatched_references with the regex rule.
* `"kind": "general_after"` -- the forgetting check on eval.general_text_files after training:
  general_loss, general_perplexity, general_token_accuracy, general_tokens.

A restarted run reads the baseline back (`read_baseline`) instead of measuring a trained model,
so its summary still compares with the model before fine-tuning. summary.json gets
`"comparison": [{"metric", "before", "after"}, ...]` (`comparison`), None where a side is
unknown (a workdir started before baselines were recorded, or a metric turned on at a restart).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from sft_jax.checkpoint import Checkpointer
from sft_jax.console import log
from sft_jax.evaluate import GENERATION_BATCH, run_generation_eval
from sft_jax.run_state import Run

_NOT_METRICS = ("kind", "step", "time", "run", "accuracy", "samples")


def read_baseline(workdir: str) -> dict[str, float] | None:
    """The "before" metrics of the first baseline record in metrics.jsonl; None if there is none."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if '"baseline"' in line:
                record = json.loads(line)
                if record.get("kind") == "baseline":
                    return record["before"]
    return None


def metric_values(record: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a result (without bookkeeping such as step, run or samples)."""
    return {
        k: v
        for k, v in record.items()
        if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def validate(run: Run, params: Any, step: int) -> dict[str, float]:
    """Validation loss, perplexity and token accuracy, written as a `kind: eval` record."""
    result = run.evaluate(params)
    run.writer.write(step, {"kind": "eval", **result, "run": run.run_number})
    return result


def write_samples(run: Run, step: int, samples: list[dict[str, Any]]) -> None:
    if samples:
        run.writer.write(step, {"kind": "samples", "run": run.run_number, "samples": samples})


def generation(run: Run, params: Any, step: int, kind: str | None) -> dict[str, Any] | None:
    """Held-out generation metrics, written as a `kind` record unless kind is None, and their
    samples; None when generation is off."""
    result = run_generation_eval(run.config, run.model, params, run.bundle)
    if result is not None:
        if kind is not None:
            values = {k: v for k, v in result.items() if k != "samples"}
            run.writer.write(step, {"kind": kind, "run": run.run_number, **values})
        write_samples(run, step, result["samples"])
    return result


def general(run: Run, params: Any, step: int, kind: str | None) -> dict[str, float] | None:
    """The forgetting check on general text, written as a `kind` record unless kind is None;
    None when eval.general_text_files is empty."""
    if run.evaluate_general is None:
        return None
    result = run.evaluate_general(params)
    if kind is not None:
        run.writer.write(step, {"kind": kind, "run": run.run_number, **result})
    return result


def baseline(run: Run, state: Any) -> dict[str, float]:
    """The "before" metrics: read back when an earlier start of this workdir recorded them, else
    measured now if training has not started (step 0) and written as the `baseline` record."""
    before = read_baseline(run.workdir)
    if before is not None or int(state.step) > 0:
        return before or {}
    params = run.inference_params(state)
    before = {}
    if run.bundle.eval_batches:
        before.update(run.evaluate(params))
    generated = generation(run, params, 0, kind=None)
    if generated is not None:
        values = metric_values(generated)
        values["generation_n"] = values.pop("n")
        before.update(values)
    before.update(general(run, params, 0, kind=None) or {})
    if before:
        run.writer.write(0, {"kind": "baseline", "run": run.run_number, "before": before})
        rows = comparison(before, {}, run.config.eval.matches)
        log("before training: " + ", ".join(f"{r['metric']} {r['before']:.4f}" for r in rows))
    return before


def periodic(run: Run, state: Any, step: int, *, with_samples: bool) -> dict[str, float]:
    """A mid-training validation (written and returned); with samples, the generations of the
    first eval.samples held-out prompts too (not at the last step: the final evaluation logs
    them there). The samples come from one full generation batch of prompts, which reuses the
    decode program the baseline compiled (4 rows would compile a new one, seconds on CPU, for
    about the same decode time)."""
    params = run.inference_params(state)
    result = validate(run, params, step)
    samples = run.config.eval.samples
    if with_samples and samples and step < run.steps:
        limit = max(samples, GENERATION_BATCH)
        generated = run_generation_eval(run.config, run.model, params, run.bundle, limit=limit)
        write_samples(run, step, [] if generated is None else generated["samples"])
    return result


def comparison(
    before: dict[str, float], after: dict[str, float], matches: tuple[str, ...]
) -> list[dict[str, Any]]:
    """[{"metric", "before", "after"}] for the metrics either side measured, in a fixed order."""
    names = [
        "eval_loss",
        "eval_perplexity",
        "eval_token_accuracy",
        *(f"generation_{m}" for m in matches),
        "general_loss",
        "general_perplexity",
    ]
    return [
        {"metric": n, "before": before.get(n), "after": after.get(n)}
        for n in names
        if n in before or n in after
    ]


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """The comparison as an aligned text table (n/a where a side is unknown)."""
    width = max([len("metric"), *(len(r["metric"]) for r in rows)])
    lines = [f"  {'metric':<{width}}  {'before':>10}  {'after':>10}"]
    for r in rows:
        cells = ["n/a" if r[k] is None else f"{r[k]:.4f}" for k in ("before", "after")]
        lines.append(f"  {r['metric']:<{width}}  {cells[0]:>10}  {cells[1]:>10}")
    return "\n".join(lines)


def rewind(run: Run, state: Any) -> dict[str, Any]:
    """Evaluates every kept checkpoint on the validation data -> best step and its loss.

    Final checkpoints often overshoot; `python -m sft_jax.export --step <best_step>` exports the
    best one instead of the last. Ties go to the earlier step.
    """
    run.checkpointer.wait()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params
    )
    # A fresh manager: the training one has a StandardSave handler registered for `state`,
    # which refuses the partial PyTreeRestore that `restore_params` (shared with export) uses.
    c = run.config.checkpoint
    reader = Checkpointer(run.workdir, keep=c.keep, keep_best=c.keep_best, async_save=False)
    losses: dict[str, float] = {}
    try:
        for step in reader.all_steps():
            params = reader.restore_params(step, abstract)
            params = run.inference_params(state.replace(params=params))
            losses[str(step)] = run.evaluate(params)["eval_loss"]
    finally:
        reader.close()
    best = min(losses, key=lambda k: (losses[k], int(k)))
    run.writer.write(int(best), {"kind": "rewind", "run": run.run_number, "eval_losses": losses})
    log(f"rewind: best kept checkpoint is step {best} (eval loss {losses[best]:.4f}) of {losses}")
    return {"best_step": int(best), "best_eval_loss": losses[best], "kept_eval_losses": losses}
