"""Splash attention (a Pallas TPU kernel) run per device under `jax.shard_map`.

Why shard_map: XLA cannot partition a Mosaic kernel, so on a mesh of more than one device the
kernel must be called on each device's own block of the arrays. Attention is independent per
batch row and per head, so the blocks are exactly the mesh's batch and head shards: the
specs come from the same rules table as every other array (`sharding.logical_to_spec` with the
logical names batch and heads), and the sequence and head_dim stay whole on each device (the
kernel needs the full rows).

Grouped-query heads: query head n reads kv head n // G. When the query heads split into `a`
shards but the kv heads do not (K not divisible by a), each kv head is repeated
r = a / gcd(K, a) times before the call, the fewest copies that make K * r divisible by a; the
local group size G / r stays whole because N = K * G is divisible by a. The copies are summed
back by the gradient of the repeat.

Attention sinks (gpt-oss: a learned logit per query head in every softmax denominator) are the
kernel's own `sinks` input; under shard_map they split with the query heads.

Masks are static block masks (causal, or causal within a sliding window); packed examples are
kept apart by the kernel's segment ids. The per-layer `local` flag of models with sliding-window
layers is data, so both kernels are compiled and `lax.cond` picks one per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from sft_jax.training import sharding

SPLASH_BLOCK = 128  # splash's default block size: the sequence must be a multiple of it


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    local: jax.Array | None = None,
    window: int | None = None,
    mesh: Mesh | None = None,
    rules: Sequence = (),
    interpret: bool = False,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T] -> [B, T, N, H]; `sinks` [N] or
    None.

    On `mesh` (more than one device) the kernel runs under shard_map, batch and heads split as
    `rules` split them; without a mesh it runs as one call (one device). `local` (a traced bool)
    with `window` selects the sliding-window kernel; `interpret` runs the kernel in Pallas'
    interpreter (tests on CPU).
    """
    t = q.shape[1]
    if t % SPLASH_BLOCK:
        raise ValueError(f"splash attention needs seq_len a multiple of {SPLASH_BLOCK}, got {t}")
    windowed = local is not None and window is not None
    flag = local if windowed else jnp.asarray(False)

    def per_device(q, k, v, segment_ids, flag, sinks):
        run = lambda w: _kernel(q, k, v, segment_ids, w, scale, softcap, interpret, sinks)
        if not windowed:
            return run(None)
        return jax.lax.cond(flag, lambda: run(window), lambda: run(None))

    if mesh is None or mesh.size == 1:
        return per_device(q, k, v, segment_ids, flag, sinks)
    spec = sharding.logical_to_spec(("batch", None, "heads", None), q.shape, mesh, rules)
    repeats = kv_repeats(k.shape[2], axis_size(mesh, spec[2]))
    if repeats > 1:
        k, v = jnp.repeat(k, repeats, axis=2), jnp.repeat(v, repeats, axis=2)
    rows = PartitionSpec(spec[0], None)
    heads = None if sinks is None else PartitionSpec(spec[2])  # sinks split as query heads
    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(spec, spec, spec, rows, PartitionSpec(), heads),
        out_specs=spec,
        check_vma=False,  # the Pallas call carries no varying-axes annotations
    )
    return sharded(q, k, v, segment_ids, flag, sinks)


def kv_repeats(kv_heads: int, head_shards: int) -> int:
    """How many copies of each kv head make the kv heads split into `head_shards` like the
    query heads do (1 when they already do)."""
    return head_shards // math.gcd(kv_heads, head_shards)


def axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    """How many shards a PartitionSpec entry cuts its dimension into."""
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _kernel(q, k, v, segment_ids, window, scale, softcap, interpret, sinks=None):
    """One device's splash call over its rows and heads: static causal (or local-window) block
    sparsity per head, packed segments through `SegmentIds`, `sinks` [heads] (in units of the
    scaled scores, as the queries are pre-scaled) or None."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    t, n = q.shape[1], q.shape[2]
    if window is None:
        head_mask = splash.CausalMask((t, t))
    else:  # keys less than `window` slots behind the query, none ahead
        head_mask = splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * n),
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )
    to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, heads, H] -> [B, heads, T, H]
    segments = splash.SegmentIds(q=segment_ids, kv=segment_ids)
    call = lambda q, k, v, segments: kernel(q, k, v, segment_ids=segments, sinks=sinks)
    out = jax.vmap(call)(
        to_heads_first(q * jnp.asarray(scale, q.dtype)),
        to_heads_first(k),
        to_heads_first(v),
        segments,
    )
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
