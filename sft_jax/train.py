"""Entry point: `python -m sft_jax.train --config configs/x.py --workdir DIR [--config.a.b=v ...]`.

`main` parses flags and hands a parsed `Config` to `train_and_evaluate`, which tests call directly.
The loop is split into named sections: setup (mesh, data, model, state, restore), baseline
evaluation, the step loop (log, evaluate, checkpoint), and the final evaluation and summary.

Exit codes: 0 finished; 2 bad config or data (nothing trained).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from sft_jax import data, hf, sharding
from sft_jax.checkpoint import Checkpointer
from sft_jax.config import Config, ConfigError, make_configs_importable, parse, to_dict
from sft_jax.evaluate import evaluate_loss, generation_accuracy, make_eval_step
from sft_jax.metrics import MetricsWriter
from sft_jax.model import Transformer, count_params
from sft_jax.optim import make_optimizer, make_schedule
from sft_jax.state import create_train_state
from sft_jax.step import BATCH_KEYS, make_train_step

USER_ERRORS = (ConfigError, data.DataError, hf.UnsupportedModelError, FileNotFoundError)


def log(message: str) -> None:
    """Human-readable progress on process 0 (stderr, so stdout stays clean for tools)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- setup


def check_workdir(workdir: str) -> None:
    """Fails before compute when the workdir cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir '{workdir}' is not writable: {e}") from e


def total_steps(config: Config, steps_per_epoch: int) -> int:
    if config.train.max_steps > 0:
        return config.train.max_steps
    return max(1, math.ceil(config.train.epochs * steps_per_epoch))


def check_batch_layout(config: Config, mesh: jax.sharding.Mesh) -> None:
    """The global batch must split evenly into micro-batches, devices and processes."""
    shards = sharding.batch_shards(mesh, config.mesh.rules)
    per_micro = config.train.global_batch_size // config.train.micro_batches
    if per_micro % shards or config.train.global_batch_size % jax.process_count():
        raise ConfigError(
            f"train.global_batch_size={config.train.global_batch_size} with "
            f"train.micro_batches={config.train.micro_batches} gives {per_micro} rows per "
            f"micro-batch, which must be a multiple of the {shards} batch shards of the mesh"
        )
    if config.eval.batch_size % shards:
        raise ConfigError(
            f"eval.batch_size={config.eval.batch_size} must be a multiple of the "
            f"{shards} batch shards"
        )


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


# ----------------------------------------------------------------------------- evaluation


def run_generation_eval(
    config: Config, model: Transformer, params: Any, bundle: data.DataBundle
) -> dict[str, Any] | None:
    n = min(config.eval.generate_examples, len(bundle.eval_rows))
    if n == 0:
        return None
    return generation_accuracy(
        model,
        params,
        bundle.tokenizer,
        bundle.eval_rows[:n],
        max_new_tokens=config.eval.max_new_tokens,
        match=config.eval.match,
    )


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


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
    """Trains per `config`, writing metrics and checkpoints to `workdir`; returns the summary."""
    start_time = time.time()
    # --- setup: everything that can fail on bad input fails here, before compute.
    check_workdir(workdir)
    mesh = sharding.make_mesh(config.mesh)
    check_batch_layout(config, mesh)
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
    tx = make_optimizer(config.optim, steps)
    schedule = make_schedule(config.optim, steps)
    state, shardings = create_train_state(
        model_config, config.model.path, tx, mesh, config.mesh.rules, config.seed
    )
    log(f"model: {count_params(state.params) / 1e6:.3f}M parameters on mesh {dict(mesh.shape)}")
    checkpointer = Checkpointer(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    latest = checkpointer.latest_step()
    if latest is not None:
        state, data_state = checkpointer.restore(latest, state, shardings)
        bundle.train_iter.set_state(data_state)
        log(f"resumed from checkpoint at step {latest}")
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules)
    place = make_placer(batch_sharding)
    train_step = make_train_step(
        shardings, batch_sharding, micro_batches=config.train.micro_batches, schedule=schedule
    )
    eval_step = make_eval_step(model.apply, shardings.params, batch_sharding)
    writer = MetricsWriter(workdir)
    resolved = to_dict(config)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(resolved, f, indent=2)

    # --- baseline: held-out generation before any update (kept across restarts).
    first_step = int(state.step)
    before = previous_baseline(workdir)
    if before is None and first_step == 0:
        generation = run_generation_eval(config, model, state.params, bundle)
        if generation is not None:
            before = {"kind": "generation_before", "accuracy": generation["accuracy"]}
            writer.write(0, {**before, "samples": generation["samples"]})
            log(f"before training: held-out {config.eval.match} match {generation['accuracy']:.3f}")

    # --- the step loop.
    bar = tqdm(
        total=steps,
        initial=first_step,
        disable=not config.train.progress_bar or jax.process_index() != 0,
        desc="train",
        dynamic_ncols=True,
    )
    interval_tokens, interval_start = 0.0, time.time()
    last_metrics: dict[str, float] = {}
    for step in range(first_step, steps):
        host_batch = next(bundle.train_iter)
        interval_tokens += float(np.sum(host_batch["segment_ids"] > 0)) * jax.process_count()
        state, metrics = train_step(state, place(host_batch))
        done = step + 1
        bar.update(1)
        if done % config.train.log_every == 0 or done == steps:
            last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = max(time.time() - interval_start, 1e-9)
            last_metrics["tokens_per_s"] = interval_tokens / elapsed
            last_metrics["epoch"] = done / bundle.train_iter.steps_per_epoch
            writer.write(done, last_metrics)
            bar.set_postfix(
                loss=f"{last_metrics['loss']:.4f}", tok_s=f"{last_metrics['tokens_per_s']:.0f}"
            )
            interval_tokens, interval_start = 0.0, time.time()
        eval_due = config.eval.every_steps and done % config.eval.every_steps == 0
        if eval_due and done < steps and bundle.eval_batches:
            result = evaluate_loss(eval_step, state.params, bundle.eval_batches, place)
            writer.write(done, result)
            bar.write(f"step {done}: eval_loss {result['eval_loss']:.4f}")
        if config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0:
            checkpointer.save(done, state, bundle.train_iter.get_state(), resolved)
    bar.close()

    # --- final evaluation, checkpoint and summary.
    checkpointer.save(steps, state, bundle.train_iter.get_state(), resolved)
    summary: dict[str, Any] = {"steps": steps, "train_loss": last_metrics.get("loss")}
    if bundle.eval_batches:
        result = evaluate_loss(eval_step, state.params, bundle.eval_batches, place)
        writer.write(steps, result)
        summary.update(result)
    generation = run_generation_eval(config, model, state.params, bundle)
    if generation is not None:
        writer.write(steps, {"kind": "generation_after", **generation})
        summary["accuracy_before"] = before["accuracy"] if before else None
        summary["accuracy_after"] = generation["accuracy"]
        summary["samples"] = generation["samples"]
        summary["generated"] = generation["n"]
    checkpointer.close()
    summary["wall_s"] = round(time.time() - start_time, 1)
    summary["data"] = bundle.stats
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    print_summary(summary, config)
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
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file (configs/*.py).",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,  # overrides are read from here, not from the global sys.argv
    )
    flags.DEFINE_string("workdir", None, "Output directory.", flag_values=flag_values)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            make_configs_importable(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(argv):
            make_configs_importable(argv[i + 1])
    try:
        flag_values(argv)
    except (flags.Error, AttributeError, KeyError, ValueError) as e:
        # ml_collections reports an unknown override key as AttributeError("... Did you mean ...").
        message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
        raise ConfigError(f"bad command-line flag: {message}") from e
    if config_flag.value is None or not flag_values.workdir:
        raise ConfigError("usage: python -m sft_jax.train --config configs/x.py --workdir DIR")
    return parse(config_flag.value), flag_values.workdir


def main(argv: list[str] | None = None) -> int:
    """Runs training; bad config or data ends with a one-line message and exit code 2."""
    try:
        config, workdir = load_config_from_flags(sys.argv if argv is None else argv)
        train_and_evaluate(config, workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
