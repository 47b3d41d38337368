"""Hybrid decoders (Qwen3.5): which layers are full attention and which are Gated DeltaNet linear
attention, and the shape of the linear-attention layers. No jax here, so configs can be read and
checked without loading it.

Why the decoder scans a repeating period of layers: full-attention and linear-attention layers
have different parameters, so one `nn.scan` over single layers would need a Python branch per
layer (which a scan cannot have) or both layers' parameters in every layer (wasted memory and
a parameter tree that no longer mirrors the checkpoint). Hybrid checkpoints repeat one pattern
(Qwen3.5: three linear-attention layers then one full-attention layer), so the decoder scans
that period as one super-block: each scan step runs the period's layers, each with its own
parameters, and the scan still compiles one super-block whatever the depth.

The period is `layer_types` up to and including its first full-attention layer (all of it when
there is none); `layer_types` must be that period repeated a whole number of times, else the
model is refused where it is read (naming the file and field).
"""

from __future__ import annotations

import dataclasses

FULL = "full_attention"
LINEAR = "linear_attention"
LAYER_TYPES = (FULL, LINEAR)


@dataclasses.dataclass(frozen=True)
class LinearAttention:
    """Gated DeltaNet layer shape (HF Qwen3.5 names: linear_num_key_heads, ...)."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int = 4
    chunk_size: int = 64  # the chunked training form's block length (results do not depend on it)

    def __post_init__(self) -> None:
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(
                f"linear_num_value_heads ({self.num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.num_key_heads})"
            )
        if self.conv_kernel < 1 or self.chunk_size < 1:
            raise ValueError("the conv kernel and the chunk size must be positive")

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the short causal convolution: q, k and v concatenated."""
        return 2 * self.key_dim + self.value_dim


def layer_period(layer_types: tuple[str, ...]) -> tuple[str, ...]:
    """The repeating period of `layer_types` (module docstring); ValueError when it does not
    repeat a whole number of times or names an unknown type."""
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"layer_types has unknown types {unknown}; known: {LAYER_TYPES}")
    end = layer_types.index(FULL) + 1 if FULL in layer_types else 1
    period = tuple(layer_types[:end])
    if (
        not period
        or len(layer_types) % len(period)
        or (period * (len(layer_types) // len(period)) != tuple(layer_types))
    ):
        raise ValueError(
            f"layer_types is not a whole repetition of one period {list(period)} (the decoder "
            "scans that period as one block)"
        )
    return period
