"""Setup of a training run: config resolution, preflight, data, model and train state, restore
and the evaluator, bundled into the `Run` the loop sections of sft_jax/train.py share.

Its own module because it is one concept with one contract, kept apart from the step loop and the
end of a run: everything that fails on bad input (config, data, model files, a busy or unwritable
workdir) fails here, before compute, so a run that leaves `setup` only fails from faults.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import jax
import numpy as np

from sft_jax import console, data, hf, paths
from sft_jax.config import Config, ConfigError, to_dict
from sft_jax.console import log
from sft_jax.data.pack import PACKED_KEYS
from sft_jax.data.pipeline import format_stats, padding_line
from sft_jax.evaluation.eval_loop import Evaluator
from sft_jax.evaluation.evaluate import general_text_batches
from sft_jax.model.decoder import ModelConfig, Transformer, count_params
from sft_jax.training import preflight, sharding
from sft_jax.training.checkpoint import Checkpointer
from sft_jax.training.faults import FaultInjector
from sft_jax.training.metrics import MetricsWriter, import_wandb
from sft_jax.training.optim import make_schedule, schedule_change, schedule_steps
from sft_jax.training.run_state import LoopState, Run, next_run_number
from sft_jax.training.state import StateSpec, TrainState, create_train_state
from sft_jax.training.step import StepOptions, make_train_step


def total_steps(config: Config, steps_per_epoch: int) -> int:
    return schedule_steps(config.train.max_steps, config.train.epochs, steps_per_epoch)


def make_placer(batch_sharding: jax.sharding.NamedSharding):
    """Host numpy batch (this process's rows) -> global jax arrays with the batch sharding."""

    def place(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(batch_sharding, batch[k]) for k in PACKED_KEYS
        }

    return place


def print_data_stats(stats: dict[str, Any], steps: int, per_epoch: int) -> None:
    line = f"data: {format_stats(stats)}; {padding_line(stats)}"
    log(textwrap.fill(line, 100, subsequent_indent="  ", break_on_hyphens=False))
    log(f"schedule: {steps} steps ({per_epoch} steps per epoch)")


def step_options(config: Config, mesh: jax.sharding.Mesh, model: ModelConfig) -> StepOptions:
    """The step's static options for `config` and `model` on `mesh`: an automatic
    model.loss_chunk is decided on one device's micro-batch (global rows / micro-batches / batch
    shards, each row's sequence split over the context axis)."""
    shards = sharding.batch_shards(mesh, config.mesh.rules)
    micro = config.train.global_batch_size // config.train.micro_batches
    rows = -(-micro // shards)
    return StepOptions.from_config(
        config, model, rows_per_device=rows, context=sharding.context_shards(mesh)
    )


def make_step_from_config(
    config: Config, shardings: TrainState, mesh: jax.sharding.Mesh, steps: int, model: ModelConfig
) -> Any:
    """The jitted train step of `config` for `model` in a state placed as `shardings`, its
    schedule stretched over `steps`: the one place training, the benchmark and the compile
    checks make it (micro-batches, chunked loss, KL to the base, router losses)."""
    return make_train_step(
        shardings,
        sharding.batch_sharding(mesh, config.mesh.rules),
        options=step_options(config, mesh, model),
        schedule=make_schedule(config.optim, steps),
    )


def build_state(
    config: Config, mesh: jax.sharding.Mesh, bundle: data.DataBundle, steps: int
) -> tuple[Transformer, Any, Any]:
    """The model and its fresh (initialised or loaded) train state -> (model, state, shardings)."""
    spec = StateSpec.from_config(config, None, mesh, steps)
    if len(bundle.tokenizer) > spec.model_config.vocab_size:
        raise ConfigError(
            f"tokenizer has {len(bundle.tokenizer)} tokens but the model's vocab_size is "
            f"{spec.model_config.vocab_size}"
        )
    state, shardings = create_train_state(spec)
    trainable = "" if state.frozen is None else " trainable (LoRA adapters)"
    millions = count_params(state.params) / 1e6
    log(f"model: {millions:.3f}M{trainable} parameters on mesh {dict(mesh.shape)}")
    return spec.model, state, shardings


def restore(
    checkpointer: Checkpointer,
    state: Any,
    shardings: Any,
    bundle: data.DataBundle,
    config: Config,
    steps: int,
) -> tuple[Any, LoopState]:
    """The latest committed checkpoint, if any, with its data position and loop counters; warns
    when the run's length changed since that checkpoint (the schedule is re-stretched)."""
    committed = checkpointer.committed_steps()
    if committed:
        saved = checkpointer.saved_config(committed[-1])
        check_adapters_unchanged(saved, config)
        if change := model_path_change(saved, config):
            console.warn(change)
    restored = checkpointer.restore_latest(state, shardings)
    if restored is None:
        return state, LoopState()
    step, state, data_state, loop_values = restored
    bundle.train_iter.set_state(data_state)
    log(f"resumed from checkpoint at step {step}")
    planned = checkpointer.planned_steps(step, bundle.train_iter.steps_per_epoch)
    if change := schedule_change(config.optim, planned, steps, step):
        console.warn(change)
    return state, LoopState.from_dict(loop_values)


# The adapter keys a resumed run must keep: alpha and rslora change no shape, so a checkpoint
# restored under new values silently continued at another scale; the rest fail the restore with
# a tree or shape mismatch, which this names as the key that changed.
ADAPTER_KEYS = (
    "enabled",
    "method",
    "rank",
    "alpha",
    "rslora",
    "dora",
    "targets",
    "modules_to_save",
)


def check_adapters_unchanged(saved: dict[str, Any], config: Config) -> None:
    """ConfigError naming each `lora` key whose value differs from the checkpoint's config."""
    before = saved.get("lora")
    if not isinstance(before, dict) or not (before.get("enabled") or config.lora.enabled):
        return
    now = to_dict(config)["lora"]
    changed = [
        f"lora.{key} was {before[key]!r}, now {now[key]!r}"
        for key in ADAPTER_KEYS
        if key in before and _plain(before[key]) != _plain(now[key])
    ]
    if changed:
        raise ConfigError(
            f"cannot resume: {'; '.join(changed)} since the last checkpoint. Resume with the "
            "checkpoint's adapter settings, or start a new workdir (export this run and "
            "fine-tune the export to build on it)"
        )


def model_path_change(saved: dict[str, Any], config: Config) -> str | None:
    """The warning for a resume whose model.path differs from the checkpoint's, else None.

    Not an error: a workdir copied to another machine legitimately names the same model under
    another absolute path. But a different base model under the checkpoint's weights or adapters
    is a silent mix-up, so the run says which two paths it saw."""
    before = saved.get("model", {}).get("path") if isinstance(saved.get("model"), dict) else None
    now = config.model.path
    if not before or before == now:
        return None
    return (
        f"model.path was {before!r} when the last checkpoint was saved, now {now!r}; resuming "
        "anyway. If the model only moved this is fine; if it is another model, start a new "
        "workdir"
    )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def setup(config: Config, workdir: str) -> tuple[Run, Any]:
    """Preflight, data, model, state and restore: everything that fails on bad input fails here,
    before compute. Returns the run and its (possibly restored) train state."""
    config = hf.absolute_local_paths(config)  # config.json must work from any directory
    mesh = preflight.run(config, workdir)
    if config.logging.wandb:  # a missing wandb fails before data and compute
        import_wandb()
    bundle = data.prepare_data(config, cache_dir=paths.join(workdir, "data_cache"))
    general = general_text_batches(config, bundle.tokenizer)  # bad files fail here, like data
    steps = total_steps(config, bundle.train_iter.steps_per_epoch)
    print_data_stats(bundle.stats, steps, bundle.train_iter.steps_per_epoch)
    if general:
        log(f"general text: {len(general)} eval batches from {config.eval.general_text_files}")
    model, state, shardings = build_state(config, mesh, bundle, steps)
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules)
    c = config.checkpoint
    checkpointer = Checkpointer(
        workdir, keep=c.keep, keep_best=c.keep_best, async_save=c.async_save
    )
    state, loop = restore(checkpointer, state, shardings, bundle, config, steps)
    writer = MetricsWriter(workdir, logging=config.logging, run_config=to_dict(config))
    run_number = next_run_number(workdir)
    place = make_placer(batch_sharding)
    evaluator = Evaluator.build(
        config, model, mesh, batch_sharding, bundle, general, place, writer, run_number, workdir
    )
    run = Run(
        config=config,
        workdir=workdir,
        steps=steps,
        shardings=shardings,
        bundle=bundle,
        train_step=make_step_from_config(config, shardings, mesh, steps, model.config),
        evaluator=evaluator,
        checkpointer=checkpointer,
        writer=writer,
        resolved=to_dict(config),
        loop=loop,
        run_number=run_number,
        faults=FaultInjector(config.faults),
        place=place,
    )
    if jax.process_index() == 0:
        paths.write_text(paths.join(workdir, "config.json"), json.dumps(run.resolved, indent=2))
    return run, state
