"""QLoRA: the frozen base kernels stored blockwise-quantised (int8 or 4-bit NormalFloat).

Each kernel is flattened and cut into blocks of 64 values; a block keeps its absmax as a float32
scale and each value as a code: int8 (round(x / absmax * 127)) or NF4 (the index of the nearest
of the 16 NormalFloat levels of the QLoRA paper, two codes packed per byte). Error bounds, per
value of a block: int8 |err| <= absmax / 127 / 2; NF4 |err| <= absmax * (largest gap between
adjacent levels) / 2.

The forward dequantises the whole frozen tree at the start of each loss evaluation (`dequantize`
inside loss_fn): simple and exact to test, at the cost of materialising the compute-dtype weights
once per step in temporary memory. Persistent memory is the codes plus scales (about 1 byte per
weight for int8, 0.5 for NF4, + 4/64 for the scales). Quantised leaves are stored replicated.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

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
    """A blockwise-quantised array: codes [blocks, 64 or 32 packed] and float32 scales [blocks]."""

    codes: jax.Array
    scales: jax.Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)
    fmt: str = flax.struct.field(pytree_node=False)


def quantize(x: jax.Array, fmt: str, dtype: Any = None) -> Quantized:
    """Blockwise absmax quantisation of `x` in format "int8" or "nf4"; dequantises to `dtype`
    (default x's dtype), e.g. bfloat16 for a float32 base."""
    if fmt not in ("int8", "nf4"):
        raise ValueError(f"quantisation format {fmt!r}; choose int8 or nf4")
    size = math.prod(x.shape)
    flat = jnp.pad(x.astype(jnp.float32).reshape(-1), (0, -size % BLOCK)).reshape(-1, BLOCK)
    absmax = jnp.max(jnp.abs(flat), axis=1)
    scales = jnp.where(absmax > 0, absmax, 1.0)
    normed = flat / scales[:, None]  # in [-1, 1]
    if fmt == "int8":
        codes = jnp.round(normed * 127).astype(jnp.int8)
    else:
        index = jnp.searchsorted(_NF4_MIDPOINTS, normed).astype(jnp.uint8)  # nearest level
        codes = index[:, 0::2] | (index[:, 1::2] << 4)  # two 4-bit codes per byte
    return Quantized(codes, scales, tuple(x.shape), jnp.dtype(dtype or x.dtype).name, fmt)


def dequantize_array(q: Quantized, dtype: Any = None) -> jax.Array:
    """The array a `Quantized` stands for, in `dtype` (default: its original dtype)."""
    if q.fmt == "int8":
        values = q.codes.astype(jnp.float32) / 127
    else:
        index = jnp.stack([q.codes & 15, q.codes >> 4], axis=-1).reshape(q.codes.shape[0], -1)
        values = jnp.asarray(NF4_LEVELS)[index]
    flat = (values * q.scales[:, None]).reshape(-1)[: math.prod(q.shape)]
    return flat.reshape(q.shape).astype(dtype or q.dtype)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def quantize_kernels(params: dict, fmt: str, dtype: Any) -> dict:
    """The base tree in `dtype`, with every layer kernel quantised when `fmt` is not "none"
    (embeddings, norms and the LM head stay in `dtype`: as in QLoRA, only the linear layers of
    the blocks are stored in 4 or 8 bits). Quantised from the original values, not from `dtype`."""

    def one(path: tuple, leaf: jax.Array) -> Any:
        keys = [str(getattr(p, "key", p)) for p in path]
        if fmt != "none" and keys[0] == "layers" and keys[-1] == "kernel":
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
