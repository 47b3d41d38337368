"""Mixture-of-experts feed-forward layer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss; Gemma 4
beside its dense MLP), a drop-in for the dense `Mlp` of sft_jax/model/decoder.py: x [B, T, D]
in, y [B, T, D] out, plus router statistics.

Dimension letters as in decoder.py, plus E experts, K experts chosen per token (top-k), N = B * T
tokens and A = N * K (token, choice) assignments.

Design choices and why:
- Dropless routing with grouped matmuls: the A assignments are sorted by expert, so each expert's
  tokens are one contiguous block, and a grouped matmul (sft_jax/model/grouped_matmul.py:
  `jax.lax.ragged_dot` on TPU and GPU, a blocked scan on the CPU, whose ragged_dot is dense)
  multiplies every block by its own expert's weights. Work is proportional to N * K (not N * E,
  as dispatching every token to every expert would be), no token is dropped for capacity, and
  shapes stay static.
- Routing follows Hugging Face: logits in the compute dtype, softmax over experts in float32, top-k
  of the probabilities; `norm_topk_prob` renormalises the k weights to sum 1 (Qwen3-MoE, OLMoE
  with the flag, and Mixtral, whose softmax over the top-k logits is the same thing); without it
  (Qwen2-MoE, OLMoE by default) the raw probabilities weight the experts.
- gpt-oss adds biases to the router and to each expert's projections (added per grouped row,
  `GroupedRows.bias`) and replaces act(gate) * up by its clamped SwiGLU (`clamped_swiglu`).
- Gemma 4's router (`gemma4_router`) reads its input normalised and scaled, and scales each
  chosen expert's weight by a learned per-expert factor; its experts may read another input
  than the router (`MoeMlp`'s `expert_input`).
- Qwen2-MoE's shared expert is a dense gated MLP of its own width, scaled per token by
  sigmoid(shared_expert_gate(x)), added to the routed output.
- On a mesh (`MoeConfig.mesh`, as ModelConfig carries it) routing and the grouped matmuls run
  per device under shard_map over the token shards: each device sorts only its own tokens, where
  XLA alone would gather every token's top_k and sort onto every device and run every token
  through the experts there. Without an expert mesh axis the expert weights are gathered whole
  per layer, as FSDP gathers the dense MLP's.
- Expert parallelism (a mesh `expert` axis > 1 that the rules give the expert dimension): each
  device holds E / G experts of its group of G devices, and the assignments reach them by an
  all-gather of the group's tokens or by a ragged all-to-all (`MoeConfig.dispatch`); how, and
  when each moves less, is in sft_jax/model/expert_dispatch.py. Each expert's D and F
  dimensions are gathered whole on its devices at the shard_map boundary; their gradients are
  reduce-scattered back there.
- Tokens marked as padding by the mask still go through their experts (static shapes); they are
  left out of the router statistics only, as transformers leaves them out with its attention mask.
- The router statistics are returned, not applied: the train step decides how to weight the
  load-balancing and z losses. Per-expert counts and probability sums are returned as sums, so a
  model can combine its layers exactly as `transformers`' `load_balancing_loss_func` does (sum
  over layers, then normalise) with `load_balancing_loss`.

Parameter tree (names are load-bearing for the future HF loader and sharding rules):

    router/kernel [D, E]                                   ("embed", "expert")
    router/bias [E]                                        (router_bias: gpt-oss)
    experts/{gate_proj, up_proj} [E, D, F]                 ("expert", "embed", "mlp")
    experts/down_proj [E, F, D]                            ("expert", "mlp", "embed")
    experts/{gate_bias, up_bias [E, F], down_bias [E, D]}  (expert_bias: gpt-oss)
    shared_expert/{gate_proj, up_proj [D, Fs], down_proj [Fs, D]}/kernel   (shared expert only)
    shared_expert_gate/kernel [D, 1]                       (shared expert only)
    router_scale [D], per_expert_scale [E]                 (gemma4_router: Gemma 4)

HF's fused expert weights map as gate_up_proj [E, 2F, D] -> gate = [:, :F].T, up = [:, F:].T
(transposed to [E, D, F]) and down_proj [E, D, F] -> transposed to [E, F, D].

LoRA adapters of the experts (the "lora" collection, sft_jax/model/expert_lora.py) follow those
fused HF parameters, as PEFT adapts them: experts/gate_up_proj/{a [E, D, R], b [E, R, 2F]} and
experts/down_proj/{a [E, F, R], b [E, R, D]}, split over the expert axis like the kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sft_jax.lora.quant import Quantized, dequantize_array
from sft_jax.lora.tree import EXPERT_KERNELS
from sft_jax.model.config import ModelConfig, mesh_platform
from sft_jax.model.expert_dispatch import (
    all_to_all_dispatch,
    choose_dispatch,
    expert_parallel_axes,
    gather_dispatch,
    on_token_shards,
    token_gather_axes,
)
from sft_jax.model.expert_lora import ExpertLora, device_lora, rng_axes
from sft_jax.model.grouped_matmul import GroupedRows
from sft_jax.model.layers import ACTIVATIONS, INIT_STD, Einsum, named_param


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """The MoE layer's sizes and numerics (HF config field names where they exist)."""

    hidden_size: int  # D
    moe_intermediate_size: int  # F, each routed expert's width
    num_experts: int  # E
    num_experts_per_tok: int  # K
    norm_topk_prob: bool = False  # renormalise the K routing weights to sum 1
    shared_expert_intermediate_size: int = 0  # Fs; 0: no shared expert
    mlp_activation: str = "silu"
    # gpt-oss: a bias on the router, biases on every expert's gate, up and down projections,
    # and its clamped SwiGLU (`clamped_swiglu`) with this limit and alpha instead of
    # mlp_activation(gate) * up. None: the plain gated MLP.
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # Gemma 4's router (transformers' Gemma4TextRouter): it reads RMSNorm(x) without a scale,
    # times its own `router_scale` [D] and D^-0.5, and multiplies each chosen (renormalised)
    # weight by its expert's `per_expert_scale` [E]. `rms_norm_eps`: that norm's epsilon.
    gemma4_router: bool = False
    rms_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora_scale: float | None = None  # as ModelConfig: required when adapters are passed
    lora_dropout: float = 0.0  # dropout on the adapters' input, only with a "dropout" rng
    # The mesh the layer runs on and its logical-axis rules (config.mesh.rules), as in
    # ModelConfig: with more than one device each device routes its own tokens under shard_map.
    mesh: Any = None
    mesh_rules: tuple = ()
    # Under expert parallelism: how tokens reach their experts' devices (expert_dispatch.py):
    # auto | all_gather | all_to_all. Results never change.
    dispatch: str = "auto"

    @classmethod
    def of_model(cls, c: ModelConfig) -> MoeConfig:
        """The MoE layer's config for the layers of a decoder configured by `c`."""
        return cls(
            hidden_size=c.hidden_size,
            moe_intermediate_size=c.moe_intermediate_size,
            num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            norm_topk_prob=c.norm_topk_prob,
            shared_expert_intermediate_size=c.shared_expert_intermediate_size,
            mlp_activation=c.mlp_activation,
            router_bias=c.router_bias,
            expert_bias=c.expert_bias,
            swiglu_limit=c.swiglu_limit,
            swiglu_alpha=c.swiglu_alpha,
            gemma4_router=c.gemma4 is not None,
            rms_norm_eps=c.rms_norm_eps,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            mesh=c.mesh,
            mesh_rules=c.mesh_rules,
            lora_scale=c.lora_scale,
            lora_dropout=c.lora_dropout,
            dispatch=c.moe_dispatch,
        )

    @property
    def platform(self) -> str:
        """Where the layer is compiled for: its grouped matmuls differ on the CPU."""
        return mesh_platform(self.mesh)

    @property
    def clamp(self) -> tuple[float, float] | None:
        """(limit, alpha) of gpt-oss's clamped SwiGLU, or None for the plain gated MLP."""
        return None if self.swiglu_limit is None else (self.swiglu_limit, self.swiglu_alpha)

    def __post_init__(self) -> None:
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"[1, num_experts={self.num_experts}]"
            )


@flax.struct.dataclass
class MoeAux:
    """Router statistics of one layer, over the unmasked tokens (a pytree: passes through jit and
    scan).

    `expert_counts` [E] and `router_prob_sum` [E] are sums and `tokens` the unmasked token count,
    so several layers combine exactly as transformers does (see `load_balancing_loss`).
    """

    load_balancing_loss: jax.Array  # this layer's E * sum_e f_e * P_e
    z_loss: jax.Array  # mean over tokens of logsumexp(router logits)^2
    expert_counts: jax.Array  # [E] assignments per expert; sums to tokens * K
    router_prob_sum: jax.Array  # [E] sum over tokens of the softmax probabilities
    tokens: jax.Array  # number of unmasked tokens


def load_balancing_loss(
    expert_counts: jax.Array, router_prob_sum: jax.Array, tokens: jax.Array, num_experts: int
) -> jax.Array:
    """Switch/Mixtral load-balancing loss, E * sum_e f_e * P_e, as `transformers` computes it.

    f_e = assignments to e per token (sums to K, not 1: transformers divides the top-k counts by
    the token count) and P_e = mean router probability of e. Pass sums over layers (counts, prob
    sums and tokens each summed) to get transformers' multi-layer value, which normalises the
    totals rather than averaging per-layer losses.
    """
    tokens = jnp.maximum(tokens, 1.0)
    return num_experts * jnp.sum((expert_counts / tokens) * (router_prob_sum / tokens))


def combine_layers(stacked: MoeAux) -> tuple[jax.Array, jax.Array]:
    """(load-balancing loss, z-loss) of a whole model from its layers' statistics stacked along
    a leading layer axis: the load-balancing loss of all layers' assignments together, as
    transformers computes it from every layer's router logits at once, and the mean z-loss."""
    balance = load_balancing_loss(
        jnp.sum(stacked.expert_counts, axis=0),
        jnp.sum(stacked.router_prob_sum, axis=0),
        jnp.sum(stacked.tokens),
        stacked.expert_counts.shape[-1],
    )
    return balance, jnp.mean(stacked.z_loss)


def route(
    logits: jax.Array, k: int, norm_topk_prob: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(probs [..., E] float32, top-k weights [..., K] float32, top-k experts [..., K] int32)
    from logits [..., E].

    Softmax in float32 whatever the logits' dtype, top-k of the probabilities (the same choice as
    top-k of the logits), optionally renormalised: HF's TopKRouter classes. gpt-oss's router
    (a softmax over the top-k logits) is the renormalised case: the top-k probabilities divided
    by their sum are exactly that softmax.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts.astype(jnp.int32)


def router_aux(
    logits: jax.Array, probs: jax.Array, experts: jax.Array, mask: jax.Array | None
) -> MoeAux:
    """The router statistics over the tokens where `mask` [...] is true (all when None), from
    logits and probs [..., E] and the chosen experts [..., K] (any leading token dims).

    Padding tokens are still routed (static shapes), but must not count towards balance: they
    are excluded here, as transformers excludes them with the attention mask.
    """
    e = probs.shape[-1]
    w = jnp.ones(probs.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    tokens_axes = tuple(range(w.ndim))
    # A one-hot sum rather than bincount: a reduction, so XLA keeps it split over the token
    # shards (a scatter would gather every token's choices onto every device).
    one_hot = jax.nn.one_hot(experts, e, dtype=jnp.float32) * w[..., None, None]
    counts = jnp.sum(one_hot, axis=(*tokens_axes, w.ndim))
    prob_sum = jnp.sum(probs * w[..., None], axis=tokens_axes)
    tokens = jnp.sum(w)
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2
    z_loss = jnp.sum(z * w) / jnp.maximum(tokens, 1.0)
    return MoeAux(
        load_balancing_loss=load_balancing_loss(counts, prob_sum, tokens, e),
        z_loss=z_loss,
        expert_counts=counts,
        router_prob_sum=prob_sum,
        tokens=tokens,
    )


def grouped_swiglu(
    x: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    activation: Any = nn.silu,
    platform: str = "cpu",
    biases: tuple[jax.Array, ...] | None = None,
    clamp: tuple[float, float] | None = None,
    lora: ExpertLora | None = None,
) -> jax.Array:
    """Each token's K expert outputs, [N, K, D], from x [N, D] and its experts [N, K].
    `biases` (gate [E, F], up [E, F], down [E, D]) and `clamp` as in `_swiglu_groups`.

    The N * K assignments are sorted by expert (stable, so the order inside a group is the token
    order), the per-expert counts are the ragged_dot group sizes, and the outputs are put back in
    (token, choice) order by the inverse permutation: gathers, so gradients are scatter-adds.
    """
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # [A, D], grouped by expert
    ys = _swiglu_groups(
        xs, gate, up, down, group_sizes, activation, platform, biases, clamp, lora
    )  # [A, D]
    inverse = jnp.argsort(order)
    return jnp.take(ys, inverse, axis=0).reshape(n, k, -1)


def local_grouped_swiglu(
    x: jax.Array,
    local: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    activation: Any = nn.silu,
    platform: str = "cpu",
    biases: tuple[jax.Array, ...] | None = None,
    clamp: tuple[float, float] | None = None,
    lora: ExpertLora | None = None,
) -> jax.Array:
    """`grouped_swiglu` over this device's experts only: [N, K, D] from x [N, D] and each
    assignment's local expert index [N, K], zero for assignments whose index falls outside
    [0, E_local) (their experts live on other devices).

    Those assignments sort after the local groups. Rows past the last group are zeroed on the
    way in and out of the grouped matmuls, so neither their outputs nor their gradients depend
    on what a backend's ragged_dot leaves there.
    """
    n, k = local.shape
    e = gate.shape[0]
    flat = jnp.where((local >= 0) & (local < e), local, e).reshape(-1)  # e: another device's
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)
    grouped = (jnp.arange(n * k) < jnp.sum(group_sizes))[:, None]
    xs = jnp.where(grouped, jnp.take(x, order // k, axis=0), 0)
    ys = _swiglu_groups(xs, gate, up, down, group_sizes, activation, platform, biases, clamp, lora)
    ys = jnp.where(grouped, ys, 0)
    inverse = jnp.argsort(order)
    return jnp.take(ys, inverse, axis=0).reshape(n, k, -1)


def _swiglu_groups(
    xs: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    group_sizes: jax.Array,
    activation: Any,
    platform: str,
    biases: tuple[jax.Array, ...] | None = None,
    clamp: tuple[float, float] | None = None,
    lora: ExpertLora | None = None,
) -> jax.Array:
    """The gated MLP of each expert on its block of the grouped rows xs [A, D] -> [A, D], in
    one grouped layout for the three matmuls and their adapters
    (sft_jax/model/grouped_matmul.py). `biases`: each expert's gate [E, F], up [E, F] and down
    [E, D] biases (gpt-oss), None: none. `clamp`: (limit, alpha) of gpt-oss's clamped SwiGLU in
    place of activation(gate) * up. `lora`: the experts' adapters, None: none."""
    layout = GroupedRows.make(group_sizes, xs.shape[0], platform)
    xs = layout.enter(xs)
    g, u = layout.matmul(xs, gate), layout.matmul(xs, up)
    if lora is not None and "gate_up_proj" in lora.adapters:
        # One adapter over HF's fused gate_up_proj output [2F]: gate units first, then up.
        fused = lora.term(layout, "gate_up_proj", xs)
        g, u = g + fused[:, : gate.shape[-1]], u + fused[:, gate.shape[-1] :]
    if biases is not None:
        g, u = g + layout.bias(biases[0]), u + layout.bias(biases[1])
    h = activation(g) * u if clamp is None else clamped_swiglu(g, u, *clamp)
    y = layout.matmul(h, down)
    if lora is not None and "down_proj" in lora.adapters:
        y = y + lora.term(layout, "down_proj", h)
    if biases is not None:
        y = y + layout.bias(biases[2])
    return layout.leave(y)


def clamped_swiglu(gate: jax.Array, up: jax.Array, limit: float, alpha: float) -> jax.Array:
    """gpt-oss's expert activation (transformers' GptOssExperts): the gate clamped from above
    and the up projection on both sides at `limit`, then (up + 1) * gate * sigmoid(alpha *
    gate). The clamps bound the activations the experts were trained with."""
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


class Experts(nn.Module):
    """E gated MLPs stored as stacked kernels, applied to each token's chosen experts.

    With a "lora" collection holding "gate_up_proj" and/or "down_proj" adapters ({a, b} per
    expert, `ExpertLora`), adds them inside the grouped matmuls. A QLoRA base passes the kernels
    as `Quantized` codes: dequantised here, one layer at a time, and recomputed in the backward
    pass rather than saved.
    """

    config: MoeConfig

    @nn.compact
    def __call__(self, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
        """x [B, T, D], experts [B, T, K], weights [B, T, K] -> sum_k weights * expert_k(x)."""
        c = self.config
        e, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
        in_names, out_names = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        gate = self._kernel("gate_proj", (e, d, f), in_names)
        up = self._kernel("up_proj", (e, d, f), in_names)
        down = self._kernel("down_proj", (e, f, d), out_names)
        dt = jnp.dtype(c.dtype)
        activation = ACTIVATIONS[c.mlp_activation]
        tokens = (x.astype(dt), experts, weights.astype(dt))
        biases = ()
        if c.expert_bias:  # gpt-oss; HF initialises them to zero
            zeros = nn.initializers.zeros_init()
            b_in, b_out = ("expert", "mlp"), ("expert", "embed")
            biases = tuple(
                named_param(self, name, zeros, shape, names, c.param_dtype).astype(dt)
                for name, shape, names in (
                    ("gate_bias", (e, f), b_in),
                    ("up_bias", (e, f), b_in),
                    ("down_bias", (e, d), b_out),
                )
            )
        adapters, key = self._adapters(dt)
        ep = expert_parallel_axes(c)
        axes = rng_axes(c.mesh, c.mesh_rules, x.shape, ep)  # of the adapters' dropout
        gather = token_gather_axes(c, x.shape, ep) if ep else ()
        dispatch = choose_dispatch(c.dispatch, ep, gather, c, c.platform) if ep else None
        emulate = mesh_platform(c.mesh) == "cpu"  # the CPU cannot run ragged_all_to_all

        def per_device(x, experts, weights, gate, up, down, biases, adapters, key):
            lora = device_lora(c.lora_scale, c.lora_dropout, axes, adapters, key)
            weights_etc = dict(
                gate=gate, up=up, down=down, activation=activation, platform=c.platform,
                biases=biases or None, clamp=c.clamp, lora=lora,
            )  # fmt: skip
            local = functools.partial(local_grouped_swiglu, **weights_etc)
            if dispatch == "all_to_all":
                return all_to_all_dispatch(x, experts, weights, local, ep, len(gate), emulate)
            if dispatch == "all_gather":
                return gather_dispatch(x, experts, weights, local, ep, gather, len(gate))
            b, t, _ = x.shape
            ys = grouped_swiglu(x.reshape(b * t, d), experts.reshape(b * t, -1), **weights_etc)
            return jnp.sum(ys * weights.reshape(b * t, -1, 1), axis=1).reshape(b, t, d)

        kernel_spec = PartitionSpec(ep) if ep else None
        split = on_token_shards(
            per_device, c, x.shape, 3, 5, kernel_spec=kernel_spec, replicated_in=1
        )

        def run(tokens, kernels, biases, adapters, key):
            dense = [dequantize_array(k, dt) if isinstance(k, Quantized) else k for k in kernels]
            return split(*tokens, *[k.astype(dt) for k in dense], biases, adapters, key)

        if isinstance(gate, Quantized):  # keep only the codes for the backward, as Einsum does
            run = jax.checkpoint(run)
        return run(tokens, (gate, up, down), biases, adapters, key)

    def _kernel(self, name: str, shape: tuple[int, ...], names: tuple[str, ...]) -> Any:
        """A stacked expert kernel: the stored `Quantized` codes of a QLoRA base as they are,
        else the (created at init) parameter."""
        if self.has_variable("params", name):
            stored = self.get_variable("params", name)
            if isinstance(stored, Quantized):
                return stored
        init = nn.initializers.normal(INIT_STD)
        return named_param(self, name, init, shape, names, self.config.param_dtype)

    def _adapters(self, dt: Any) -> tuple[dict, jax.Array | None]:
        """The experts' adapters from the "lora" collection (cast to `dt`; {} without any) and
        the dropout key (training with lora_dropout only)."""
        names = [n for n in EXPERT_KERNELS if self.has_variable("lora", n)]
        if not names:
            return {}, None
        if self.config.lora_scale is None:
            raise ValueError(
                "LoRA adapters were passed for the experts but MoeConfig.lora_scale is unset: "
                "build the model config with sft_jax.training.state.lora_model_config"
            )
        cast = lambda ad: {k: ad[k].astype(dt) for k in ("a", "b")}
        adapters = {n: cast(self.get_variable("lora", n)) for n in names}
        training = self.config.lora_dropout > 0 and self.has_rng("dropout")
        return adapters, self.make_rng("dropout") if training else None


class SharedExpert(nn.Module):
    """Qwen2-MoE's always-on expert: a dense gated MLP scaled by sigmoid(shared_expert_gate(x))."""

    config: MoeConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        d, f = c.hidden_size, c.shared_expert_intermediate_size
        dt = {"dtype": c.dtype, "param_dtype": c.param_dtype}
        dt.update(lora_scale=c.lora_scale, lora_dropout=c.lora_dropout)  # LoRA targets them too
        gate = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **dt, name="gate_proj")(x)
        up = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **dt, name="up_proj")(x)
        hidden = ACTIVATIONS[c.mlp_activation](gate) * up
        return Einsum("BTF,FD->BTD", (f, d), ("mlp", "embed"), **dt, name="down_proj")(hidden)


class MoeMlp(nn.Module):
    """The MoE feed-forward layer: routed experts (plus the shared expert when configured)."""

    config: MoeConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, expert_input: jax.Array | None = None
    ) -> tuple[jax.Array, MoeAux]:
        """x [B, T, D], mask [B, T] (true for real tokens; None: all) -> (y [B, T, D], aux).
        `expert_input` [B, T, D]: what the experts read, when not x (Gemma 4 routes on its
        layer's residual stream and gives the experts their own pre-norm of it).

        The mask only affects the router statistics: every token gets its experts' output.
        """
        c = self.config
        d, e = c.hidden_size, c.num_experts
        dt = {"dtype": c.dtype, "param_dtype": c.param_dtype}
        router_bias = ("expert",) if c.router_bias else None  # gpt-oss
        router = Einsum(
            "BTD,DE->BTE", (d, e), ("embed", "expert"), router_bias, **dt, name="router"
        )
        logits = router(self._gemma4_router_input(x) if c.gemma4_router else x)
        routing = functools.partial(route, k=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob)
        probs, weights, experts = on_token_shards(routing, c, x.shape, 1, outs=3)(logits)
        if c.gemma4_router:
            ones = nn.initializers.ones_init()
            scale = named_param(self, "per_expert_scale", ones, (e,), ("expert",), c.param_dtype)
            weights = weights * jnp.take(scale.astype(jnp.float32), experts)
        y = Experts(c, name="experts")(
            x if expert_input is None else expert_input, experts, weights
        )
        if c.shared_expert_intermediate_size:
            shared = SharedExpert(c, name="shared_expert")(x)
            gate = Einsum("BTD,DO->BTO", (d, 1), ("embed", None), **dt, name="shared_expert_gate")
            y = y + jax.nn.sigmoid(gate(x)) * shared
        aux = router_aux(logits, probs, experts, mask)
        return y, aux

    def _gemma4_router_input(self, x: jax.Array) -> jax.Array:
        """Gemma 4's router input: RMSNorm(x) without a scale (statistics in float32), times
        `router_scale` [D] and D^-0.5, as Gemma4TextRouter computes it."""
        c = self.config
        ones = nn.initializers.ones_init()
        scale = named_param(self, "router_scale", ones, (c.hidden_size,), ("embed",), c.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.rms_norm_eps)
        dt = jnp.dtype(c.dtype)
        return normed.astype(dt) * scale.astype(dt) * jnp.asarray(c.hidden_size**-0.5, dt)
