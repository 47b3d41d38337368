"""Builds the sharded TrainState: parameters (random init or Hugging Face weights) and optimizer.

Parameters are never built whole on one device and then split: the model is traced abstractly
(`jax.eval_shape`), its logical axis names become shardings through the rules table, and then
either `jit(init, out_shardings=...)` creates each shard in place or the HF loader places each
tensor straight into its sharding. Optimizer state follows the parameter shardings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax import hf, sharding
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


def create_train_state(
    model_config: ModelConfig,
    model_path: str,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Sequence,
    seed: int,
) -> tuple[TrainState, TrainState]:
    """Returns (state, state_shardings); the second has the same structure, with shardings."""
    model = Transformer(model_config)
    params = init_params(model, model_path, mesh, rules, seed)
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
    )
    shardings = TrainState(
        step=replicated,
        params=p_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        apply_fn=model.apply,
        tx=tx,
    )
    return state, shardings
