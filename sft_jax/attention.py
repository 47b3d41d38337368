"""Attention's pure pieces: RoPE tables, packing-aware masks and grouped-query attention.

Kept apart from the Flax modules in model.py so each can be tested against its Hugging Face
counterpart alone. Packing is honoured here: RoPE uses each token's own position within its
example, and a query sees a key only when both carry the same segment id and the key is not in
its future (within a sliding window where the layer has one).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from sft_jax.model import ModelConfig


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """float32 [H/2] inverse frequencies, rescaled when `rope_scaling` is set.

    Computed in float64 on the host (a trace-time constant) and rounded once, which matches
    transformers' float32 computation to within an ulp. `local`: the unscaled frequencies of
    Gemma 3's sliding-window layers, at their own base `local_rope_theta`.
    """
    dim = config.head_dim
    theta = config.rope_theta
    if local and config.local_rope_theta is not None:
        theta = config.local_rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = None if local and config.local_rope_theta is not None else config.rope_scaling
    if s is not None and s.rope_type == "linear":
        inv_freq = inv_freq / s.factor
    elif s is not None:  # transformers.modeling_rope_utils._compute_llama3_parameters
        old_len = s.original_max_position_embeddings
        low_freq_wavelen = old_len / s.low_freq_factor
        high_freq_wavelen = old_len / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32 [B, T, H/2] at each token's own position (per packed segment)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, H] in HF "rotate_half" layout (pairs (i, i + H/2)), in float32."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T, S]: causal within the row AND same segment.

    Padding (segment 0) attends to earlier padding, so no query row is fully masked (no NaNs);
    real tokens never see padding or another packed example.
    """
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same


def window_mask(mask: jax.Array, q_slots: jax.Array, window: int) -> jax.Array:
    """mask [B, T, S] restricted to keys less than `window` slots behind the query (HF's
    `kv_idx > q_idx - sliding_window`). Within one packed segment slots and positions advance
    together, and `mask` already keeps segments apart, so packing is respected."""
    k_slots = jnp.arange(mask.shape[-1])
    return mask & (q_slots[:, None] - k_slots[None, :] < window)[None]


def grouped_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Grouped-query attention without materialising repeated kv heads.

    q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]. Query head n uses kv head
    n // G, as HF's `repeat_kv` does. Scores and softmax in float32; `softcap` (Gemma 2) squashes
    the scaled scores before masking, as HF does.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)
