"""The building blocks every layer of the models shares: explicitly shaped projections (`Einsum`,
with the LoRA family's adapter paths and the QLoRA dequantising path), RMSNorm, and parameters
that carry logical axis names for the sharding rules.

Kept apart from the decoder so that its layers (attention, the dense and the mixture-of-experts
feed-forward layers) can all import them without importing each other.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax.lora.oft import PARAM, ROTATION, SCALE, butterfly_input, rotate_input
from sft_jax.lora.quant import Quantized, dequantize_array, einsum_dequantized
from sft_jax.model.cpu_linear import cpu_linear, input_rank
from sft_jax.model.wide_einsum import wide_einsum

INIT_STD = 0.02  # Hugging Face `initializer_range` for every family here.
ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def named_param(module: nn.Module, name: str, init: Any, shape: tuple, names: tuple, dtype: str):
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
    A QLoRA base passes the kernel as `sft_jax.lora.Quantized` codes: dequantised here, per
    scanned layer, and rematerialised in the backward pass (`einsum_dequantized`). With OFT
    rotation blocks `oft_rotation` [blocks, b, b] (sft_jax/lora/oft.py) the input is rotated
    first, y = (x blockdiag(R)) W: the frozen kernel, quantised or not, is used as is; BOFT's
    output scale `boft_s` [*out] then multiplies each output feature (before the bias, as PEFT).
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_names: tuple[str, ...]
    bias_names: tuple[str, ...] | None = None  # bias over the trailing len(bias_names) out dims
    dtype: str = "float32"
    param_dtype: str = "float32"
    out_dtype: str | None = None  # accumulate/return in this dtype (float32 logits)
    lora_scale: float | None = None  # required when adapters are passed (never silently 0)
    lora_dropout: float = 0.0
    cpu_grad: bool = False  # weight gradient as one matmul over x^T (sft_jax/model/cpu_linear.py)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = None if self.out_dtype is None else jnp.dtype(self.out_dtype)
        stored = self.get_variable("params", "kernel")
        if self.has_variable("lora", PARAM):  # else the base would run silently
            raise ValueError(
                "OFT vectors reached the model unrotated: pass the variables through "
                "sft_jax.lora.apply_variables(variables, oft_spec)"
            )
        if self.has_variable("lora", ROTATION):
            x = self._rotate(x)
        if isinstance(stored, Quantized):  # QLoRA base: dequantised here, one layer at a time
            kernel = stored
            h = x.astype(self.dtype)
            y = einsum_dequantized(self.equation, h, stored, self.dtype, out_dtype)
        else:
            init = nn.initializers.normal(INIT_STD)
            kernel = named_param(
                self, "kernel", init, self.kernel_shape, self.kernel_names, self.param_dtype
            )
            h, w = x.astype(self.dtype), kernel.astype(self.dtype)
            y = self._project(self.equation, h, w, out_dtype)
        if self.has_variable("lora", "a"):
            y = self._lora(x, y, kernel)
        if self.has_variable("lora", SCALE):  # BOFT: [*out], the trailing dims of y
            y = y * self.get_variable("lora", SCALE).astype(y.dtype)
        if self.bias_names is not None:
            shape = self.kernel_shape[-len(self.bias_names) :]
            zeros = nn.initializers.zeros_init()
            bias = named_param(self, "bias", zeros, shape, self.bias_names, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y

    def _rotate(self, x: jax.Array) -> jax.Array:
        """x with its input dims (the kernel letters it shares, trailing in kernel order)
        rotated by OFT's blocks."""
        x_letters, kernel_letters = self.equation.split("->")[0].split(",")
        k_in = "".join(c for c in kernel_letters if c in x_letters)
        if not x_letters.endswith(k_in):
            raise ValueError(f"OFT needs the input dims trailing in {self.equation!r}")
        rot = self.get_variable("lora", ROTATION)
        if self.has_variable("lora", SCALE):  # BOFT: butterfly factors [F, blocks, b, b]
            return butterfly_input(x, rot, len(k_in))
        return rotate_input(x, rot, len(k_in))

    def _project(
        self, equation: str, x: jax.Array, w: jax.Array, out_dtype: Any = None
    ) -> jax.Array:
        """einsum(equation, x, w), through `cpu_linear` when `cpu_grad` and it is a projection."""
        n_in = input_rank(equation) if self.cpu_grad else None
        if n_in:
            return cpu_linear(x, w, n_in, out_dtype)
        return wide_einsum(equation, x, w, out_dtype)

    def _lora(self, x: jax.Array, y: jax.Array, kernel: Any) -> jax.Array:
        """y + the adapter term (LoRA), or the DoRA-rescaled sum, in the compute dtype."""
        if self.lora_scale is None:
            raise ValueError(
                "LoRA adapters were passed (the 'lora' collection) but ModelConfig.lora_scale is "
                "unset: build the config with sft_jax.training.state.lora_model_config, or load "
                "the model with sft_jax.load, which takes the scale from the adapter's config"
            )
        a = self.get_variable("lora", "a").astype(self.dtype)  # [*in, R]
        b = self.get_variable("lora", "b").astype(self.dtype)  # [R, *out]
        down, up = lora_equations(self.equation)
        h = x.astype(self.dtype)
        if self.lora_dropout > 0 and self.has_rng("dropout"):  # training only
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora_dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0.0).astype(self.dtype)
        # The scale multiplies the rank-R activations, not the [.., *out] product: one pass
        # over R values per position, forward and backward, instead of one over the outputs.
        scaled = self._project(down, h, a) * jnp.asarray(self.lora_scale, self.dtype)
        low_rank = self._project(up, scaled, b)
        if not self.has_variable("lora", "m"):
            return y + low_rank.astype(y.dtype)
        m = self.get_variable("lora", "m").astype(jnp.float32)  # [*out]
        n_in = a.ndim - 1
        rank = a.shape[-1]
        w = (
            dequantize_array(kernel, jnp.float32)
            if isinstance(kernel, Quantized)
            else kernel.astype(jnp.float32)
        )
        ab = a.reshape(-1, rank).astype(jnp.float32) @ b.reshape(rank, -1).astype(jnp.float32)
        w = w + self.lora_scale * jax.lax.stop_gradient(ab.reshape(w.shape))
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(w * w, axis=tuple(range(n_in)))))
        return ((m / norm) * (y.astype(jnp.float32) + low_rank)).astype(y.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with HF numerics: statistics in float32. Llama casts back, then multiplies by w;
    Gemma (`offset`) multiplies by (1 + w) in float32, then casts, and initialises w to zero;
    OLMo 2/3 (`scale_float32`) multiply by w in float32, then cast."""

    eps: float
    names: tuple[str, ...]  # logical name of the normalised (last) axis
    dtype: str = "float32"
    param_dtype: str = "float32"
    offset: bool = False
    scale_float32: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.offset else nn.initializers.ones_init()
        scale = named_param(self, "scale", init, (x.shape[-1],), self.names, self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        if self.scale_float32:
            return (normed * scale.astype(jnp.float32)).astype(self.dtype)
        return normed.astype(self.dtype) * scale.astype(self.dtype)
