"""Grouped matrix multiplication for the mixture-of-experts layer: rows sorted by group (expert),
each group multiplied by its own matrix, `jax.lax.ragged_dot`'s contract.

Why two implementations: on TPU (and GPU) `ragged_dot` compiles to a grouped matmul that does
the work of the rows it has (the TPU compiler tiles the groups: flops = 2 x rows x D x F). XLA:CPU
instead lowers it densely: every row times every group's matrix, then a select, so E times the
flops and an [rows, E, F] temporary. On the CPU `blocked_grouped_matmul` pads each group to a
multiple of `BLOCK_ROWS` rows and multiplies block by block with the block's own matrix (a scan
over at most rows / BLOCK_ROWS + E blocks): at most E - 1 partial blocks of extra work, no
dense temporary, and the same result (rows past the groups' total are zero, as in ragged_dot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK_ROWS = 128


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, platform: str) -> jax.Array:
    """x [A, D] (rows sorted by group), w [G, D, F], group_sizes int32 [G] -> [A, F]: row i of
    group g is x[i] @ w[g]; rows past sum(group_sizes) give zeros. `platform`: where this is
    compiled for ("cpu" takes the blocked path)."""
    if platform == "cpu":
        return blocked_grouped_matmul(x, w, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes)


def blocked_grouped_matmul(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, block: int = BLOCK_ROWS
) -> jax.Array:
    """`grouped_matmul` by blocks of `block` rows, each inside one group (see the module
    docstring). Static shapes: the padded layout has room for every group's rounding up."""
    rows, d = x.shape
    groups, f = w.shape[0], w.shape[-1]
    block = max(1, min(block, rows))
    blocks = -(-rows // block) + groups  # sum over groups of ceil(size / block) is at most this
    padded_sizes = -(-group_sizes // block) * block
    ends, padded_ends = jnp.cumsum(group_sizes), jnp.cumsum(padded_sizes)
    index = jnp.arange(rows)
    group = jnp.searchsorted(ends, index, side="right")  # == groups past the last group
    in_group = group < groups
    group = jnp.minimum(group, groups - 1)
    offset = index - (ends - group_sizes)[group]  # position inside its group
    slot = jnp.where(in_group, padded_ends[group] - padded_sizes[group] + offset, blocks * block)
    padded = jnp.zeros((blocks * block, d), x.dtype).at[slot].set(x, mode="drop")
    block_group = jnp.searchsorted(padded_ends, jnp.arange(blocks) * block, side="right")
    block_group = jnp.minimum(block_group, groups - 1)  # blocks past the end hold zeros

    def one_block(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        rows_of_block, g = args
        return rows_of_block @ jax.lax.dynamic_index_in_dim(w, g, keepdims=False)

    out = jax.lax.map(one_block, (padded.reshape(blocks, block, d), block_group))
    out = out.reshape(blocks * block, f)[jnp.minimum(slot, blocks * block - 1)]
    return jnp.where(in_group[:, None], out, jnp.zeros((), out.dtype))
