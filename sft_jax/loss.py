"""Masked token cross-entropy, returned as (sum, count) so normalisation happens exactly once.

Why a sum and a count instead of a mean: a mean per micro-batch or per device, averaged again,
weights short examples more than long ones and makes gradient accumulation differ from one big
batch. The train step divides the summed loss by the number of loss tokens in the whole global
batch, once. The mask is its own tensor (never inferred from token values such as the pad id).
"""

import jax
import jax.numpy as jnp


def masked_cross_entropy(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Returns (sum of -log p(target) over masked positions, number of masked positions).

    logits: [B, T, V] (any float dtype; computed in float32), targets: int [B, T],
    loss_mask: bool or {0, 1} [B, T]. Both results are float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(mask)
