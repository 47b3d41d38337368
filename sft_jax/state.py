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
import functools
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
    """Parameter init by tracing the model on a (1, 8) token batch. Attention there is the
    reference implementation: it has no parameters (the tree is the same whichever runs) and,
    unlike a fused kernel such as splash (sequence a multiple of 128), takes any length."""
    model = model.clone(config=dataclasses.replace(model.config, attention="reference"))

    def init(rng: jax.Array) -> Any:
        tokens = jnp.zeros((1, 8), jnp.int32)
        return model.init(rng, tokens, tokens, jnp.ones_like(tokens))["params"]

    return init


def abstract_boxed_params(model: Transformer) -> Any:
    """The parameter tree as ShapeDtypeStructs boxed with their logical axis names (nothing
    allocated; any attention implementation and mesh)."""
    return jax.eval_shape(_init_fn(model), init_key(0))


def param_shardings(model: Transformer, mesh: Mesh, rules: Sequence) -> tuple[Any, Any]:
    """(abstract unboxed params, NamedSharding tree) for a model, without allocating weights."""
    boxed = abstract_boxed_params(model)
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


@dataclasses.dataclass(frozen=True)
class LoraApply:
    """`apply_fn` of a LoRA state: the model's apply after moving the trained copies of saved
    modules (`lora.modules_to_save`) from the "lora" collection into "params". A frozen
    dataclass, so two states built alike compare equal (apply_fn is static in jit)."""

    model: Transformer

    def __call__(self, variables: dict, *args: Any, **kwargs: Any) -> Any:
        return self.model.apply(lora.apply_variables(variables), *args, **kwargs)


def adapter_shardings(adapters: Any, base: Any, mesh: Mesh) -> Any:
    """a follows its kernel's sharding on the input dims, b and m on the output dims; a saved
    module's trained copy follows its frozen leaf."""

    def visit(ad: dict, p: dict, name: str) -> dict:
        if "a" not in ad:
            return {k: visit(v, p[k], k) for k, v in ad.items() if k != lora.SAVED}
        kernel = p["kernel"]
        specs = lora.adapter_specs(kernel.sharding.spec, kernel.ndim, lora.KERNELS[name][0])
        return {k: NamedSharding(mesh, PartitionSpec(*specs[k])) for k in ad}

    out = visit(adapters, base, "")
    if lora.SAVED in adapters:
        table = lora.saved_module_table(base)
        leaf = lambda path: functools.reduce(lambda node, key: node[key], path, base)
        out[lora.SAVED] = {m: leaf(table[m][0]).sharding for m in adapters[lora.SAVED]}
    return out


def init_lora_adapters(base: Any, frozen: Any, cfg: LoraSection, mesh: Mesh, seed: int) -> Any:
    """Fresh adapters (A random, B zero, DoRA m = ||W||), or a PEFT adapter (`init_from`)
    checked against the config, placed in their shardings."""

    def make(params: Any, frozen: Any, rng: jax.Array) -> Any:
        adapters = lora.init_adapters(params, cfg.targets, cfg.rank, rng)
        # DoRA's m is the norm of the weight the forward sees (the stored, maybe rounded base),
        # so the model equals the base exactly at init.
        if cfg.dora:
            adapters = lora.init_magnitudes(lora.dequantize(frozen), adapters)
        return lora.add_saved_modules(params, adapters, cfg.modules_to_save)

    rng = jax.random.PRNGKey(seed + 2)
    try:
        abstract = jax.eval_shape(make, base, frozen, rng)
    except ValueError as e:
        raise ConfigError(f"lora.targets / lora.modules_to_save: {e}") from e
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
    """The frozen base: cast to `lora.base_dtype`, layer kernels quantised per `base_quant`.
    Every leaf keeps its kernel's sharding (quantised codes and scales: `quantized_specs`), so
    a QLoRA base is FSDP/tensor-sharded like a bf16 one and built shard by shard in place."""
    dtype = jnp.dtype(cfg.base_dtype)
    quantize = lambda p: lora.quantize_kernels(p, cfg.base_quant, dtype)
    is_q = lambda x: isinstance(x, lora.Quantized)

    def sharding_of(q: Any, leaf: jax.Array) -> Any:
        if not is_q(q):
            return leaf.sharding
        blocks = q.scales.shape[-1]
        specs = lora.quantized_specs(leaf.sharding.spec, leaf.ndim, blocks, dict(mesh.shape))
        put = lambda spec: NamedSharding(mesh, PartitionSpec(*spec))
        return q.replace(codes=put(specs["codes"]), scales=put(specs["scales"]))

    abstract = jax.eval_shape(quantize, base)
    shardings = jax.tree.map(sharding_of, abstract, base, is_leaf=is_q)
    return jax.jit(quantize, out_shardings=shardings)(base)


def create_train_state(
    model_config: ModelConfig,
    model_path: str,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Sequence,
    seed: int,
    lora_cfg: LoraSection | None = None,
    keep_reference: bool = False,
) -> tuple[TrainState, TrainState]:
    """Returns (state, state_shardings); the second has the same structure, with shardings.

    `keep_reference` (KL-to-base under full fine-tuning) keeps a separate copy of the initial
    parameters as `state.reference`: one more parameter-sized buffer per device.

    With `lora_cfg.enabled`: params = adapters, frozen = the base (see the module docstring).
    """
    model_config = sharding.pin_model_activations(model_config, mesh, rules)
    model = Transformer(model_config)
    params = init_params(model, model_path, mesh, rules, seed)
    apply_fn: Any = model.apply
    frozen = frozen_shardings = None
    if lora_cfg is not None and lora_cfg.enabled:
        frozen = freeze_base(params, lora_cfg, mesh)
        params = init_lora_adapters(params, frozen, lora_cfg, mesh, seed)
        frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
        apply_fn = LoraApply(Transformer(lora_model_config(model_config, lora_cfg)))
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
        apply_fn=apply_fn,
        tx=tx,
        frozen=frozen,
        reference=jax.tree.map(jnp.copy, params) if keep_reference and frozen is None else None,
    )
    shardings = TrainState(
        step=replicated,
        params=p_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        apply_fn=apply_fn,
        tx=tx,
        frozen=frozen_shardings,
        reference=None if state.reference is None else p_shardings,
    )
    return state, shardings
