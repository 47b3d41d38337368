"""The decoder's sub-layers (sft_jax/model/decoder.py composes them into layers): the token
embedding, grouped-query attention, the gated MLP, the RMSNorm each is built with, and how an
activation is pinned to the mesh. Kept apart so the decoder module holds only the layer stack
(scan, cache, heads); the design notes and the parameter tree are in decoder.py's docstring."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax.model.attention import (
    AttentionOptions,
    apply_rope,
    attend,
    resolve_implementation,
)
from sft_jax.model.config import ModelConfig
from sft_jax.model.layers import ACTIVATIONS, INIT_STD, Einsum, RMSNorm, named_param
from sft_jax.model.prefix import PREFIX_K, PREFIX_V, prefix_attention
from sft_jax.model.wide_einsum import wide_einsum

# Per-layer activation checkpointing (ModelConfig.remat). "dots" saves the projection outputs
# (matmuls without batch dims) and recomputes attention scores; "dots_saveable" also saves the
# batched attention dots.
CHECKPOINT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}

# --------------------------------------------------------------------------------------------
# Modules.


def rms_norm(c: ModelConfig, names: tuple[str, ...], name: str | None = None) -> RMSNorm:
    return RMSNorm(
        c.rms_norm_eps,
        names,
        c.dtype,
        c.param_dtype,
        c.norm_offset,
        c.norm_scale_float32,
        name=name,
    )


class Embed(nn.Module):
    """Token embedding; `attend` is the tied LM head (h @ embedding.T)."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        shape = (c.vocab_size, c.hidden_size)
        init = nn.initializers.normal(INIT_STD)
        self.embedding = named_param(
            self, "embedding", init, shape, ("vocab", "embed"), c.param_dtype
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.config.dtype)  # [B, T, D]
        if self.config.embed_scale:  # Gemma; HF rounds sqrt(D) to the activation dtype first
            x = x * jnp.asarray(self.config.hidden_size**0.5, dtype=self.config.dtype)
        return x

    def attend(self, x: jax.Array) -> jax.Array:
        table = self.embedding.astype(self.config.dtype)
        return wide_einsum("BTD,VD->BTV", x, table, jnp.float32)


def cpu_grad(c: ModelConfig, in_layers: bool = True) -> bool:
    """Projections take their weight gradient as one matmul over x^T on the CPU (why, and why
    only there: sft_jax/model/cpu_linear.py). In the layers only with remat none or full: the custom
    VJP hides a projection from the dots / dots_saveable policies, which would then recompute
    it instead of saving it (full remat saves nothing in a layer anyway)."""
    if in_layers and c.remat not in ("none", "full"):
        return False
    return c.platform == "cpu"


def einsum_fields(c: ModelConfig) -> dict[str, Any]:
    """The Einsum settings every block projection shares."""
    return {
        "dtype": c.dtype,
        "param_dtype": c.param_dtype,
        "lora_scale": c.lora_scale,
        "lora_dropout": c.lora_dropout,
        "cpu_grad": cpu_grad(c),
    }


def attention_options(c: ModelConfig, seq_len: int | None) -> AttentionOptions:
    """How a layer attends: `c.attention` resolved for this platform and `seq_len` (training and
    prefill), or, decoding over a cache (`seq_len` None, T != S), the plain masked reference."""
    impl = "reference"
    if seq_len is not None:
        impl = resolve_implementation(
            c.attention,
            platform=c.platform,
            dtype=c.dtype,
            head_dim=c.head_dim,
            softcap=c.attn_softcap,
            seq_len=seq_len,
            context=_context_shards(c),
            sinks=c.attention_sinks,
        )
    return AttentionOptions(
        implementation=impl,
        scale=None if c.query_scale is None else c.query_scale**-0.5,
        softcap=c.attn_softcap,
        window=c.sliding_window if c.has_local_layers else None,
        mesh=c.mesh,
        rules=c.mesh_rules,
    )


def _context_shards(c: ModelConfig) -> int:
    """How many devices split each row's sequence (the mesh's context axis; 1 without one)."""
    return 1 if c.mesh is None else int(dict(c.mesh.shape).get("context", 1))


class Attention(nn.Module):
    """Grouped-query self-attention with optional q/k/v bias (Qwen2), o_proj bias and attention
    sinks (gpt-oss), and q/k RMSNorm (per head: Qwen3, Gemma 3; over all heads: OLMoE). With a
    `cache` (k, v [B, S, K, H]) the new keys and values are written at slot `index` and the
    queries attend over the whole cache; the updated cache is returned."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        cos: jax.Array,
        sin: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        local: jax.Array | None = None,
        slots: jax.Array | None = None,
    ):
        c = self.config
        d, n, kv, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dt = einsum_fields(c)
        q_bias = ("heads", "head_dim") if c.attention_bias else None
        kv_bias = ("kv_heads", "head_dim") if c.attention_bias else None
        q_names, kv_names = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q_width = 2 * h if c.attn_output_gate else h  # Qwen3.5: per head the query, then a gate
        q = Einsum("BTD,DNH->BTNH", (d, n, q_width), q_names, q_bias, **dt, name="q_proj")(x)
        gate = None
        if c.attn_output_gate:
            q, gate = jnp.split(q, 2, axis=-1)
        k = Einsum("BTD,DKH->BTKH", (d, kv, h), kv_names, kv_bias, **dt, name="k_proj")(x)
        v = Einsum("BTD,DKH->BTKH", (d, kv, h), kv_names, kv_bias, **dt, name="v_proj")(x)
        if c.qk_norm and c.qk_norm_full:  # OLMoE: one RMSNorm over all heads, before RoPE.
            b, t = x.shape[:2]
            q = rms_norm(c, ("heads",), name="q_norm")(q.reshape(b, t, n * h)).reshape(b, t, n, h)
            k = rms_norm(c, ("kv_heads",), name="k_norm")(k.reshape(b, t, kv * h)).reshape(
                b, t, kv, h
            )
        elif c.qk_norm:  # Qwen3 / Gemma 3: per-head RMSNorm over H, before RoPE.
            q = rms_norm(c, ("head_dim",), name="q_norm")(q)
            k = rms_norm(c, ("head_dim",), name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            cache = (k, v)
        seq_len = None if cache is not None else q.shape[1]
        options = attention_options(c, seq_len)
        sinks = None
        if c.attention_sinks:  # gpt-oss; HF initialises them as weights (normal, std 0.02)
            init = nn.initializers.normal(INIT_STD)
            sinks = named_param(self, "sinks", init, (n,), ("heads",), c.param_dtype)
        held = [n for n in ("lora", "params") if self.has_variable(n, PREFIX_K)]
        if held and c.has_local_layers:  # HF's window would let the prefix slide out
            raise ValueError("prefix and prompt tuning on sliding-window layers is not supported")
        if held:  # prefix / prompt tuning's per-layer K/V (sft_jax/model/prefix.py)
            prefix = (self.get_variable(held[0], PREFIX_K), self.get_variable(held[0], PREFIX_V))
            out = prefix_attention(q, k, v, mask, prefix, options, sinks)
        else:
            out = attend(
                q, k, v, mask, options, segment_ids=segment_ids, local=local, slots=slots,
                sinks=sinks,
            )  # fmt: skip
        if gate is not None:
            out = out * jax.nn.sigmoid(gate.astype(out.dtype))
        o_names = ("heads", "head_dim", "embed")
        o_bias = ("embed",) if c.o_proj_bias else None
        o_proj = Einsum("BTNH,NHD->BTD", (n, h, d), o_names, o_bias, **dt, name="o_proj")
        return o_proj(out), cache


class Mlp(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU, or GeGLU with tanh-gelu (Gemma)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        dt = einsum_fields(c)
        gate = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **dt, name="gate_proj")(x)
        up = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **dt, name="up_proj")(x)
        hidden = ACTIVATIONS[c.mlp_activation](gate) * up
        return Einsum("BTF,FD->BTD", (f, d), ("mlp", "embed"), **dt, name="down_proj")(hidden)


def pin_activations(c: ModelConfig, x: jax.Array, *, decoding: bool) -> jax.Array:
    """x [B, T, D] constrained to `c.activation_sharding` (batch over the data-parallel axes,
    the sequence over the context axis).

    Without it, XLA's propagation follows the FSDP-sharded weights and each device holds every
    layer's activations for the whole batch (3-4x the memory, measured by
    sft_jax.planning.plan_check). Generation batches need not divide the mesh, so decoding is left
    to propagation, as is a batch or sequence that does not divide its axes.
    """
    sharding = c.activation_sharding
    if sharding is None or decoding:
        return x
    for size, axes in zip(x.shape[:2], sharding.spec[:2], strict=True):
        named = (axes,) if isinstance(axes, str) else (axes or ())
        if size % math.prod(sharding.mesh.shape[a] for a in named):
            return x
    return jax.lax.with_sharding_constraint(x, sharding)
