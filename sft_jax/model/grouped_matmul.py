"""Grouped matrix multiplication for the mixture-of-experts layer: rows sorted by group (expert),
each group multiplied by its own matrix, `jax.lax.ragged_dot`'s contract.

Why three implementations: `jax.lax.ragged_dot` is lowered differently per backend. The TPU
compiler tiles its forward and its gradient with respect to the rows by group (the rows' work),
but computes its gradient with respect to the weights densely, every row against every group
(E times the flops): fine for LoRA, where expert weights are frozen, ruinous for full
fine-tuning. So on TPU the megablox Pallas kernels (gmm, and tgmm for the weight gradient) do
all three. GPU keeps ragged_dot (its lowering is not measured here). XLA:CPU lowers even the
forward densely: every row times every group's matrix, then a select, so E times the flops and
an [rows, E, F] temporary. On the CPU the rows are laid out with each group padded to
a multiple of `BLOCK_ROWS` rows and multiplied block by block with the block's own matrix (a
scan over at most rows / BLOCK_ROWS + E blocks): at most E - 1 partial blocks of extra work, no
dense temporary, and the same result (rows past the groups' total are zero, as in ragged_dot).

`GroupedRows` holds that layout so that several matmuls in a row (an expert's gate, up and down
projections, and their adapters) stay in it: rows are padded once on the way in and gathered
back once on the way out.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

BLOCK_ROWS = 128


@dataclasses.dataclass(frozen=True)
class GroupedRows:
    """The layout of `rows` rows sorted into groups of `group_sizes` for grouped matmuls: on the
    CPU each group padded to whole blocks (`slot`: each row's padded position; `block_group`:
    each block's group), elsewhere the rows as they are."""

    group_sizes: jax.Array  # int32 [G]
    rows: int
    blocked: bool
    platform: str = "cpu"
    block: int = BLOCK_ROWS
    slot: jax.Array | None = None  # [rows]: padded position, or `padded_rows` past the groups
    block_group: jax.Array | None = None  # [blocks]

    @classmethod
    def make(
        cls, group_sizes: jax.Array, rows: int, platform: str, block: int = BLOCK_ROWS
    ) -> GroupedRows:
        if platform != "cpu":
            return cls(group_sizes, rows, blocked=False, platform=platform)
        groups = group_sizes.shape[0]
        block = max(1, min(block, rows))
        blocks = -(-rows // block) + groups  # sum over groups of ceil(size / block) <= this
        padded_sizes = -(-group_sizes // block) * block
        ends, padded_ends = jnp.cumsum(group_sizes), jnp.cumsum(padded_sizes)
        index = jnp.arange(rows)
        group = jnp.searchsorted(ends, index, side="right")  # == groups past the last group
        in_group = group < groups
        group = jnp.minimum(group, groups - 1)
        offset = index - (ends - group_sizes)[group]  # position inside its group
        slot = jnp.where(
            in_group, padded_ends[group] - padded_sizes[group] + offset, blocks * block
        )
        block_group = jnp.searchsorted(padded_ends, jnp.arange(blocks) * block, side="right")
        block_group = jnp.minimum(block_group, groups - 1)  # blocks past the end hold zeros
        return cls(group_sizes, rows, True, "cpu", block, slot, block_group)

    @property
    def padded_rows(self) -> int:
        return self.block_group.shape[0] * self.block

    def enter(self, x: jax.Array) -> jax.Array:
        """Sorted rows [rows, D] -> the layout's rows ([padded_rows, D] on the CPU)."""
        if not self.blocked:
            return x
        padded = jnp.zeros((self.padded_rows, x.shape[-1]), x.dtype)
        return padded.at[self.slot].set(x, mode="drop")

    def matmul(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """Rows in the layout [.., D] times their group's w [G, D, F] -> [.., F]."""
        if self.platform == "tpu" and kernel_tiles(x.shape[0], x.shape[-1], w.shape[-1]):
            return tpu_grouped_matmul(x, w, self.group_sizes)
        if not self.blocked:
            return jax.lax.ragged_dot(x, w, self.group_sizes)
        blocks = x.reshape(-1, self.block, x.shape[-1])
        out = _blocked_matmul(blocks, _as_varying_as(w, x), self.block_group)
        return out.reshape(self.padded_rows, w.shape[-1])

    def bias(self, b: jax.Array) -> jax.Array:
        """Each row's group's bias, from b [G, F]: [rows, F] in the layout, to add to a matmul's
        output. Rows past the groups get zeros; on the CPU a block's padding rows get its
        group's bias, which `leave` drops with them."""
        if self.blocked:
            per_block = jnp.take(_as_varying_as(b, self.block_group), self.block_group, axis=0)
            return jnp.repeat(per_block, self.block, axis=0)
        groups = b.shape[0]
        ends = jnp.cumsum(self.group_sizes)
        group = jnp.searchsorted(ends, jnp.arange(self.rows), side="right")
        rows = jnp.take(_as_varying_as(b, ends), jnp.minimum(group, groups - 1), axis=0)
        return jnp.where((group < groups)[:, None], rows, jnp.zeros((), rows.dtype))

    def leave(self, y: jax.Array) -> jax.Array:
        """The layout's rows -> sorted rows [rows, F]; rows past the groups are zero."""
        if not self.blocked:
            return y
        in_group = self.slot < self.padded_rows
        out = y[jnp.minimum(self.slot, self.padded_rows - 1)]
        return jnp.where(in_group[:, None], out, jnp.zeros((), out.dtype))


def _varying_axes(x: jax.Array) -> frozenset:
    """The mesh axes over which `x` differs between devices inside shard_map (none outside)."""
    return jax.typeof(x).manual_axis_type.varying


def _as_varying_as(w: jax.Array, x: jax.Array) -> jax.Array:
    """`w` typed as varying over `x`'s axes. Under shard_map the weights are the same on every
    device and the rows are not; marking the weights varying outside the custom VJP makes
    autodiff sum their per-device gradients (the transpose of the cast is a psum)."""
    axes = tuple(sorted(_varying_axes(x) - _varying_axes(w)))
    return jax.lax.pcast(w, axes, to="varying") if axes else w


@jax.custom_vjp
def _blocked_matmul(blocks: jax.Array, w: jax.Array, block_group: jax.Array) -> jax.Array:
    """blocks [n, M, D], w [G, D, F], block_group [n] -> [n, M, F], block i times
    w[block_group[i]]. A custom VJP so that the backward keeps x and w, not the [n, D, F] stack
    of per-block weight slices that differentiating the scan would save."""
    return _blocks_times(blocks, w, block_group)


def _blocks_times(blocks: jax.Array, w: jax.Array, block_group: jax.Array) -> jax.Array:
    one = lambda args: args[0] @ jax.lax.dynamic_index_in_dim(w, args[1], keepdims=False)
    return jax.lax.map(one, (blocks, block_group))


def _blocked_forward(blocks, w, block_group):
    return _blocks_times(blocks, w, block_group), (blocks, w, block_group)


def _blocked_backward(residuals, grad):
    blocks, w, block_group = residuals
    d_blocks = _blocks_times(grad, jnp.swapaxes(w, 1, 2), block_group)

    def add_block(dw: jax.Array, args: tuple) -> tuple[jax.Array, None]:
        rows, g_rows, g = args  # dw[g] += rows^T @ g_rows
        update = (rows.T @ g_rows).astype(dw.dtype)
        current = jax.lax.dynamic_index_in_dim(dw, g, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(dw, current + update, g, 0), None

    zeros = jnp.zeros_like(w)  # as device-varying as w (scan wants carry types to match)
    dw, _ = jax.lax.scan(add_block, zeros, (blocks, grad, block_group))
    return d_blocks.astype(blocks.dtype), dw, None


_blocked_matmul.defvjp(_blocked_forward, _blocked_backward)


def kernel_tiles(rows: int, d: int, f: int) -> tuple[int, int, int] | None:
    """The megablox tiling (rows, D, F) for these shapes, or None where the TPU kernels cannot
    take them: their blocks must be whole (8, 128) tiles in both orientations (the gradient
    with respect to the rows multiplies by the transposed weights with the same tiling), so D
    and F multiples of 128 and rows of 8. Smaller shapes (a low-rank adapter's R) keep
    ragged_dot."""
    tm = math.gcd(rows, 128)
    if d % 128 or f % 128 or tm % 8:
        return None
    return tm, 128, 128


def tpu_grouped_matmul(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, interpret: bool = False
) -> jax.Array:
    """`grouped_matmul` on TPU: the megablox Pallas kernels (gmm forward and for the rows'
    gradient, tgmm for the weights'), whose work is the rows' in every direction. Under
    shard_map (a Pallas kernel on a mesh must be) the weights are marked device-varying like
    the rows; `interpret` runs the kernels in Pallas' interpreter (tests on the CPU)."""
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    tiling = kernel_tiles(x.shape[0], x.shape[-1], w.shape[-1]) or (x.shape[0], *w.shape[1:])
    w = _as_varying_as(w, x)
    return megablox.gmm(x, w, group_sizes, x.dtype, tiling, interpret=interpret)


def grouped_matmul(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, platform: str, block: int = BLOCK_ROWS
) -> jax.Array:
    """x [A, D] (rows sorted by group), w [G, D, F], group_sizes int32 [G] -> [A, F]: row i of
    group g is x[i] @ w[g]; rows past sum(group_sizes) give zeros. `platform`: where this is
    compiled for ("cpu" takes the blocked layout of `block`-row blocks)."""
    layout = GroupedRows.make(group_sizes, x.shape[0], platform, block)
    return layout.leave(layout.matmul(layout.enter(x), w))
