"""The plan's check: XLA's own memory figure for the real train step, without allocating it.

`compiled_step_memory(config)` takes the TrainState training would build, abstractly
(`sft_jax.training.state.state_layout`: ShapeDtypeStructs carrying the shardings training gives
them, the frozen LoRA base and KL-to-base's reference copy included), compiles the step training
makes (`sft_jax.training.train_setup.make_step_from_config`) for an abstract batch over the local
devices, and reads `compiled.memory_analysis()`.

What is compared: XLA reports, per device, the argument bytes (state + batch), the output bytes
(new state + metrics), the part of the outputs aliased onto donated arguments (the state: the
step is jitted with donate_argnums=(0,)), and temporaries (gradients, activations kept for the
backward pass, optimizer intermediates). The step's peak is therefore

    argument + output - alias + temp

(argument + output + temp would count the donated state twice). The plan's total estimates the
same quantity: parameters + reference copy + optimizer state + gradients + activations.

Why this exists: the plan's activation term is an estimate, calibrated against this figure and
checked with it (`python -m sft_jax.plan ... --check_compiled`). The measured ratios, with the
command that gives them, are in docs/benchmarks.md ("Memory plan against XLA"). Two known
limits: under FSDP with remat=full XLA's temporaries barely shrink with remat, so the plan reads
low there (not yet explained); and XLA:CPU computes bfloat16 elementwise work in float32, so its
temporaries are larger than a GPU's or TPU's: CPU is a proxy for float32 steps only.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sft_jax import hf
from sft_jax.config import Config
from sft_jax.data.pack import PACKED_KEYS
from sft_jax.model.decoder import ModelConfig
from sft_jax.training import sharding
from sft_jax.training.state import StateSpec, TrainState, state_layout
from sft_jax.training.train_setup import make_step_from_config

GIB = 1024**3
# The schedule's length changes neither the state nor the step's buffers.
SCHEDULE_STEPS = 2


def abstract_train_state(
    config: Config, mesh: Mesh, model_config: ModelConfig | None = None
) -> TrainState:
    """The TrainState training would build, as ShapeDtypeStructs with their shardings
    (`model_config`: the model of `config.model` unless given)."""
    return state_layout(StateSpec.from_config(config, model_config, mesh, SCHEDULE_STEPS))


def compile_abstract_step(
    config: Config, mesh: Mesh, state: TrainState, model_config: ModelConfig | None = None
) -> Any:
    """The train step compiled for an abstract state and batch (nothing allocated or run);
    `model_config`: the model `state` was laid out for, that of `config.model` unless given."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    model_config = model_config or hf.build_model_config(config.model)
    step = make_step_from_config(config, shardings, mesh, SCHEDULE_STEPS, model_config)
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules)
    shape = (config.train.global_batch_size, config.data.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, np.bool_ if k == "loss_mask" else np.int32,
                                sharding=batch_sharding)
        for k in PACKED_KEYS
    }  # fmt: skip
    return step.lower(state, batch, np.float32(1.0)).compile()


def compiled_step_memory(config: Config) -> dict[str, int]:
    """XLA's per-device memory analysis of the compiled train step (see the module docstring),
    with `peak` = argument + output - alias + temp. Nothing is allocated or run."""
    mesh = sharding.make_mesh(config.mesh)
    return memory_figures(compile_abstract_step(config, mesh, abstract_train_state(config, mesh)))


def memory_figures(compiled: Any) -> dict[str, int]:
    """Per-device argument, output, alias and temp bytes of a compiled step, and their `peak`
    (argument + output - alias + temp: the donated state is not counted twice)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise ValueError(f"XLA reports no memory analysis on {jax.default_backend()}")
    names = ("argument", "output", "alias", "temp")
    out = {n: int(getattr(analysis, f"{n}_size_in_bytes")) for n in names}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def compare(config: Config, planned: dict[str, Any]) -> dict[str, Any]:
    """XLA's figures for `config` on the local devices beside the plan `planned` made for them."""
    if planned["devices"] != jax.device_count():
        raise ValueError(
            f"--check_compiled compiles on the {jax.device_count()} local devices; plan for "
            f"them (--devices {jax.device_count()}), not for {planned['devices']}"
        )
    compiled = compiled_step_memory(config)
    return {
        **compiled,
        "plan": planned["total_bytes"],
        "ratio": planned["total_bytes"] / compiled["peak"],
    }


def format_comparison(c: dict[str, Any]) -> str:
    gib = lambda x: f"{x / GIB:.3f} GiB"
    return (
        f"  compiled step (XLA, {jax.device_count()} x {jax.devices()[0].device_kind}): "
        f"{gib(c['peak'])} per device = arguments {gib(c['argument'])} + outputs "
        f"{gib(c['output'])} - donated {gib(c['alias'])} + temporaries {gib(c['temp'])}; "
        f"plan / XLA = {c['ratio']:.2f}"
    )
