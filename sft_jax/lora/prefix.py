"""Prefix tuning and prompt tuning as adapter trees, and their PEFT files both ways.

The model side is sft_jax/model/prefix.py. The trees:

    prefix tuning:  adapters/layers/attn/{prefix_k, prefix_v}  [L, P, K, H]   (trained K/V)
    prompt tuning:  adapters/prompt_embeddings                 [P, D]         (virtual tokens)

A prompt tree becomes the prefix tree of its virtual tokens' keys and values before each
forward (`Transformer.prompt_cache`, done by `sft_jax.model.prefix.with_prompt_prefix`).

PEFT stores both as one tensor `prompt_embeddings` in adapter_model.safetensors: prompt tuning
[P, D]; prefix tuning the flattened past_key_values [P, L * 2 * K * H] (per virtual token: layer
by layer, key then value, kv-head by kv-head; PEFT's token_dim is K * H and its
num_attention_heads K for grouped-query models). PEFT's `prefix_projection` (an MLP
reparametrisation used while training) is not reproduced: the K/V are trained directly, which
is PEFT's default, and what PEFT saves either way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PREFIX_K = "prefix_k"  # the per-layer prefix keys [L, P, K, H] (layers/attn in the tree)
PREFIX_V = "prefix_v"  # and values
PROMPT = "prompt_embeddings"  # prompt tuning's trained virtual token embeddings [P, D]
PEFT_KEY = "prompt_embeddings"  # PEFT's tensor name, for both methods
PEFT_TYPES = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}


def init_prefix(layers: int, tokens: int, kv_heads: int, head_dim: int, rng: jax.Array) -> dict:
    """Prefix K/V [L, P, K, H] drawn from N(0, 1), PEFT's init of its prefix embedding."""
    kk, kv = jax.random.split(rng)
    shape = (layers, tokens, kv_heads, head_dim)
    return {
        "layers": {
            "attn": {
                PREFIX_K: jax.random.normal(kk, shape, jnp.float32),
                PREFIX_V: jax.random.normal(kv, shape, jnp.float32),
            }
        }
    }


def init_prompt(embedding: jax.Array, tokens: int, rng: jax.Array) -> dict:
    """Virtual tokens [P, D] initialised as the embeddings of P random vocabulary tokens (PEFT's
    SAMPLE_VOCAB init): inputs the model already reads like words."""
    ids = jax.random.randint(rng, (tokens,), 0, embedding.shape[0])
    return {PROMPT: jnp.take(embedding, ids, axis=0).astype(jnp.float32)}


def make_prefix_adapters(params: dict, method: str, tokens: int, rng: jax.Array) -> dict:
    """The adapter tree a prefix ("prefix") or prompt ("prompt") tuning run starts from, shaped
    after the model's parameters (k_proj [L, D, K, H], the embedding [V, D])."""
    if method == "prompt":
        return init_prompt(params["embed"]["embedding"], tokens, rng)
    layers, _, kv_heads, head_dim = params["layers"]["attn"]["k_proj"]["kernel"].shape
    return init_prefix(layers, tokens, kv_heads, head_dim, rng)


def with_prefix(params: dict, adapters: dict) -> dict:
    """`params` with a prefix tree's K/V added at layers/attn (where the model also reads them
    from the "params" collection): the inference tree of a prefix-tuned model, which no weight
    merge can express. A prompt tree must first become its prefix (`with_prompt_prefix`)."""
    if method_of(adapters) != "prefix":
        raise ValueError(
            "prompt tuning's virtual tokens become a prefix only through the model "
            "(sft_jax.model.prefix.with_prompt_prefix)"
        )
    layers = dict(params["layers"])
    layers["attn"] = {**layers["attn"], **adapters["layers"]["attn"]}
    return {**params, "layers": layers}


def method_of(adapters: dict) -> str | None:
    """ "prefix", "prompt" or None (no prefix-style adapter in the tree)."""
    if PROMPT in adapters:
        return "prompt"
    if PREFIX_K in adapters.get("layers", {}).get("attn", {}):
        return "prefix"
    return None


def to_peft_tensors(adapters: dict) -> dict[str, np.ndarray]:
    """PEFT's `prompt_embeddings` of a prefix or prompt tree (float32)."""
    if method_of(adapters) == "prompt":
        return {PEFT_KEY: np.asarray(adapters[PROMPT], np.float32)}
    attn = adapters["layers"]["attn"]
    k, v = (np.asarray(attn[n], np.float32) for n in (PREFIX_K, PREFIX_V))  # [L, P, K, H]
    both = np.stack([k, v], axis=1).transpose(2, 0, 1, 3, 4)  # [P, L, 2, K, H]
    return {PEFT_KEY: np.ascontiguousarray(both.reshape(both.shape[0], -1))}


def from_peft_tensors(
    tensors: dict[str, np.ndarray], method: str, layers: int, kv_heads: int, head_dim: int
) -> dict:
    """The inverse of `to_peft_tensors` for a model of `layers` layers with K kv-heads of H."""
    if set(tensors) != {PEFT_KEY}:
        raise ValueError(f"a PEFT {PEFT_TYPES[method]} adapter holds only {PEFT_KEY!r}")
    value = np.asarray(tensors[PEFT_KEY], np.float32)
    if method == "prompt":
        return {PROMPT: jnp.asarray(value)}
    width = layers * 2 * kv_heads * head_dim
    if value.ndim != 2 or value.shape[1] != width:
        raise ValueError(
            f"PEFT prefix of shape {value.shape} does not fit {layers} layers x 2 x {kv_heads} "
            f"kv-heads x {head_dim} (= {width} per virtual token)"
        )
    both = value.reshape(value.shape[0], layers, 2, kv_heads, head_dim).transpose(1, 2, 0, 3, 4)
    attn = {PREFIX_K: jnp.asarray(both[:, 0]), PREFIX_V: jnp.asarray(both[:, 1])}
    return {"layers": {"attn": attn}}


def peft_config(adapters: dict, model: Any, *, base: str) -> dict[str, Any]:
    """adapter_config.json of a prefix or prompt tree for `model` (a ModelConfig: layers, heads,
    hidden size), as PEFT writes it for a causal LM."""
    method = method_of(adapters)
    if method is None:
        raise ValueError("no prefix or prompt adapter in this tree")
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPES[method],
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(to_peft_tensors(adapters)[PEFT_KEY].shape[0]),
        "num_layers": model.num_layers,
        "num_transformer_submodules": 1,
        "base_model_name_or_path": base,
        "inference_mode": True,
    }
    if method == "prefix":  # PEFT's grouped-query convention: K heads of H
        config |= {
            "token_dim": model.num_kv_heads * model.head_dim,
            "num_attention_heads": model.num_kv_heads,
            "prefix_projection": False,
            "encoder_hidden_size": model.num_kv_heads * model.head_dim,
        }
    else:
        config |= {
            "token_dim": model.hidden_size,
            "num_attention_heads": model.num_heads,
            "prompt_tuning_init": "RANDOM",
        }
    return config


def method_of_config(cfg: dict) -> str | None:
    """ "prefix" / "prompt" for a PEFT adapter_config.json of either type, else None."""
    return {v: k for k, v in PEFT_TYPES.items()}.get(cfg.get("peft_type", ""))
