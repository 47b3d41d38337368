"""The Flax Linen decoder for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3).

Dimension letters, used in einsum strings and shape comments:

    B batch   T query length   S key length (= T)   D model width   F mlp width   V vocab
    N query heads   K key/value heads   G query heads per kv head (N // K)   H head dim   L layers

Design choices and why:
- Every projection is one explicit einsum over a kernel that keeps its head axes ([D, N, H], not
  [D, N*H]), so sharding rules name heads directly and LoRA can add `x @ A @ B` terms in place.
- Layers are stacked with `nn.scan` (leading L axis on every layer leaf, logical name "layers"): one
  layer is compiled once whatever the depth, and `nn.remat` inside the scan trades compute for
  activation memory per layer.
- Attention is packing-aware: a query sees a key only when it is not in the future of its row AND
  both carry the same segment id, and RoPE uses the per-example `positions` input, so a packed row
  of several examples gives exactly each example's own logits.
- Numerics follow Hugging Face: RMSNorm statistics and softmax in float32; logits in float32.

Parameter tree (names are load-bearing: the HF loader, sharding rules, LoRA and checkpoints use it):

    embed/embedding [V, D]                       final_norm/scale [D]      lm_head/kernel [D, V]
    layers/attn_norm/scale [L, D]                layers/mlp_norm/scale [L, D]
    layers/attn/{q_proj [L, D, N, H], k_proj, v_proj [L, D, K, H], o_proj [L, N, H, D]}/kernel
    layers/attn/{q,k,v}_proj/bias [L, N|K, H]    (attention_bias)
    layers/attn/{q_norm, k_norm}/scale [L, H]    (qk_norm)
    layers/mlp/{gate_proj, up_proj [L, D, F], down_proj [L, F, D]}/kernel
    lm_head is absent when tie_embeddings (logits = h @ embedding.T).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from sft_jax.config import ArchConfig, ModelSection

_INIT_STD = 0.02  # Hugging Face `initializer_range` for every family here.
_REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 ("llama3" rope_type) rescaling of the RoPE inverse frequencies."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs; hashable so it can sit in a jit-static Module."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    qk_norm: bool
    attention_bias: bool
    max_position_embeddings: int
    rope_scaling: RopeScaling | None
    dtype: str  # compute dtype of activations and matmuls: "float32" | "bfloat16"
    param_dtype: str  # storage dtype of the parameters
    remat: str  # "none" | "dots" | "full": jax.checkpoint policy per layer

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.remat not in ("none", *_REMAT_POLICIES):
            raise ValueError(f"remat is {self.remat!r}; choose none, dots or full")


def model_config_from_arch(arch: ArchConfig, section: ModelSection) -> ModelConfig:
    """ModelConfig for a random init described by the config file (no HF checkpoint)."""
    return ModelConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_norm_eps,
        tie_embeddings=arch.tie_embeddings,
        qk_norm=arch.qk_norm,
        attention_bias=arch.attention_bias,
        max_position_embeddings=arch.max_position_embeddings,
        rope_scaling=None,
        dtype=section.dtype,
        param_dtype=section.param_dtype,
        remat=section.remat,
    )


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (boxed, unboxed or abstract)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------
# Pure pieces: RoPE and the attention mask.


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """float32 [H/2] inverse frequencies, Llama-3 rescaled when `rope_scaling` is set.

    Computed in float64 on the host (a trace-time constant) and rounded once, which matches
    transformers' float32 computation to within an ulp.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = config.rope_scaling
    if s is not None:  # transformers.modeling_rope_utils._compute_llama3_parameters
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


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention without materialising repeated kv heads.

    q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]. Query head n uses kv head
    n // G, as HF's `repeat_kv` does. Scores and softmax in float32.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


# --------------------------------------------------------------------------------------------
# Modules.


def _param(module: nn.Module, name: str, init: Any, shape: tuple, names: tuple, dtype: str):
    """Creates a parameter carrying logical axis names (read by nn.get_partition_spec)."""
    return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.dtype(dtype))


class Einsum(nn.Module):
    """A linear map as one einsum over an explicitly shaped kernel (plus an optional bias)."""

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_names: tuple[str, ...]
    bias_names: tuple[str, ...] | None = None  # bias over the trailing len(bias_names) out dims
    dtype: str = "float32"
    param_dtype: str = "float32"
    out_dtype: str | None = None  # accumulate/return in this dtype (float32 logits)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(_INIT_STD)
        kernel = _param(
            self, "kernel", init, self.kernel_shape, self.kernel_names, self.param_dtype
        )
        y = jnp.einsum(
            self.equation,
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            preferred_element_type=None if self.out_dtype is None else jnp.dtype(self.out_dtype),
        )
        if self.bias_names is not None:
            shape = self.kernel_shape[-len(self.bias_names) :]
            zeros = nn.initializers.zeros_init()
            bias = _param(self, "bias", zeros, shape, self.bias_names, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """RMSNorm with HF Llama numerics: statistics in float32, cast back, then times the weight."""

    eps: float
    names: tuple[str, ...]  # logical name of the normalised (last) axis
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ones = nn.initializers.ones_init()
        scale = _param(self, "scale", ones, (x.shape[-1],), self.names, self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding; `attend` is the tied LM head (h @ embedding.T)."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        shape = (c.vocab_size, c.hidden_size)
        init = nn.initializers.normal(_INIT_STD)
        self.embedding = _param(self, "embedding", init, shape, ("vocab", "embed"), c.param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, tokens, axis=0).astype(self.config.dtype)  # [B, T, D]

    def attend(self, x: jax.Array) -> jax.Array:
        table = self.embedding.astype(self.config.dtype)
        return jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)


class Attention(nn.Module):
    """Grouped-query self-attention with optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array):
        c = self.config
        d, n, kv, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dt = {"dtype": c.dtype, "param_dtype": c.param_dtype}
        q_bias = ("heads", "head_dim") if c.attention_bias else None
        kv_bias = ("kv_heads", "head_dim") if c.attention_bias else None
        q_names, kv_names = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q = Einsum("BTD,DNH->BTNH", (d, n, h), q_names, q_bias, **dt, name="q_proj")(x)
        k = Einsum("BTD,DKH->BTKH", (d, kv, h), kv_names, kv_bias, **dt, name="k_proj")(x)
        v = Einsum("BTD,DKH->BTKH", (d, kv, h), kv_names, kv_bias, **dt, name="v_proj")(x)
        if c.qk_norm:  # Qwen3: per-head RMSNorm over H, before RoPE.
            q = RMSNorm(c.rms_norm_eps, ("head_dim",), **dt, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, ("head_dim",), **dt, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = grouped_attention(q, k, v, mask)  # [B, T, N, H]
        o_names = ("heads", "head_dim", "embed")
        return Einsum("BTNH,NHD->BTD", (n, h, d), o_names, **dt, name="o_proj")(out)


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        dt = {"dtype": c.dtype, "param_dtype": c.param_dtype}
        gate = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **dt, name="gate_proj")(x)
        up = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **dt, name="up_proj")(x)
        hidden = nn.silu(gate) * up
        return Einsum("BTF,FD->BTD", (f, d), ("mlp", "embed"), **dt, name="down_proj")(hidden)


class Block(nn.Module):
    """One pre-norm decoder layer; the scan carry is the residual stream x [B, T, D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array):
        c = self.config
        dt = {"dtype": c.dtype, "param_dtype": c.param_dtype}
        h = RMSNorm(c.rms_norm_eps, ("embed",), **dt, name="attn_norm")(x)
        x = x + Attention(c, name="attn")(h, mask, cos, sin)
        h = RMSNorm(c.rms_norm_eps, ("embed",), **dt, name="mlp_norm")(x)
        x = x + Mlp(c, name="mlp")(h)
        return nn.with_logical_constraint(x, ("batch", "seq", "embed")), None


class Transformer(nn.Module):
    """Decoder-only LM. See the module docstring for the parameter tree.

    Built with `setup` (not `nn.compact`) so that `logits` is a method of its own: generation
    applies the LM head to one position per row instead of materialising [B, T, V].
    """

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        dt = {"dtype": c.dtype, "param_dtype": c.param_dtype}
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        self.embed = Embed(c)
        self.layers = scanned(c)
        self.final_norm = RMSNorm(c.rms_norm_eps, ("embed",), **dt)
        if not c.tie_embeddings:
            shape, names = (c.hidden_size, c.vocab_size), ("embed", "vocab")
            self.lm_head = Einsum("BTD,DV->BTV", shape, names, **dt, out_dtype="float32")

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        *,
        return_hidden: bool = False,
    ) -> jax.Array:
        """tokens/positions/segment_ids: int32 [B, T] -> float32 logits [B, T, V].

        With `return_hidden`, the final-normed hidden states [B, T, D] (compute dtype) instead;
        `logits` turns (a selection of) them into logits.
        """
        x = nn.with_logical_constraint(self.embed(tokens), ("batch", "seq", "embed"))
        mask = attention_mask(segment_ids)  # computed once, broadcast to every layer
        cos, sin = rope_tables(positions, rope_inv_freq(self.config))
        x, _ = self.layers(x, mask, cos, sin)
        x = self.final_norm(x)
        return x if return_hidden else self.logits(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: final-normed hidden [B, T, D] -> float32 logits [B, T, V]."""
        tied = self.config.tie_embeddings
        logits = self.embed.attend(hidden) if tied else self.lm_head(hidden)
        return nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))
