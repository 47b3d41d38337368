"""A projection x @ w whose weight gradient is one plain matmul over an explicitly transposed x.

Why: on XLA:CPU the weight gradient of a projection, dW = x^T @ dy summed over all B*T
positions, contracts the leading (position) axis of both operands. The compiler then copies an
operand into transposed order inside the backward, often the wide [B*T, O] cotangent, and for
the MLP's gate/up it fuses the SiLU backward into that strided copy. Here the backward first
transposes x itself ([I, B*T], an optimization barrier keeps it a separate copy) and then
computes dW = x^T @ dy as an ordinary [I, B*T] x [B*T, O] matmul. Measured on the CPU workload
of docs/benchmarks.md (levers, and "Figures behind design choices"); the forward is the plain
einsum, so inference and the forward's numerics are unchanged, and the gradients are the same
sums in another order (tests/test_cpu_linear.py).

`sft_jax.model.layers.Einsum` uses it for its projection and, under LoRA, for both low-rank matmuls
x @ a and (x a) @ b (their dB = (x a)^T dy had the same strided copy of the cotangent), on the
CPU only. Inside the layers not under the remat policies that save
projections (dots, dots_saveable): a custom VJP is opaque to them, so they would recompute the
projection instead of saving it. Full remat saves nothing inside a layer, so its layers take the
path, and the LM head, outside the layers, always does.
Accelerators' GEMM libraries take either operand orientation at no cost.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def input_rank(equation: str) -> int | None:
    """How many leading kernel dims are inputs, when `equation` is a projection x [.., *in] @
    w [*in, *out] -> [.., *out] (the kernel's input letters trail x in order and the output is
    x's leading letters then the kernel's output letters), so that it is a matmul over flattened
    dims; None for any other einsum."""
    operands, out = equation.split("->")
    x, kernel = operands.split(",")
    k_in = "".join(c for c in kernel if c in x)
    if not k_in or not kernel.startswith(k_in) or not x.endswith(k_in):
        return None
    lead, k_out = x[: -len(k_in)], kernel[len(k_in) :]
    return len(k_in) if k_out and out == lead + k_out else None


def cpu_linear(
    x: jax.Array, w: jax.Array, n_in: int, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """x [.., *in] @ w [*in, *out] -> [.., *out], in `out_dtype` if given; `n_in` = len(in)."""
    in_size = math.prod(w.shape[:n_in])
    lead = x.shape[: x.ndim - n_in]
    y = _matmul(x.reshape(-1, in_size), w.reshape(in_size, -1), out_dtype)
    return y.reshape(*lead, *w.shape[n_in:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=out_dtype)


def _forward(x, w, out_dtype):
    return _matmul(x, w, out_dtype), (x, w)


def _backward(out_dtype, residuals, dy):
    x, w = residuals
    dx = jnp.dot(dy, w.T, preferred_element_type=jnp.float32)
    x_t = jax.lax.optimization_barrier(x.T)  # [I, P]: a real copy, not folded into the dot
    dw = jnp.dot(x_t, dy, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_forward, _backward)
