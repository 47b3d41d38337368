"""Splash attention under context parallelism: each device holds one chunk of the
sequence. Its queries stay local; keys and values are all-gathered along the context axis (the
shard_map's spec leaves their sequence whole, so XLA gathers them before the call and
reduce-scatters their gradients after it), which costs one [T, K, H] copy per device and layer,
small next to the queries' [T, N, H] when kv heads are grouped. The rows arrive in the
causally balanced order of `context_attention.balanced_order` (device i holds chunks i and
2n-1-i of 2n), so every device has the same share of unmasked blocks. The kernel is built for
the whole sequence with `q_seq_shards` = context devices: its static block mask describes the
balanced query order against keys put back in slot order (`_SlotMask`), and its mask tables are
handed to shard_map as an argument sharded along the query blocks (`manual_sharding_spec`), so
each device reads the part of the mask for its own queries.

Its own module because it imports Pallas' splash package at import time (the mask class below
derives from it), which costs about a second: the model imports it only when a run splits the
sequence on a TPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax.model.context_attention import balanced_order
from sft_jax.model.splash_attention import SPLASH_BLOCK, axis_size, kv_repeats
from sft_jax.training import sharding


class _SlotMask(splash_attention_mask._ComputableMask):
    """Causal, optionally windowed, for queries in `q_slots` order against keys in slot order:
    query row r is the token of slot q_slots[r], and it sees key slot s when s <= q_slots[r]
    (and q_slots[r] - s < window). Splash computes it in-kernel from the sharded q_slots."""

    def __init__(self, shape: tuple[int, int], q_slots: np.ndarray, window: int | None):
        self.window = window

        def sees(q_ids, kv_ids):
            visible = q_ids >= kv_ids
            return visible if window is None else visible & (q_ids - kv_ids < window)

        super().__init__(shape=shape, mask_function=sees)
        self.q_sequence = np.asarray(q_slots, dtype=np.int32)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _SlotMask)
            and (self.shape, self.window) == (other.shape, other.window)
            and np.array_equal(self.q_sequence, other.q_sequence)
        )

    def __hash__(self) -> int:
        return hash((type(self), self.shape, self.window, self.q_sequence.tobytes()))


def _context_kernel(t, heads, shards, window, softcap, interpret):
    """The whole sequence's kernel, its mask tables split into `shards` query shards. Splash
    caches the (slow, NumPy) processing of a mask by the mask's hash, so a retrace reuses the
    tables; the kernel itself is rebuilt per trace, since its arrays belong to the trace that
    made them."""
    mask = _SlotMask((t, t), balanced_order(t, shards), window)
    return splash.make_splash_mha(
        splash.MultiHeadMask([mask] * heads),
        head_shards=1,
        q_seq_shards=shards,
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )


def splash_context_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    mesh: Mesh,
    context_axis: str = "context",
    rules: Sequence = (),
    softcap: float | None = None,
    local: jax.Array | None = None,
    window: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T] -> [B, T, N, H], every per-token
    array in the balanced order of `balanced_order(T, context devices)` (as the train step
    permutes rows), split along T over `context_axis` and over batch and heads as `rules`
    split them. Masks exactly as `splash_attention` does on the unpermuted rows."""
    shards = mesh.shape[context_axis]
    t = q.shape[1]
    if t % (2 * shards * SPLASH_BLOCK):
        raise ValueError(
            f"splash under context parallelism needs seq_len a multiple of 2 x {shards} "
            f"context devices x {SPLASH_BLOCK}, got {t}"
        )
    spec = sharding.logical_to_spec(("batch", None, "heads", None), q.shape, mesh, rules)
    repeats = kv_repeats(k.shape[2], axis_size(mesh, spec[2]))
    if repeats > 1:
        k, v = jnp.repeat(k, repeats, axis=2), jnp.repeat(v, repeats, axis=2)
    local_heads = q.shape[2] // axis_size(mesh, spec[2])
    windowed = local is not None and window is not None
    kernels = [_context_kernel(t, local_heads, shards, None, softcap, interpret)]
    if windowed:
        kernels.append(_context_kernel(t, local_heads, shards, window, softcap, interpret))
    kernel_specs = [
        kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(None, context_axis)))
        for kernel in kernels
    ]
    to_slots = np.argsort(balanced_order(t, shards))  # balanced order -> slot order

    def per_device(kernels, q, k, v, q_segments, kv_segments, flag):
        k, v, kv_segments = k[:, to_slots], v[:, to_slots], kv_segments[:, to_slots]
        segments = splash.SegmentIds(q=q_segments, kv=kv_segments)
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)
        args = (heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v))
        run = lambda kernel: jax.vmap(lambda *a: kernel(*a[:3], segment_ids=a[3]))(*args, segments)
        if len(kernels) == 1:
            out = run(kernels[0])
        else:
            out = jax.lax.cond(flag, lambda: run(kernels[1]), lambda: run(kernels[0]))
        return jnp.swapaxes(out, 1, 2).astype(q.dtype)

    queries = PartitionSpec(spec[0], context_axis, spec[2], None)
    gathered = PartitionSpec(spec[0], None, spec[2], None)
    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(
            kernel_specs,
            queries,
            gathered,
            gathered,
            PartitionSpec(spec[0], context_axis),
            PartitionSpec(spec[0], None),
            PartitionSpec(),
        ),
        out_specs=queries,
        check_vma=False,  # the Pallas call carries no varying-axes annotations
    )
    flag = local if windowed else jnp.asarray(False)
    return sharded(kernels, q, k, v, segment_ids, segment_ids, flag)
