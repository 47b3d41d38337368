"""The evaluations a training run makes, as one object: `Evaluator`, built once at setup and held
by the run as `Run.evaluator`, so the loop asks for an evaluation by name (`baseline`,
`periodic`, `final_validation`, `final_generation`, `final_general_text`, `rewind`) and never
handles compiled functions or held-out data itself. The pure pieces it runs (the jitted eval step,
answer matching and scoring, general-text batches, the LoRA merge) are in
sft_jax/evaluation/evaluate.py.

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
* `"kind": "rewind"` -- "eval_losses": {step: eval loss} of every kept checkpoint, with
  "generation_scores" (the first rule of eval.match) when eval.generate_examples is on and
  "general_losses" when eval.general_text_files is set, at the chosen step.

A restarted run reads the baseline back (`read_baseline`) instead of measuring a trained model,
so its summary still compares with the model before fine-tuning. summary.json gets
`"comparison": [{"metric", "before", "after"}, ...]` (`comparison`), None where a side is
unknown (a workdir started before baselines were recorded, or a metric turned on at a restart).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sft_jax import paths
from sft_jax.config import Config
from sft_jax.console import log
from sft_jax.data import DataBundle, EvalPrompt
from sft_jax.data.templates import ChatTemplate, generation_stops
from sft_jax.evaluation import rewind as rewind_rule
from sft_jax.evaluation.evaluate import (
    GENERATION_BATCH,
    evaluate_loss,
    generation_eval,
    make_eval_step,
    make_inference_params,
)
from sft_jax.model.decoder import Transformer
from sft_jax.training.checkpoint import Checkpointer
from sft_jax.training.metrics import MetricsWriter

_NOT_METRICS = ("kind", "step", "time", "run", "accuracy", "samples")

Batches = list[dict[str, np.ndarray]]


@dataclasses.dataclass
class Evaluator:
    """Every evaluation of a run, with what they share built once (`build`): the held-out data,
    the compiled eval step and LoRA merge, and where records go. One object, so the loop names the
    evaluation it wants and these pieces never travel through `Run` one by one.

    Methods that only measure write nothing (`validation_loss`, `general_text_loss`,
    `generation_scores`); the others are the evaluations of the run's timeline and write their
    records (see the module docstring)."""

    config: Config
    model: Transformer  # generation runs the plain decoder on `inference_params`
    tokenizer: Any
    template: ChatTemplate | None  # its end of turn stops a generation
    validation_batches: Batches  # the held-out split (data.eval_files or eval_fraction), packed
    general_batches: Batches  # eval.general_text_files, packed; [] when off
    prompts: list[EvalPrompt]  # held-out prompts for generation, ready-tokenised
    place: Callable[[dict], dict]  # host batch -> sharded global arrays
    eval_step: Callable  # jitted (params, batch) -> (loss sum, loss tokens, correct tokens)
    inference_params: Callable[[Any], Any]  # state -> params of the plain model (LoRA merged)
    writer: MetricsWriter
    run_number: int
    workdir: str

    @classmethod
    def build(
        cls,
        config: Config,
        model: Transformer,
        mesh: jax.sharding.Mesh,
        batch_sharding: jax.sharding.NamedSharding,
        bundle: DataBundle,
        general_batches: Batches,
        place: Callable[[dict], dict],
        writer: MetricsWriter,
        run_number: int,
        workdir: str,
    ) -> Evaluator:
        """The run's evaluator; compiles nothing yet (the jitted functions compile on first use,
        at the baseline)."""
        inference_params, inference_shardings = make_inference_params(config, model, mesh)
        return cls(
            config=config,
            model=model,
            tokenizer=bundle.tokenizer,
            template=bundle.template,
            validation_batches=bundle.eval_batches,
            general_batches=general_batches,
            prompts=bundle.eval_prompts,
            place=place,
            eval_step=make_eval_step(model.apply, inference_shardings, batch_sharding),
            inference_params=inference_params,
            writer=writer,
            run_number=run_number,
            workdir=workdir,
        )

    @property
    def has_validation(self) -> bool:
        """Whether there is a validation split: periodic evals, the keep_best ranking of saves,
        early stopping and the rewind all need one."""
        return bool(self.validation_batches)

    # ------------------------------------------------------------------------- measurements

    def validation_loss(self, params: Any) -> dict[str, float]:
        """eval_loss, eval_perplexity, eval_token_accuracy, eval_tokens on the validation split."""
        return evaluate_loss(self.eval_step, params, self.validation_batches, self.place)

    def general_text_loss(self, params: Any) -> dict[str, float] | None:
        """The forgetting check: general_loss, general_perplexity, ... on eval.general_text_files;
        None when that key is empty."""
        if not self.general_batches:
            return None
        return evaluate_loss(
            self.eval_step, params, self.general_batches, self.place, prefix="general"
        )

    def generation_scores(self, params: Any, *, limit: int | None = None) -> dict[str, Any] | None:
        """`generation_eval` on the first eval.generate_examples held-out prompts (the first
        `limit` of them when given), with eval.samples samples; None when generation is off or
        there are no prompts."""
        e = self.config.eval
        n = min(e.generate_examples, len(self.prompts))
        n = n if limit is None else min(n, limit)
        if n == 0:
            return None
        return generation_eval(
            self.model,
            params,
            self.tokenizer,
            self.prompts[:n],
            max_new_tokens=e.max_new_tokens,
            matches=e.matches,
            pattern=re.compile(e.answer_regex) if "regex" in e.matches else None,
            samples=e.samples,
            stops=generation_stops(self.template, self.tokenizer),
        )

    # ------------------------------------------------------------------------- the run's timeline

    def baseline(self, state: Any) -> dict[str, float]:
        """The "before" metrics: read back when an earlier start of this workdir recorded them,
        else measured now if training has not started (step 0) and written as the `baseline`
        record, so every summary compares with the model before fine-tuning."""
        before = read_baseline(self.workdir)
        if before is not None or int(state.step) > 0:
            return before or {}
        if self.validation_batches or self.general_batches:
            log("evaluating the model before training (compiles the evaluation) ...")
        params = self.inference_params(state)
        before = {}
        if self.validation_batches:
            before.update(self.validation_loss(params))
        generated = self.generation_scores(params)
        if generated is not None:
            self._write_samples(0, generated["samples"])
            values = metric_values(generated)
            values["generation_n"] = values.pop("n")
            before.update(values)
        before.update(self.general_text_loss(params) or {})
        if before:
            self.writer.write(0, {"kind": "baseline", "run": self.run_number, "before": before})
            rows = comparison(before, {}, self.config.eval.matches)
            log("before training: " + ", ".join(f"{r['metric']} {r['before']:.4f}" for r in rows))
        return before

    def periodic(self, state: Any, step: int, *, with_samples: bool) -> dict[str, float]:
        """A mid-training validation (written, logged and returned); with samples, the
        generations of the first eval.samples held-out prompts too. The samples come from one
        full generation batch of prompts, which reuses the decode program the baseline compiled
        (4 rows would compile a new one, seconds on CPU, for about the same decode time)."""
        params = self.inference_params(state)
        result = self._write_validation(params, step)
        samples = self.config.eval.samples
        if with_samples and samples:
            generated = self.generation_scores(params, limit=max(samples, GENERATION_BATCH))
            self._write_samples(step, [] if generated is None else generated["samples"])
        loss, accuracy = result["eval_loss"], result["eval_token_accuracy"]
        log(f"step {step}: eval_loss {loss:.4f}, token accuracy {accuracy:.4f}")
        return result

    def final_validation(self, state: Any, step: int) -> dict[str, float]:
        """The validation of the trained model, written as an `eval` record; {} without a
        validation split (and then no LoRA merge either)."""
        if not self.validation_batches:
            return {}
        return self._write_validation(self.inference_params(state), step)

    def final_generation(self, params: Any, step: int) -> dict[str, Any] | None:
        """Held-out generation after training, written as `generation_after` with its samples;
        None when generation is off. Takes `inference_params(state)` rather than the state so
        that it and `final_general_text` share one LoRA merge."""
        result = self.generation_scores(params)
        if result is not None:
            values = {k: v for k, v in result.items() if k != "samples"}
            self.writer.write(step, {"kind": "generation_after", "run": self.run_number, **values})
            self._write_samples(step, result["samples"])
        return result

    def final_general_text(self, params: Any, step: int) -> dict[str, float] | None:
        """The forgetting check after training, written as `general_after`; None when off."""
        result = self.general_text_loss(params)
        if result is not None:
            self.writer.write(step, {"kind": "general_after", "run": self.run_number, **result})
        return result

    def rewind(
        self, state: Any, checkpointer: Checkpointer, base_general_loss: float | None = None
    ) -> dict[str, Any]:
        """Evaluates every kept checkpoint on the task (validation loss, and the generation
        score when eval.generate_examples is on) and on retention (the general text, when
        eval.general_text_files is set), whatever the rule -> the step `checkpoint.rewind_rule`
        chooses (sft_jax/evaluation/rewind.py; `base_general_loss`: the baseline's general_loss).

        Final checkpoints often overshoot; `python -m sft_jax.export --step best` exports the
        chosen one instead of the last. `checkpointer` is the training one: its pending save
        must commit before the kept steps are listed.
        """
        checkpointer.wait()
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params
        )
        # A fresh manager: the training one has a StandardSave handler registered for `state`,
        # which refuses the partial PyTreeRestore that `restore_params` (shared with export) uses.
        c = self.config.checkpoint
        reader = Checkpointer(self.workdir, keep=c.keep, keep_best=c.keep_best, async_save=False)
        try:
            trajectory = [
                self._measure_kept(reader, step, abstract, state) for step in reader.all_steps()
            ]
        finally:
            reader.close()
        decision = rewind_rule.choose(
            trajectory,
            c.rewind_rule,
            metric=c.rewind_metric,
            base_general_loss=base_general_loss,
            tolerance=c.rewind_tolerance,
        )
        if any("generation" in p for p in trajectory):
            decision["generation_match"] = self.config.eval.matches[0]
        best = decision["chosen_step"]
        record: dict[str, Any] = {"kind": "rewind", "run": self.run_number}
        result: dict[str, Any] = {"best_step": best}
        for key, name in (("eval_loss", "eval_losses"), ("generation", "generation_scores"),
                          ("general_loss", "general_losses")):  # fmt: skip
            values = {str(p["step"]): p[key] for p in trajectory if key in p}
            if values:
                record[name] = values
                result[f"kept_{name}"] = values
        result["best_eval_loss"] = record["eval_losses"][str(best)]
        self.writer.write(best, record)
        log(f"rewind: chose kept checkpoint {best} ({decision['reason']}) of {trajectory}")
        return {**result, "rewind": decision}

    def _measure_kept(
        self, reader: Checkpointer, step: int, abstract: Any, state: Any
    ) -> dict[str, Any]:
        """One kept checkpoint's trajectory point: step, eval_loss, and generation (the first
        rule of eval.match) and general_loss where those evaluations are on."""
        params = reader.restore_params(step, abstract)
        params = self.inference_params(state.replace(params=params))
        point: dict[str, Any] = {
            "step": int(step),
            "eval_loss": self.validation_loss(params)["eval_loss"],
        }
        generated = self.generation_scores(params)
        if generated is not None:
            point["generation"] = generated["accuracy"]
        general = self.general_text_loss(params)
        if general is not None:
            point["general_loss"] = general["general_loss"]
        return point

    def _write_validation(self, params: Any, step: int) -> dict[str, float]:
        result = self.validation_loss(params)
        self.writer.write(step, {"kind": "eval", **result, "run": self.run_number})
        return result

    def _write_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        if samples:
            self.writer.write(step, {"kind": "samples", "run": self.run_number, "samples": samples})


# ----------------------------------------------------------------------------- before / after


def read_baseline(workdir: str) -> dict[str, float] | None:
    """The "before" metrics of the first baseline record in metrics.jsonl; None if there is none."""
    path = paths.join(workdir, "metrics.jsonl")
    if not paths.exists(path):
        return None
    with paths.open_text(path, encoding="utf-8") as f:
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
