"""Ring attention: attention over a sequence split across the devices of a `context` mesh axis.

Why: at long context the [T, S] scores of one row no longer fit one device, and neither does the
flash-style residual of a whole sequence's keys and values times every layer. Here each device
holds one chunk of the sequence (queries, keys, values, and their segment ids and positions);
the key/value chunks travel around the ring of context devices with `lax.ppermute`, and each
device folds every chunk it receives into its own queries' attention with an online softmax
(running maximum and sum, float32). No device ever holds more than one chunk of keys and values
beyond its own, nor more than a [block, block] tile of scores, so memory is linear in T.

- The mask is built tile by tile from data, not from slot indices: a query sees a key when both
  carry the same segment id (packing), the key's position is not after the query's (causal), and,
  with a sliding window, fewer than `window` positions behind. Because positions travel with the
  tokens, any permutation of the sequence gives the same attention; `reorder_for_context` uses
  that to balance the causal work (below).
- Tiles whose every pair is masked are skipped with `lax.cond` (decided from the tile's ranges of
  segment ids and positions, a few scalar reductions), so after load balancing each device does
  about the same work and about half the causal tiles cost nothing.
- The backward is a custom VJP that recomputes each tile's probabilities from the forward's
  log-sum-exp (as flash attention does) and rotates keys and values again, together with their
  dK/dV accumulators: after a full turn of the ring each chunk's gradients arrive back home, so
  the backward's memory is linear in T too.
- Grouped-query heads are folded as [B, T, K, G, H] (query head n uses kv head n // G, HF's
  `repeat_kv`); kv heads are never repeated. A Gemma 2 logit soft-cap squashes the scaled scores
  before masking, as the reference does.

Load balancing (as MaxText and torchtitan do): with a causal mask, the device holding the last
chunk of the sequence has the most work. `reorder_for_context` splits the sequence into 2n
chunks and gives device i chunks i and 2n-1-i (one early, one late); apply it to tokens, segment
ids and positions alike before the model and `restore_order` to anything per-token after it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:
    from collections.abc import Sequence

    from jax.sharding import Mesh

BLOCK = 512  # query and key positions per tile: bounds the per-device temporaries
# Scores of masked pairs: finite, so no inf - inf; probabilities there are also zeroed by select.
_MASKED = -1e30


# --------------------------------------------------------------------------------------------
# Load-balancing permutation of the sequence.


def balanced_order(length: int, n: int) -> np.ndarray:
    """Slot order that gives device i chunks i and 2n-1-i of 2n equal chunks."""
    if length % (2 * n):
        raise ValueError(f"sequence length {length} is not a multiple of 2 x {n} context devices")
    chunks = np.arange(length).reshape(2 * n, length // (2 * n))
    return np.concatenate([chunks[j] for i in range(n) for j in (i, 2 * n - 1 - i)])


def reorder_for_context(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """x with its `axis` (the sequence) permuted so that n contiguous shards are causally balanced.

    Apply it to everything per token (inputs, targets, masks, segment ids, positions): the
    attention reads positions as data, so the permuted sequence attends exactly as the original.
    """
    return jnp.take(x, balanced_order(x.shape[axis], n), axis=axis)


def restore_order(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """The inverse of `reorder_for_context`."""
    return jnp.take(x, np.argsort(balanced_order(x.shape[axis], n)), axis=axis)


# --------------------------------------------------------------------------------------------
# Public entry point.


def context_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    *,
    mesh: Mesh,
    context_axis: str = "context",
    batch_axes: Sequence[str] = ("data", "fsdp"),
    head_axis: str | None = "tensor",
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    block: int = BLOCK,
) -> jax.Array:
    """q [B, T, N, H], k/v [B, T, K, H], segment_ids/positions int [B, T] -> [B, T, N, H].

    The sequence is split over `context_axis`, the batch over `batch_axes` and the heads over
    `head_axis` (axes the mesh lacks are left out). `positions` order the tokens of a segment
    (causality and the window are decided on them); pass the row's slot indices, permuted like
    the tokens, to mask exactly as `attention.attention_mask`, padding included. Every query must
    see at least itself, which holds for any segment ids and positions.
    """
    names = set(mesh.axis_names)
    if context_axis not in names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no context axis {context_axis!r}")
    batch = tuple(a for a in batch_axes if a in names) or None
    heads = head_axis if head_axis in names else None
    ring = mesh.shape[context_axis]
    _check_shapes(q, k, ring, mesh.shape[heads] if heads else 1)
    local_t = q.shape[1] // ring
    config = _Config(
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        softcap=softcap,
        window=window,
        block=_tile(local_t, block),
        axis=context_axis,
        ring=ring,
    )
    tokens, rows = P(batch, context_axis, heads, None), P(batch, context_axis)
    per_device = jax.shard_map(
        functools.partial(_ring_attention, config=config),
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, rows, rows),
        out_specs=tokens,
    )
    return per_device(q, k, v, segment_ids, positions)


def _check_shapes(q: jax.Array, k: jax.Array, ring: int, head_shards: int) -> None:
    """Errors that name the mismatch, before shard_map reports it as a spec error."""
    if q.shape[1] % ring:
        raise ValueError(f"sequence length {q.shape[1]} does not split over {ring} context devices")
    if k.shape[2] % head_shards or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"{q.shape[2]} query heads and {k.shape[2]} kv heads: kv heads must divide query "
            f"heads and split over the {head_shards} head shards"
        )


def _tile(length: int, block: int) -> int:
    """The tile size: `block`, or the whole local chunk when it is shorter."""
    if length <= block:
        return length
    if length % block:
        raise ValueError(f"local sequence chunk {length} is not a multiple of block {block}")
    return block


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static settings of one ring attention (hashable: a nondiff argument of the custom VJP)."""

    scale: float
    softcap: float | None
    window: int | None
    block: int  # tile size, queries and keys
    axis: str  # the context mesh axis
    ring: int  # its size


# --------------------------------------------------------------------------------------------
# Tiles: mask, skip test, scores.


def _tile_mask(qseg, qpos, kseg, kpos, window):
    """bool [b, q, s]: same segment, key not after the query, within the window."""
    mask = (qseg[:, :, None] == kseg[:, None, :]) & (kpos[:, None, :] <= qpos[:, :, None])
    if window is not None:
        mask &= qpos[:, :, None] - kpos[:, None, :] < window
    return mask


def _tile_visible(qseg, qpos, kseg, kpos, window):
    """False when no pair of the tile can be unmasked: every key after every query, segment id
    ranges that do not meet, or every key a window or more behind. Conservative: a True tile
    may still be fully masked, and is then computed (correctly) for nothing."""
    visible = jnp.min(kpos) <= jnp.max(qpos)
    visible &= (jnp.min(kseg) <= jnp.max(qseg)) & (jnp.min(qseg) <= jnp.max(kseg))
    if window is not None:
        visible &= jnp.min(qpos) - jnp.max(kpos) < window
    return visible


def _scores(q, k, config):
    """Scaled, soft-capped float32 scores [b, q, K, G, s]; q [b, q, K, G, H], k [b, s, K, H]."""
    s = jnp.einsum("bqkgh,bskh->bqkgs", q, k, preferred_element_type=jnp.float32)
    s = s * config.scale
    if config.softcap is not None:
        s = jnp.tanh(s / config.softcap) * config.softcap
    return s


def _blocks(x, block):
    """[b, t, ...] -> [t / block, b, block, ...]: the leading axis is what lax.scan walks."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // block, block, *x.shape[2:]), 1, 0)


def _unblock(x):
    """The inverse of `_blocks`."""
    n, b, block = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * block, *x.shape[3:])


def _full(like, shape, value=0.0):
    """float32 `value` of `shape`, varying over the same mesh axes as `like`: shard_map's type
    check wants both branches of a cond and a scan's carry to agree on which axes they vary."""
    x = jnp.full(shape, value, jnp.float32)
    return jax.lax.pcast(x, tuple(sorted(jax.typeof(like).manual_axis_type.varying)), to="varying")


def _rotate(xs, config):
    """Each device's arrays to the next device of the ring (device i sends to i + 1)."""
    perm = [(i, (i + 1) % config.ring) for i in range(config.ring)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, config.axis, perm), xs)


# --------------------------------------------------------------------------------------------
# Forward: online softmax over the ring.


def _forward_tile(state, q, qseg, qpos, kv_tile, config):
    """Folds one key tile into a query tile's running (max, sum, output), all float32."""
    k, v, kseg, kpos = kv_tile
    m, total, acc = state  # [b, q, K, G], [b, q, K, G], [b, q, K, G, H]
    mask = _tile_mask(qseg, qpos, kseg, kpos, config.window)[:, :, None, None, :]
    s = jnp.where(mask, _scores(q, k, config), _MASKED)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    pv = jnp.einsum("bqkgs,bskh->bqkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, total * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv


def _forward_chunk(state, q, qseg, qpos, kv, config):
    """Folds one held key/value chunk into every local query tile, skipping masked tiles.
    Everything arrives in tiles ([tiles, b, block, ...], `_blocks`), so nothing is copied."""

    def per_query_tile(args):
        tile_state, q_t, qseg_t, qpos_t = args

        def per_key_tile(st, kv_tile):
            fold = functools.partial(_forward_tile, q=q_t, qseg=qseg_t, qpos=qpos_t, config=config)
            visible = _tile_visible(qseg_t, qpos_t, kv_tile[2], kv_tile[3], config.window)
            return jax.lax.cond(visible, lambda s: fold(s, kv_tile=kv_tile), lambda s: s, st), None

        return jax.lax.scan(per_key_tile, tile_state, kv)[0]

    return jax.lax.map(per_query_tile, (state, q, qseg, qpos))


def _ring_forward(q, k, v, qseg, qpos, config):
    """(output float32, log-sum-exp) of the local query tiles q [tiles, b, block, K, G, H]."""
    state = (_full(q, q.shape[:-1], _MASKED), _full(q, q.shape[:-1]), _full(q, q.shape))
    chunk = functools.partial(_forward_chunk, q=q, qseg=qseg, qpos=qpos, config=config)
    state = chunk(state, kv=(k, v, qseg, qpos))  # the local chunk first: no communication

    def step(carry, _):
        state, kv = carry
        kv = _rotate(kv, config)
        return (chunk(state, kv=kv), kv), None

    (state, _), _ = jax.lax.scan(step, (state, (k, v, qseg, qpos)), length=config.ring - 1)
    m, total, acc = state
    return acc / total[..., None], m + jnp.log(total)


# --------------------------------------------------------------------------------------------
# Backward: recompute each tile, rotate keys/values with their gradient accumulators.


def _backward_tile(dq, q, do, lse, delta, qseg, qpos, kv_tile, config):
    """One tile's gradients: (dq + this tile's dq, dk tile, dv tile), float32."""
    k, v, kseg, kpos = kv_tile
    mask = _tile_mask(qseg, qpos, kseg, kpos, config.window)[:, :, None, None, :]
    s = _scores(q, k, config)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)  # [b, q, K, G, s]
    dv = jnp.einsum("bqkgs,bqkgh->bskh", p, do.astype(jnp.float32))
    dp = jnp.einsum("bqkgh,bskh->bqkgs", do, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None])
    if config.softcap is not None:  # d tanh: the capped score s = c tanh(x / c)
        ds = ds * (1.0 - jnp.square(s / config.softcap))
    ds = ds * config.scale
    dq = dq + jnp.einsum("bqkgs,bskh->bqkgh", ds, k.astype(jnp.float32))
    dk = jnp.einsum("bqkgs,bqkgh->bskh", ds, q.astype(jnp.float32))
    return dq, dk, dv


def _backward_chunk(dq, grads, per_query, kv, config):
    """Adds one held chunk's contributions to the local dq and to the chunk's (dk, dv)."""

    def per_query_tile(kv_grads, args):
        dq_t, q_t, do_t, lse_t, delta_t, qseg_t, qpos_t = args

        def per_key_tile(dq_t, kv_tile):
            tile = functools.partial(
                _backward_tile, q=q_t, do=do_t, lse=lse_t, delta=delta_t,
                qseg=qseg_t, qpos=qpos_t, kv_tile=kv_tile, config=config,
            )  # fmt: skip
            k, v = kv_tile[:2]
            skip = lambda dq: (dq, _full(k, k.shape), _full(v, v.shape))
            visible = _tile_visible(qseg_t, qpos_t, kv_tile[2], kv_tile[3], config.window)
            dq_t, dk, dv = jax.lax.cond(visible, tile, skip, dq_t)
            return dq_t, (dk, dv)

        dq_t, (dk, dv) = jax.lax.scan(per_key_tile, dq_t, kv)
        return (kv_grads[0] + dk, kv_grads[1] + dv), dq_t

    grads, dq = jax.lax.scan(per_query_tile, grads, (dq, *per_query))
    return dq, grads


def _ring_backward(q, k, v, qseg, qpos, out, lse, do, config):
    """(dq, dk, dv) float32 of the local chunk, after one full turn of the ring."""
    delta = jnp.sum(out * do.astype(jnp.float32), axis=-1)  # [tiles, b, block, K, G]
    per_query = (q, do, lse, delta, qseg, qpos)
    chunk = functools.partial(_backward_chunk, per_query=per_query, config=config)
    zeros = (_full(k, k.shape), _full(v, v.shape))
    dq = _full(q, q.shape)

    def step(carry, _):
        dq, kv, grads = carry
        dq, grads = chunk(dq, grads, kv=kv)
        kv, grads = _rotate((kv, grads), config)
        return (dq, kv, grads), None

    carry = (dq, (k, v, qseg, qpos), zeros)
    (dq, kv, grads), _ = jax.lax.scan(step, carry, length=config.ring - 1)
    dq, grads = chunk(dq, grads, kv=kv)
    return dq, *_rotate(grads, config)  # the last hop brings each chunk's (dk, dv) home


# --------------------------------------------------------------------------------------------
# Per-device function with its custom VJP.


def _ring_attention(q, k, v, segment_ids, positions, *, config):
    """The body run on each device: its chunk [b, t, n, H] of the queries -> their output.

    Cut into tiles once, here, outside the custom VJP: inside it every array (and the ring's
    carries) stays in tiles, so no per-step copy of a whole chunk is made to tile or untile it.
    """
    b, t, n, h = q.shape
    gq = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
    tiles = (_blocks(x, config.block) for x in (gq, k, v, segment_ids, positions))
    return _unblock(_ring_core(*tiles, config)).reshape(b, t, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring_core(q, k, v, segment_ids, positions, config):
    out, _ = _ring_forward(q, k, v, segment_ids, positions, config)
    return out.astype(q.dtype)


def _ring_core_fwd(q, k, v, segment_ids, positions, config):
    out, lse = _ring_forward(q, k, v, segment_ids, positions, config)
    return out.astype(q.dtype), (q, k, v, segment_ids, positions, out, lse)


def _ring_core_bwd(config, residuals, do):
    q, k, v, segment_ids, positions, out, lse = residuals
    dq, dk, dv = _ring_backward(q, k, v, segment_ids, positions, out, lse, do, config)
    no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    return (
        dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
        no_grad(segment_ids), no_grad(positions),
    )  # fmt: skip


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)
