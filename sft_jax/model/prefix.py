"""Prefix and prompt tuning in the model: P trained key/value slots before every row.

Prefix tuning (PEFT's PREFIX_TUNING) trains, per layer, keys and values [P, K, H] that every
query may attend to, as transformers uses the `past_key_values` PEFT passes: the prefix keys are
used as given (no RoPE: they stand for already-rotated cached keys) and the real tokens sit at
positions P, P + 1, ... Prompt tuning (PROMPT_TUNING) prepends P trained input embeddings; since
they come first and attention is causal, their keys and values in each layer do not depend on
the example, so the model computes them once per forward (`Transformer.prompt_cache`, at
positions 0..P-1) and uses them as the same prefix: the real tokens' logits are PEFT's.

The prefix arrives in the "lora" variable collection as `prefix_k` / `prefix_v` [L, P, K, H]
under layers/attn (scanned like the weights), or, in an inference tree (evaluation, loading a
run), at the same place in "params" (`sft_jax.lora.prefix.with_prefix`). Every row, and every
packed example in a row, sees the whole prefix and, through the usual mask, only its own
tokens; positions (which restart per packed example) are all shifted by P, so a packed row's
logits equal those of its examples run alone. Attention with a prefix runs the reference
(dense-mask) attention over the P + S keys, whatever implementation is configured.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sft_jax.lora.prefix import ENCODER, PREFIX_K, PREFIX_V, PROMPT, prefix_kv
from sft_jax.model.attention import AttentionOptions, grouped_attention


def prefix_length(variables: Any) -> int:
    """P of the prefix in a model's variables (0 without one): in the "lora" collection
    (training), or in "params" (an inference tree, `sft_jax.lora.prefix.with_prefix`)."""
    for collection in ("lora", "params"):
        attn = variables.get(collection, {}).get("layers", {}).get("attn", {})
        if PREFIX_K in attn:
            return int(attn[PREFIX_K].shape[1])
    return 0


def prefix_tree(model: Any, params: dict, adapters: dict) -> dict:
    """The prefix tree of prefix- or prompt-tuning adapters (prompt: its virtual tokens' K/V,
    computed by `model` from `params`)."""
    variables = with_prompt_prefix(model, {"params": params, "lora": adapters})
    return variables["lora"]


def with_prompt_prefix(model: Any, variables: dict) -> dict:
    """`variables` with a prompt-tuning tree's virtual tokens (the "lora" collection's
    prompt_embeddings) replaced by their per-layer keys and values, computed by `model` (a
    Transformer) from `variables["params"]`: the prefix the model then attends to. A prefix
    encoder (prefix_projection) is replaced by the K/V it gives."""
    adapters = variables.get("lora")
    if isinstance(adapters, dict) and ENCODER in adapters:
        return {**variables, "lora": prefix_kv(adapters)}
    if not isinstance(adapters, dict) or PROMPT not in adapters:
        return variables
    virtual = adapters[PROMPT]
    cache = model.apply({"params": variables["params"]}, virtual, method="prompt_cache")
    rest = {k: v for k, v in adapters.items() if k != PROMPT}
    prefix = {"layers": {"attn": {PREFIX_K: cache["k"], PREFIX_V: cache["v"]}}}
    return {**variables, "lora": {**rest, **prefix}}


def prefix_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    prefix: tuple[jax.Array, jax.Array],
    options: AttentionOptions,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """q [B, T, N, H] over the prefix keys/values [P, K, H] (visible to every query) and k/v
    [B, S, K, H] under `mask` [B, T, S] -> [B, T, N, H]."""
    b, t = q.shape[:2]
    pk, pv = (jnp.broadcast_to(x.astype(k.dtype), (b, *x.shape)) for x in prefix)
    keys = jnp.concatenate([pk, k], axis=1)
    values = jnp.concatenate([pv, v], axis=1)
    visible = jnp.concatenate([jnp.ones((b, t, pk.shape[1]), bool), mask], axis=-1)
    return grouped_attention(
        q, keys, values, visible, scale=options.scale, softcap=options.softcap, sinks=sinks
    )
