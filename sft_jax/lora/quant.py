"""QLoRA: the frozen base kernels stored blockwise-quantised (int8 or 4-bit NormalFloat).

Blocks run along the last axis of a kernel: block size b = the largest divisor of the last
dimension that is at most 64 (even for NF4), so an array [..., n] is stored as

    codes  [..., n / b, b]   int8 round(x / absmax * 127), or uint8 NF4 pairs [..., n / b, b / 2]
    scales [..., n / b]      float32 absmax of each block

Keeping the kernel's leading axes is what lets the codes be sharded like the kernel itself (the
last axis's mesh axes move to the block axis, `quantized_specs`) and lets `nn.scan` slice one
layer's codes off the leading L axis: the model dequantises inside each layer
(`einsum_dequantized`, used by `sft_jax.model.layers.Einsum`), so peak memory holds one layer's
dequantised weights, not the whole base. The dequantisation is rematerialised in the backward
pass instead of being saved. NF4 levels are those of the QLoRA paper (two codes per byte).

Error bounds, per value of a block: int8 |err| <= absmax / 127 / 2; NF4 |err| <= absmax *
(largest gap between adjacent levels) / 2. Persistent memory: about 1 byte per weight for int8,
0.5 for NF4, + 4 / b for the scales.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.model.wide_einsum import wide_einsum

BLOCK = 64
FORMATS = ("none", "int8", "nf4")
# NormalFloat4 levels (QLoRA, Dettmers et al. 2023; bitsandbytes' NF4 table).
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
NF4_MAX_HALF_GAP = float(np.max(np.diff(NF4_LEVELS)) / 2)


@flax.struct.dataclass
class Quantized:
    """A blockwise-quantised array (see the module docstring); its shape is derived from the
    codes, so a slice of the leading axes (one scanned layer) is still a valid `Quantized`."""

    codes: jax.Array
    scales: jax.Array
    dtype: str = flax.struct.field(pytree_node=False)  # the dtype it dequantises to
    fmt: str = flax.struct.field(pytree_node=False)

    @property
    def block(self) -> int:
        return self.codes.shape[-1] * (2 if self.fmt == "nf4" else 1)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.scales.shape[:-1], self.scales.shape[-1] * self.block)


def block_size(last: int, fmt: str) -> int:
    """Largest divisor of the last dimension up to 64; even for NF4 (two codes per byte)."""
    step = 2 if fmt == "nf4" else 1
    for b in range(BLOCK - BLOCK % step, 0, -step):
        if last % b == 0:
            return b
    raise ValueError(f"nf4 needs an even last dimension to pack codes in pairs; got {last}")


def quantize(x: jax.Array, fmt: str, dtype: Any = None) -> Quantized:
    """Blockwise absmax quantisation of `x` (at least 1-d) along its last axis, in format
    "int8" or "nf4"; dequantises to `dtype` (default x's dtype), e.g. bfloat16."""
    if fmt not in ("int8", "nf4"):
        raise ValueError(f"quantisation format {fmt!r}; choose int8 or nf4")
    b = block_size(x.shape[-1], fmt)
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // b, b)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scales = jnp.where(absmax > 0, absmax, 1.0)
    normed = blocks / scales[..., None]  # in [-1, 1]
    if fmt == "int8":
        codes = jnp.round(normed * 127).astype(jnp.int8)
    else:
        index = jnp.searchsorted(_NF4_MIDPOINTS, normed).astype(jnp.uint8)  # nearest level
        codes = index[..., 0::2] | (index[..., 1::2] << 4)  # two 4-bit codes per byte
    return Quantized(codes, scales, jnp.dtype(dtype or x.dtype).name, fmt)


def dequantize_array(q: Quantized, dtype: Any = None) -> jax.Array:
    """The array a `Quantized` stands for, in `dtype` (default: its original dtype)."""
    if q.fmt == "int8":
        values = q.codes.astype(jnp.float32) / 127
    else:
        pairs = jnp.stack([q.codes & 15, q.codes >> 4], axis=-1)
        values = jnp.asarray(NF4_LEVELS)[pairs.reshape(*q.codes.shape[:-1], -1)]
    flat = (values * q.scales[..., None]).reshape(q.shape)
    return flat.astype(dtype or q.dtype)


def einsum_dequantized(
    equation: str, x: jax.Array, q: Quantized, dtype: Any, out_dtype: Any = None
) -> jax.Array:
    """einsum(x, dequantised q) with the dequantisation rematerialised in the backward pass:
    only x, codes and scales are kept for it, never the dequantised weight (which, saved per
    scanned layer, would be a full-precision copy of the whole base)."""

    def run(x: jax.Array, codes: jax.Array, scales: jax.Array) -> jax.Array:
        # Via the stored dtype (e.g. bfloat16), exactly as the whole-tree `dequantize`.
        w = dequantize_array(Quantized(codes, scales, q.dtype, q.fmt)).astype(dtype)
        return wide_einsum(equation, x, w, out_dtype)

    return jax.checkpoint(run)(x, q.codes, q.scales)


def quantized_specs(kernel_spec: tuple, ndim: int, blocks: int, mesh_shape: dict) -> dict:
    """PartitionSpec entries of codes and scales from their kernel's spec (ndim dims): the
    leading dims keep the kernel's mesh axes; the last dim's axes go to the block axis when they
    divide the number of blocks (else it is replicated); the within-block axis is replicated."""
    spec = (tuple(kernel_spec) + (None,) * ndim)[:ndim]
    last = spec[-1]
    axes = () if last is None else (last,) if isinstance(last, str) else tuple(last)
    if axes and blocks % int(np.prod([mesh_shape[a] for a in axes])):
        last = None
    scales = (*spec[:-1], last)
    return {"codes": (*scales, None), "scales": scales}


def _is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def quantize_kernels(params: dict, fmt: str, dtype: Any) -> dict:
    """The base tree in `dtype`, with every layer kernel (a mixture-of-experts layer's stacked
    expert kernels included) quantised when `fmt` is not "none" (embeddings, norms and the LM
    head stay in `dtype`: as in QLoRA, only the linear layers of the blocks are stored in 4 or 8
    bits). Quantised from the original values, not from `dtype`."""

    def one(path: tuple, leaf: jax.Array) -> Any:
        keys = [str(getattr(p, "key", p)) for p in path]
        expert_kernel = keys[-2:-1] == ["experts"] and keys[-1].endswith("_proj")  # not biases
        kernel = keys[-1] == "kernel" or expert_kernel
        if fmt != "none" and keys[0] == "layers" and kernel:
            return quantize(leaf, fmt, dtype)
        return leaf.astype(dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def dequantize(tree: Any) -> Any:
    """Replaces every `Quantized` leaf by its dequantised array; other leaves pass through."""
    return jax.tree.map(
        lambda x: dequantize_array(x) if _is_quantized(x) else x, tree, is_leaf=_is_quantized
    )


def error_bound(fmt: str, absmax: jax.Array) -> jax.Array:
    """Largest |x - dequantize(quantize(x))| per block with this absmax."""
    return absmax / 127 / 2 if fmt == "int8" else absmax * NF4_MAX_HALF_GAP
