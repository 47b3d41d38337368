"""Gemma 4's per-layer differences, as data: which layers reuse another layer's keys and values,
the full-attention layers' own head shape and RoPE, the per-layer input embeddings. No jax
here, so configs can be read and checked without loading it (sft_jax/model/gemma4.py runs it).

Why the decoder runs Gemma 4's layers as one scanned block: its layers are not alike. Sliding
and full-attention layers have different head dims (and kv heads), the last
`kv_shared_layers` layers have no key/value projections at all and attend over the keys and
values of the last earlier layer of their type, and with `double_wide_mlp` those layers' MLP is
twice as wide. No repeating period covers that, so the whole stack is the period: one scan step
runs every layer, each with its own parameters (layers/layer_{j}/..., a leading axis of 1),
as a hybrid model's period is run (sft_jax/model/hybrid.py).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sft_jax.model.config import ModelConfig

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclasses.dataclass(frozen=True)
class Gemma4Features:
    """What Gemma4TextConfig turns on beyond the Gemma 3 layer (HF names in comments).

    ModelConfig's head_dim, num_kv_heads and local_rope_theta are the sliding layers';
    rope_theta and these `global_*` fields are the full-attention layers'."""

    global_head_dim: int  # global_head_dim
    global_kv_heads: int  # num_global_key_value_heads (with attention_k_eq_v), else kv heads
    global_rotary_factor: float = 1.0  # full layers' "proportional" RoPE partial_rotary_factor
    global_rope_factor: float = 1.0  # its "factor": every frequency divided by it
    kv_shared_layers: int = 0  # num_kv_shared_layers: the last ones reuse earlier K/V
    k_eq_v: bool = False  # attention_k_eq_v: full layers' values are their key projection
    double_wide_mlp: bool = False  # use_double_wide_mlp: the K/V-sharing layers' MLP is 2F
    per_layer_input_size: int = 0  # hidden_size_per_layer_input (0: no per-layer inputs)
    per_layer_vocab_size: int = 0  # vocab_size_per_layer_input

    def __post_init__(self) -> None:
        if self.global_head_dim % 2 or self.global_head_dim < 2:
            raise ValueError(f"global_head_dim ({self.global_head_dim}) must be even")
        if not 0 < self.global_rotary_factor <= 1:
            raise ValueError(f"global_rotary_factor ({self.global_rotary_factor}) not in (0, 1]")
        if self.per_layer_input_size and self.per_layer_vocab_size < 1:
            raise ValueError("per-layer inputs need per_layer_vocab_size")


def layer_types(c: ModelConfig) -> tuple[str, ...]:
    """Each layer's attention type, from `local_layers`."""
    return tuple(SLIDING if local else FULL for local in c.local_layers)


def first_shared_layer(c: ModelConfig) -> int:
    """The first layer that reuses an earlier layer's keys and values (num_layers: none)."""
    return c.num_layers - c.gemma4.kv_shared_layers


def check_kv_sharing(c: ModelConfig) -> None:
    """ValueError unless every type of a K/V-sharing layer has a layer of that type before the
    sharing starts (the one whose keys and values it reads), as transformers requires."""
    first = first_shared_layer(c)
    types = layer_types(c)
    if c.gemma4.kv_shared_layers and set(types[first:]) - set(types[:first]):
        raise ValueError(
            f"the last {c.gemma4.kv_shared_layers} layers share keys and values, but no earlier "
            f"layer has their type(s) {sorted(set(types[first:]) - set(types[:first]))}"
        )


def layer_view(c: ModelConfig, j: int) -> ModelConfig:
    """`c` as layer j sees it: a full-attention layer's head dim and kv heads, a K/V-sharing
    layer's double-wide MLP."""
    g = c.gemma4
    fields = {}
    if not c.local_layers[j]:
        fields.update(head_dim=g.global_head_dim, num_kv_heads=g.global_kv_heads)
    if g.double_wide_mlp and j >= first_shared_layer(c):
        fields["intermediate_size"] = 2 * c.intermediate_size
    return dataclasses.replace(c, **fields) if fields else c
