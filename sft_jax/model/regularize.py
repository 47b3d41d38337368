"""Forgetting control: NEFTune embedding noise and a KL-to-base penalty, as pure functions.

NEFTune (Jain et al., 2023) adds uniform noise to the input embeddings during training only,
scaled by alpha / sqrt(L * d), where L is the example's length and d the hidden size. Under
packing a row holds several examples, so L is each token's own segment length, not the row
length: scaling by the row length would shrink the noise for every example that happens to share
a row, and the amount of noise would depend on how the packer filled the rows.

The KL penalty keeps the fine-tuned distribution near the base model's on the tokens we train:
KL(p_model || p_base) summed over the vocabulary at every loss position, summed over positions,
and (like the cross-entropy) divided once by the loss-token count of the whole global batch, so
it accumulates over micro-batches and data-parallel devices exactly like the loss does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_lengths(segment_ids: jax.Array) -> jax.Array:
    """int [B, T] segment ids (0 = padding) -> float32 [B, T]: each token's segment length.

    Padding positions get 1 (their noise is irrelevant: they are masked out of attention and
    loss), which keeps the scale finite.
    """
    length = segment_ids.shape[1] + 1  # segment ids are < T + 1

    def row(ids: jax.Array) -> jax.Array:
        return jnp.bincount(ids, length=length)[ids]

    lengths = jax.vmap(row)(segment_ids).astype(jnp.float32)
    return jnp.where(segment_ids > 0, lengths, 1.0)


def neftune_noise(
    embeddings: jax.Array, segment_ids: jax.Array, alpha: float, rng: jax.Array
) -> jax.Array:
    """Embeddings [B, T, D] plus Uniform(-1, 1) * alpha / sqrt(L * D) noise (L per segment).

    Padding positions get no noise. Computed in float32 and cast back to the embeddings' dtype.
    """
    hidden = embeddings.shape[-1]
    scale = alpha / jnp.sqrt(segment_lengths(segment_ids) * hidden)  # [B, T]
    scale = jnp.where(segment_ids > 0, scale, 0.0)
    noise = jax.random.uniform(rng, embeddings.shape, jnp.float32, minval=-1.0, maxval=1.0)
    noisy = embeddings.astype(jnp.float32) + noise * scale[..., None]
    return noisy.astype(embeddings.dtype)


def kl_to_base(logits: jax.Array, base_logits: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Sum over masked positions of KL(softmax(logits) || softmax(base_logits)), float32.

    The base logits are constants: no gradient flows into the base model.
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(jax.lax.stop_gradient(base_logits).astype(jnp.float32), axis=-1)
    per_position = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B, T]
    return jnp.sum(per_position * loss_mask.astype(jnp.float32))
