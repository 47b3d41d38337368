"""An einsum with a wider result than its inputs (bfloat16 in, float32 out) whose backward pass
runs in the inputs' dtype.

Why: `jnp.einsum(x, w, preferred_element_type=float32)` transposes with the float32 cotangent,
and XLA then runs both backward matmuls with float32 operands (the bfloat16 operand is widened).
On GPUs these run as TF32 at half the bfloat16 rate, and for the LM head they are the largest
single matmuls of the step: [tokens, D] x [D, V] with V = 128k for Llama 3. Here the cotangent
is rounded to the inputs' dtype first, so the head's backward is like every other projection's
backward in the model: operands in the compute dtype, accumulation in float32 inside the matmul.
The forward, and so the logits and the loss, are unchanged; the rounding adds a relative error
of the compute dtype's epsilon to each element of the logits' gradient, as the bfloat16
activations already do to every gradient below the head. When inputs and result share a dtype
(float32 models, the CPU tests) this is the plain einsum.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def wide_einsum(equation: str, x: jax.Array, w: jax.Array, out_dtype: Any = None) -> jax.Array:
    """einsum(equation, x, w) with results in `out_dtype` (None: the inputs' dtype); when that is
    wider than the inputs, the gradients are computed from the cotangent in the inputs' dtype."""
    if out_dtype is None:
        return jnp.einsum(equation, x, w)
    out_dtype = jnp.dtype(out_dtype)
    inputs_dtype = jnp.result_type(x.dtype, w.dtype)
    if out_dtype == inputs_dtype or jnp.finfo(out_dtype).bits <= jnp.finfo(inputs_dtype).bits:
        return jnp.einsum(equation, x, w, preferred_element_type=out_dtype)
    return _wide(equation, out_dtype, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _wide(equation: str, out_dtype: Any, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(equation, x, w, preferred_element_type=out_dtype)


def _wide_forward(equation, out_dtype, x, w):
    return _wide(equation, out_dtype, x, w), (x, w)


def _wide_backward(equation, out_dtype, residuals, cotangent):
    x, w = residuals
    narrow = jnp.result_type(x.dtype, w.dtype)
    _, pullback = jax.vjp(lambda a, b: jnp.einsum(equation, a, b), x, w)
    return pullback(cotangent.astype(narrow))


_wide.defvjp(_wide_forward, _wide_backward)
