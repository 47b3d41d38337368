"""Builds the sharded TrainState: parameters (random init or Hugging Face weights) and optimizer.

Parameters are never built whole on one device and then split: the model is traced abstractly
(`jax.eval_shape`), its logical axis names become shardings through the rules table, and then
either `jit(init, out_shardings=...)` creates each shard in place or the HF loader places each
tensor straight into its sharding. Optimizer state follows the parameter shardings.

With LoRA enabled the trainable `params` are the adapter tree (their optimizer state is the only
optimizer state) and `frozen` holds the base in `lora.base_dtype`, possibly quantised (QLoRA);
the base is re-read from `model.path` (or re-initialised from the seed) on every start, never
checkpointed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax import hf, lora, sharding
from sft_jax.config import ConfigError, LoraSection
from sft_jax.model import ModelConfig, Transformer
from sft_jax.step import TrainState


def init_key(seed: int) -> jax.Array:
    """Key for parameter init. RBG rather than threefry: on CPU, XLA compiles one threefry
    expansion per parameter, which made init of even a 2-layer model take seconds to compile."""
    return jax.random.key(seed, impl="rbg")


def _init_fn(model: Transformer):
    def init(rng: jax.Array) -> Any:
        tokens = jnp.zeros((1, 8), jnp.int32)
        return model.init(rng, tokens, tokens, jnp.ones_like(tokens))["params"]

    return init


def param_shardings(model: Transformer, mesh: Mesh, rules: Sequence) -> tuple[Any, Any]:
    """(abstract unboxed params, NamedSharding tree) for a model, without allocating weights."""
    boxed = jax.eval_shape(_init_fn(model), init_key(0))
    logical = nn.get_partition_spec(boxed)
    abstract = nn.unbox(boxed)
    return abstract, sharding.param_shardings(logical, abstract, mesh, rules)


def init_params(model: Transformer, model_path: str, mesh: Mesh, rules: Sequence, seed: int) -> Any:
    """Sharded parameters: loaded from `model_path` if set, else a seeded random init."""
    _, shardings = param_shardings(model, mesh, rules)
    if model_path:
        return hf.load_params(model_path, model.config, shardings)
    init = _init_fn(model)
    return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(init_key(seed))


def lora_model_config(model_config: ModelConfig, cfg: LoraSection) -> ModelConfig:
    """The model config whose Einsums apply adapters with this LoRA scale and dropout."""
    scale = lora.lora_scale(cfg.alpha, cfg.rank, cfg.rslora)
    return dataclasses.replace(model_config, lora_scale=scale, lora_dropout=cfg.dropout)


def adapter_shardings(adapters: Any, base: Any, mesh: Mesh) -> Any:
    """a follows its kernel's sharding on the input dims, b and m on the output dims."""

    def visit(ad: dict, p: dict, name: str) -> dict:
        if "a" not in ad:
            return {k: visit(v, p[k], k) for k, v in ad.items()}
        kernel = p["kernel"]
        specs = lora.adapter_specs(kernel.sharding.spec, kernel.ndim, lora.KERNELS[name][0])
        return {k: NamedSharding(mesh, PartitionSpec(*specs[k])) for k in ad}

    return visit(adapters, base, "")


def init_lora_adapters(base: Any, frozen: Any, cfg: LoraSection, mesh: Mesh, seed: int) -> Any:
    """Fresh adapters (A random, B zero, DoRA m = ||W||), or a PEFT adapter (`init_from`)
    checked against the config, placed in their shardings."""

    def make(params: Any, frozen: Any, rng: jax.Array) -> Any:
        adapters = lora.init_adapters(params, cfg.targets, cfg.rank, rng)
        # DoRA's m is the norm of the weight the forward sees (the stored, maybe rounded base),
        # so the model equals the base exactly at init.
        return lora.init_magnitudes(lora.dequantize(frozen), adapters) if cfg.dora else adapters

    rng = jax.random.PRNGKey(seed + 2)
    abstract = jax.eval_shape(make, base, frozen, rng)
    shardings = adapter_shardings(abstract, base, mesh)
    if not cfg.init_from:
        return jax.jit(make, out_shardings=shardings)(base, frozen, rng)
    flags = {"rank": cfg.rank, "alpha": cfg.alpha, "rslora": cfg.rslora, "dora": cfg.dora}
    try:
        adapters = lora.read_peft_adapter(cfg.init_from, base, **flags)
    except (ValueError, OSError) as e:
        raise ConfigError(f"lora.init_from: {e}") from e
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t)
    if shapes(adapters) != shapes(abstract):
        raise ConfigError(
            f"PEFT adapter {cfg.init_from} adapts other modules or shapes than config.lora "
            f"targets {cfg.targets} with rank {cfg.rank} on this model"
        )
    return jax.device_put(adapters, shardings)


def freeze_base(base: Any, cfg: LoraSection, mesh: Mesh) -> Any:
    """The frozen base: cast to `lora.base_dtype`, layer kernels quantised per `base_quant`
    (quantised leaves replicated, the rest keep their shardings)."""
    dtype = jnp.dtype(cfg.base_dtype)
    frozen = jax.jit(lambda p: lora.quantize_kernels(p, cfg.base_quant, dtype))(base)
    replicated = NamedSharding(mesh, PartitionSpec())
    is_q = lambda x: isinstance(x, lora.Quantized)
    return jax.tree.map(
        lambda x: jax.device_put(x, replicated) if is_q(x) else x, frozen, is_leaf=is_q
    )


def create_train_state(
    model_config: ModelConfig,
    model_path: str,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Sequence,
    seed: int,
    lora_cfg: LoraSection | None = None,
) -> tuple[TrainState, TrainState]:
    """Returns (state, state_shardings); the second has the same structure, with shardings.

    With `lora_cfg.enabled`: params = adapters, frozen = the base (see the module docstring).
    """
    model = Transformer(model_config)
    params = init_params(model, model_path, mesh, rules, seed)
    frozen = frozen_shardings = None
    if lora_cfg is not None and lora_cfg.enabled:
        frozen = freeze_base(params, lora_cfg, mesh)
        params = init_lora_adapters(params, frozen, lora_cfg, mesh, seed)
        frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
        model = Transformer(lora_model_config(model_config, lora_cfg))
    p_shardings = jax.tree.map(lambda x: x.sharding, params)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.follow_param_shardings(abstract_opt, params, p_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    put = lambda x: jax.device_put(x, replicated)
    state = TrainState(
        step=put(jnp.int32(0)),
        params=params,
        opt_state=opt_state,
        rng=put(jax.random.PRNGKey(seed + 1)),
        apply_fn=model.apply,
        tx=tx,
        frozen=frozen,
    )
    shardings = TrainState(
        step=replicated,
        params=p_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        apply_fn=model.apply,
        tx=tx,
        frozen=frozen_shardings,
    )
    return state, shardings
