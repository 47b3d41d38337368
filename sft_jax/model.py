"""The Flax Linen decoder for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 2/3).

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
- Per-layer differences (Gemma's sliding-window "local" layers with their own RoPE base) are data
  scanned alongside the weights (a per-layer `local` flag selecting precomputed masks and RoPE
  tables), not Python branches, so the scan still compiles one layer.
- Generation uses the same layers through `Transformer.decode`: a KV cache [L, B, S, K, H] enters
  the scan as per-layer input and leaves it as per-layer output; training never builds one.

Parameter tree (names are load-bearing: the HF loader, sharding rules, LoRA and checkpoints use it):

    embed/embedding [V, D]                       final_norm/scale [D]      lm_head/kernel [D, V]
    layers/attn_norm/scale [L, D]                layers/mlp_norm/scale [L, D]
    layers/attn/{q_proj [L, D, N, H], k_proj, v_proj [L, D, K, H], o_proj [L, N, H, D]}/kernel
    layers/attn/{q,k,v}_proj/bias [L, N|K, H]    (attention_bias)
    layers/attn/{q_norm, k_norm}/scale [L, H]    (qk_norm)
    layers/mlp/{gate_proj, up_proj [L, D, F], down_proj [L, F, D]}/kernel
    layers/{post_attn_norm, post_mlp_norm}/scale [L, D]   (sandwich_norms: Gemma 2/3)
    lm_head is absent when tie_embeddings (logits = h @ embedding.T).
    With norm_offset (Gemma) every norm scale is stored as HF stores it, w, and applied as 1 + w.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax.attention import (
    apply_rope,
    attention_mask,
    grouped_attention,
    rope_inv_freq,
    rope_tables,
    window_mask,
)

if TYPE_CHECKING:
    from sft_jax.config import ArchConfig, ModelSection

_INIT_STD = 0.02  # Hugging Face `initializer_range` for every family here.
_ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
_REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rescaling of the RoPE inverse frequencies: Llama-3 ("llama3") or "linear" (Gemma 3)."""

    factor: float
    low_freq_factor: float = 0.0  # llama3 only
    high_freq_factor: float = 0.0  # llama3 only
    original_max_position_embeddings: int = 0  # llama3 only
    rope_type: str = "llama3"


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
    # Gemma features; the defaults are the Llama behaviour.
    norm_offset: bool = False  # RMSNorm scale applied as (1 + w), zero-initialised
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the compute dtype
    mlp_activation: str = "silu"  # "silu" | "gelu_tanh"
    sandwich_norms: bool = False  # extra norms after attention and after the MLP
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    query_scale: float | None = None  # scores scaled by query_scale**-0.5 (else head_dim**-0.5)
    sliding_window: int | None = None  # a local layer's query sees keys less than this far back
    local_layers: tuple[bool, ...] = ()  # per layer: sliding window (empty: no local layers)
    local_rope_theta: float | None = None  # RoPE base of local layers (None: rope_theta, scaled)
    # LoRA (sft_jax/lora): used only when the "lora" variable collection is passed to apply.
    lora_scale: float = 0.0  # alpha / r (or alpha / sqrt(r), rsLoRA); static, so jit-constant
    lora_dropout: float = 0.0  # dropout on the adapter input, active only with a "dropout" rng

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
        if self.mlp_activation not in _ACTIVATIONS:
            raise ValueError(f"mlp_activation is {self.mlp_activation!r}; choose silu or gelu_tanh")
        if self.local_layers and len(self.local_layers) != self.num_layers:
            raise ValueError(f"local_layers has {len(self.local_layers)} entries, not num_layers")
        if any(self.local_layers) and not self.sliding_window:
            raise ValueError("local_layers are set but sliding_window is not")

    @property
    def has_local_layers(self) -> bool:
        return any(self.local_layers)


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
# Modules.


def _param(module: nn.Module, name: str, init: Any, shape: tuple, names: tuple, dtype: str):
    """Creates a parameter carrying logical axis names (read by nn.get_partition_spec)."""
    return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.dtype(dtype))


def lora_equations(equation: str, rank_letter: str = "R") -> tuple[str, str]:
    """The two einsums of the low-rank path from a projection's own equation.

    "BTD,DNH->BTNH" -> ("BTD,DR->BTR", "BTR,RNH->BTNH"): kernel letters shared with x are the
    input dims (contracted by A), the others the output dims (produced by B).
    """
    inputs, out = equation.split("->")
    x, kernel = inputs.split(",")
    if rank_letter in equation:
        raise ValueError(f"rank letter {rank_letter!r} already used in {equation!r}")
    k_in = "".join(c for c in kernel if c in x)
    k_out = "".join(c for c in kernel if c not in x)
    batch = "".join(c for c in x if c not in kernel)
    r = rank_letter
    return f"{x},{k_in}{r}->{batch}{r}", f"{batch}{r},{r}{k_out}->{out}"


class Einsum(nn.Module):
    """A linear map as one einsum over an explicitly shaped kernel (plus an optional bias).

    With a "lora" variable collection holding `a` [*in, R] and `b` [R, *out] for this module,
    adds lora_scale * (x @ a) @ b (never forming W + a @ b, so W gets no weight gradient). With a
    DoRA magnitude `m` [*out] as well, the output is m / ||W + s a b||_in * (x @ W + s x a b), the
    norm a constant of the gradient as in PEFT: that norm needs the weight-sized product a @ b.
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_names: tuple[str, ...]
    bias_names: tuple[str, ...] | None = None  # bias over the trailing len(bias_names) out dims
    dtype: str = "float32"
    param_dtype: str = "float32"
    out_dtype: str | None = None  # accumulate/return in this dtype (float32 logits)
    lora_scale: float = 0.0
    lora_dropout: float = 0.0

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
        if self.has_variable("lora", "a"):
            y = self._lora(x, y, kernel)
        if self.bias_names is not None:
            shape = self.kernel_shape[-len(self.bias_names) :]
            zeros = nn.initializers.zeros_init()
            bias = _param(self, "bias", zeros, shape, self.bias_names, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y

    def _lora(self, x: jax.Array, y: jax.Array, kernel: jax.Array) -> jax.Array:
        """y + the adapter term (LoRA), or the DoRA-rescaled sum, in the compute dtype."""
        a = self.get_variable("lora", "a").astype(self.dtype)  # [*in, R]
        b = self.get_variable("lora", "b").astype(self.dtype)  # [R, *out]
        down, up = lora_equations(self.equation)
        h = x.astype(self.dtype)
        if self.lora_dropout > 0 and self.has_rng("dropout"):  # training only
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora_dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0.0).astype(self.dtype)
        low_rank = jnp.einsum(up, jnp.einsum(down, h, a), b) * self.lora_scale
        if not self.has_variable("lora", "m"):
            return y + low_rank.astype(y.dtype)
        m = self.get_variable("lora", "m").astype(jnp.float32)  # [*out]
        n_in = a.ndim - 1
        rank = a.shape[-1]
        w = kernel.astype(jnp.float32)
        ab = a.reshape(-1, rank).astype(jnp.float32) @ b.reshape(rank, -1).astype(jnp.float32)
        w = w + self.lora_scale * jax.lax.stop_gradient(ab.reshape(w.shape))
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(w * w, axis=tuple(range(n_in)))))
        return ((m / norm) * (y.astype(jnp.float32) + low_rank)).astype(y.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with HF numerics: statistics in float32. Llama casts back, then multiplies by w;
    Gemma (`offset`) multiplies by (1 + w) in float32, then casts, and initialises w to zero."""

    eps: float
    names: tuple[str, ...]  # logical name of the normalised (last) axis
    dtype: str = "float32"
    param_dtype: str = "float32"
    offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.offset else nn.initializers.ones_init()
        scale = _param(self, "scale", init, (x.shape[-1],), self.names, self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def _norm(c: ModelConfig, names: tuple[str, ...], name: str | None = None) -> RMSNorm:
    return RMSNorm(c.rms_norm_eps, names, c.dtype, c.param_dtype, c.norm_offset, name=name)


class Embed(nn.Module):
    """Token embedding; `attend` is the tied LM head (h @ embedding.T)."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        shape = (c.vocab_size, c.hidden_size)
        init = nn.initializers.normal(_INIT_STD)
        self.embedding = _param(self, "embedding", init, shape, ("vocab", "embed"), c.param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.config.dtype)  # [B, T, D]
        if self.config.embed_scale:  # Gemma; HF rounds sqrt(D) to the activation dtype first
            x = x * jnp.asarray(self.config.hidden_size**0.5, dtype=self.config.dtype)
        return x

    def attend(self, x: jax.Array) -> jax.Array:
        table = self.embedding.astype(self.config.dtype)
        return jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)


def _lora_fields(c: ModelConfig) -> dict[str, float]:
    return {"lora_scale": c.lora_scale, "lora_dropout": c.lora_dropout}


class Attention(nn.Module):
    """Grouped-query self-attention with optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3,
    Gemma 3). With a `cache` (k, v [B, S, K, H]) the new keys and values are written at slot
    `index` and the queries attend over the whole cache; the updated cache is returned."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
    ):
        c = self.config
        d, n, kv, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dt = {"dtype": c.dtype, "param_dtype": c.param_dtype, **_lora_fields(c)}
        q_bias = ("heads", "head_dim") if c.attention_bias else None
        kv_bias = ("kv_heads", "head_dim") if c.attention_bias else None
        q_names, kv_names = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q = Einsum("BTD,DNH->BTNH", (d, n, h), q_names, q_bias, **dt, name="q_proj")(x)
        k = Einsum("BTD,DKH->BTKH", (d, kv, h), kv_names, kv_bias, **dt, name="k_proj")(x)
        v = Einsum("BTD,DKH->BTKH", (d, kv, h), kv_names, kv_bias, **dt, name="v_proj")(x)
        if c.qk_norm:  # Qwen3 / Gemma 3: per-head RMSNorm over H, before RoPE.
            q = _norm(c, ("head_dim",), name="q_norm")(q)
            k = _norm(c, ("head_dim",), name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            cache = (k, v)
        scale = None if c.query_scale is None else c.query_scale**-0.5
        out = grouped_attention(q, k, v, mask, scale=scale, softcap=c.attn_softcap)
        o_names = ("heads", "head_dim", "embed")
        return Einsum("BTNH,NHD->BTD", (n, h, d), o_names, **dt, name="o_proj")(out), cache


class Mlp(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU, or GeGLU with tanh-gelu (Gemma)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        dt = {"dtype": c.dtype, "param_dtype": c.param_dtype, **_lora_fields(c)}
        gate = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **dt, name="gate_proj")(x)
        up = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **dt, name="up_proj")(x)
        hidden = _ACTIVATIONS[c.mlp_activation](gate) * up
        return Einsum("BTF,FD->BTD", (f, d), ("mlp", "embed"), **dt, name="down_proj")(hidden)


class Block(nn.Module):
    """One pre-norm decoder layer; the scan carry is the residual stream x [B, T, D].

    `layer` holds this layer's slice of the scanned inputs: "local" (bool, when the model has
    sliding-window layers) and the KV cache "k"/"v" (when decoding). `ctx` is shared by all
    layers: the masks and RoPE tables (global, and "local_*" ones) and the cache write "index".
    Returns (x, this layer's updated cache or None), the scan's (carry, per-layer output).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, layer: dict, ctx: dict):
        c = self.config
        mask, cos, sin = ctx["mask"], ctx["cos"], ctx["sin"]
        if "local" in layer:  # select this layer's mask and RoPE by data, not by branch
            local = layer["local"]
            mask = jnp.where(local, ctx["local_mask"], mask)
            if "local_cos" in ctx:
                cos = jnp.where(local, ctx["local_cos"], cos)
                sin = jnp.where(local, ctx["local_sin"], sin)
        cache = (layer["k"], layer["v"]) if "k" in layer else None
        h = _norm(c, ("embed",), name="attn_norm")(x)
        h, cache = Attention(c, name="attn")(h, mask, cos, sin, cache, ctx.get("index"))
        if c.sandwich_norms:
            h = _norm(c, ("embed",), name="post_attn_norm")(h)
        x = x + h
        h = Mlp(c, name="mlp")(_norm(c, ("embed",), name="mlp_norm")(x))
        if c.sandwich_norms:
            h = _norm(c, ("embed",), name="post_mlp_norm")(h)
        x = nn.with_logical_constraint(x + h, ("batch", "seq", "embed"))
        return x, (None if cache is None else {"k": cache[0], "v": cache[1]})


def init_cache(config: ModelConfig, batch: int, length: int) -> dict[str, jax.Array]:
    """An empty KV cache {"k", "v": [L, B, S, K, H]} in the compute dtype, for `decode`."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(config.dtype))
    return {"k": zeros, "v": zeros}


class Transformer(nn.Module):
    """Decoder-only LM. See the module docstring for the parameter tree.

    Built with `setup` (not `nn.compact`) so that `logits` and `decode` are methods of their own:
    generation applies the LM head to one position per row instead of materialising [B, T, V].
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
            variable_axes={"params": 0, "lora": 0},  # "lora": adapters, only when passed
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        self.embed = Embed(c)
        self.layers = scanned(c)
        self.final_norm = _norm(c, ("embed",))
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
        mask = attention_mask(segment_ids)  # computed once, broadcast to every layer
        x, _ = self._layers(tokens, positions, mask, jnp.arange(tokens.shape[1]), {})
        x = self.final_norm(x)
        return x if return_hidden else self.logits(x)

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        starts: jax.Array,
        cache: dict[str, jax.Array],
        index: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One generation step over a KV cache -> (final-normed hidden [B, T, D], new cache).

        tokens/positions [B, T] occupy cache slots index .. index + T - 1 of every row; a row's
        real tokens start at slot starts[b] (prompts are right-aligned), so a query sees the
        slots in [starts[b], its own slot]. Prefill is T = prompt buffer length, then T = 1.
        """
        length = cache["k"].shape[2]
        q_slots = index + jnp.arange(tokens.shape[1])
        k_slots = jnp.arange(length)
        mask = (k_slots[None, None, :] <= q_slots[None, :, None]) & (
            k_slots[None, None, :] >= starts[:, None, None]
        )
        x, cache = self._layers(tokens, positions, mask, q_slots, {**cache}, index=index)
        return self.final_norm(x), cache

    def _layers(self, tokens, positions, mask, q_slots, layer: dict, index=None):
        """Embeds and runs the scanned layers; builds the per-layer and shared scan inputs."""
        c = self.config
        x = nn.with_logical_constraint(self.embed(tokens), ("batch", "seq", "embed"))
        cos, sin = rope_tables(positions, rope_inv_freq(c))
        ctx = {"mask": mask, "cos": cos, "sin": sin}
        if index is not None:
            ctx["index"] = index
        if c.has_local_layers:
            layer["local"] = jnp.asarray(c.local_layers)
            ctx["local_mask"] = window_mask(mask, q_slots, c.sliding_window)
            if c.local_rope_theta is not None:
                local_freq = rope_inv_freq(c, local=True)
                ctx["local_cos"], ctx["local_sin"] = rope_tables(positions, local_freq)
        return self.layers(x, layer, ctx)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: final-normed hidden [B, T, D] -> float32 logits [B, T, V]."""
        tied = self.config.tie_embeddings
        logits = self.embed.attend(hidden) if tied else self.lm_head(hidden)
        if self.config.final_softcap is not None:  # Gemma 2
            cap = self.config.final_softcap
            logits = jnp.tanh(logits / cap) * cap
        return nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))
