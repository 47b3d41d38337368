"""The CPU's blocked grouped matmul against `jax.lax.ragged_dot` (values and gradients): groups
of every size, empty groups, rows past the groups' total, blocks smaller and larger than groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.model.grouped_matmul import BLOCK_ROWS, grouped_matmul


@pytest.mark.parametrize(
    "sizes, block",
    [
        ([5, 0, 17, 3, 0, 11], 4),  # empty groups, groups spanning several blocks
        ([40, 0, 0, 0], 8),  # everything in one group
        ([0, 0, 0, 0], 8),  # no row in any group
        ([3, 1, 2], 64),  # block wider than every group and than the rows
        ([7, 9, 2, 6], 5),  # sizes not multiples of the block; 4 rows past the total
    ],
)
def test_equals_ragged_dot_with_gradients(sizes, block):
    rows = max(sum(sizes), 1) + (4 if sizes == [7, 9, 2, 6] else 0)
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(sum(sizes) + block), 3)
    x = jax.random.normal(kx, (rows, 6))
    w = jax.random.normal(kw, (len(sizes), 6, 5))
    g = jnp.asarray(sizes, jnp.int32)
    cotangent = jax.random.normal(kg, (rows, 5))
    ours = lambda x, w: jnp.sum(grouped_matmul(x, w, g, "cpu", block) * cotangent)
    ref = lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, g) * cotangent)
    np.testing.assert_allclose(
        grouped_matmul(x, w, g, "cpu", block), jax.lax.ragged_dot(x, w, g), atol=1e-5
    )
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_cpu_path_holds_no_row_by_group_temporary():
    """XLA:CPU's ragged_dot multiplies every row by every group's matrix and keeps the
    [rows, groups, F] products; the blocked path's temporaries stay a few row-sized buffers
    however many groups there are. (Flop counts cannot tell: XLA counts a loop body once.)"""
    rows, d, f, groups = 8192, 64, 128, 16
    args = (
        jax.ShapeDtypeStruct((rows, d), jnp.float32),
        jax.ShapeDtypeStruct((groups, d, f), jnp.float32),
        jax.ShapeDtypeStruct((groups,), jnp.int32),
    )
    temp = lambda fn: jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
    blocked = temp(lambda x, w, g: grouped_matmul(x, w, g, "cpu"))
    dense = temp(jax.lax.ragged_dot)
    padded_rows = rows + groups * BLOCK_ROWS  # the blocked path's buffers, input and output
    assert blocked <= padded_rows * (d + f) * 4 < rows * groups * f * 4 / 2 < dense
