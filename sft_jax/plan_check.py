"""The plan's check: XLA's own memory figure for the real train step, without allocating it.

`compiled_step_memory(config)` builds the TrainState abstractly (ShapeDtypeStructs carrying the
shardings training would give them: parameters from the rules table, Adam state following the
parameters, under LoRA the frozen base quantised and the adapters placed like
`sft_jax.state.create_train_state` places them), compiles `sft_jax.step.make_train_step` for an
abstract batch over the local devices, and reads `compiled.memory_analysis()`.

What is compared: XLA reports, per device, the argument bytes (state + batch), the output bytes
(new state + metrics), the part of the outputs aliased onto donated arguments (the state: the
step is jitted with donate_argnums=(0,)), and temporaries (gradients, activations kept for the
backward pass, optimizer intermediates). The step's peak is therefore

    argument + output - alias + temp

(argument + output + temp would count the donated state twice). The plan's total estimates the
same quantity: parameters + optimizer state + gradients + activations.

Validation (2026-11-22, 8 fake CPU devices on 2 shared cores, load average 9-16; memory figures
do not depend on load). Workload configs/bench/cpu_small.py (Llama-style, V 8192, D 256, 4
layers, 8 / 4 heads of 32, F 688, float32, batch 8 packed rows), ratio = plan total / XLA peak:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python -m sft_jax.plan --config configs/bench/cpu_small.py --devices 8 --check_compiled \
        --config.mesh.data=8 --config.model.remat=none --config.data.seq_len=256

    mesh (data, fsdp, tensor)  remat   seq 256   seq 512   seq 1024
    (8, 1, 1)                  none    0.98      0.97      1.00
    (8, 1, 1)                  full    1.08      1.10      1.15
    (2, 1, 4)                  none    0.99      1.06
    (2, 1, 4)                  full                        1.18
    (1, 8, 1)                  none    0.79      0.97      1.11
    (1, 8, 1)                  full    0.46      0.43      0.38   (*)
    (2, 2, 2)                  none    0.97      1.03      1.12
    (2, 2, 2)                  full    0.68      0.58      0.46   (*)

    at (8, 1, 1), seq 512: micro_batches 2 (batch 16) 0.93, loss_chunk 128 0.93, LoRA int8
    0.96, LoRA nf4 + remat full 1.02, bfloat16 compute and params 0.72 (**)

Spot checks 2026-12-02, after blocked attention's backward moved to transposed score blocks
and the plan began counting them (configs/tiny.py with V 2048, D 128, as tests/test_plan.py
builds it): (2, 1, 4) full seq 1024 0.74 (0.68 without the new term), (8, 1, 1) full 512 1.11,
(2, 1, 4) none 512 0.94, (8, 1, 1) none 256 0.96, (1, 8, 1) none 512 1.07.

(*) fsdp > 1 with remat=full: XLA's temporaries barely shrink with remat under FSDP (0.165 GiB
vs 0.170 without remat at (1, 8, 1), seq 512), so the plan is 2-2.6x low there; not yet
explained. The fsdp rows were 0.24-0.91 before the model pinned each layer's input and output to
the batch axes (model.pin_activations); XLA had kept every layer's activations for the whole
batch on every device.
(**) XLA:CPU computes bfloat16 elementwise work in float32, so its temporaries are larger than
a GPU's or TPU's; CPU is a proxy for float32 steps only. Before calibration the plan read 0.83
to 1.03 at (8, 1, 1) (it missed the backward's working set and miscounted the logits) and took
Adam's moments to be in the parameter dtype (half the bytes with bfloat16 parameters).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax import hf, lora, sharding
from sft_jax.config import Config
from sft_jax.data.pack import PACKED_KEYS
from sft_jax.model import ModelConfig, Transformer
from sft_jax.optim import make_optimizer, make_schedule
from sft_jax.state import LoraApply, adapter_shardings, lora_model_config, param_shardings
from sft_jax.step import StepOptions, TrainState, make_train_step

GIB = 1024**3


def _with(leaf: Any, s: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s)


def _abstract_lora(params: Any, cfg: Any, mesh: Mesh) -> tuple[Any, Any]:
    """(abstract frozen base, abstract adapters) placed as `create_train_state` places them."""
    quantize = lambda p: lora.quantize_kernels(p, cfg.base_quant, jnp.dtype(cfg.base_dtype))
    is_q = lambda x: isinstance(x, lora.Quantized)

    def place(q: Any, leaf: Any) -> Any:
        if not is_q(q):
            return _with(q, leaf.sharding)
        blocks = q.scales.shape[-1]
        specs = lora.quantized_specs(leaf.sharding.spec, len(leaf.shape), blocks, dict(mesh.shape))
        put = lambda a, spec: _with(a, NamedSharding(mesh, PartitionSpec(*spec)))
        return q.replace(codes=put(q.codes, specs["codes"]), scales=put(q.scales, specs["scales"]))

    frozen = jax.tree.map(place, jax.eval_shape(quantize, params), params, is_leaf=is_q)

    def make(p: Any, f: Any, rng: jax.Array) -> Any:
        adapters = lora.init_adapters(p, cfg.targets, cfg.rank, rng)
        if cfg.dora:
            adapters = lora.init_magnitudes(lora.dequantize(f), adapters)
        return lora.add_saved_modules(p, adapters, cfg.modules_to_save)

    adapters = jax.eval_shape(make, params, frozen, jax.random.PRNGKey(0))
    return frozen, jax.tree.map(_with, adapters, adapter_shardings(adapters, params, mesh))


def abstract_train_state(
    config: Config, mesh: Mesh, model_config: ModelConfig | None = None
) -> TrainState:
    """The TrainState training would build, as ShapeDtypeStructs with their shardings
    (`model_config`: the model of `config.model` unless given)."""
    model_config = model_config or hf.build_model_config(config.model)
    model_config = sharding.pin_model_activations(model_config, mesh, config.mesh.rules)
    model = Transformer(model_config)
    abstract, shardings = param_shardings(model, mesh, config.mesh.rules)
    params = jax.tree.map(_with, abstract, shardings)
    tx = make_optimizer(config.optim, 2, config.lora)
    apply_fn, frozen = model.apply, None
    if config.lora.enabled:
        frozen, params = _abstract_lora(params, config.lora, mesh)
        apply_fn = LoraApply(Transformer(lora_model_config(model_config, config.lora)))
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt = jax.eval_shape(tx.init, params)
    opt = jax.tree.map(_with, opt, sharding.follow_param_shardings(opt, params, param_sh, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=params,
        opt_state=opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
        apply_fn=apply_fn,
        tx=tx,
        frozen=frozen,
    )


def compile_abstract_step(config: Config, mesh: Mesh, state: TrainState) -> Any:
    """The train step compiled for an abstract state and batch (nothing allocated or run)."""
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules)
    step = make_train_step(
        jax.tree.map(lambda x: x.sharding, state),
        batch_sharding,
        options=StepOptions(config.train.micro_batches, config.model.loss_chunk),
        schedule=make_schedule(config.optim, 2),
    )
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
