"""gpt-oss's MXFP4 expert matrices, dequantized exactly (every MXFP4 value is a bfloat16):
blocks [..., G, 16] uint8 hold two e2m1 codes a byte, low nibble first, and scales [..., G]
uint8 a power-of-two exponent biased by 127 per 32 values (transformers' integrations/mxfp4.py).
The loader (sft_jax/hf/params.py) reads a tensor's blocks under its key and its scales under
`scales_key`."""

from __future__ import annotations

import numpy as np


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 blocks [..., G, 16] uint8 and scales [..., G] uint8 -> float32 [..., G * 32]
    (transformers' integrations/mxfp4.py): each byte holds two e2m1 codes, the low nibble the
    even value; each group of 32 values is scaled by 2 ** (scale - 127)."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], -1)
    values = _FP4_VALUES[codes]
    np.ldexp(values, scales.astype(np.int32)[..., None] - 127, out=values)  # in place: no copy
    return values.reshape(*scales.shape[:-1], -1)


# e2m1 code -> value: sign bit, then 2 exponent bits and 1 mantissa bit.
_FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)


def scales_key(key: str) -> str:
    return key.removesuffix("_blocks") + "_scales"
