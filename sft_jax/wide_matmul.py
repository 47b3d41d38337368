"""x @ w for a kernel that widens (w [I, O], O > I), with its weight gradient formed [O, I].

Why: on XLA:CPU the weight gradient of such a layer, dW = x^T @ dy over all B*T positions, is
slow in the orientation autodiff gives it ([I, O] out): the compiler copies the wide [B*T, O]
cotangent into transposed order first, and for the MLP's gate/up projections it fuses the SiLU
backward into that strided copy. Formed as dW^T = dy^T @ x ([O, I]) and transposed afterwards
(an [O, I] copy, the size of the kernel), the same product runs without the big copy. Measured
on the CPU workload of issue #8 (docs/benchmarks.md, levers): the LM head's forward + backward
in isolation 430-545 -> 250-265 ms, one MLP layer 67 -> 60 ms; the whole train step, four
interleaved A/B rounds, 3,154-3,490 -> 4,059-5,080 tokens/s (CPU time per step -15% to -28%).

The forward is the plain einsum, so inference and the forward's numerics are unchanged; the
gradients are the same sums in another order (equal to float32 rounding, tests/test_model.py).
Used by `sft_jax.model.Einsum` on the CPU only, without remat (a custom VJP is opaque to the
remat policies, which would then recompute instead of saving the projection): accelerators'
GEMM libraries take either operand orientation at no cost.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def widens(kernel_shape: tuple[int, ...]) -> bool:
    """Whether a kernel is a 2-D [I, O] map with O > I (the case this module speeds up)."""
    return len(kernel_shape) == 2 and kernel_shape[1] > kernel_shape[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def wide_matmul(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x [..., I] @ w [I, O] -> [..., O], accumulated and returned in `out_dtype` if given."""
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=out_dtype)


def _forward(x, w, out_dtype):
    return wide_matmul(x, w, out_dtype), (x, w)


def _backward(out_dtype, residuals, dy):
    x, w = residuals
    dx = jnp.einsum("...o,io->...i", dy, w, preferred_element_type=jnp.float32)
    # Output-major product, kept from being folded back into the [I, O] orientation.
    dw_t = jnp.einsum("...o,...i->oi", dy, x, preferred_element_type=jnp.float32)
    dw_t = jax.lax.optimization_barrier(dw_t)
    return dx.astype(x.dtype), dw_t.T.astype(w.dtype)


wide_matmul.defvjp(_forward, _backward)
