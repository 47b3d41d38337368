"""Masked token cross-entropy, returned as (sum, count) so normalisation happens exactly once.

Why a sum and a count instead of a mean: a mean per micro-batch or per device, averaged again,
weights short examples more than long ones and makes gradient accumulation differ from one big
batch. The train step divides the summed loss by the number of loss tokens in the whole global
batch, once. The mask is its own tensor (never inferred from token values such as the pad id).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

AUTO_CHUNK = -1  # model.loss_chunk's default: chunk only where the whole logits would not fit
# Auto chunks when one device's float32 logits for a micro-batch would exceed this: with their
# gradient that is twice as much, more than the rest of a small model's step at long context.
WHOLE_LOGITS_LIMIT = 1 << 30
# Auto's pieces hold at most this many bytes of float32 logits (and as many of their gradient),
# but never fewer than MIN_AUTO_CHUNK positions, so the scan stays short.
PIECE_BYTES = 128 << 20
MIN_AUTO_CHUNK = 128


def resolve_loss_chunk(
    setting: int, *, rows: int, seq_len: int, vocab_size: int, kl_to_base: bool
) -> int:
    """Positions per cross-entropy piece for one device's micro-batch of `rows` x `seq_len`
    (0: whole logits). `setting` is model.loss_chunk: >= 0 is used as given; AUTO_CHUNK keeps
    the whole [rows, T, V] float32 logits when they take at most WHOLE_LOGITS_LIMIT bytes (the
    single pass is the faster one), else cuts the sequence into pieces of the largest power of
    two positions whose logits fit PIECE_BYTES. The KL to the base reads whole logits, so it
    keeps them."""
    if setting != AUTO_CHUNK:
        return setting
    per_position = 4 * vocab_size * max(rows, 1)
    if kl_to_base or per_position * seq_len <= WHOLE_LOGITS_LIMIT:
        return 0
    chunk = 1 << max((PIECE_BYTES // per_position).bit_length() - 1, 0)
    return min(max(chunk, MIN_AUTO_CHUNK), seq_len)


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


def chunked_cross_entropy(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    chunk: int,
    shards: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """`masked_cross_entropy(logits_fn(hidden), ...)` without ever holding the [B, T, V] logits.

    Why: at Llama-3 vocabularies (V = 128k) the float32 logits of a 4 x 2048 batch and their
    gradient take 8 GB. Here the sequence is cut into pieces of `chunk` positions (all rows of
    the batch at once, so batch sharding is untouched); a `lax.scan` computes each piece's
    logits [B, chunk, V] and its summed loss, and `jax.checkpoint` makes the backward pass
    recompute them piece by piece instead of storing them. The LM head's weight gradient
    accumulates across pieces in the scan. Costs one extra LM-head matmul (the recompute).

    With the sequence split into `shards` (context parallelism: each device holds T / shards
    positions of every row) the pieces are cut inside each device's part, so step p of the scan
    takes positions [p * chunk, (p + 1) * chunk) of every part at once and stays on the devices
    that hold them; pieces across the whole T would hand each step to one device in turn.

    logits_fn: final-normed hidden [B, C, D] -> float32 logits [B, C, V] (the model's LM head,
    tied or not, with LoRA adapters if any). hidden [B, T, D]; each part is padded to a
    multiple of `chunk` with masked-out positions. Returns (loss sum, loss-token count), float32
    scalars.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, t = hidden.shape[:2]
    if t % shards:
        raise ValueError(f"sequence length {t} does not split into {shards} parts")
    part = t // shards
    chunk = min(chunk, part)
    pad = -part % chunk
    pieces = (part + pad) // chunk

    def to_pieces(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [pieces, B, shards * chunk, ...]
        x = x.reshape(b, shards, part, *x.shape[2:])
        if pad:
            x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        x = jnp.moveaxis(x.reshape(b, shards, pieces, chunk, *x.shape[3:]), 2, 0)
        return x.reshape(pieces, b, shards * chunk, *x.shape[4:])

    mask = loss_mask.astype(jnp.float32)

    @jax.checkpoint
    def piece_loss(h: jax.Array, tgt: jax.Array, m: jax.Array) -> jax.Array:
        return masked_cross_entropy(logits_fn(h), tgt, m)[0]

    def body(total: jax.Array, piece: tuple) -> tuple[jax.Array, None]:
        return total + piece_loss(*piece), None

    xs = (to_pieces(hidden), to_pieces(targets), to_pieces(mask))
    total, _ = jax.lax.scan(body, jnp.float32(0.0), xs)
    return total, jnp.sum(mask)
