"""Attention's pure pieces: RoPE tables, packing-aware masks and grouped-query attention.

Kept apart from the Flax modules in model.py so each can be tested against its Hugging Face
counterpart alone. Packing is honoured here: RoPE uses each token's own position within its
example, and a query sees a key only when both carry the same segment id and the key is not in
its future (within a sliding window where the layer has one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.model.blocked_attention import blocked_attention
from sft_jax.model.config import IMPLEMENTATIONS
from sft_jax.model.context_attention import BLOCK as RING_BLOCK
from sft_jax.model.context_attention import context_attention
from sft_jax.model.splash_attention import SPLASH_BLOCK, splash_attention
from sft_jax.training import sharding

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from sft_jax.model.config import ModelConfig, RopeScaling


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """float32 [H/2] inverse frequencies, rescaled when `rope_scaling` is set.

    Computed in float64 on the host (a trace-time constant) and rounded once, which matches
    transformers' float32 computation to within an ulp. `local`: the unscaled frequencies of
    Gemma 3's sliding-window layers, at their own base `local_rope_theta`.
    """
    dim = config.rotary_dim  # partial rotary (Qwen3.5): only the first dims rotate
    theta = config.rope_theta
    if local and config.local_rope_theta is not None:
        theta = config.local_rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = None if local and config.local_rope_theta is not None else config.rope_scaling
    if s is not None and s.rope_type == "linear":
        inv_freq = inv_freq / s.factor
    elif s is not None and s.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, s, theta, dim)
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


def _yarn_inv_freq(inv_freq: np.ndarray, s: RopeScaling, theta: float, dim: int) -> np.ndarray:
    """YaRN (transformers.modeling_rope_utils._compute_yarn_parameters): high frequencies (many
    rotations over the original context) keep their value, low ones are divided by `factor`,
    with a linear ramp between the dimensions where `beta_fast` and `beta_slow` rotations fit
    into original_max_position_embeddings (rounded outwards when `truncate`)."""

    def correction_dim(rotations: float) -> float:
        length = s.original_max_position_embeddings
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # the share of the unscaled frequency
    return inv_freq / s.factor * ramp + inv_freq * extrapolation


def rope_attention_factor(config: ModelConfig, *, local: bool = False) -> float:
    """The factor cos and sin are multiplied by: YaRN's attention factor, else 1."""
    s = config.rope_scaling
    if s is None or s.rope_type != "yarn" or (local and config.local_rope_theta is not None):
        return 1.0
    return s.attention_factor


def rope_tables(
    positions: jax.Array, inv_freq: np.ndarray, factor: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32 [B, T, H/2] at each token's own position (per packed segment), times
    `factor` (YaRN's attention factor; 1 leaves them untouched)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    if factor == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, H] in HF "rotate_half" layout (pairs (i, i + H/2)), in float32.
    Tables narrower than H/2 (partial rotary) rotate only the first 2 * their width dims."""
    rotated = 2 * cos.shape[-1]
    if rotated < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotated], cos, sin), x[..., rotated:]], -1)
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
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query attention without materialising repeated kv heads.

    q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]. Query head n uses kv head
    n // G, as HF's `repeat_kv` does. Scores and softmax in float32; `softcap` (Gemma 2) squashes
    the scaled scores before masking, as HF does. `sinks` [N] (gpt-oss): a learned logit per
    query head that joins every query's softmax as one more column with no value, so a query
    can attend to "nothing"; the probabilities of the real keys then sum to less than one.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    else:
        sink = jnp.broadcast_to(
            _grouped_sinks(sinks, kv)[None, :, :, None, None], (b, *scores.shape[1:4], 1)
        )
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)
        probs = probs[..., :-1].astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def _grouped_sinks(sinks: jax.Array, kv_heads: int) -> jax.Array:
    """Sinks [N] as float32 [K, G]: query head n belongs to kv head n // G."""
    return sinks.astype(jnp.float32).reshape(kv_heads, -1)


def xla_attention_with_sinks(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, sinks: jax.Array, scale: float
) -> jax.Array:
    """`jax.nn.dot_product_attention` (XLA) with attention sinks [N]: one extra key and value of
    zeros that every query sees, whose score q . 0 = 0 plus a per-head bias of the sink is the
    sink logit. Its value adds nothing to the output, only exp(sink) to the denominator, which
    is the sink's definition; the bias is [1, N, 1, S + 1], so nothing quadratic is added to
    the dense mask this path reads; float32, so the sinks are not rounded to a bfloat16
    compute dtype. (Rescaling the output by the returned log-sum-exp instead
    would be cheaper, but its gradient is not propagated.) The mask already holds causality,
    so is_causal is off: its rule would hide the extra key column."""
    b, t, n, _ = q.shape
    zero = jnp.zeros((b, 1, *k.shape[2:]), k.dtype)
    keys, values = jnp.concatenate([k, zero], axis=1), jnp.concatenate([v, zero], axis=1)
    mask = jnp.concatenate([mask, jnp.ones((b, t, 1), bool)], axis=-1)
    bias = jnp.concatenate(
        [jnp.zeros((n, k.shape[1]), jnp.float32), sinks[:, None].astype(jnp.float32)], axis=1
    )
    return jax.nn.dot_product_attention(
        q, keys, values, bias=bias[None, :, None], mask=mask[:, None], scale=scale,
        implementation="xla",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Implementations of the attention core, chosen by `model.attention` (IMPLEMENTATIONS).

# The implementations that read the dense [B, T, S] mask: the reference, and
# jax.nn.dot_product_attention (xla, cudnn), which takes no segment ids. Blocked and splash build
# their masks per block from segment ids, so the model builds no dense mask for them.
DENSE_MASK_IMPLEMENTATIONS = ("reference", "xla", "cudnn")

# Fastest correct implementation per platform for "auto"; measured, see docs/benchmarks.md.
_AUTO_BY_PLATFORM = {"gpu": "cudnn", "tpu": "splash", "cpu": "blocked"}


def resolve_implementation(
    requested: str,
    *,
    platform: str,
    dtype: str,
    head_dim: int,
    softcap: float | None,
    seq_len: int | None = None,
    context: int = 1,
    sinks: bool = False,
) -> str:
    """The attention implementation to run: `requested`, or for "auto" the fastest correct one
    on `platform` ("cpu" | "gpu" | "tpu"), falling back to XLA (or, with logit soft-capping,
    which only the reference and splash implement, to the reference) where a fused kernel
    cannot run these settings. `seq_len` (when known) rules out splash on a length its blocks
    do not tile. `sinks` (gpt-oss's attention sinks) rule out cudnn and, under context
    parallelism, both splash with gathered keys and ring attention, which have no input for
    them: "auto" then picks XLA on a GPU, never dropping them; a context split is refused.
    An explicit request that cannot run raises ValueError saying why.

    With the sequence split over `context` > 1 devices only two attend across the split:
    splash with gathered keys and values (sft_jax/model/splash_context.py), "auto"'s choice on
    a TPU where splash can run and the length cuts into 2 x `context` chunks of whole splash
    blocks, and otherwise "ring" (ring attention). Another explicit choice is honoured
    (parameter init traces the reference) and the config refuses it for training
    (sft_jax/config.py).
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention is {requested!r}; choose one of {IMPLEMENTATIONS}")
    settings = (platform, dtype, head_dim, softcap, seq_len, sinks)
    if context > 1 and sinks and requested in ("auto", "splash"):
        raise ValueError(
            f"model.attention={requested!r} cannot run under mesh.context={context}: only ring "
            "attention and splash attend across a split sequence, and neither takes attention "
            "sinks (gpt-oss); use mesh.context=1"
        )
    if context > 1 and requested in ("auto", "splash"):
        why = _unsupported("splash", *settings)
        if why is None and seq_len is not None and seq_len % (2 * context * SPLASH_BLOCK):
            why = (
                f"under mesh.context={context} splash needs seq_len a multiple of 2 x "
                f"{context} x {SPLASH_BLOCK}, got {seq_len}"
            )
        if why is None:
            return "splash"
        if requested == "splash":
            raise ValueError(f"model.attention='splash' cannot run here: {why}")
        return "ring"
    if requested == "auto":
        choice = _AUTO_BY_PLATFORM.get(platform, "xla")
        if _unsupported(choice, *settings) is None:
            return choice
        return "reference" if softcap is not None else "xla"
    why = _unsupported(requested, *settings)
    if why is not None:
        raise ValueError(f"model.attention={requested!r} cannot run here: {why}")
    return requested


def _unsupported(
    impl: str,
    platform: str,
    dtype: str,
    head_dim: int,
    softcap: float | None,
    seq_len: int | None = None,
    sinks: bool = False,
) -> str | None:
    """Why `impl` cannot run these settings, or None when it can."""
    if sinks and impl in ("cudnn", "ring"):
        return f"{impl} attention has no attention sinks (gpt-oss); use xla, blocked or reference"
    if impl == "xla" and softcap is not None:
        return "jax.nn.dot_product_attention has no logit soft-capping (Gemma 2); use reference"
    if impl == "blocked" and softcap is not None:
        return "blocked attention has no logit soft-capping (Gemma 2); use reference"
    if impl == "cudnn":
        if platform != "gpu":
            return f"cuDNN attention needs an NVIDIA GPU, this process runs on {platform}"
        if dtype not in ("bfloat16", "float16"):
            return f"cuDNN flash attention needs bfloat16 compute (model.dtype is {dtype})"
        if head_dim > 128 or head_dim % 8:
            return f"cuDNN flash attention needs head_dim <= 128 and a multiple of 8 ({head_dim})"
        if softcap is not None:
            return "cuDNN attention has no logit soft-capping (Gemma 2); use reference"
    if impl == "splash" and platform != "tpu":
        return f"splash attention is a TPU (Pallas) kernel, this process runs on {platform}"
    if impl == "splash" and seq_len is not None and seq_len % SPLASH_BLOCK:
        return f"splash attention needs seq_len a multiple of {SPLASH_BLOCK}, got {seq_len}"
    return None


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """How `attend` runs: static settings fixed at trace time, which the model builds from its
    config (so this module never reads a ModelConfig to attend)."""

    implementation: str  # a resolved one (resolve_implementation): never "auto"
    scale: float | None = None  # scores' scale; None: head_dim ** -0.5
    softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    window: int | None = None  # the sliding window of local layers (splash, ring: lax.cond)
    mesh: Mesh | None = None  # splash, ring: the mesh they run on per device
    rules: Sequence = ()  # splash, ring: logical-axis rules splitting batch and heads over `mesh`
    interpret: bool = False  # splash: run in Pallas' interpreter (tests)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    options: AttentionOptions,
    *,
    segment_ids: jax.Array | None = None,
    local: jax.Array | None = None,
    slots: jax.Array | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H] with one resolved implementation.

    `mask` [B, T, S] is the full mask (causal, same segment and, on local layers, the window);
    only DENSE_MASK_IMPLEMENTATIONS read it: the reference, and xla and cudnn through
    `jax.nn.dot_product_attention`, which has no segment-id input, so on those paths the dense
    mask (memory quadratic in T) is still built. Blocked and splash never read it (pass None):
    they take `segment_ids` [B, T] and build each block's mask from them, and on a model with
    local layers the traced per-layer flag `local` applies `options.window` (blocked: as a
    traced window bound; splash: picking the windowed kernel with `lax.cond`). Blocked and
    cudnn skip the blocks above the diagonal (the mask is always causal in training). Splash
    runs per device on `options.mesh`, split as `options.rules` split batch and heads
    (sft_jax/model/splash_attention.py). Ring (context parallelism) takes the segment ids and
    `slots` [B, T], each token's slot in its unpermuted row, and masks by them exactly as the
    dense mask does, whatever order the row is in (`ring_attention`). `sinks` [N]: gpt-oss's
    per-head sink logits (see `grouped_attention`), taken by the reference, xla, blocked and
    splash (not under context parallelism); the others refuse them here too, as
    `resolve_implementation` does.
    """
    implementation, softcap = options.implementation, options.softcap
    split = options.mesh is not None and sharding.context_shards(options.mesh) > 1
    takes_sinks = ("reference", "xla", "blocked") + (() if split else ("splash",))
    if sinks is not None and implementation not in takes_sinks:
        raise ValueError(f"{implementation} attention has no attention sinks (gpt-oss)")
    scale = q.shape[-1] ** -0.5 if options.scale is None else options.scale
    if implementation in DENSE_MASK_IMPLEMENTATIONS and mask is None:
        raise ValueError(f"{implementation} attention reads the dense mask; got none")
    if implementation in ("blocked", "splash", "ring") and segment_ids is None:
        raise ValueError(f"{implementation} attention needs segment_ids")
    if implementation == "reference":
        return grouped_attention(q, k, v, mask, scale=scale, softcap=softcap, sinks=sinks)
    if implementation == "blocked":
        window = None
        if local is not None and options.window is not None:  # no window on global layers
            window = jnp.where(local, options.window, q.shape[1])
        return blocked_attention(q, k, v, segment_ids, scale=scale, window=window, sinks=sinks)
    if implementation == "xla" and sinks is not None:
        return xla_attention_with_sinks(q, k, v, mask, sinks, scale)
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale, is_causal=True, implementation=implementation
        )
    if implementation == "splash" and options.mesh and sharding.context_shards(options.mesh) > 1:
        from sft_jax.model.splash_context import splash_context_attention  # imports Pallas

        return splash_context_attention(
            q, k, v, segment_ids, scale=scale, mesh=options.mesh,
            context_axis=sharding.CONTEXT_AXIS, rules=options.rules, softcap=softcap,
            local=local, window=options.window, interpret=options.interpret,
        )  # fmt: skip
    if implementation == "splash":
        return splash_attention(
            q, k, v, segment_ids, scale=scale, softcap=softcap, local=local,
            window=options.window, mesh=options.mesh, rules=options.rules,
            interpret=options.interpret, sinks=sinks,
        )  # fmt: skip
    if implementation == "ring":
        if slots is None:
            raise ValueError("ring attention needs slots (each token's slot in its row)")
        return ring_attention(q, k, v, segment_ids, slots, options, scale=scale, local=local)
    raise ValueError(f"unresolved attention implementation {implementation!r}")


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    slots: jax.Array,
    options: AttentionOptions,
    *,
    scale: float,
    local: jax.Array | None = None,
) -> jax.Array:
    """Ring attention over `options.mesh`'s context axis (sft_jax/model/context_attention.py).

    Its mask reads `slots` (the row's slot indices, permuted with the tokens) where the dense
    path reads array order: same segment, key slot not after the query's, and on local layers
    fewer than `options.window` slots behind, which is `attention_mask` and `window_mask`
    exactly, padding included. (Per-example positions would mask real tokens the same, but let
    padding, all at position 0, see later padding.) The ring takes a static window, so the
    traced per-layer `local` flag picks the windowed or the global ring with `lax.cond`.
    Batch and kv heads split as the rules split them, where they divide.

    The segment ids and slots pass an optimization barrier with q first. They are the same in
    every layer, so under the layers' `lax.scan` the gradient's partial evaluation hoists
    everything computed from them alone out of the loop: every tile mask of every ring step,
    broadcast over heads, held at once, quadratic in the local chunk (docs/benchmarks.md,
    "Context-parallel attention"). Tied to q they stay per layer and per tile.
    """
    segment_ids, slots, q = jax.lax.optimization_barrier((segment_ids, slots, q))
    mesh, rules = options.mesh, options.rules
    spec = sharding.logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh, rules)
    heads = spec[2] if isinstance(spec[2], str) else None  # the ring splits heads over one axis
    batch = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0] or ())
    local_t = q.shape[1] // sharding.context_shards(mesh)
    run = lambda window: context_attention(
        q, k, v, segment_ids, slots, mesh=mesh, context_axis=sharding.CONTEXT_AXIS,
        batch_axes=batch, head_axis=heads, scale=scale, softcap=options.softcap,
        window=window, block=ring_block(local_t),
    )  # fmt: skip
    if local is None or options.window is None:
        return run(None)
    return jax.lax.cond(local, lambda: run(options.window), lambda: run(None))


def ring_block(local_len: int) -> int:
    """The ring's tile: the largest divisor of a device's chunk up to the ring's default, so
    any sequence length that splits over the context devices tiles."""
    return max(b for b in range(1, min(RING_BLOCK, local_len) + 1) if local_len % b == 0)
