"""Entry point: `python -m sft_jax.train --config configs/x.py --workdir DIR [--config.a.b=v ...]`.

`main` parses flags and hands a parsed `Config` to `train_and_evaluate`, which tests call directly.
The loop is split into named sections: setup (sft_jax/training/train_setup.py: mesh, data, model,
state, restore, the evaluator), the baseline evaluation, the step loop (health, log, evaluate,
checkpoint), and the final evaluation, before/after comparison and summary. Every evaluation is a
method of `run.evaluator` (sft_jax/evaluation/eval_loop.py).

Exit codes (sft_jax/training/faults.py): 0 finished or stopped early; 2 bad config or data, or a
busy workdir (nothing trained); 42 preempted or interrupted (SIGTERM, Ctrl-C), safe to restart; 43
aborted on non-finite loss; 44 a checkpoint could not be written (disk full, read-only),
committed checkpoints kept; 130 a second Ctrl-C. What is printed where: sft_jax/console.py.

metrics.jsonl is appended to by every start of a run in the same workdir. Each start writes a
`{"kind": "start", "run": n, "resumed_from": step}` record, and every training and eval record
of that start carries `"run": n` (0 for the first start), so the records a resumed run wrote
are told apart exactly from those of the run it replaced. Training records have no "kind"; the
evaluation records ("eval", "samples", "generation_*", "general_*") are described in
sft_jax/evaluation/eval_loop.py. Other kinds: "loss_spike", "preempted", "rewind".
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, NoReturn

import jax
import numpy as np
from tqdm import tqdm

from sft_jax import console, data, hf
from sft_jax.cli import absl_help, wants_help
from sft_jax.config import Config, ConfigError
from sft_jax.config_file import config_from_argv
from sft_jax.console import log
from sft_jax.evaluation import eval_loop
from sft_jax.training import preflight, train_setup, workdir_lock
from sft_jax.training.distributed import check_platform, initialize_distributed
from sft_jax.training.faults import (
    EXIT_ABORTED,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_SAVE_FAILED,
    EXIT_USER_ERROR,
    NonFiniteAbort,
    Preempted,
    PreemptionWatcher,
    SaveFailed,
)
from sft_jax.training.host_memory import configure_host_allocator
from sft_jax.training.run_state import Run
from sft_jax.training.run_summary import print_summary, read_finished_summary, write_summary

USER_ERRORS = (ConfigError, data.DataError, hf.UnsupportedModelError, FileNotFoundError)


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Interval:
    """Real tokens seen since the last logged step, and when that interval started."""

    tokens: float = 0.0
    start: float = dataclasses.field(default_factory=time.time)


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


def check_health(run: Run, done: int, metrics: dict, bar: tqdm) -> tuple[bool, Exception | None]:
    """One scalar read per step (needed to stop after K non-finite steps in a row) -> (whether
    this step was non-finite and skipped, the NonFiniteAbort to raise once it is logged)."""
    loss, nonfinite = (float(x) for x in jax.device_get((metrics["loss"], metrics["nonfinite"])))
    health, abort, spike = run.loop.health, None, False
    try:
        spike = health.observe(
            done,
            loss,
            nonfinite > 0,
            limit=run.config.train.max_nonfinite_steps,
            spike_factor=run.config.train.loss_spike_factor,
            min_delta=run.config.train.loss_spike_min_delta,
        )
    except NonFiniteAbort as e:  # raised once this step's record is written
        abort = e
    run.loop.last_loss = run.loop.last_loss if nonfinite else loss
    if nonfinite:
        console.warn(
            f"step {done}: non-finite loss or gradient, update skipped "
            f"({health.skipped_steps} so far)"
        )
    if spike:
        console.warn(f"step {done}: loss spike {loss:.4f} (running mean {health.loss_ema:.4f})")
        run.writer.write(done, {"kind": "loss_spike", "run": run.run_number, "spike_loss": loss})
    return bool(nonfinite), abort


def log_step(run: Run, done: int, metrics: dict, interval: Interval, bar: tqdm) -> None:
    """Writes the training record of step `done` (no "kind") and starts a new interval."""
    # Scalars, and lists for per-expert metrics (metrics.jsonl keeps them; scalar sinks skip).
    record = {k: v.tolist() if np.ndim(v) else float(v) for k, v in jax.device_get(metrics).items()}
    elapsed = max(time.time() - interval.start, 1e-9)
    record["tokens_per_s"] = interval.tokens / elapsed
    record["epoch"] = done / run.bundle.train_iter.steps_per_epoch
    record["skipped_steps"] = run.loop.health.skipped_steps
    record["run"] = run.run_number
    run.writer.write(done, record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
    log(
        f"step {done}/{run.steps}: loss {record['loss']:.4f}, lr {record['learning_rate']:.3g}, "
        f"grad norm {record['grad_norm']:.3g}, {record['tokens_per_s']:.0f} tokens/s"
    )
    interval.tokens, interval.start = 0.0, time.time()


def evaluate_if_due(
    run: Run, state: Any, done: int, checkpoint_due: bool, bar: tqdm
) -> tuple[float | None, bool]:
    """The periodic eval (every eval.every_steps, with samples), or the eval ranking a save when
    checkpoint.keep_best is set -> (eval loss or None, whether early stopping triggers)."""
    config = run.config
    eval_due = bool(config.eval.every_steps and done % config.eval.every_steps == 0)
    ranked_save = checkpoint_due and config.checkpoint.keep_best
    if not run.evaluator.has_validation or not (eval_due or ranked_save):
        return None, False
    # No samples at the last step: the final evaluation writes them there.
    with_samples = eval_due and done < run.steps
    eval_loss = run.evaluator.periodic(state, done, with_samples=with_samples)["eval_loss"]
    patience = config.eval.early_stopping_patience
    return eval_loss, eval_due and run.loop.observe_eval(done, eval_loss, patience)


def preempt(
    run: Run, state: Any, done: int, eval_loss: float | None, bar: tqdm, signal_name: str
) -> NoReturn:
    """SIGTERM or Ctrl-C arrived: save at this step, wait for the commit, record it, and stop."""
    run.save(done, state, eval_loss)
    run.checkpointer.wait()
    run.writer.write(done, {"kind": "preempted", "run": run.run_number})
    bar.close()
    raise Preempted(done, signal_name)


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
    interval, last_save_time = Interval(), time.time()
    done, reason = first_step, "finished"
    if first_step < run.steps:  # the first call compiles; say so, or the bar sits at 0 silently
        log("compiling the train step (the first step waits for it) ...")
    for step in range(first_step, run.steps):
        host_batch = next(bundle.train_iter)
        interval.tokens += float(np.sum(host_batch["segment_ids"] > 0)) * jax.process_count()
        state, metrics = run.train_step(
            state, run.place(host_batch), run.faults.loss_scale(step + 1)
        )
        done = step + 1
        bar.update(1)
        nonfinite, abort = check_health(run, done, metrics, bar)
        if step == first_step:
            log(f"first step done in {time.time() - interval.start:.1f} s (compile included)")
        if done % config.train.log_every == 0 or done == run.steps or nonfinite:
            log_step(run, done, metrics, interval, bar)
        if abort is not None:
            bar.close()
            raise abort
        checkpoint_due = save_due(run, done, last_save_time)
        eval_loss, stop = evaluate_if_due(run, state, done, checkpoint_due, bar)
        if checkpoint_due or stop:
            run.save(done, state, eval_loss)
            last_save_time = time.time()
        run.faults.after_step(done)
        if watcher.reached(done):
            preempt(run, state, done, eval_loss, bar, watcher.signal_name)
        if stop:
            reason = "early_stopping"
            log(
                f"step {done}: early stopping, no eval-loss improvement in "
                f"{config.eval.early_stopping_patience} evals (best {run.loop.best_eval_loss:.4f} "
                f"at step {run.loop.best_eval_step})"
            )
            break
    bar.close()
    return state, done, reason


# ----------------------------------------------------------------------------- the end


def train_and_evaluate(
    config: Config, workdir: str, *, host_memory: str | None = None
) -> dict[str, Any]:
    """Trains per `config`, writing metrics and checkpoints to `workdir`; returns the summary.

    Raises faults.Preempted on SIGTERM / Ctrl-C (after saving, when in the step loop),
    faults.NonFiniteAbort after too many non-finite steps in a row, KeyboardInterrupt on a second
    Ctrl-C, ConfigError / DataError on bad input (before compute), WorkdirBusyError (a
    ConfigError) when another run holds the workdir's lock, and faults.SaveFailed when a
    checkpoint cannot be written. `host_memory` is the allocator line of the command, logged once
    the config and data were accepted.

    train.log closes when the run returns, so that what the process logs afterwards (another
    run's data preparation, an evaluation) is not appended to this run's record. After an
    exception it stays open for the command's last line (`main` closes it).
    """
    preflight.check_workdir(workdir)  # the lock file needs a writable local directory
    with workdir_lock.hold(workdir):  # one writer per workdir, released on every exit
        summary = _train_and_evaluate(config, workdir, host_memory)
        console.close_run_log()  # a workdir in a bucket: train.log's last lines are uploaded now
    return summary


def _train_and_evaluate(config: Config, workdir: str, host_memory: str | None) -> dict[str, Any]:
    start_time = time.time()
    console.reset()
    watcher = PreemptionWatcher(phase="setup")  # a signal during setup stops at once, cleanly
    try:
        run, state = train_setup.setup(config, workdir)
        console.open_run_log(workdir)
        if host_memory:
            log(f"host memory: {host_memory}")
        return _train_and_finish(run, state, watcher, start_time)
    finally:
        watcher.close()


def _train_and_finish(
    run: Run, state: Any, watcher: PreemptionWatcher, start_time: float
) -> dict[str, Any]:
    """The baseline, the loop and the end of a set-up run (resources closed on every exit)."""
    config, workdir = run.config, run.workdir
    first_step = int(state.step)
    try:
        run.writer.write(
            first_step, {"kind": "start", "run": run.run_number, "resumed_from": first_step}
        )
        finished = read_finished_summary(workdir, first_step) if first_step >= run.steps else None
        if finished is not None:  # nothing left to do: keep the training's own figures
            log(f"already finished at step {first_step}; summary.json is kept as it was")
            print_summary(finished, config, workdir)
            return finished
        before = run.evaluator.baseline(state)  # measured at step 0, read back after a restart
        watcher.phase = "loop"
        state, done, reason = train_loop(run, state, watcher)
        watcher.phase, watcher.step = "finish", done
        summary = finish(run, state, done, reason, before)
    finally:
        run.checkpointer.close()  # waits for any asynchronous save to commit
        run.writer.close()  # flushes TensorBoard, finishes the W&B run
        run.bundle.train_iter.close()  # stops the prefetch thread
    summary["wall_s"] = round(time.time() - start_time, 1)
    if jax.process_index() == 0:
        write_summary(workdir, summary)
    print_summary(summary, config, workdir)
    return summary


def finish(
    run: Run, state: Any, done: int, reason: str, before: dict[str, float]
) -> dict[str, Any]:
    """Final evaluation, checkpoint (ranked by eval loss), optional rewind, held-out generation,
    the forgetting check, and the summary with its before/after comparison."""
    config, evaluator = run.config, run.evaluator
    summary: dict[str, Any] = {"steps": done, "stopped": reason, "train_loss": run.loop.last_loss}
    after = evaluator.final_validation(state, done)
    summary.update(after)
    run.save(done, state, after.get("eval_loss"))
    summary["skipped_steps"] = run.loop.health.skipped_steps
    summary["loss_spikes"] = run.loop.health.spikes
    if run.loop.best_eval_step is not None:
        summary["best_periodic_eval"] = {
            "step": run.loop.best_eval_step,
            "eval_loss": run.loop.best_eval_loss,
        }
    if config.checkpoint.rewind_to_best and evaluator.has_validation:
        summary.update(evaluator.rewind(state, run.checkpointer, before.get("general_loss")))
    params = evaluator.inference_params(state)
    generation = evaluator.final_generation(params, done)
    if generation is not None:
        after.update(eval_loop.metric_values(generation))
        summary["accuracy_before"] = before.get(f"generation_{config.eval.matches[0]}")
        summary["accuracy_after"] = generation["accuracy"]
        summary["samples"] = generation["samples"]
        summary["generated"] = generation["n"]
    general = evaluator.final_general_text(params, done)
    if general is not None:
        after.update(general)
        summary.update(general)
    summary["comparison"] = eval_loop.comparison(before, after, config.eval.matches)
    summary["data"] = run.bundle.stats
    return summary


# ----------------------------------------------------------------------------- command line


USAGE = "python -m sft_jax.train --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]"
DESCRIPTION = (
    "Fine-tunes a model as the config file says, writing checkpoints, metrics.jsonl, train.log\n"
    "and summary.json to DIR; the same command resumes an interrupted run. Exit codes: 0 done,\n"
    "2 bad config or data or a busy workdir, 42 preempted or interrupted (safe to restart),\n"
    "43 non-finite loss, 44 a checkpoint could not be written, 130 a second Ctrl-C."
)


def train_flags():
    """The absl flags of this command besides --config (which config_from_argv adds)."""
    from absl import flags

    flag_values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Output directory (created).", flag_values=flag_values)
    return flag_values


def load_config_from_flags(argv: list[str]) -> tuple[Config, str]:
    """Parses `--config FILE[:arg] --workdir DIR --config.a.b=v`; bad flags -> ConfigError."""
    flag_values = train_flags()
    config = config_from_argv(argv, flag_values)
    if not flag_values.workdir:
        raise ConfigError(f"--workdir DIR is required; usage: {USAGE}")
    return config, flag_values.workdir


def main(argv: list[str] | None = None) -> int:
    """Runs training -> exit code: 0 done, 2 bad config or data or a busy workdir, 42 preempted,
    43 non-finite, 44 a checkpoint save failed (disk full, read-only), 130 a second Ctrl-C. Every
    ending is one line on stderr (and in train.log), no traceback."""
    argv = list(sys.argv if argv is None else argv)
    if wants_help(argv[1:]):
        print(absl_help(USAGE, DESCRIPTION, train_flags()), end="")
        return EXIT_OK
    console.reset()
    console.route_logging()
    watcher = PreemptionWatcher(phase="setup")  # until train_and_evaluate installs its own
    try:
        config, workdir = load_config_from_flags(argv)
        # Before anything touches devices: the host allocator (it must precede JAX's backend),
        # join the other hosts, then refuse a CPU fallback.
        allocator = configure_host_allocator(
            config.train.host_allocator, config.distributed.expected_platform
        )
        config = hf.resolve_config_hub_ids(config)
        initialize_distributed(config.distributed)
        check_platform(config.distributed.expected_platform)
        train_and_evaluate(config, workdir, host_memory=allocator)
    except USER_ERRORS as e:
        return _ended(f"error: {e}", EXIT_USER_ERROR)
    except Preempted as e:
        return _ended(f"{e} (exit {EXIT_PREEMPTED})", EXIT_PREEMPTED)
    except NonFiniteAbort as e:
        return _ended(f"error: {e} (exit {EXIT_NONFINITE})", EXIT_NONFINITE)
    except SaveFailed as e:
        return _ended(f"error: {e} (exit {EXIT_SAVE_FAILED})", EXIT_SAVE_FAILED)
    except KeyboardInterrupt:
        message = "stopped by a second Ctrl-C without saving; committed checkpoints are kept"
        return _ended(f"{message} (exit {EXIT_ABORTED})", EXIT_ABORTED)
    finally:
        watcher.close()
    return EXIT_OK


def _ended(line: str, code: int) -> int:
    """Prints the run's last line (stderr and train.log) and returns its exit code."""
    console.final(line)
    console.reset()
    return code


if __name__ == "__main__":
    sys.exit(main())
