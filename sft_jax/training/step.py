"""The train step: one pure function `train_step(state, batch) -> (state, metrics)`.

It is composed of named pieces, each tested alone:

    loss_fn        params, state, batch     -> (objective sum, LossParts)   one forward
    compute_grads  state, batch, options    -> summed grads and LossParts over M micro-batches
    apply_updates  state, grads             -> new state (optax), grad norm
    keep_if_finite finite, new, old         -> new state, or old params/optimizer when not finite

Normalisation happens once: the summed gradient is divided by the number of loss tokens in the
whole global batch, so M micro-batches of B/M rows give the same update as one batch of B rows,
and data parallelism gives the same update as one device. `make_train_step` jits the step once
with explicit in/out shardings and donates the old state.

Non-finite steps are skipped inside the step, never by optax.apply_if_finite (which applies a
non-finite update once its error budget is spent): when the loss or the gradient norm is NaN/Inf,
params and the whole optimizer state (moments and its update count, hence its learning-rate
schedule position) stay as they were, while `step` still advances. So a skipped step consumes its
batch and its rng slot, and the data order and step numbering of a run do not depend on whether a
step was skipped. The `learning_rate` metric is read from the optimizer's own count, so it is the
rate the update used even after skips. The host loop counts skips (sft_jax/training/faults.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from sft_jax.data.pack import PACKED_KEYS
from sft_jax.model.context_attention import reorder_for_context
from sft_jax.model.decoder import ROUTER_STATS
from sft_jax.model.moe import MoeAux, combine_layers
from sft_jax.model.regularize import kl_to_base
from sft_jax.training.loss import chunked_cross_entropy, masked_cross_entropy, resolve_loss_chunk
from sft_jax.training.sharding import context_shards
from sft_jax.training.state import TrainState

if TYPE_CHECKING:
    from sft_jax.config import Config
    from sft_jax.model.config import ModelConfig

Batch = dict[str, jax.Array]
NEFTUNE_STREAM = 1 << 29  # fold_in offset of the NEFTune rng, apart from dropout's


def model_variables(params: Any, frozen: Any) -> dict[str, Any]:
    """The variables to apply the model with: {"params": params}, or, under LoRA, the frozen
    base as "params" (quantised kernels stay quantised: each scanned layer dequantises its own,
    so the step never holds a dequantised copy of the whole base) and the adapters as "lora"."""
    if frozen is None:
        return {"params": params}
    return {"params": frozen, "lora": params}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The train step's static settings: Python values fixed at trace time, one compiled step
    per combination (the schedule, a function, is passed beside them)."""

    micro_batches: int = 1  # train.micro_batches: the batch is accumulated in this many pieces
    loss_chunk: int = 0  # resolved model.loss_chunk: > 0 computes the loss over pieces
    kl_coef: float = 0.0  # train.kl_to_base: weight of the KL to the base model in the objective
    context: int = 1  # the mesh's context axis: rows are permuted for it (make_train_step sets it)
    # A mixture-of-experts model: its router statistics are collected (metrics), and the
    # load-balancing and z losses weighted by these (train.router_aux_loss_coef, ...z_loss_coef).
    router_stats: bool = False
    router_aux_coef: float = 0.0
    router_z_coef: float = 0.0

    @classmethod
    def from_config(
        cls, config: Config, model: ModelConfig, *, rows_per_device: int, context: int = 1
    ) -> StepOptions:
        """The options of `config` for `model` in micro-batches of `rows_per_device` rows on each
        device, each holding 1 / `context` of every row (what an automatic model.loss_chunk is
        decided on)."""
        loss_chunk = resolve_loss_chunk(
            config.model.loss_chunk,
            rows=rows_per_device,
            seq_len=config.data.seq_len // context,
            vocab_size=model.vocab_size,
            kl_to_base=config.train.kl_to_base > 0,
        )
        aux_coef = config.train.router_aux_loss_coef
        return cls(
            micro_batches=config.train.micro_batches,
            loss_chunk=loss_chunk,
            kl_coef=config.train.kl_to_base,
            router_stats=model.is_moe,
            router_aux_coef=model.router_aux_loss_coef if aux_coef < 0 else aux_coef,
            router_z_coef=config.train.router_z_loss_coef,
        )


@flax.struct.dataclass
class LossParts:
    """What one forward measured besides the objective: sums over the (micro-)batch, so
    micro-batches add up (`jax.tree.map(jnp.add, ...)`)."""

    tokens: jax.Array  # loss tokens
    cross_entropy: jax.Array  # summed over the loss tokens
    kl: jax.Array  # summed KL to the base model (0 when off)
    router: RouterTotals | None = None  # a mixture-of-experts model's router statistics


@flax.struct.dataclass
class RouterTotals:
    """A mixture-of-experts model's router losses, weighted by loss tokens (so that micro-batches
    combine as the cross-entropy does), and its per-layer expert assignment counts."""

    balance: jax.Array  # loss tokens x the load-balancing loss over all layers
    z: jax.Array  # loss tokens x the router z-loss (mean over layers)
    expert_counts: jax.Array  # [L, E] (token, choice) assignments per layer and expert


def context_order(batch: Batch, context: int) -> Batch:
    """Every per-token array permuted along the sequence so that each of `context` devices gets
    an early and a late chunk of every row, balancing the causal work of ring attention
    (`reorder_for_context`). Masked sums over tokens (the loss, its count, token accuracy) do
    not change; the model is told each position's slot (`context_slots`) and masks by it."""
    if context == 1:
        return batch
    return {k: reorder_for_context(batch[k], context) for k in PACKED_KEYS}


def context_slots(length: int, context: int) -> jax.Array | None:
    """int [length]: the slot each position of a `context_order`ed row came from (None: rows in
    slot order). The same permutation for every row, so micro-batching needs no copy of it."""
    if context == 1:
        return None
    return reorder_for_context(jnp.arange(length)[None], context)[0]


def loss_fn(
    params: Any, state: TrainState, batch: Batch, rng: jax.Array, options: StepOptions
) -> tuple[jax.Array, LossParts]:
    """Summed objective of one (micro-)batch -> (sum, LossParts).

    The model is `state.apply_fn` applied with `params` (state.params is not read, so the
    differentiated copy is the only one used). The objective is the masked cross-entropy sum,
    plus `options.kl_coef` times the summed KL to the base model
    (sft_jax.model.regularize.kl_to_base) when it is > 0: the base is the frozen weights under LoRA,
    else `state.reference` (a copy of the initial parameters). A mixture-of-experts model adds
    loss tokens x (router_aux_coef x load-balancing loss + router_z_coef x z-loss), so that after
    the division by the loss tokens the objective is transformers' cross-entropy mean plus the
    weighted router losses. NEFTune noise, when the model config enables it, draws from the
    "neftune" rng stream passed here.

    Only `params` is differentiated: with LoRA the base weights in `state.frozen` are constants
    of the loss, so no weight-gradient matmul is ever formed for them. With `options.context` >
    1 the batch is in `context_order` and the model gets its slots. `options.loss_chunk` > 0
    computes the loss over pieces of that many positions
    (sft_jax.training.loss.chunked_cross_entropy), never holding the [B, T, V] logits; the result is
    the same up to float rounding.
    """
    apply_fn, frozen = state.apply_fn, state.frozen
    variables = model_variables(params, frozen)
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    slots = context_slots(batch["inputs"].shape[1], options.context)
    targets, mask = batch["targets"], batch["loss_mask"]
    rngs = {"dropout": rng, "neftune": jax.random.fold_in(rng, NEFTUNE_STREAM)}
    forward = functools.partial(_forward, apply_fn, variables, inputs, options, slots=slots)
    kl = jnp.float32(0.0)
    if options.loss_chunk <= 0:
        logits, router = forward(rngs=rngs)
        loss_sum, count = masked_cross_entropy(logits, targets, mask)
        if options.kl_coef > 0:
            base = {"params": frozen} if frozen is not None else {"params": state.reference}
            kl = kl_to_base(logits, apply_fn(base, *inputs, slots=slots), mask)  # no noise
    else:
        hidden, router = forward(rngs=rngs, return_hidden=True)
        # LM-head adapters (if targeted) draw dropout from their own key, the same for every piece.
        head_rng = jax.random.fold_in(rng, 1 << 30)
        logits_fn = lambda h: apply_fn(variables, h, method="logits", rngs={"dropout": head_rng})
        loss_sum, count = chunked_cross_entropy(
            logits_fn, hidden, targets, mask, options.loss_chunk, shards=options.context
        )
    objective = loss_sum + options.kl_coef * kl
    parts = LossParts(tokens=count, cross_entropy=loss_sum, kl=kl)
    if router is not None:
        balance, z_loss = combine_layers(router)
        totals = RouterTotals(count * balance, count * z_loss, router.expert_counts)
        objective += options.router_aux_coef * totals.balance + options.router_z_coef * totals.z
        parts = parts.replace(router=totals)
    return objective, parts


def _forward(
    apply_fn: Callable, variables: dict, inputs: tuple, options: StepOptions, **kwargs: Any
) -> tuple[jax.Array, MoeAux | None]:
    """The model applied to `inputs` -> (its output, the per-layer router statistics of a
    mixture-of-experts model, which it sows as intermediates; None for a dense model)."""
    if not options.router_stats:
        return apply_fn(variables, *inputs, **kwargs), None
    out, sown = apply_fn(variables, *inputs, mutable=["intermediates"], **kwargs)
    return out, sown["intermediates"][ROUTER_STATS][0]


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """[B, T] -> [M, B/M, T], micro-batch m taking rows m, m+M, m+2M, ...

    Strided rather than contiguous so that every device's local rows contribute to every
    micro-batch: with the batch sharded over devices, each micro-batch stays evenly sharded.
    """

    def split(x: jax.Array) -> jax.Array:
        rows = x.shape[0]
        return jnp.swapaxes(x.reshape(rows // micro_batches, micro_batches, *x.shape[1:]), 0, 1)

    return {k: split(batch[k]) for k in PACKED_KEYS}


def compute_grads(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    options: StepOptions,
    *,
    micro_batch_sharding: Any = None,
) -> tuple[Any, LossParts]:
    """Gradient of the summed objective with respect to `state.params`, accumulated over
    `options.micro_batches` micro-batches with a scan (constant memory) -> (grads, LossParts
    summed over the micro-batches). `micro_batch_sharding` (a batch-key -> sharding dict) pins
    each micro-batch's layout inside the scan."""
    params, micro_batches = state.params, options.micro_batches
    objective = functools.partial(loss_fn, state=state, options=options)
    value_and_grad = jax.value_and_grad(objective, has_aux=True)
    if micro_batches == 1:
        (_, parts), grads = value_and_grad(params, batch=batch, rng=rng)
        return grads, parts

    stacked = split_micro_batches(batch, micro_batches)
    zero = jnp.float32(0.0)
    parts_zero = LossParts(tokens=zero, cross_entropy=zero, kl=zero)
    if options.router_stats:  # the counts' [L, E] shape, from tracing one micro-batch's forward
        micro = jax.tree.map(lambda x: x[0], stacked)
        parts = jax.eval_shape(lambda: objective(params, batch=micro, rng=rng)[1])
        parts_zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), parts)

    def body(carry: tuple, micro: Batch) -> tuple[tuple, None]:
        grads_acc, parts_acc, index = carry
        if micro_batch_sharding is not None:
            micro = jax.lax.with_sharding_constraint(micro, micro_batch_sharding)
        (_, parts), grads = value_and_grad(params, batch=micro, rng=jax.random.fold_in(rng, index))
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        return (grads_acc, jax.tree.map(jnp.add, parts_acc, parts), index + 1), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, parts, _), _ = jax.lax.scan(body, (zeros, parts_zero, jnp.int32(0)), stacked)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, parts


def apply_updates(state: TrainState, grads: Any) -> tuple[TrainState, jax.Array]:
    """One optax update; returns the new state and the global norm of the (unclipped) gradient."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), grad_norm


def optimizer_count(opt_state: Any, fallback: jax.Array) -> jax.Array:
    """Updates the optimizer has applied (its schedule's count); `fallback` if it keeps none."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
    return counts[0] if counts else fallback


def keep_if_finite(finite: jax.Array, new: TrainState, old: TrainState) -> TrainState:
    """`new`, except that params and optimizer state stay `old`'s when `finite` is False."""
    select = lambda a, b: jnp.where(finite, a, b)
    return new.replace(
        params=jax.tree.map(select, new.params, old.params),
        opt_state=jax.tree.map(select, new.opt_state, old.opt_state),
    )


def train_step(
    state: TrainState,
    batch: Batch,
    loss_scale: jax.Array,
    *,
    options: StepOptions,
    schedule: optax.Schedule,
    micro_batch_sharding: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Pure step: grads of the summed loss / global loss tokens, then one optimizer update.

    `loss_scale` is a float32 scalar, 1.0 except under fault injection (NaN), which scales loss
    and gradients; x * 1.0 == x exactly, so it leaves normal runs bitwise unchanged. A step whose
    loss or gradient norm is not finite is skipped (see the module docstring); metrics report
    `nonfinite` (1.0 for a skipped step).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    batch = context_order(batch, options.context)  # once, before micro-batches split the rows
    grads, parts = compute_grads(
        state, batch, rng, options, micro_batch_sharding=micro_batch_sharding
    )
    count = parts.tokens
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denominator.astype(g.dtype) * loss_scale, grads)
    loss = parts.cross_entropy / denominator * loss_scale
    learning_rate = schedule(optimizer_count(state.opt_state, state.step))
    updated, grad_norm = apply_updates(state, grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {
        "loss": loss,
        "loss_tokens": count,
        "real_tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        "learning_rate": jnp.asarray(learning_rate, jnp.float32),
        "grad_norm": grad_norm,
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    if options.kl_coef > 0:  # the gradient includes kl_coef * kl; "loss" stays the cross-entropy
        metrics["kl_to_base"] = parts.kl / denominator
    if parts.router is not None:
        metrics.update(router_metrics(parts.router, denominator))
    return keep_if_finite(finite, updated, state), metrics


def router_metrics(totals: RouterTotals, loss_tokens: jax.Array) -> dict[str, jax.Array]:
    """The router's health: its losses (before their weights), each expert's share of all
    assignments ([E], summed over layers: uniform is 1 / E), and the most and least loaded
    expert of any layer relative to that layer's mean (1 and 1: balanced; a max near E or a min
    of 0: collapse onto a few experts, or experts no token reaches)."""
    counts = totals.expert_counts  # [L, E]
    per_layer_mean = jnp.maximum(jnp.mean(counts, axis=-1, keepdims=True), 1e-9)
    relative = counts / per_layer_mean
    return {
        "router_balance_loss": totals.balance / loss_tokens,
        "router_z_loss": totals.z / loss_tokens,
        "expert_load": jnp.sum(counts, axis=0) / jnp.maximum(jnp.sum(counts), 1e-9),
        "expert_load_max": jnp.max(relative),
        "expert_load_min": jnp.min(relative),
    }


def make_train_step(
    state_shardings: Any,
    batch_sharding: NamedSharding,
    *,
    options: StepOptions,
    schedule: optax.Schedule,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, batch, loss_scale)` jitted once, with explicit shardings, donating the
    incoming state: XLA writes the new params and optimizer state into the old buffers (input
    output aliasing), so a step holds one copy of the state, not two. Pass
    `loss_scale=np.float32(1.0)` unless injecting a fault. `options`: usually
    `sft_jax.training.train_setup.step_options(config, mesh, vocab_size)`; its `context` is
    the mesh's."""
    options = dataclasses.replace(options, context=context_shards(batch_sharding.mesh))
    replicated = NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    batch_shardings = {k: batch_sharding for k in PACKED_KEYS}

    def step(
        state: TrainState, batch: Batch, loss_scale: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        return train_step(
            state,
            batch,
            loss_scale,
            options=options,
            schedule=schedule,
            micro_batch_sharding=batch_shardings if options.micro_batches > 1 else None,
        )

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
