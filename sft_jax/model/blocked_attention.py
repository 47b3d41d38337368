"""Causal-blocked attention with a flash-style backward: the fast attention core on CPU.

Why it exists: on the CPU benchmark workload, `jax.nn.dot_product_attention` (XLA) took over
half of the train step. XLA:CPU runs each op over the whole [B, N, T, S] score tensor in turn
(scores, mask, max, exp, sum, divide, and as many again in the backward), so attention is paid
in passes over memory, and half of those scores lie above the causal diagonal. Here:

- queries go in blocks of `block` positions, and block [s, e) reads only keys [0, e): keys after
  the block's last query are masked for every query in it (the mask is always causal in
  training), so skipping them changes nothing but the work (10 of 16 score blocks at T = 512,
  block 128; 36 of 64 at block 64);
- the forward keeps only the output and the log-sum-exp per query (not the probabilities), and
  the backward recomputes each block's probabilities from them, as flash attention does: fewer
  passes over [.., T, S] tensors and a per-layer residual of O(T) instead of O(T^2);
- the backward holds its recomputed score blocks transposed (keys x queries), so that every
  dot in it is a plain matmul: in [.., Q, S] blocks, dV = P^T dO and dK = dS^T Q contract the
  leading axis of both operands, which XLA:CPU runs several times slower than the other dots;
- grouped-query heads are folded into the query rows ([B, K, G*t, H]), so kv heads are never
  repeated;
- in the forward the mask enters as an additive bias (0 or -1e30) and the softmax scale is
  applied to the queries once: one add per score block instead of a multiply and a select, fewer
  passes over the scores; the backward masks its transposed blocks with one select (-1e30), so the
  recomputed probabilities are exactly 0 there (a float32 bias would be kept per block for the
  whole backward, see `_block_mask_t`).

Long sequences (T >= `LOOP_FROM`) take a looped version of the same kernel. The unrolled
blocks above are independent of each other, so XLA:CPU schedules them freely and keeps every
block's score temporaries alive at once: the step's temporary memory grows as T^2 (a chain of
optimization barriers between the blocks did not change that). The looped kernel cuts queries
and keys into [tile, tile] tiles and walks them with `lax.scan` over query tiles and
`lax.fori_loop` over key tiles, which XLA cannot flatten, so only one tile's temporaries exist at
a time (memory linear in T):

- online softmax in the forward (running maximum, sum and output per query row, float32) and
  the same transposed, recomputing backward as above, with dK and dV accumulated in place in the
  loop's carry;
- the key loop runs over [first tile that can be seen, i] only: nothing after the diagonal
  (causal), nothing wholly outside the window (traced bound), and on packed rows nothing before
  the first tile whose segment id range meets tile i's; tiles inside that range whose segment
  ranges do not meet are skipped with `lax.cond`. Attention work then grows with T times the
  example length, not T^2;
- a sequence that is not a multiple of the tile is padded with a segment of its own, which real
  queries never see, and cut back after.
Below `LOOP_FROM` the unrolled kernel stays: it is the tuned path of the main CPU benchmark (T =
512), where the two measured within noise of each other (docs/benchmarks.md, "Long context").

Attention sinks (gpt-oss: a learned logit per query head that joins every query's softmax
denominator, with no value) seed the online softmax: the running maximum starts at the sink and
the running sum at exp(sink - sink) = 1 (the unrolled blocks add the sink's term to their
sum). The saved log-sum-exp then includes the sink, so the backward's recomputed probabilities
are right as they are, and the sink's own gradient is -sum over queries of p_sink * rowsum(dO *
O) (its value is zero), computed from the saved statistics outside the loops. Without sinks
the kernels are unchanged (a static branch).

No dense [B, T, S] mask is read or built: each block makes its own from the segment ids and the
slots (causal, same packed segment, and on local layers the sliding window), the same mask as
`attention.attention_mask` (and `window_mask`), so packing is honoured exactly and attention
memory stays linear in T apart from the block being computed. Scores, softmax and
gradients are float32; the probability-value product runs in the value dtype (bf16 under mixed
precision) with float32 accumulation. The measurements behind these choices, with their commands,
are in docs/benchmarks.md ("Figures behind design choices", and the attention levers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 64  # query positions per block: the fastest size on CPU (docs/benchmarks.md)
TILE = 128  # query and key positions per tile of the looped kernel (docs/benchmarks.md)
LOOP_FROM = 1024  # sequences this long or longer take the looped kernel (module docstring)
# Additive mask: 0 where a query sees a key, this where it does not. Finite, so a score plus it
# never overflows to -inf (no inf - inf); exp of it minus a row's maximum is exactly 0.
_MASKED = -1e30


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    window: jax.Array | int | None = None,
    sinks: jax.Array | None = None,
    block: int = BLOCK,
    tile: int = TILE,
    loop_from: int = LOOP_FROM,
) -> jax.Array:
    """q [B, T, N, H], k/v [B, T, K, H], segment_ids int [B, T] -> [B, T, N, H].

    A query sees a key at or before its own slot with the same segment id (padding, segment 0,
    sees earlier padding, as `attention.attention_mask` defines it, so no row is fully masked)
    and, when `window` (an int or a traced int32 scalar, e.g. chosen per scanned layer) is given,
    less than `window` slots behind it. Keys and queries must be the same positions (training,
    no KV cache): the block skipping relies on the mask being causal. `block` sizes the unrolled
    kernel's query blocks, `tile` the looped kernel's tiles; T >= `loop_from` picks the looped one.
    `sinks` [N]: per-head sink logits (module docstring), None: none.
    """
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"blocked attention needs S == T (got T={q.shape[1]}, S={k.shape[1]})")
    if segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids {segment_ids.shape} must be [B, T] = {q.shape[:2]}")
    limit = q.shape[1] if window is None else window  # q - k < T holds for every causal pair
    limit = jnp.asarray(limit, jnp.int32)
    if sinks is not None:  # [K, G] float32: query head n belongs to kv head n // G
        sinks = sinks.astype(jnp.float32).reshape(k.shape[2], -1)
    if q.shape[1] >= loop_from:
        return _looped(q, k, v, segment_ids, limit, sinks, scale, min(tile, q.shape[1]))
    return _attention(q, k, v, segment_ids, limit, sinks, scale, block)


def _group_queries(x: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, N, H] -> [B, K, G, T, H]: query head n belongs to kv head n // G (HF's repeat_kv)."""
    b, t, n, h = x.shape
    return x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def _ungroup(x: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, N, H], the inverse of `_group_queries`."""
    b, kv, g, t, h = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)


def _heads_first(x: jax.Array) -> jax.Array:
    """[B, S, K, H] <-> [B, K, S, H]."""
    return x.transpose(0, 2, 1, 3)


def _blocks(t: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _rows(x: jax.Array, start: int, end: int) -> jax.Array:
    """[B, K, G, T, X] -> the block's rows [B, K, G * (end - start), X] (heads of a group first)."""
    b, kv, g, _, last = x.shape
    return x[:, :, :, start:end].reshape(b, kv, g * (end - start), last)


def _block_mask(segment_ids: jax.Array, limit: jax.Array, start: int, end: int) -> jax.Array:
    """bool [B, end - start, end]: queries [start, end) against keys [0, end). The same mask as
    `attention.window_mask(attention.attention_mask(segment_ids), ...)` restricted to the block,
    made from [B, T] segment ids and slots, so no [B, T, S] array exists."""
    q_slots = jnp.arange(start, end)[:, None]
    k_slots = jnp.arange(end)[None, :]
    slots = (k_slots <= q_slots) & (q_slots - k_slots < limit)
    same = segment_ids[:, start:end, None] == segment_ids[:, None, :end]
    return same & slots[None]


def _block_bias(
    segment_ids: jax.Array, limit: jax.Array, groups: int, start: int, end: int
) -> jax.Array:
    """The block's additive mask [B, 1, G * (end - start), end] (0 where a query sees a key,
    _MASKED elsewhere), rows laid out as `_rows`. Made per block from the segment ids, so XLA
    fuses it into the add: no float32 (nor bool) copy of a [B, T, T] mask is ever held."""
    b = segment_ids.shape[0]
    rows = _block_mask(segment_ids, limit, start, end)[:, None, None]
    rows = jnp.broadcast_to(rows, (b, 1, groups, end - start, end)).reshape(b, 1, -1, end)
    return jnp.where(rows, 0.0, _MASKED).astype(jnp.float32)


def _scores(q_rows: jax.Array, keys: jax.Array, bias: jax.Array) -> jax.Array:
    """Masked scores [B, K, Q, S] of pre-scaled queries: one add, no select."""
    s = jnp.einsum("BKQH,BKSH->BKQS", q_rows, keys, preferred_element_type=jnp.float32)
    return s + bias


def _grouped_inputs(q, k, v, scale):
    """Queries scaled once ([B, T, N, H] pass instead of one per score block), then grouped."""
    scaled = q * jnp.asarray(scale, q.dtype)
    return _group_queries(scaled, k.shape[2]), _heads_first(k), _heads_first(v)


def _sink_rows(sinks: jax.Array, rows: int) -> jax.Array:
    """Sinks [K, G] as a per-row statistic [1, K, G * rows, 1] in `_rows`' layout."""
    kv, g = sinks.shape
    return jnp.broadcast_to(sinks[:, :, None], (kv, g, rows)).reshape(1, kv, g * rows, 1)


def _untile_stat(x: jax.Array) -> jax.Array:
    """A per-query statistic of the looped kernel, [n, B, K, G, Q], as [B, K, G, n * Q]."""
    return jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], -1)


def _sink_grad(sinks: jax.Array, lse: jax.Array, delta: jax.Array) -> jax.Array:
    """d loss / d sinks [K, G] from the per-query log-sum-exp (sink included) and rowsum(dO * O),
    both [B, K, G, T] (trailing 1 allowed): the sink's probability p = exp(sink - lse) and its
    value is zero, so its score gradient is p * (0 - delta), summed over batch and queries."""
    lse, delta = lse.reshape(*lse.shape[:4]), delta.reshape(*delta.shape[:4])
    return -jnp.sum(jnp.exp(sinks[None, :, :, None] - lse) * delta, axis=(0, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, segment_ids, limit, sinks, scale, block):
    return _forward(q, k, v, segment_ids, limit, sinks, scale, block)[0]


def _forward(q, k, v, segment_ids, limit, sinks, scale, block):
    b, t, _, h = q.shape
    gq, gk, gv = _grouped_inputs(q, k, v, scale)
    groups = gq.shape[2]
    outs, lses = [], []
    for start, end in _blocks(t, block):
        s = _scores(
            _rows(gq, start, end),
            gk[:, :, :end],
            _block_bias(segment_ids, limit, groups, start, end),
        )
        peak = jnp.max(s, axis=-1, keepdims=True)
        if sinks is not None:
            sink = _sink_rows(sinks, end - start)
            peak = jnp.maximum(peak, sink)
        p = jnp.exp(s - peak)
        total = jnp.sum(p, axis=-1, keepdims=True)
        if sinks is not None:
            total = total + jnp.exp(sink - peak)
        pv = jnp.einsum(
            "BKQS,BKSH->BKQH", p.astype(v.dtype), gv[:, :, :end], preferred_element_type=jnp.float32
        )
        shape = (b, gk.shape[1], groups, end - start)
        outs.append((pv / total).reshape(*shape, h))
        lses.append((peak + jnp.log(total)).reshape(*shape, 1))
    out = jnp.concatenate(outs, axis=3)  # [B, K, G, T, H] float32
    lse = jnp.concatenate(lses, axis=3)
    return _ungroup(out).astype(q.dtype), (q, k, v, segment_ids, limit, sinks, out, lse)


def _block_mask_t(segment_ids: jax.Array, limit: jax.Array, start: int, end: int) -> jax.Array:
    """The block's bool mask transposed, [B, 1, end, 1, end - start] (keys, then heads of a
    group, then queries): the broadcast over heads is an outer axis, so the passes over the
    transposed blocks run along contiguous queries. A select, not an additive bias: XLA:CPU
    would hoist a float32 bias per block out of the layers (CSE) and keep them all alive
    through the backward (more temporary memory, docs/benchmarks.md); the bool select fuses
    into the exponential, computed from the segment ids there."""
    k_slots = jnp.arange(end)[:, None]
    q_slots = jnp.arange(start, end)[None, :]
    slots = (k_slots <= q_slots) & (q_slots - k_slots < limit)
    same = segment_ids[:, :end, None] == segment_ids[:, None, start:end]
    return (same & slots[None])[:, None, :, None, :]


def _query_stat_t(x: jax.Array, start: int, end: int) -> jax.Array:
    """A per-query statistic [B, K, G, T, 1] as the block's [B, K, 1, G, end - start]."""
    b, kv, g = x.shape[:3]
    return x[:, :, :, start:end].reshape(b, kv, 1, g, end - start)


def _backward(scale, block, residuals, d_out):
    """Flash backward with the score blocks held transposed, [B, K, S, G, Q] (keys x queries).

    Why transposed: dV = P^T dO and dK = dS^T Q contract the query axis, which in [.., Q, S] blocks
    is the leading axis of both operands; XLA:CPU runs such a dot several times slower than a plain
    one (it copies an operand into transposed order inside it). Recomputing the scores as K Q^T
    gives P^T and dS^T directly, so dV and dK are plain matmuls, and dQ = dS K becomes
    dQ^T = K^T dS^T over keys transposed once per layer ([B, K, H, T], an optimization barrier
    keeps it a separate copy): every dot of the backward is an ordinary matmul.
    """
    q, k, v, segment_ids, limit, sinks, out, lse = residuals
    t = q.shape[1]
    gq, gk, gv = _grouped_inputs(q, k, v, scale)
    grouped_d_out = _group_queries(d_out.astype(jnp.float32), k.shape[2])
    delta = jnp.sum(grouped_d_out * out, axis=-1, keepdims=True)  # rowsum(dO * O)
    keys_t = jax.lax.optimization_barrier(jnp.swapaxes(gk, 2, 3))  # [B, K, H, S]
    dk = jnp.zeros(gk.shape, jnp.float32)
    dv = jnp.zeros(gv.shape, jnp.float32)
    dqs = []
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    for start, end in _blocks(t, block):
        q_cols, do_cols = gq[:, :, :, start:end], grouped_d_out[:, :, :, start:end]
        keys, values = gk[:, :, :end], gv[:, :, :end]
        s_t = f32("BKSH,BKGQH->BKSGQ", keys, q_cols)
        s_t = jnp.where(_block_mask_t(segment_ids, limit, start, end), s_t, _MASKED)
        p_t = jnp.exp(s_t - _query_stat_t(lse, start, end))  # exactly 0 where masked
        dv = dv.at[:, :, :end].add(f32("BKSGQ,BKGQH->BKSH", p_t, do_cols))
        dp_t = f32("BKSH,BKGQH->BKSGQ", values, do_cols)
        ds_t = p_t * (dp_t - _query_stat_t(delta, start, end))
        dk = dk.at[:, :, :end].add(f32("BKSGQ,BKGQH->BKSH", ds_t, q_cols))
        dqs.append(f32("BKHS,BKSGQ->BKHGQ", keys_t[..., :end], ds_t))
    # One transpose of the whole dQ^T, behind a barrier: XLA would otherwise fold each block's
    # transpose into its dot and contract the keys axis of dS^T again.
    dq_t = jax.lax.optimization_barrier(jnp.concatenate(dqs, axis=4))  # [B, K, H, G, T]
    # Scores used scaled queries: d(scores)/dq carries the scale once, and dk's q_cols have it.
    dq = _ungroup(jnp.moveaxis(dq_t, 2, 4)) * scale
    return (
        dq.astype(q.dtype),
        _heads_first(dk).astype(k.dtype),
        _heads_first(dv).astype(v.dtype),
        None,  # segment ids and window: integers, no cotangent
        None,
        None if sinks is None else _sink_grad(sinks, lse, delta),
    )


_attention.defvjp(_forward, _backward)


# --------------------------------------------------------------------------------------------
# Long sequences: the same attention with its tiles walked by loops.


def _tiles_of(x: jax.Array, tile: int, axis: int) -> jax.Array:
    """x with `axis` (length n * tile) split, the tile index moved first: [n, ..., tile, ...]."""
    shape = (*x.shape[:axis], x.shape[axis] // tile, tile, *x.shape[axis + 1 :])
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _looped(q, k, v, segment_ids, limit, sinks, scale, tile):
    """`_looped_core` on a sequence padded to a multiple of `tile`. The padding is a segment of its
    own (an id no real token has), so real queries never see it and its queries see themselves;
    its outputs are cut off, and its gradients with them."""
    t = q.shape[1]
    pad = -t % tile
    if pad:
        widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        q, k, v = (jnp.pad(x, widths(x)) for x in (q, k, v))
        pad_id = jnp.min(segment_ids) - 1
        segment_ids = jnp.pad(segment_ids, widths(segment_ids), constant_values=pad_id)
    return _looped_core(q, k, v, segment_ids, limit, sinks, scale, tile)[:, :t]


def _tile_inputs(q, k, v, segment_ids, scale, tile):
    """Queries [n, B, K, G, Q, H] (scaled), keys/values [n, B, K, Q, H], segment ids [n, B, Q]."""
    gq, gk, gv = _grouped_inputs(q, k, v, scale)
    return (
        _tiles_of(gq, tile, 3),
        _tiles_of(gk, tile, 2),
        _tiles_of(gv, tile, 2),
        _tiles_of(segment_ids, tile, 1),
    )


def _key_tiles(i, limit, tile, segs):
    """The key tiles query tile i may see, as a loop range [lo, i + 1) and a per-tile flag.

    Causal: none after tile i. The window's bound `limit`: none wholly `limit` slots behind the
    tile's first query. Segments: the flag is False where no row's segment id range meets tile
    i's, and the range starts at the first tile that meets (tile i meets itself), so on packed
    rows (examples in contiguous runs) the loop walks only the tiles of the examples in tile i.
    """
    low, high = jnp.min(segs, axis=-1), jnp.max(segs, axis=-1)  # [n, B]
    meets = jnp.any((low <= high[i]) & (low[i] <= high), axis=-1)  # [n]
    lo = jnp.maximum(jnp.maximum(i * tile - limit + 1, 0) // tile, jnp.argmax(meets))
    return lo, i + 1, meets


def _tile_mask(seg_q, seg_k, limit, i, j, tile):
    """bool [B, Q, S] of query tile i against key tile j: `_block_mask`'s rule on slots."""
    q_slots = i * tile + jnp.arange(tile)[:, None]
    k_slots = j * tile + jnp.arange(tile)[None, :]
    slots = (k_slots <= q_slots) & (q_slots - k_slots < limit)
    return (seg_q[:, :, None] == seg_k[:, None, :]) & slots[None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _looped_core(q, k, v, segment_ids, limit, sinks, scale, tile):
    return _looped_forward(q, k, v, segment_ids, limit, sinks, scale, tile)[0]


def _looped_forward(q, k, v, segment_ids, limit, sinks, scale, tile):
    """Online softmax: per query tile, a running (max, sum, output) over its visible key tiles."""
    tq, tk, tv, segs = _tile_inputs(q, k, v, segment_ids, scale, tile)
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

    def fold(j, state, q_i, i):
        peak, total, acc = state  # [B, K, G, Q, 1] twice, [B, K, G, Q, H]
        mask = _tile_mask(segs[i], segs[j], limit, i, j, tile)[:, None, None]
        s = f32("BKGQH,BKSH->BKGQS", q_i, tk[j]) + jnp.where(mask, 0.0, _MASKED)
        new_peak = jnp.maximum(peak, jnp.max(s, axis=-1, keepdims=True))
        # A row whose tiles so far are all masked sums exp(0) = 1s here; its own diagonal key
        # (visited last, j = i) then brings a real maximum, and exp(-1e30 - max) = 0 drops them.
        p = jnp.exp(s - new_peak)
        alpha = jnp.exp(peak - new_peak)
        pv = f32("BKGQS,BKSH->BKGQH", p.astype(v.dtype), tv[j])
        return new_peak, total * alpha + jnp.sum(p, -1, keepdims=True), acc * alpha + pv

    def query_tile(_, xs):
        q_i, i = xs
        lo, hi, meets = _key_tiles(i, limit, tile, segs)
        stat = jnp.full((*q_i.shape[:-1], 1), _MASKED, jnp.float32)
        state = (stat, jnp.zeros_like(stat), jnp.zeros(q_i.shape, jnp.float32))
        if sinks is not None:  # seeded with the sink: maximum the sink, sum exp(0) = 1
            stat = jnp.broadcast_to(sinks[None, :, :, None, None], stat.shape)
            state = (stat, jnp.ones_like(stat), state[2])
        body = lambda j, st: jax.lax.cond(meets[j], lambda s: fold(j, s, q_i, i), lambda s: s, st)
        peak, total, acc = jax.lax.fori_loop(lo, hi, body, state)
        return None, (acc / total, (peak + jnp.log(total))[..., 0])

    _, (out, lse) = jax.lax.scan(query_tile, None, (tq, jnp.arange(tq.shape[0])))
    # out [n, B, K, G, Q, H] -> [B, n, Q, K, G, H] -> [B, T, N, H]
    b, t, n, h = q.shape
    result = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, n, h).astype(q.dtype)
    return result, (q, k, v, segment_ids, limit, sinks, out, lse)


def _looped_backward(scale, tile, residuals, d_out):
    """Flash backward over the same tiles, held transposed (keys x queries) as in `_backward`, so
    every dot is a plain matmul; dK and dV accumulate in place in the loop's carry."""
    q, k, v, segment_ids, limit, sinks, out, lse = residuals
    tq, tk, tv, segs = _tile_inputs(q, k, v, segment_ids, scale, tile)
    t_do = _tiles_of(_group_queries(d_out.astype(jnp.float32), k.shape[2]), tile, 3)
    delta = jnp.sum(t_do * out, axis=-1)  # [n, B, K, G, Q]
    keys_t = jnp.swapaxes(tk, -1, -2)  # [n, B, K, H, S]
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

    def tile_grads(j, q_i, do_i, lse_i, delta_i, i):
        mask_t = jnp.swapaxes(_tile_mask(segs[i], segs[j], limit, i, j, tile), 1, 2)
        s_t = f32("BKSH,BKGQH->BKSGQ", tk[j], q_i)
        s_t = jnp.where(mask_t[:, None, :, None], s_t, _MASKED)
        p_t = jnp.exp(s_t - lse_i[:, :, None])  # exactly 0 where masked
        dp_t = f32("BKSH,BKGQH->BKSGQ", tv[j], do_i)
        ds_t = p_t * (dp_t - delta_i[:, :, None])
        return (
            f32("BKHS,BKSGQ->BKHGQ", keys_t[j], ds_t),
            f32("BKSGQ,BKGQH->BKSH", ds_t, q_i),
            f32("BKSGQ,BKGQH->BKSH", p_t, do_i),
        )

    def query_tile(grads, xs):
        i = xs[-1]
        lo, hi, meets = _key_tiles(i, limit, tile, segs)
        b, kv, g, rows, h = xs[0].shape  # dq^T of the tile: [B, K, H, G, Q]
        skip = lambda: (
            jnp.zeros((b, kv, h, g, rows)),
            jnp.zeros(tk.shape[1:]),
            jnp.zeros(tv.shape[1:]),
        )

        def body(j, carry):
            dq_i, dk, dv = carry
            g_q, g_k, g_v = jax.lax.cond(meets[j], lambda: tile_grads(j, *xs), skip)
            return dq_i + g_q, dk.at[j].add(g_k), dv.at[j].add(g_v)

        dq_i, dk, dv = jax.lax.fori_loop(lo, hi, body, (skip()[0], *grads))
        return (dk, dv), dq_i

    zeros = jnp.zeros(tk.shape, jnp.float32)
    xs = (tq, t_do, lse, delta, jnp.arange(tq.shape[0]))
    (dk, dv), dq_t = jax.lax.scan(query_tile, (zeros, zeros), xs)
    # dq_t [n, B, K, H, G, Q] -> [B, n, Q, K, G, H]; the scores used scaled queries (see _backward)
    b, t, n, h = q.shape
    dq = dq_t.transpose(1, 0, 5, 2, 4, 3).reshape(b, t, n, h) * scale
    untile = lambda x: _heads_first(jnp.moveaxis(x, 0, 2).reshape(b, k.shape[2], t, h))
    return (
        dq.astype(q.dtype),
        untile(dk).astype(k.dtype),
        untile(dv).astype(v.dtype),
        None,
        None,
        None if sinks is None else _sink_grad(sinks, _untile_stat(lse), _untile_stat(delta)),
    )


_looped_core.defvjp(_looped_forward, _looped_backward)
