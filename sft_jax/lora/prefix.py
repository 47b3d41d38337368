"""Prefix tuning and prompt tuning as adapter trees, and their PEFT files both ways.

The model side is sft_jax/model/prefix.py. The trees:

    prefix tuning:  adapters/layers/attn/{prefix_k, prefix_v}  [L, P, K, H]   (trained K/V)
    prompt tuning:  adapters/prompt_embeddings                 [P, D]         (virtual tokens)

A prompt tree becomes the prefix tree of its virtual tokens' keys and values before each
forward (`Transformer.prompt_cache`, done by `sft_jax.model.prefix.with_prompt_prefix`).

With `lora.prefix_projection`, prefix tuning trains PEFT's reparametrisation instead of the K/V
themselves: an embedding [P, K * H] through a two-layer tanh MLP (hidden width E, PEFT's
`encoder_hidden_size`) whose output is the K/V,

    adapters/prefix_encoder/{embedding [P, KH], w1 [KH, E], b1 [E], w2 [E, L, 2, K, H], b2}

turned into the prefix tree before each forward (`prefix_kv`); what is exported (as by PEFT,
which saves the K/V its encoder gives) is that K/V.

PEFT stores both as one tensor `prompt_embeddings` in adapter_model.safetensors: prompt tuning
[P, D]; prefix tuning the flattened past_key_values [P, L * 2 * K * H] (per virtual token: layer
by layer, key then value, kv-head by kv-head; PEFT's token_dim is K * H and its
num_attention_heads K for grouped-query models). PEFT's `prefix_projection` (an MLP
reparametrisation used while training) is optional here (`lora.prefix_projection`); PEFT
saves the K/V either way, so an exported adapter always loads as a plain prefix.
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
ENCODER = "prefix_encoder"  # prefix tuning's MLP reparametrisation (prefix_projection)
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


def init_encoder(
    layers: int, tokens: int, kv_heads: int, head_dim: int, hidden: int, rng: jax.Array
) -> dict:
    """PEFT's prefix encoder as initialised by torch: the embedding N(0, 1), each Linear's
    weight and bias U(+-1/sqrt(fan_in))."""
    width = kv_heads * head_dim
    ke, k1, kb1, k2, kb2 = jax.random.split(rng, 5)
    uniform = lambda key, shape, fan_in: jax.random.uniform(
        key, shape, jnp.float32, -(fan_in**-0.5), fan_in**-0.5
    )
    out = (layers, 2, kv_heads, head_dim)
    encoder = {
        "embedding": jax.random.normal(ke, (tokens, width), jnp.float32),
        "w1": uniform(k1, (width, hidden), width),
        "b1": uniform(kb1, (hidden,), width),
        "w2": uniform(k2, (hidden, *out), hidden),
        "b2": uniform(kb2, out, hidden),
    }
    return {ENCODER: encoder}


def prefix_kv(adapters: dict) -> dict:
    """The prefix tree of a prefix-tuning tree: as is, or the K/V its encoder gives
    (tanh(e w1 + b1) w2 + b2 per virtual token)."""
    if ENCODER not in adapters:
        return adapters
    enc = adapters[ENCODER]
    hidden = jnp.tanh(enc["embedding"] @ enc["w1"] + enc["b1"])  # [P, E]
    kv = jnp.einsum("pe,elskh->lspkh", hidden, enc["w2"]) + enc["b2"][:, :, None]
    return {"layers": {"attn": {PREFIX_K: kv[:, 0], PREFIX_V: kv[:, 1]}}}


def init_prompt(embedding: jax.Array, tokens: int, rng: jax.Array) -> dict:
    """Virtual tokens [P, D] initialised as the embeddings of P random vocabulary tokens (PEFT's
    SAMPLE_VOCAB init): inputs the model already reads like words."""
    ids = jax.random.randint(rng, (tokens,), 0, embedding.shape[0])
    return {PROMPT: jnp.take(embedding, ids, axis=0).astype(jnp.float32)}


def make_prefix_adapters(
    params: dict, method: str, tokens: int, rng: jax.Array, projection: int | None = None
) -> dict:
    """The adapter tree a prefix ("prefix") or prompt ("prompt") tuning run starts from, shaped
    after the model's parameters (k_proj [L, D, K, H], the embedding [V, D]); `projection`:
    the hidden width of prefix tuning's encoder (0: K x H, PEFT's default), None: no encoder.
    Both need one uniform attention layer scanned over depth (prompt tuning's virtual tokens
    become such a prefix too), which hybrid and Gemma 4 models do not have."""
    if "attn" not in params["layers"]:
        raise ValueError(
            f"lora.method={method!r} needs every layer to be the same attention layer; this "
            "model's layers differ (a hybrid linear-attention model or Gemma 4): use "
            "lora.method='lora', 'oft' or 'boft'"
        )
    if method == "prompt":
        return init_prompt(params["embed"]["embedding"], tokens, rng)
    layers, _, kv_heads, head_dim = params["layers"]["attn"]["k_proj"]["kernel"].shape
    if projection is not None:
        hidden = projection or kv_heads * head_dim
        return init_encoder(layers, tokens, kv_heads, head_dim, hidden, rng)
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
    adapters = prefix_kv(adapters)
    layers = dict(params["layers"])
    layers["attn"] = {**layers["attn"], **adapters["layers"]["attn"]}
    return {**params, "layers": layers}


def method_of(adapters: dict) -> str | None:
    """ "prefix", "prompt" or None (no prefix-style adapter in the tree)."""
    if PROMPT in adapters:
        return "prompt"
    if ENCODER in adapters:
        return "prefix"
    if PREFIX_K in adapters.get("layers", {}).get("attn", {}):
        return "prefix"
    return None


def to_peft_tensors(adapters: dict) -> dict[str, np.ndarray]:
    """PEFT's `prompt_embeddings` of a prefix or prompt tree (float32)."""
    if method_of(adapters) == "prompt":
        return {PEFT_KEY: np.asarray(adapters[PROMPT], np.float32)}
    attn = prefix_kv(adapters)["layers"]["attn"]
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
        # PEFT saves the K/V an encoder gives, never the encoder: the file is a plain prefix.
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
