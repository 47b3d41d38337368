"""Gemma 4's decoder layers (transformers' Gemma4TextModel), run by sft_jax/model/decoder.py as
one scanned block of all layers (sft_jax/model/gemma4_config.py says why).

A layer is Gemma 3's sandwich-normed layer (GeGLU MLP, per-head q/k RMSNorm) with these
differences, each as transformers computes it:
- RMSNorm scales are applied as w (not 1 + w), in float32; values get a scale-less RMSNorm;
  attention scores are not scaled (q/k norms fix their size).
- Full-attention layers have their own head dim and kv heads, and a "proportional" RoPE: the
  first `global_rotary_factor` of the head's frequency pairs rotate at theta^(-2k/H), the rest
  not at all (frequency 0). With `k_eq_v` their values are the key projection (pre-norm).
- The last `kv_shared_layers` layers have no key/value projections: they attend over the keys
  and values of the last earlier layer of their own type (its KV cache when decoding), with
  their own mask, so packing still keeps examples apart.
- Per-layer inputs: a second token embedding [V', L*P] plus a projection of the input
  embedding, normalised and averaged, give each layer a [P] vector per token; the layer adds
  proj(gelu(gate(x)) * that vector), normalised, to its output. Both parts are per token.
- Every layer's output is multiplied by its `layer_scalar`.
- With `enable_moe_block` (ModelConfig.num_experts > 0) a mixture-of-experts block runs beside
  the dense MLP: sft_jax/model/moe.py's layer with Gemma 4's router (`MoeConfig.gemma4_router`),
  routing on the residual stream while its experts read their own pre-norm of it; each output
  is normed, and their sum goes through the post-MLP norm.

Parameter tree (beside decoder.py's embed, final_norm, lm_head; layer j of L under
layers/layer_{j}, each leaf with a leading axis of 1):

    per_layer_inputs/{embedding [V', L*P], projection/kernel [D, L*P], norm/scale [P]}
    layers/layer_{j}/{attn_norm, post_attn_norm, mlp_norm, post_mlp_norm}/scale [1, D]
    layers/layer_{j}/attn/{q_proj, o_proj, q_norm}, and {k_proj, v_proj, k_norm} unless the
        layer reuses K/V (no v_proj with k_eq_v on a full layer); H, K: the layer's own
    layers/layer_{j}/mlp/{gate_proj, up_proj, down_proj}/kernel
    layers/layer_{j}/{per_layer_input_gate [1, D, P], per_layer_projection [1, P, D]}/kernel,
        layers/layer_{j}/post_per_layer_norm/scale [1, D]     (with per-layer inputs)
    layers/layer_{j}/layer_scalar [1, 1]
    layers/layer_{j}/moe/... (sft_jax/model/moe.py's tree with Gemma 4's router scales), and
        layers/layer_{j}/{moe_norm, post_mlp_norm_1, post_moe_norm}/scale [1, D]   (with experts)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.model.attention import apply_rope, attend, rope_tables
from sft_jax.model.config import ModelConfig
from sft_jax.model.gemma4_config import first_shared_layer, layer_view
from sft_jax.model.layers import ACTIVATIONS, INIT_STD, Einsum, RMSNorm, named_param
from sft_jax.model.moe import MoeAux, MoeConfig, MoeMlp
from sft_jax.model.prefix import PREFIX_K
from sft_jax.model.sublayers import (
    CHECKPOINT_POLICIES,
    Mlp,
    attention_options,
    einsum_fields,
    pin_activations,
    rms_norm,
)

KV = tuple[jax.Array, jax.Array]


def global_rope(c: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H'/2] of the full-attention layers (head dim H'): transformers'
    _compute_proportional_rope_parameters, the unrotated pairs at frequency 0 (cos 1, sin 0)."""
    g = c.gemma4
    dim = g.global_head_dim
    rotated = int(g.global_rotary_factor * dim // 2)
    freq = 1.0 / (c.rope_theta ** (np.arange(0, 2 * rotated, 2, dtype=np.float64) / dim))
    freq = np.concatenate([freq, np.zeros(dim // 2 - rotated)]) / g.global_rope_factor
    return rope_tables(positions, freq.astype(np.float32))


class PerLayerInputs(nn.Module):
    """tokens [B, T] and their input embeddings x [B, T, D] -> per-layer inputs [B, T, L, P]
    (Gemma4TextModel.get_per_layer_inputs and project_per_layer_inputs)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, x: jax.Array) -> jax.Array:
        c, g = self.config, self.config.gemma4
        b, t = tokens.shape
        d, n, p = c.hidden_size, c.num_layers, g.per_layer_input_size
        init = nn.initializers.normal(INIT_STD)
        shape = (g.per_layer_vocab_size, n * p)
        table = named_param(self, "embedding", init, shape, ("vocab", None), c.param_dtype)
        scale = jnp.asarray(p**0.5, c.dtype)  # HF rounds the scale to the table's dtype first
        own = jnp.take(table, tokens, axis=0).astype(c.dtype) * scale
        dt = einsum_fields(c)
        proj = Einsum("BTD,DQ->BTQ", (d, n * p), ("embed", None), **dt, name="projection")(x)
        proj = (proj * jnp.asarray(d**-0.5, c.dtype)).reshape(b, t, n, p)
        proj = RMSNorm(c.rms_norm_eps, (None,), c.dtype, c.param_dtype, False, True, name="norm")(
            proj
        )
        return (proj + own.reshape(b, t, n, p)) * jnp.asarray(2**-0.5, c.dtype)


def _unscaled_norm(c: ModelConfig, x: jax.Array) -> jax.Array:
    """RMSNorm without a scale (Gemma 4's v_norm), statistics in float32."""
    x32 = x.astype(jnp.float32)
    return (
        x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.rms_norm_eps)
    ).astype(c.dtype)


class Gemma4Attention(nn.Module):
    """One layer's attention (`config`: its `layer_view`). With `shared` (k, v) it reuses them
    and has no key/value projections; otherwise it computes its own (written into `cache` at
    `index` when decoding). Returns the output and the (k, v) it attended over."""

    config: ModelConfig
    local: bool

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, cos: jax.Array, sin: jax.Array,
        shared: KV | None, cache: KV | None, ctx: dict,
    ) -> tuple[jax.Array, KV]:  # fmt: skip
        c = self.config
        if any(self.has_variable(n, PREFIX_K) for n in ("lora", "params")):
            raise ValueError("prefix and prompt tuning are not supported for Gemma 4")
        d, n, kv, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dt = einsum_fields(c)
        q_names, kv_names = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q = Einsum("BTD,DNH->BTNH", (d, n, h), q_names, **dt, name="q_proj")(x)
        q = apply_rope(rms_norm(c, ("head_dim",), name="q_norm")(q), cos, sin)
        if shared is None:
            k = Einsum("BTD,DKH->BTKH", (d, kv, h), kv_names, **dt, name="k_proj")(x)
            if c.gemma4.k_eq_v and not self.local:
                v = k
            else:
                v = Einsum("BTD,DKH->BTKH", (d, kv, h), kv_names, **dt, name="v_proj")(x)
            k = apply_rope(rms_norm(c, ("head_dim",), name="k_norm")(k), cos, sin)
            v = _unscaled_norm(c, v)
            if cache is not None:
                start = (0, ctx["index"], 0, 0)
                k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
                v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            shared = (k, v)
        decoding = "index" in ctx
        options = attention_options(c, None if decoding else q.shape[1])
        out = attend(
            q, *shared, mask, options, segment_ids=ctx.get("segment_ids"),
            local=jnp.asarray(self.local), slots=ctx.get("slots"),
        )  # fmt: skip
        o_names = ("heads", "head_dim", "embed")
        o_proj = Einsum("BTNH,NHD->BTD", (n, h, d), o_names, **dt, name="o_proj")
        return o_proj(out), shared


class Gemma4Layer(nn.Module):
    """One Gemma 4 decoder layer (Gemma4TextDecoderLayer), with the mixture-of-experts block
    beside the dense MLP when the config has experts; `config` is its `layer_view`, `index` its
    layer number j."""

    config: ModelConfig
    index: int

    @nn.compact
    def __call__(self, x: jax.Array, layer: dict, ctx: dict, shared: KV | None):
        c, j = self.config, self.index
        decoding = "index" in ctx
        x = pin_activations(c, x, decoding=decoding)
        local = c.local_layers[j]
        mask = ctx.get("local_mask" if local else "mask")
        cos, sin = (ctx["local_cos"], ctx["local_sin"]) if local else (ctx["cos"], ctx["sin"])
        h = rms_norm(c, ("embed",), name="attn_norm")(x)
        cache = (layer["k"], layer["v"]) if "k" in layer else None
        attention = Gemma4Attention(c, local, name="attn")
        h, kv = attention(h, mask, cos, sin, shared, cache, ctx)
        out = {} if cache is None else {"k": kv[0], "v": kv[1]}
        x = x + rms_norm(c, ("embed",), name="post_attn_norm")(h)
        h = Mlp(c, name="mlp")(rms_norm(c, ("embed",), name="mlp_norm")(x))
        if c.is_moe:
            h, out["router"] = self._moe(x, h, ctx)
        x = x + rms_norm(c, ("embed",), name="post_mlp_norm")(h)
        if c.gemma4.per_layer_input_size:
            d, p = c.hidden_size, c.gemma4.per_layer_input_size
            dt = einsum_fields(c)
            gate = Einsum("BTD,DP->BTP", (d, p), ("embed", None), **dt, name="per_layer_input_gate")
            h = ACTIVATIONS[c.mlp_activation](gate(x)) * ctx["per_layer"][:, :, j]
            proj = Einsum("BTP,PD->BTD", (p, d), (None, "embed"), **dt, name="per_layer_projection")
            x = x + rms_norm(c, ("embed",), name="post_per_layer_norm")(proj(h))
        scalar = named_param(
            self, "layer_scalar", nn.initializers.ones, (1,), (None,), c.param_dtype
        )
        x = pin_activations(c, x * scalar.astype(c.dtype), decoding=decoding)
        return x, out, kv

    def _moe(self, x: jax.Array, dense: jax.Array, ctx: dict) -> tuple[jax.Array, MoeAux]:
        """The mixture-of-experts block beside the dense MLP (`enable_moe_block`): the router
        reads the residual stream x, the experts their own pre-norm of it; the two outputs are
        each normed and summed (then normed again by the caller's post_mlp_norm)."""
        c = self.config
        segment_ids = ctx.get("segment_ids")
        real = None if segment_ids is None else segment_ids != 0
        experts_in = rms_norm(c, ("embed",), name="moe_norm")(x)
        y, aux = MoeMlp(MoeConfig.of_model(c), name="moe")(x, real, experts_in)
        dense = rms_norm(c, ("embed",), name="post_mlp_norm_1")(dense)
        return dense + rms_norm(c, ("embed",), name="post_moe_norm")(y), aux


class Gemma4Stack(nn.Module):
    """All of a Gemma 4 model's layers as one scan step (the decoder's block for Gemma 4):
    layer j is `layer_{j}`; a K/V-sharing layer gets the keys and values of the last earlier
    layer of its type. Returns (x, per-layer outputs: the updated caches when decoding, and
    with the mixture-of-experts block "router", every layer's MoeAux stacked [L, ...])."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, layer: dict, ctx: dict):
        c = self.config
        first = first_shared_layer(c)
        stored: dict[bool, KV] = {}  # by layer type (local or not): the latest layer's K/V
        outputs, routers = {}, []
        layer_cls = Gemma4Layer
        if c.remat != "none":  # per layer, not the whole stack (one scan step holds all)
            policy = CHECKPOINT_POLICIES[c.remat]
            layer_cls = nn.remat(Gemma4Layer, policy=policy, prevent_cse=True)
        for j, local in enumerate(c.local_layers):
            name = f"layer_{j}"
            shared = stored[local] if j >= first else None
            block = layer_cls(layer_view(c, j), j, name=name)
            x, outputs[name], kv = block(x, layer.get(name, {}), ctx, shared)
            if "router" in outputs[name]:
                routers.append(outputs[name].pop("router"))
            if j < first:
                stored[local] = kv
        if routers:  # the decoder sows them, [1, L, ...] after the scan
            outputs["router"] = jax.tree.map(lambda *xs: jnp.stack(xs), *routers)
        return x, outputs


def gemma4_context(
    c: ModelConfig, per_layer: nn.Module | None, tokens: jax.Array | None, x: jax.Array,
    positions: jax.Array,
) -> dict[str, jax.Array]:  # fmt: skip
    """What the layers share beyond decoder.py's context: the full-attention layers' RoPE
    tables and the per-layer inputs [B, T, L, P]."""
    if tokens is None:  # prompt tuning's virtual tokens: no ids for the per-layer inputs
        raise ValueError("prompt tuning is not supported for Gemma 4")
    cos, sin = global_rope(c, positions)
    ctx = {"cos": cos, "sin": sin}
    if per_layer is not None:
        ctx["per_layer"] = per_layer(tokens, x)
    return ctx


def init_gemma4_cache(config: ModelConfig, batch: int, length: int) -> dict[str, Any]:
    """An empty KV cache per layer `layer_{j}`, {"k", "v"} [1, B, S, K, H] with the layer's own
    K and H; K/V-sharing layers keep none (they read their source layer's)."""
    cache = {}
    for j in range(config.num_layers):
        view = layer_view(config, j)
        shape = (1, batch, length, view.num_kv_heads, view.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(config.dtype))
        cache[f"layer_{j}"] = {"k": zeros, "v": zeros} if j < first_shared_layer(config) else {}
    return cache
