"""The Flax Linen decoder for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 2/3), its
mixture-of-experts relatives (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss), the hybrid
linear-attention Qwen3.5 (dense and MoE) and Gemma 4 (text).

The sub-layers (embedding, attention, MLP) are in sft_jax/model/sublayers.py; this module stacks
them into layers, scans the layers and holds the KV cache and the LM head.

Dimension letters, used in einsum strings and shape comments:

    B batch   T query length   S key length (= T)   D model width   F mlp width   V vocab
    N query heads   K key/value heads   G query heads per kv head (N // K)   H head dim   L layers

Design choices and why:
- Every projection is one explicit einsum over a kernel that keeps its head axes ([D, N, H], not
  [D, N*H]), so sharding rules name heads directly and LoRA can add `x @ A @ B` terms in place.
- Layers are stacked with `nn.scan` (leading L axis on every layer leaf, logical name "layers"): one
  layer is compiled once whatever the depth, and `nn.remat` inside the scan trades compute for
  activation memory per layer.
- Attention is packing-aware: a query sees a key only when it is not in the future of its row AND
  both carry the same segment id, and RoPE uses the per-example `positions` input, so a packed row
  of several examples gives exactly each example's own logits. The dense [B, T, T] mask is built
  only for the implementations that read it (reference, xla, cudnn, and decoding); blocked and
  splash take the segment ids, so their training memory stays linear in T.
- Numerics follow Hugging Face: RMSNorm statistics and softmax in float32; logits in float32.
- Per-layer differences (Gemma's sliding-window "local" layers with their own RoPE base, SmolLM3's
  NoPE layers) are data scanned alongside the weights (per-layer `local` and `nope` flags
  selecting precomputed masks and RoPE tables), not Python branches, so the scan still compiles
  one layer.
- Generation uses the same layers through `Transformer.decode`: a KV cache [L, B, S, K, H] enters
  the scan as per-layer input and leaves it as per-layer output; training never builds one.
- Hybrid models (Qwen3.5: Gated DeltaNet linear-attention layers among full-attention ones) scan
  the repeating period of their `layer_types` as one `HybridBlock` (sft_jax/model/hybrid.py says
  why); a linear-attention layer carries a recurrent and a conv state instead of a KV cache.
- Gemma 4, whose layers differ in shape and share keys and values, scans all its layers as one
  block (`Gemma4Stack`; sft_jax/model/gemma4.py has its layers and parameter tree).

Parameter tree (names are load-bearing: the HF loader, sharding rules, LoRA and checkpoints use it):

    embed/embedding [V, D]                       final_norm/scale [D]      lm_head/kernel [D, V]
    layers/attn_norm/scale [L, D]                layers/mlp_norm/scale [L, D]
    layers/attn/{q_proj [L, D, N, H], k_proj, v_proj [L, D, K, H], o_proj [L, N, H, D]}/kernel
    layers/attn/{q,k,v}_proj/bias [L, N|K, H]    (attention_bias)
    layers/attn/o_proj/bias [L, D]               (o_proj_bias: gpt-oss)
    layers/attn/sinks [L, N]                     (attention_sinks: gpt-oss)
    layers/attn/{q_norm, k_norm}/scale [L, H]    (qk_norm; [L, N*H], [L, K*H] with qk_norm_full)
    layers/mlp/{gate_proj, up_proj [L, D, F], down_proj [L, F, D]}/kernel
    layers/{post_attn_norm, post_mlp_norm}/scale [L, D]   (sandwich_norms: Gemma 2/3, OLMo 2/3)
    (no attn_norm, mlp_norm without pre_norms: OLMo 2/3 normalise only the sublayers' outputs)
    layers/mlp/{router, experts, ...} instead of the dense mlp in a mixture-of-experts model:
    MoeMlp's tree (sft_jax/model/moe.py) with the leading L axis.
    lm_head is absent when tie_embeddings (logits = h @ embedding.T).
    With norm_offset (Gemma) every norm scale is stored as HF stores it, w, and applied as 1 + w.

A hybrid model (`ModelConfig.layer_types` with linear attention) has the same leaves one level
down, per sub-layer j of its period P, each stacked over the L/P periods (HF layer s * P + j):

    layers/layer_{j}/{attn_norm, mlp_norm, mlp, attn}/...          (a full-attention sub-layer)
    layers/layer_{j}/{attn_norm, mlp_norm, mlp, linear_attn}/...   (a linear-attention one:
                                                   GatedDeltaNet's tree, gated_deltanet.py)
    With attn_output_gate (Qwen3.5) q_proj/kernel is [.., D, N, 2H]: per head the query, then
    the gate of the attention output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax.model.attention import (
    DENSE_MASK_IMPLEMENTATIONS,
    attention_mask,
    longrope_tables,
    rope_attention_factor,
    rope_inv_freq,
    rope_tables,
    window_mask,
)
from sft_jax.model.config import (  # noqa: F401  (re-exported: the config lives with the model)
    ModelConfig,
    RopeScaling,
    count_params,
    model_config_from_arch,
    with_section_options,
)
from sft_jax.model.gated_deltanet import DeltaState, GatedDeltaNet, init_hybrid_cache
from sft_jax.model.gemma4 import (
    Gemma4Stack,
    PerLayerInputs,
    gemma4_context,
    init_gemma4_cache,
)
from sft_jax.model.hybrid import LINEAR
from sft_jax.model.layers import (  # noqa: F401  (re-exported: public names of the decoder)
    ACTIVATIONS,
    INIT_STD,
    Einsum,
    RMSNorm,
    lora_equations,
    named_param,
)
from sft_jax.model.moe import MoeConfig, MoeMlp
from sft_jax.model.prefix import prefix_length
from sft_jax.model.regularize import neftune_noise
from sft_jax.model.sublayers import (
    CHECKPOINT_POLICIES,
    Attention,
    Embed,
    Mlp,
    attention_options,
    cpu_grad,
    pin_activations,
    rms_norm,
)

ROUTER_STATS = "router"  # intermediates key of a mixture-of-experts model's router statistics


class Block(nn.Module):
    """One decoder layer (pre-norm; post-norm without pre_norms); the scan carry is the
    residual stream x [B, T, D].

    `layer` holds this layer's slice of the scanned inputs: "local" (bool, when the model has
    sliding-window layers), "nope" (bool, when it has layers without RoPE) and the KV cache
    "k"/"v" (when decoding). `ctx` is shared by all layers: the masks and RoPE tables (global,
    and "local_*" ones) and the cache write "index".
    Returns (x, outputs), the scan's (carry, per-layer output): outputs holds this layer's
    updated cache "k"/"v" when decoding and its router statistics "router" (a MoeAux) in a
    mixture-of-experts model.
    `linear`: a Gated DeltaNet layer (hybrid models) in place of attention; its decoding state
    is "conv"/"state" in `layer` and in the outputs, and it resets at ctx["linear_segments"].
    """

    config: ModelConfig
    linear: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, layer: dict, ctx: dict):
        c = self.config
        x = pin_activations(c, x, decoding="index" in ctx)  # the carry remat saves
        mask, cos, sin = ctx.get("mask"), ctx["cos"], ctx["sin"]
        local = None
        if "local" in layer:  # select this layer's mask and RoPE by data, not by branch
            local = layer["local"]
            if mask is not None:
                mask = jnp.where(local, ctx["local_mask"], mask)
            if "local_cos" in ctx:
                cos = jnp.where(local, ctx["local_cos"], cos)
                sin = jnp.where(local, ctx["local_sin"], sin)
        if "nope" in layer:  # a NoPE layer: cos 1 and sin 0 rotate by nothing, exactly
            cos = jnp.where(layer["nope"], 1.0, cos)
            sin = jnp.where(layer["nope"], 0.0, sin)
        h = rms_norm(c, ("embed",), name="attn_norm")(x) if c.pre_norms else x
        if self.linear:
            state = DeltaState(layer["conv"], layer["state"]) if "conv" in layer else None
            mixer = GatedDeltaNet(c, cpu_grad(c), name="linear_attn")
            h, state = mixer(h, ctx.get("linear_segments", ctx.get("segment_ids")), state)
            out = {} if state is None else state._asdict()
        else:
            cache = (layer["k"], layer["v"]) if "k" in layer else None
            h, cache = Attention(c, name="attn")(
                h, mask, cos, sin, cache, ctx.get("index"), ctx.get("segment_ids"), local,
                ctx.get("slots"),
            )  # fmt: skip
            out = {} if cache is None else {"k": cache[0], "v": cache[1]}
        if c.sandwich_norms:
            h = rms_norm(c, ("embed",), name="post_attn_norm")(h)
        x = x + h
        h = rms_norm(c, ("embed",), name="mlp_norm")(x) if c.pre_norms else x
        if c.is_moe:  # router statistics over real tokens (training), all tokens (decoding)
            segment_ids = ctx.get("segment_ids")
            real = None if segment_ids is None else segment_ids != 0
            h, out["router"] = MoeMlp(MoeConfig.of_model(c), name="mlp")(h, real)
        else:
            h = Mlp(c, name="mlp")(h)
        if c.sandwich_norms:
            h = rms_norm(c, ("embed",), name="post_mlp_norm")(h)
        x = pin_activations(c, x + h, decoding="index" in ctx)
        return x, out


class HybridBlock(nn.Module):
    """One period of a hybrid model's layers (`ModelConfig.period`, sft_jax/model/hybrid.py says
    why), scanned like a Block: sub-layer j is `layer_{j}`, with its own parameters and its own
    slice `layer_{j}` of the scanned inputs and outputs (its cache when decoding)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, layer: dict, ctx: dict):
        outputs = {}
        for j, kind in enumerate(self.config.period):
            name = f"layer_{j}"
            block = Block(self.config, linear=kind == LINEAR, name=name)
            x, outputs[name] = block(x, layer.get(name, {}), ctx)
        return x, outputs


def init_cache(config: ModelConfig, batch: int, length: int) -> dict[str, Any]:
    """An empty KV cache {"k", "v": [L, B, S, K, H]} in the compute dtype, for `decode`; a hybrid
    model's per sub-layer (`init_hybrid_cache`)."""
    if config.is_hybrid:
        return init_hybrid_cache(config, batch, length)
    if config.gemma4 is not None:
        return init_gemma4_cache(config, batch, length)
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(config.dtype))
    return {"k": zeros, "v": zeros}


class Transformer(nn.Module):
    """Decoder-only LM. See the module docstring for the parameter tree.

    Built with `setup` (not `nn.compact`) so that `logits` and `decode` are methods of their own:
    generation applies the LM head to one position per row instead of materialising [B, T, V].
    """

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        dt = {"dtype": c.dtype, "param_dtype": c.param_dtype}
        block = HybridBlock if c.is_hybrid else Block
        if c.gemma4 is not None:
            block = Gemma4Stack
        steps = c.num_layers // len(c.period)  # scan steps: layers, or periods of a hybrid
        if c.remat != "none" and c.gemma4 is None:  # Gemma4Stack checkpoints each layer
            # A rolled scan keeps XLA from merging the backward's recomputation into the forward;
            # unrolled, only prevent_cse does. Even then XLA:CPU keeps most activations of
            # unrolled layers alive: remat's memory saving needs scan_layers (docs/benchmarks.md).
            block = nn.remat(
                block, policy=CHECKPOINT_POLICIES[c.remat], prevent_cse=not c.scan_layers
            )
        scanned = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},  # "lora": adapters, only when passed
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast),
            length=steps,
            unroll=1 if c.scan_layers else steps,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        self.embed = Embed(c)
        self.layers = scanned(c)
        self.final_norm = rms_norm(c, ("embed",))
        if c.gemma4 is not None and c.gemma4.per_layer_input_size:
            self.per_layer_inputs = PerLayerInputs(c)
        if not c.tie_embeddings:
            shape, names = (c.hidden_size, c.vocab_size), ("embed", "vocab")
            self.lm_head = Einsum(
                "BTD,DV->BTV",
                shape,
                names,
                **dt,
                out_dtype="float32",
                cpu_grad=cpu_grad(c, in_layers=False),
            )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        *,
        slots: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> jax.Array:
        """tokens/positions/segment_ids: int32 [B, T] -> float32 logits [B, T, V].

        A mixture-of-experts model also sows its per-layer router statistics (a MoeAux with a
        leading layer axis) as intermediates[ROUTER_STATS] when applied with
        mutable=["intermediates"]; otherwise they are dropped.
        With `return_hidden`, the final-normed hidden states [B, T, D] (compute dtype) instead;
        `logits` turns (a selection of) them into logits. `slots` int [T]: the slot each
        position held in its row before the rows were permuted (context parallelism's load
        balancing, sft_jax.training.step.context_order); None: the rows are in slot order. Only
        ring attention (which masks by `slots`) and splash under context parallelism (whose
        static mask is built for exactly that permutation) take a permuted row; the others mask
        by array order.
        """
        # The dense [B, T, T] mask only where the attention implementation reads it (computed
        # once, broadcast to every layer); blocked, splash and ring build theirs from data.
        implementation = attention_options(self.config, tokens.shape[1]).implementation
        if slots is not None and implementation not in ("ring", "splash"):
            raise ValueError(f"{implementation} attention needs rows in slot order (no slots)")
        if slots is not None and self.config.is_hybrid:  # a recurrence over array order
            raise ValueError("linear attention (a hybrid model) needs rows in slot order")
        mask = None
        prefix = prefix_length(self.variables)  # prefix tuning: P shared K/V before every row
        if implementation in DENSE_MASK_IMPLEMENTATIONS or prefix:
            mask = attention_mask(segment_ids)
        positions = positions + prefix  # as HF places tokens after P cached prefix slots
        slots = jnp.arange(tokens.shape[1]) if slots is None else slots
        x, outputs = self._layers(tokens, positions, mask, slots, {}, segment_ids=segment_ids)
        if self.config.is_hybrid and self.config.is_moe:  # [L/P] per sub-layer -> [L], in order
            per_sub = [outputs[f"layer_{j}"]["router"] for j in range(len(self.config.period))]
            interleave = lambda *xs: jnp.stack(xs, 1).reshape(-1, *xs[0].shape[1:])
            outputs = {"router": jax.tree.map(interleave, *per_sub)}
        if self.config.gemma4 is not None and "router" in outputs:  # one scan step: [1, L, ...]
            outputs = {"router": jax.tree.map(lambda r: r[0], outputs["router"])}
        if "router" in outputs:  # per-layer MoeAux [L, ...]: read by the train step's loss
            self.sow("intermediates", ROUTER_STATS, outputs["router"])
        x = self.final_norm(x)
        return x if return_hidden else self.logits(x)

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        starts: jax.Array,
        cache: dict[str, Any],
        index: jax.Array,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """One generation step over a KV cache -> (final-normed hidden [B, T, D], new cache).

        tokens/positions [B, T] occupy cache slots index .. index + T - 1 of every row; a row's
        real tokens start at slot starts[b] (prompts are right-aligned), so a query sees the
        slots in [starts[b], its own slot]. Prefill is T = prompt buffer length, then T = 1.
        """
        kv = [cache] if "k" in cache else [v for v in cache.values() if "k" in v]  # hybrid
        length = kv[0]["k"].shape[2] if kv else 1  # 1: no attention layer reads the mask
        q_slots = index + jnp.arange(tokens.shape[1])
        k_slots = jnp.arange(length)
        mask = (k_slots[None, None, :] <= q_slots[None, :, None]) & (
            k_slots[None, None, :] >= starts[:, None, None]
        )
        positions = positions + prefix_length(self.variables)
        # Linear-attention layers: a row's left padding is a run of its own (no state from it).
        segments = (q_slots[None, :] >= starts[:, None]).astype(jnp.int32)
        x, outputs = self._layers(
            tokens, positions, mask, q_slots, {**cache}, index=index, linear_segments=segments
        )
        return self.final_norm(x), {k: outputs[k] for k in cache}

    def prompt_cache(self, virtual: jax.Array) -> dict[str, jax.Array]:
        """Prompt tuning: the keys and values {"k", "v": [L, P, K, H]} of the virtual token
        embeddings `virtual` [P, D] at positions 0..P-1 (sft_jax/model/prefix.py: as they
        come first and attention is causal, they are the same before every example)."""
        c = self.config
        p = virtual.shape[0]
        x = virtual[None].astype(c.dtype)
        if c.embed_scale:  # HF scales inputs_embeds, virtual tokens included
            x = x * jnp.asarray(c.hidden_size**0.5, dtype=c.dtype)
        positions = jnp.arange(p)[None]
        mask = jnp.tril(jnp.ones((1, p, p), bool))
        cache = init_cache(dataclasses.replace(c, dtype="float32"), 1, p)
        _, outputs = self._layers(None, positions, mask, positions[0], cache, index=0, x=x)
        return {"k": outputs["k"][:, 0], "v": outputs["v"][:, 0]}

    def _layers(
        self, tokens, positions, mask, q_slots, layer: dict, index=None, segment_ids=None,
        linear_segments=None, x=None,
    ):  # fmt: skip
        """Embeds (unless given `x` [B, T, D]) and runs the scanned layers; builds the
        per-layer and shared scan inputs."""
        c = self.config
        x = self.embed(tokens) if x is None else x
        if c.neftune_alpha > 0 and segment_ids is not None and self.has_rng("neftune"):
            # Training only: the train step passes a "neftune" rng, evaluation does not.
            x = neftune_noise(x, segment_ids, c.neftune_alpha, self.make_rng("neftune"))
        x = pin_activations(c, x, decoding=index is not None)
        cos, sin = rope_tables(positions, rope_inv_freq(c), rope_attention_factor(c))
        if c.rope_scaling is not None and c.rope_scaling.rope_type == "longrope":  # Phi-3
            cos, sin = longrope_tables(c, positions, segment_ids, cos, sin)
        ctx = {"cos": cos, "sin": sin}
        if mask is not None:
            ctx["mask"] = mask
        if index is not None:
            ctx["index"] = index
        if linear_segments is not None and c.is_hybrid:
            ctx["linear_segments"] = linear_segments
        if segment_ids is not None:  # training: blocked, splash, ring read segments, not a mask
            ctx["segment_ids"] = segment_ids
            ctx["slots"] = jnp.broadcast_to(q_slots, tokens.shape)  # ring attention's mask
        if c.gemma4 is not None:  # full layers' RoPE, per-layer inputs
            per_layer = getattr(self, "per_layer_inputs", None)
            ctx.update(gemma4_context(c, per_layer, tokens, x, positions))
        if any(c.nope_layers):
            layer["nope"] = jnp.asarray(c.nope_layers)
        if c.has_local_layers:
            if c.gemma4 is None:  # Gemma 4's layers know their type (one scan step runs all)
                layer["local"] = jnp.asarray(c.local_layers)
            if mask is not None:
                ctx["local_mask"] = window_mask(mask, q_slots, c.sliding_window)
            if c.local_rope_theta is not None:
                local_freq = rope_inv_freq(c, local=True)
                local_factor = rope_attention_factor(c, local=True)
                ctx["local_cos"], ctx["local_sin"] = rope_tables(
                    positions, local_freq, local_factor
                )
        return self.layers(x, layer, ctx)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: final-normed hidden [B, T, D] -> float32 logits [B, T, V]."""
        tied = self.config.tie_embeddings
        logits = self.embed.attend(hidden) if tied else self.lm_head(hidden)
        if self.config.final_softcap is not None:  # Gemma 2
            cap = self.config.final_softcap
            logits = jnp.tanh(logits / cap) * cap
        return nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))
