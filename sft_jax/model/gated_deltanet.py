"""Gated DeltaNet linear attention (Qwen3.5's linear-attention layers), as transformers'
Qwen3_5GatedDeltaNet computes it.

Per value head the layer keeps a state S [Hk, Hv] that each token t decays and corrects:

    S <- exp(g_t) S;   S <- S + beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T q_t

(q, k L2-normalised, q scaled by Hk^-0.5; g_t = -exp(A_log) softplus(a_t + dt_bias) <= 0 the log
decay, beta_t = sigmoid(b_t) the write strength). q, k and v come out of a short depthwise causal
convolution (kernel K, SiLU) over the input projection; the output is RMS-normalised per head,
gated by SiLU(z) and projected back.

Two forms of the same recurrence:
- `chunked_delta_rule` (training, prefill): the sequence in blocks of C tokens; inside a block
  every token is computed at once (the UT transform: one unit-triangular inverse per block), and a
  `lax.scan` carries S from block to block. Memory is linear in T and the work is matmuls.
- `recurrent_delta_rule` (one token at a time; the reference and the decoding step).

Packing: every row may hold several examples (segment ids). The state and the convolution must
not carry one example into the next, so a token whose segment id differs from the previous
token's starts a new run: the state is zeroed before it, and the convolution reads no input of
an earlier run. Inside a block this is a mask on the pairwise decays; across blocks the carried
state is dropped for the tokens after a boundary. Decoding passes the recurrent state and the
last K-1 convolution inputs from step to step (`DeltaState`), so a step equals the full forward.

Letters: B batch, T length, C chunk, N value heads, M key heads, Hk/Hv key/value head dims,
P conv channels (2 M Hk + N Hv), K conv kernel, D model width.

Parameters (names as HF, for the loader and LoRA; kernels stored [in, out]):

    in_proj_qkv/kernel [D, P]   in_proj_z/kernel [D, N*Hv]   in_proj_{b,a}/kernel [D, N]
    conv1d [K, P]   A_log [N]   dt_bias [N]   norm [Hv] (the gated RMSNorm's w)
    out_proj/kernel [N*Hv, D]

Their channel axes carry no logical sharding name (only `embed` does): q, k and v share the conv
channels and split them apart, so tensor-sharding those axes would only move data around.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.model.config import ModelConfig
from sft_jax.model.hybrid import LINEAR, LinearAttention
from sft_jax.model.layers import Einsum, named_param


class DeltaState(NamedTuple):
    """A linear-attention layer's decoding state: conv [B, K-1, P] (the last inputs of the
    convolution, compute dtype) and state [B, N, Hk, Hv] (the recurrent state, float32)."""

    conv: jax.Array
    state: jax.Array


def init_delta_state(la: LinearAttention, batch: int, dtype: str) -> DeltaState:
    conv = jnp.zeros((batch, la.conv_kernel - 1, la.conv_dim), jnp.dtype(dtype))
    state = jnp.zeros((batch, la.num_value_heads, la.key_head_dim, la.value_head_dim), jnp.float32)
    return DeltaState(conv, state)


def init_hybrid_cache(config: ModelConfig, batch: int, length: int) -> dict[str, dict]:
    """A hybrid model's empty decoding cache, per sub-layer `layer_{j}` of its period, each
    leaf stacked over the L/P periods: a full-attention layer's KV cache {"k", "v"}
    [L/P, B, S, K, H], a linear-attention layer's DeltaState fields {"conv", "state"}."""
    steps = config.num_layers // len(config.period)
    kv = jnp.zeros((steps, batch, length, config.num_kv_heads, config.head_dim), config.dtype)
    delta = init_delta_state(config.linear_attention, batch, config.dtype)._asdict()
    delta = {k: jnp.zeros((steps, *v.shape), v.dtype) for k, v in delta.items()}
    return {
        f"layer_{j}": delta if kind == LINEAR else {"k": kv, "v": kv}
        for j, kind in enumerate(config.period)
    }


def segment_runs(segment_ids: jax.Array) -> jax.Array:
    """int32 [B, T]: run index of each token; a run starts where the segment id changes. The
    first token continues run 0 (the incoming state's run)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1]), jnp.cumsum(change, axis=1, dtype=jnp.int32)], axis=1
    ).astype(jnp.int32)


def causal_conv(
    x: jax.Array, kernel: jax.Array, runs: jax.Array, history: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal convolution of x [B, T, P] with kernel [K, P] (tap K-1 is the current
    token), in float32, reading only inputs of the token's own run. `history` [B, K-1, P]: the
    inputs before x (run 0; zeros when None). Returns (y float32 [B, T, P], new history: the
    last K-1 inputs, zeroed where they are not in the last run, which the next token continues).
    """
    k, t = kernel.shape[0], x.shape[1]
    if history is None:
        history = jnp.zeros((x.shape[0], k - 1, x.shape[2]), x.dtype)
    ext = jnp.concatenate([history.astype(x.dtype), x], axis=1).astype(jnp.float32)
    ext_runs = jnp.concatenate([jnp.zeros_like(runs[:, :1]).repeat(k - 1, axis=1), runs], axis=1)
    w = kernel.astype(jnp.float32)
    y = jnp.zeros(x.shape, jnp.float32)
    for tap in range(k):  # K is small (4): one shifted multiply-add per tap
        same = (ext_runs[:, tap : tap + t] == runs)[..., None]
        y = y + jnp.where(same, ext[:, tap : tap + t], 0.0) * w[tap]
    tail = jnp.where((ext_runs[:, t:] == runs[:, -1:])[..., None], ext[:, t:], 0.0)
    return y, tail.astype(x.dtype)


def _l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _compute_dtype(v: jax.Array) -> jnp.dtype:
    """float32 for every model dtype; float64 for float64 inputs (jax_enable_x64 on), so that
    the same code is its own float64 reference in precision tests."""
    return jnp.promote_types(v.dtype, jnp.float32)


def _prepare(q, k, v, g, beta):
    """Heads-first tensors in the compute dtype: q, k L2-normed, repeated to the value heads
    (each key head serves N // M consecutive value heads), q scaled by Hk^-0.5. q, k
    [B, N, T, Hk], v [B, N, T, Hv], g, beta [B, N, T]."""
    dtype = _compute_dtype(v)
    rep = v.shape[2] // q.shape[2]
    q, k = (jnp.repeat(x, rep, axis=2) if rep > 1 else x for x in (q, k))
    q, k, v = (x.astype(dtype).transpose(0, 2, 1, 3) for x in (q, k, v))
    g, beta = (x.astype(dtype).transpose(0, 2, 1) for x in (g, beta))
    q, k = _l2norm(q), _l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def _initial(state, q, v):
    if state is not None:
        return state.astype(q.dtype)
    b, n, _, hk = q.shape
    return jnp.zeros((b, n, hk, v.shape[-1]), q.dtype)


def recurrent_delta_rule(q, k, v, g, beta, runs=None, state=None):
    """The gated delta rule token by token. q, k [B, T, M, Hk], v [B, T, N, Hv], g, beta
    [B, T, N]; runs [B, T] (`segment_runs`; None: one run); state [B, N, Hk, Hv] or None.
    Returns (out [B, T, N, Hv] in v's dtype, final state float32, float64 for float64 v)."""
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    s0 = _initial(state, q, v)
    if runs is None:
        runs = jnp.zeros(q.shape[:1] + q.shape[2:3], jnp.int32)
    reset = jnp.concatenate([jnp.zeros_like(runs[:, :1]), runs[:, 1:] - runs[:, :-1]], axis=1)
    keep = jnp.where(reset > 0, 0.0, 1.0).T  # [T, B]

    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t, keep_t = xs  # [B, N, H], [B, N], keep [B]
        s = s * (jnp.exp(g_t) * keep_t[:, None])[..., None, None]
        delta = (v_t - jnp.einsum("bnk,bnkv->bnv", k_t, s)) * b_t[..., None]
        s = s + k_t[..., :, None] * delta[..., None, :]
        return s, jnp.einsum("bnk,bnkv->bnv", q_t, s)

    seq_first = lambda x: jnp.moveaxis(x, 2, 0)
    xs = (*(seq_first(x) for x in (q, k, v, g, beta)), keep)
    s, out = jax.lax.scan(step, s0, xs)  # out [T, B, N, Hv]
    return out.transpose(1, 0, 2, 3).astype(dtype), s


def unit_lower_inverse(strict: jax.Array) -> jax.Array:
    """(I + L)^-1 for strictly lower-triangular L [..., C, C], by block inversion: the inverses
    of the diagonal blocks double in size each step,

        [[A, 0], [X, B]]^-1 = [[A^-1, 0], [-B^-1 X A^-1, B^-1]],

    so the work is log2(C) rounds of batched matmuls. Why not `solve_triangular`: on CPU it is
    a LAPACK call that waits for its own batch threads inside XLA's thread pool, and with 8
    host devices scanning over layers and blocks every pool thread ends up waiting: the step
    never finishes. No powers of L are formed, so nothing cancels beyond what a substitution
    does."""
    length = strict.shape[-1]
    width = 1 << (length - 1).bit_length()  # padded to a power of two: the padding's rows are I's
    strict = jnp.pad(strict, [(0, 0)] * (strict.ndim - 2) + [(0, width - length)] * 2)
    lead = strict.shape[:-2]
    # Full float32 products even where the default is one bfloat16 pass (TPU): the blocks are
    # small, and an inverse's error reaches every token of the block.
    matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    blocks = jnp.ones((*lead, width, 1, 1), strict.dtype)  # [..., C/s, s, s]: diagonal blocks
    size = 1
    while size < width:
        n = width // (2 * size)
        tiles = strict.reshape(*lead, n, 2, size, n, 2, size)
        pairs = jnp.diagonal(tiles, axis1=-6, axis2=-3)  # [..., 2, s, 2, s, n]
        off = jnp.moveaxis(pairs[..., 1, :, 0, :, :], -1, -3)  # [..., n, s, s]: X
        upper, lower = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        corner = -matmul(matmul(lower, off), upper)
        top = jnp.concatenate([upper, jnp.zeros_like(upper)], axis=-1)
        bottom = jnp.concatenate([corner, lower], axis=-1)
        blocks = jnp.concatenate([top, bottom], axis=-2)
        size *= 2
    return blocks[..., 0, :length, :length]


def _segment_sums(g: jax.Array) -> jax.Array:
    """g [..., C] -> [..., C(i), C(j)]: the sum of g over the tokens (j, i] (0 where j >= i).
    Summed pair by pair rather than as differences cum_i - cum_j of the block's running sum:
    with strong decays that sum reaches thousands within a block, a float32 difference of two
    such numbers is off by ~1e-4 even where the pair's own log decay is small, and exp turns
    that into a relative error of 1e-4 in a weight near 1. Added up from j + 1 only, each
    entry is as exact as its own terms."""
    c = g.shape[-1]
    after = np.tril(np.ones((c, c), bool), -1)  # [l, j]: token l comes after token j
    return jnp.cumsum(jnp.where(after, g[..., :, None], 0.0), axis=-2)


def chunked_delta_rule(q, k, v, g, beta, runs=None, state=None, chunk_size: int = 64):
    """`recurrent_delta_rule` computed in blocks of `chunk_size` tokens (module docstring); the
    same arguments and results."""
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    s0 = _initial(state, q, v)
    b, n, t, _ = q.shape
    if runs is None:
        runs = jnp.zeros((b, t), jnp.int32)
    c = chunk_size
    pad = -t % c
    if pad:  # padded tokens: no input, no decay, no write; they continue the last run
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
        g, beta = (jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in (g, beta))
        runs = jnp.pad(runs, ((0, 0), (0, pad)), mode="edge")
    nc = (t + pad) // c
    q, k, v = (x.reshape(b, n, nc, c, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.reshape(b, n, nc, c) for x in (g, beta))
    r = runs.reshape(b, 1, nc, c)
    # The run each block's incoming state belongs to: the previous block's last token's.
    r_in = jnp.concatenate([jnp.zeros_like(r[..., :1, -1:]), r[..., :-1, -1:]], axis=2)
    first = r == r_in  # [B, 1, nc, C]: still in the incoming state's run
    last = r == r[..., -1:]  # in the block's last run (what the outgoing state holds)

    cum = jnp.cumsum(g, axis=-1)  # log decay from the block start to each token
    between = _segment_sums(g)  # [.., C(i), C(j)]: log decay from token j to token i
    causal, strict = np.tril(np.ones((c, c), bool)), np.tril(np.ones((c, c), bool), -1)
    live = causal & (r[..., :, None] == r[..., None, :])  # [.., C(i), C(j)]: j <= i, same run
    decay = jnp.where(live, jnp.exp(between), 0.0)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    system = jnp.where(strict, jnp.einsum("...ik,...jk->...ij", k_beta, k) * decay, 0.0)
    inverse = unit_lower_inverse(system)  # (I + system)^-1
    u = inverse @ v_beta  # the corrected values, before the incoming state's share
    w = inverse @ (k_beta * (jnp.exp(cum) * first)[..., None])  # what reads the incoming state
    attn = jnp.einsum("...ik,...jk->...ij", q, k) * decay
    q_in = q * (jnp.exp(cum) * first)[..., None]
    k_out = k * (jnp.exp(between[..., -1, :]) * last)[..., None]  # decay to the block's end
    carry = jnp.exp(cum[..., -1]) * first[..., -1]  # [B, N, nc]: 0 after a boundary

    def block(s, xs):
        u_c, w_c, attn_c, q_c, k_c, carry_c = xs
        v_new = u_c - jnp.einsum("bnik,bnkv->bniv", w_c, s)
        out = jnp.einsum("bnik,bnkv->bniv", q_c, s) + jnp.einsum("bnij,bnjv->bniv", attn_c, v_new)
        s = s * carry_c[..., None, None] + jnp.einsum("bnik,bniv->bnkv", k_c, v_new)
        return s, out

    blocks_first = lambda x: jnp.moveaxis(x, 2, 0)
    xs = tuple(blocks_first(x) for x in (u, w, attn, q_in, k_out, carry))
    s, out = jax.lax.scan(block, s0, xs)  # out [nc, B, N, C, Hv]
    out = jnp.moveaxis(out, 0, 2).reshape(b, n, nc * c, -1)[:, :, :t]
    return out.transpose(0, 2, 1, 3).astype(dtype), s


class GatedDeltaNet(nn.Module):
    """The Gated DeltaNet layer (module docstring). `segment_ids` [B, T] marks the examples of a
    packed row (None: one example per row); `cache` a DeltaState to continue from (decoding),
    returned updated; without one the layer starts from zeros and returns None."""

    config: ModelConfig
    cpu_grad: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: DeltaState | None = None,
    ) -> tuple[jax.Array, DeltaState | None]:
        c = self.config
        la = c.linear_attention
        d, n, m, hk, hv = (
            c.hidden_size, la.num_value_heads, la.num_key_heads, la.key_head_dim, la.value_head_dim
        )  # fmt: skip
        b, t = x.shape[:2]
        dt = dict(
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            lora_scale=c.lora_scale,
            lora_dropout=c.lora_dropout,
            cpu_grad=self.cpu_grad,
        )

        def proj(name: str, width: int) -> jax.Array:
            return Einsum("BTD,DP->BTP", (d, width), ("embed", None), **dt, name=name)(x)

        qkv, z = proj("in_proj_qkv", la.conv_dim), proj("in_proj_z", la.value_dim)
        beta_in, a = proj("in_proj_b", n), proj("in_proj_a", n)
        runs = segment_runs(segment_ids) if segment_ids is not None else None
        if runs is None:
            runs = jnp.zeros((b, t), jnp.int32)
        init = nn.initializers.normal(0.02)
        conv_w = named_param(
            self, "conv1d", init, (la.conv_kernel, la.conv_dim), (None, None), c.param_dtype
        )
        conv, history = causal_conv(qkv, conv_w, runs, None if cache is None else cache.conv)
        conv = nn.silu(conv).astype(c.dtype)
        q, k, v = jnp.split(conv, [la.key_dim, 2 * la.key_dim], axis=-1)
        q, k, v = q.reshape(b, t, m, hk), k.reshape(b, t, m, hk), v.reshape(b, t, n, hv)

        a_log = named_param(self, "A_log", _a_log_init, (n,), (None,), c.param_dtype)
        dt_bias = named_param(
            self, "dt_bias", nn.initializers.ones_init(), (n,), (None,), c.param_dtype
        )
        beta = jax.nn.sigmoid(beta_in.astype(jnp.float32))
        g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + dt_bias.astype(jnp.float32)
        )
        state = None if cache is None else cache.state
        if t == 1 and cache is not None:  # a decoding step
            out, state = recurrent_delta_rule(q, k, v, g, beta, runs, state)
        else:
            out, state = chunked_delta_rule(q, k, v, g, beta, runs, state, la.chunk_size)
        out = self._gated_norm(out, z.reshape(b, t, n, hv))
        o = Einsum("BTP,PD->BTD", (la.value_dim, d), (None, "embed"), **dt, name="out_proj")
        new_cache = None if cache is None else DeltaState(history, state)
        return o(out.reshape(b, t, la.value_dim)), new_cache

    def _gated_norm(self, x: jax.Array, z: jax.Array) -> jax.Array:
        """HF's RMSNormGated: normalised in float32, cast, times w (stored as is, no 1 + w),
        times SiLU(z) in float32, cast back."""
        c = self.config
        scale = named_param(
            self, "norm", nn.initializers.ones_init(), (x.shape[-1],), (None,), c.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.rms_norm_eps)
        h = scale.astype(c.dtype) * normed.astype(c.dtype)
        return (h.astype(jnp.float32) * nn.silu(z.astype(jnp.float32))).astype(c.dtype)


def _a_log_init(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """HF's init: A uniform in [0.01, 16) (kept away from 0 so log A is finite), stored as log."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 0.01, 16.0)).astype(dtype)
