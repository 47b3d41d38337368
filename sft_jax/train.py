"""Entry point: `python -m sft_jax.train --config configs/x.py --workdir DIR [--config.a.b=v ...]`.

`main` parses flags and hands a parsed `Config` to `train_and_evaluate`, which tests call directly.
The loop is split into named sections: setup (mesh, data, model, state, restore), baseline
evaluation, the step loop (log, evaluate, checkpoint), and the final evaluation and summary.

Exit codes (sft_jax/faults.py): 0 finished or stopped early; 2 bad config or data (nothing
trained); 42 preempted, checkpoint saved; 43 aborted on non-finite loss.

metrics.jsonl is appended to by every start of a run in the same workdir. Each start writes a
`{"kind": "start", "run": n, "resumed_from": step}` record, and every training and eval record
of that start carries `"run": n` (0 for the first start), so the records a resumed run wrote
are told apart exactly from those of the run it replaced.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from sft_jax import data, hf, preflight, sharding
from sft_jax.checkpoint import Checkpointer
from sft_jax.config import Config, ConfigError, config_from_argv, to_dict
from sft_jax.distributed import check_platform, initialize_distributed
from sft_jax.evaluate import (
    evaluate_loss,
    make_eval_step,
    make_inference_params,
    run_generation_eval,
)
from sft_jax.faults import (
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    FaultInjector,
    NonFiniteAbort,
    Preempted,
    PreemptionWatcher,
    StepHealth,
    tree_is_finite,
)
from sft_jax.metrics import MetricsWriter, previous_baseline
from sft_jax.model import Transformer, count_params
from sft_jax.optim import make_optimizer, make_schedule
from sft_jax.state import create_train_state
from sft_jax.step import BATCH_KEYS, make_train_step

# Kept importable from here for callers of the original names.
check_workdir = preflight.check_workdir
check_batch_layout = preflight.check_batch_layout

USER_ERRORS = (ConfigError, data.DataError, hf.UnsupportedModelError, FileNotFoundError)


def log(message: str) -> None:
    """Human-readable progress on process 0 (stderr, so stdout stays clean for tools)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- setup


def total_steps(config: Config, steps_per_epoch: int) -> int:
    if config.train.max_steps > 0:
        return config.train.max_steps
    return max(1, math.ceil(config.train.epochs * steps_per_epoch))


def make_placer(batch_sharding: jax.sharding.NamedSharding):
    """Host numpy batch (this process's rows) -> global jax arrays with the batch sharding."""

    def place(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(batch_sharding, batch[k]) for k in BATCH_KEYS
        }

    return place


def print_data_stats(stats: dict[str, Any], steps: int, per_epoch: int) -> None:
    log(
        "data: {examples} examples ({skipped} skipped, {truncated} truncated), {rows} packed rows, "
        "{real_tokens:.0f} tokens, trainable fraction {trainable_fraction:.3f}, "
        "padding {padding_fraction:.2%}; {eval_examples} eval examples".format(**stats)
    )
    log(f"schedule: {steps} steps ({per_epoch} steps per epoch)")


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class LoopState:
    """Host-side loop counters, saved in every checkpoint so that a resumed run continues them."""

    health: StepHealth = dataclasses.field(default_factory=StepHealth)
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    evals_since_best: int = 0

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["health"] = self.health.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopState:
        values = dict(values)
        health = StepHealth.from_dict(values.pop("health", {}))
        names = {f.name for f in dataclasses.fields(cls)} - {"health"}
        return cls(health=health, **{k: v for k, v in values.items() if k in names})

    def observe_eval(self, step: int, loss: float, patience: int) -> bool:
        """Records a periodic eval; True when `patience` evals in a row brought no new best."""
        if self.best_eval_loss is None or loss < self.best_eval_loss:
            self.best_eval_loss, self.best_eval_step, self.evals_since_best = loss, step, 0
        else:
            self.evals_since_best += 1
        return patience > 0 and self.evals_since_best >= patience


@dataclasses.dataclass
class Run:
    """Everything the loop sections share, built once by `setup`."""

    config: Config
    workdir: str
    steps: int
    model: Transformer
    shardings: Any
    bundle: data.DataBundle
    train_step: Callable
    evaluate: Callable[[Any], dict[str, float]]
    checkpointer: Checkpointer
    writer: MetricsWriter
    resolved: dict[str, Any]
    loop: LoopState
    run_number: int
    faults: FaultInjector
    place: Callable[[dict], dict]
    inference_params: Callable[[Any], Any]  # state -> params of the plain model (LoRA merged)
    last_loss: float | None = None  # last finite training loss of this process's run

    def save(self, step: int, state: Any, eval_loss: float | None = None) -> bool:
        """Starts a checkpoint of `state` at `step`; never writes non-finite parameters."""
        if not tree_is_finite((state.params, state.opt_state)):
            raise NonFiniteAbort(step, self.loop.health.nonfinite_in_a_row)
        metrics = None if eval_loss is None else {"eval_loss": eval_loss}
        return self.checkpointer.save(
            step,
            state,
            self.bundle.train_iter.get_state(),
            self.resolved,
            loop=self.loop.to_dict(),
            metrics=metrics,
        )


def next_run_number(workdir: str) -> int:
    """0 for a fresh workdir, else one more than the starts recorded in metrics.jsonl."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if '"kind": "start"' in line)


def setup(config: Config, workdir: str) -> tuple[Run, Any]:
    """Preflight, data, model, state and restore: everything that fails on bad input fails here,
    before compute. Returns the run and its (possibly restored) train state."""
    mesh = preflight.run(config, workdir)
    bundle = data.prepare_data(config)
    steps = total_steps(config, bundle.train_iter.steps_per_epoch)
    print_data_stats(bundle.stats, steps, bundle.train_iter.steps_per_epoch)
    model_config = hf.build_model_config(config.model)
    if len(bundle.tokenizer) > model_config.vocab_size:
        raise ConfigError(
            f"tokenizer has {len(bundle.tokenizer)} tokens but the model's vocab_size is "
            f"{model_config.vocab_size}"
        )
    model = Transformer(model_config)
    tx = make_optimizer(config.optim, steps, config.lora)
    state, shardings = create_train_state(
        model_config, config.model.path, tx, mesh, config.mesh.rules, config.seed, config.lora
    )
    trainable = "" if state.frozen is None else " trainable (LoRA adapters)"
    millions = count_params(state.params) / 1e6
    log(f"model: {millions:.3f}M{trainable} parameters on mesh {dict(mesh.shape)}")
    checkpointer = Checkpointer(
        workdir,
        keep=config.checkpoint.keep,
        keep_best=config.checkpoint.keep_best,
        async_save=config.checkpoint.async_save,
    )
    loop = LoopState()
    restored = checkpointer.restore_latest(state, shardings)
    if restored is not None:
        step, state, data_state, loop_values = restored
        bundle.train_iter.set_state(data_state)
        loop = LoopState.from_dict(loop_values)
        log(f"resumed from checkpoint at step {step}")
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules)
    place = make_placer(batch_sharding)
    inference_params, inference_shardings = make_inference_params(config, model, mesh)
    eval_step = make_eval_step(model.apply, inference_shardings, batch_sharding)
    schedule = make_schedule(config.optim, steps)
    run = Run(
        config=config,
        workdir=workdir,
        steps=steps,
        model=model,
        shardings=shardings,
        bundle=bundle,
        train_step=make_train_step(
            shardings, batch_sharding, micro_batches=config.train.micro_batches, schedule=schedule
        ),
        evaluate=lambda params: evaluate_loss(eval_step, params, bundle.eval_batches, place),
        checkpointer=checkpointer,
        writer=MetricsWriter(workdir),
        resolved=to_dict(config),
        loop=loop,
        run_number=next_run_number(workdir),
        faults=FaultInjector(config.faults),
        place=place,
        inference_params=inference_params,
    )
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(run.resolved, f, indent=2)
    return run, state


def save_due(run: Run, done: int, last_save_time: float) -> bool:
    """Every `checkpoint.every_steps` steps and/or `every_minutes` minutes since the last save."""
    c = run.config.checkpoint
    due = bool(c.every_steps and done % c.every_steps == 0)
    if c.every_minutes > 0 and not due:
        due = time.time() - last_save_time >= 60 * c.every_minutes
        if jax.process_count() > 1:  # clocks differ between hosts: process 0 decides for all
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.bool_(due)))
    return due or run.faults.save_before_kill(done)


def train_loop(run: Run, state: Any, watcher: PreemptionWatcher) -> tuple[Any, int, str]:
    """Steps from the restored step to the end -> (state, last step, why it stopped).

    Per step: update, health check (non-finite skips, spikes), log, periodic eval (early
    stopping), checkpoint, fault hooks, preemption. Raises Preempted / NonFiniteAbort.
    """
    config, bundle = run.config, run.bundle
    first_step = int(state.step)
    bar = tqdm(
        total=run.steps,
        initial=first_step,
        disable=not config.train.progress_bar or jax.process_index() != 0,
        desc="train",
        dynamic_ncols=True,
    )
    interval_tokens, interval_start, last_save_time = 0.0, time.time(), time.time()
    done, reason = first_step, "finished"
    for step in range(first_step, run.steps):
        host_batch = next(bundle.train_iter)
        interval_tokens += float(np.sum(host_batch["segment_ids"] > 0)) * jax.process_count()
        state, metrics = run.train_step(
            state, run.place(host_batch), run.faults.loss_scale(step + 1)
        )
        done = step + 1
        bar.update(1)
        # --- health: one scalar read per step, needed to stop after K non-finite steps in a row.
        loss, nonfinite = (
            float(x) for x in jax.device_get((metrics["loss"], metrics["nonfinite"]))
        )
        health, abort = run.loop.health, None
        try:
            spike = health.observe(
                done,
                loss,
                nonfinite > 0,
                limit=config.train.max_nonfinite_steps,
                spike_factor=config.train.loss_spike_factor,
            )
        except NonFiniteAbort as e:  # raised once this step's record is written
            abort, spike = e, False
        run.last_loss = run.last_loss if nonfinite else loss
        if nonfinite:
            bar.write(
                f"step {done}: non-finite loss or gradient, update skipped "
                f"({health.skipped_steps} so far)"
            )
        if spike:
            bar.write(f"step {done}: loss spike {loss:.4f} (running mean {health.loss_ema:.4f})")
            run.writer.write(
                done, {"kind": "loss_spike", "run": run.run_number, "spike_loss": loss}
            )
        # --- log.
        if done % config.train.log_every == 0 or done == run.steps or nonfinite:
            record = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = max(time.time() - interval_start, 1e-9)
            record["tokens_per_s"] = interval_tokens / elapsed
            record["epoch"] = done / bundle.train_iter.steps_per_epoch
            record["skipped_steps"] = health.skipped_steps
            record["run"] = run.run_number
            run.writer.write(done, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            interval_tokens, interval_start = 0.0, time.time()
        if abort is not None:
            bar.close()
            raise abort
        # --- periodic eval; early stopping.
        eval_loss, stop = None, False
        eval_due = config.eval.every_steps and done % config.eval.every_steps == 0
        checkpoint_due = save_due(run, done, last_save_time)
        if bundle.eval_batches and (eval_due or (checkpoint_due and config.checkpoint.keep_best)):
            result = run.evaluate(run.inference_params(state))
            eval_loss = result["eval_loss"]
            run.writer.write(done, {**result, "run": run.run_number})
            bar.write(f"step {done}: eval_loss {eval_loss:.4f}")
            if eval_due:
                stop = run.loop.observe_eval(done, eval_loss, config.eval.early_stopping_patience)
        # --- checkpoint; fault hooks; preemption.
        if checkpoint_due or stop:
            run.save(done, state, eval_loss)
            last_save_time = time.time()
        run.faults.after_step(done)
        if watcher.reached(done):
            run.save(done, state, eval_loss)
            run.checkpointer.wait()
            run.writer.write(done, {"kind": "preempted", "run": run.run_number})
            bar.close()
            raise Preempted(done)
        if stop:
            reason = "early_stopping"
            bar.write(
                f"step {done}: early stopping, no eval-loss improvement in "
                f"{config.eval.early_stopping_patience} evals (best {run.loop.best_eval_loss:.4f} "
                f"at step {run.loop.best_eval_step})"
            )
            break
    bar.close()
    return state, done, reason


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


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
    """Trains per `config`, writing metrics and checkpoints to `workdir`; returns the summary.

    Raises faults.Preempted after saving on SIGTERM, faults.NonFiniteAbort after too many
    non-finite steps in a row, and ConfigError / DataError on bad input (before compute).
    """
    start_time = time.time()
    run, state = setup(config, workdir)
    first_step = int(state.step)
    run.writer.write(
        first_step, {"kind": "start", "run": run.run_number, "resumed_from": first_step}
    )
    # --- baseline: held-out generation before any update (kept across restarts).
    before = previous_baseline(workdir)
    if before is None and first_step == 0:
        generation = run_generation_eval(config, run.model, run.inference_params(state), run.bundle)
        if generation is not None:
            before = {"kind": "generation_before", "accuracy": generation["accuracy"]}
            run.writer.write(0, {**before, "samples": generation["samples"]})
            log(f"before training: held-out {config.eval.match} match {generation['accuracy']:.3f}")
    watcher = PreemptionWatcher()
    try:
        state, done, reason = train_loop(run, state, watcher)
        summary = finish(run, state, done, reason, before)
    finally:
        watcher.close()
        run.checkpointer.close()  # waits for any asynchronous save to commit
    summary["wall_s"] = round(time.time() - start_time, 1)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    print_summary(summary, config)
    return summary


def finish(
    run: Run, state: Any, done: int, reason: str, before: dict[str, Any] | None
) -> dict[str, Any]:
    """Final evaluation, checkpoint (ranked by eval loss), optional rewind, and the summary."""
    config, bundle = run.config, run.bundle
    summary: dict[str, Any] = {"steps": done, "stopped": reason}
    summary["train_loss"] = run.last_loss
    eval_loss = None
    if bundle.eval_batches:
        result = run.evaluate(run.inference_params(state))
        run.writer.write(done, {**result, "run": run.run_number})
        summary.update(result)
        eval_loss = result["eval_loss"]
    run.save(done, state, eval_loss)
    summary["skipped_steps"] = run.loop.health.skipped_steps
    summary["loss_spikes"] = run.loop.health.spikes
    if run.loop.best_eval_step is not None:
        summary["best_periodic_eval"] = {
            "step": run.loop.best_eval_step,
            "eval_loss": run.loop.best_eval_loss,
        }
    if config.checkpoint.rewind_to_best and bundle.eval_batches:
        summary.update(rewind(run, state))
    generation = run_generation_eval(config, run.model, run.inference_params(state), bundle)
    if generation is not None:
        run.writer.write(done, {"kind": "generation_after", **generation})
        summary["accuracy_before"] = before["accuracy"] if before else None
        summary["accuracy_after"] = generation["accuracy"]
        summary["samples"] = generation["samples"]
        summary["generated"] = generation["n"]
    summary["data"] = bundle.stats
    return summary


def print_summary(summary: dict[str, Any], config: Config) -> None:
    lines = [f"finished {summary['steps']} steps in {summary['wall_s']} s"]
    if summary.get("train_loss") is not None:
        lines.append(f"  final train loss: {summary['train_loss']:.4f}")
    if "eval_loss" in summary:
        lines.append(f"  held-out loss:    {summary['eval_loss']:.4f}")
    if "accuracy_after" in summary:
        before = summary["accuracy_before"]
        before_text = "n/a" if before is None else f"{before:.3f}"
        lines.append(
            f"  held-out {config.eval.match} match: before {before_text} -> "
            f"after {summary['accuracy_after']:.3f}  (n={summary['generated']})"
        )
        for sample in summary["samples"][:3]:
            lines.append(f"    {sample['prompt'].splitlines()[-2]!r} -> {sample['output']!r}")
    log("\n".join(lines))


# ----------------------------------------------------------------------------- command line


def load_config_from_flags(argv: list[str]) -> tuple[Config, str]:
    """Parses `--config FILE[:arg] --workdir DIR --config.a.b=v`; bad flags -> ConfigError."""
    from absl import flags

    flag_values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Output directory.", flag_values=flag_values)
    config = config_from_argv(argv, flag_values)
    if not flag_values.workdir:
        raise ConfigError("usage: python -m sft_jax.train --config configs/x.py --workdir DIR")
    return config, flag_values.workdir


def resolve_hub_ids(config: Config) -> Config:
    """Replaces a Hub id in model.path / data.tokenizer by its local snapshot directory."""
    model = dataclasses.replace(config.model, path=hf.resolve_model_dir(config.model.path))
    data_section = dataclasses.replace(
        config.data, tokenizer=hf.resolve_model_dir(config.data.tokenizer)
    )
    return dataclasses.replace(config, model=model, data=data_section)


def main(argv: list[str] | None = None) -> int:
    """Runs training -> exit code: 0 done, 2 bad config or data, 42 preempted, 43 non-finite."""
    try:
        config, workdir = load_config_from_flags(sys.argv if argv is None else argv)
        # Before anything touches devices: join the other hosts, then refuse a CPU fallback.
        config = resolve_hub_ids(config)
        initialize_distributed(config.distributed)
        check_platform(config.distributed.expected_platform)
        train_and_evaluate(config, workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as e:
        print(f"{e} (exit {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    except NonFiniteAbort as e:
        print(f"error: {e} (exit {EXIT_NONFINITE})", file=sys.stderr)
        return EXIT_NONFINITE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
