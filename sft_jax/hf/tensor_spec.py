"""One leaf of our parameter tree as the HF tensor(s) it comes from: `TensorSpec` (key, shape,
conversions both ways, per-layer and per-expert indexing) and `linear_spec` for a torch Linear.
sft_jax/hf/params.py builds the table of them for a ModelConfig."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


def identity(w: np.ndarray) -> np.ndarray:
    return w


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one leaf of our tree comes from: HF key ('{i}' = layer, '{e}' = expert), its shape,
    and the conversions HF -> ours (`convert`) and ours -> HF (`to_hf`, None: a layout we read
    but never write) of one layer's (and expert's) slice."""

    key: str
    shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray] = identity
    to_hf: Callable[[np.ndarray], np.ndarray] | None = identity
    per_layer: bool = True
    experts: int = 0  # > 0: one HF tensor per expert, stacked on the leaf's expert axis
    # Fused tensors hold several leaves (gpt-oss's gate and up interleaved, Phi-3's q/k/v and
    # gate/up concatenated): `joins` names the other leaves, whose slices `to_hf` takes as
    # further arguments; their own specs are `joined` (written with this one).
    joins: tuple[tuple[str, ...], ...] = ()
    joined: bool = False
    mxfp4: bool = False  # `key` names MXFP4 blocks (shape: theirs), read with their scales
    # A hybrid model's sub-layer: leaf index s holds HF layer s * period + offset.
    period: int = 1
    offset: int = 0

    def hf_layers(self, num_layers: int) -> range:
        """The HF layer indices behind the leaf's leading axis, in order."""
        return range(self.offset, num_layers, self.period)


def linear_spec(out_dims: tuple[int, ...], in_dims: tuple[int, ...], key: str) -> TensorSpec:
    """A torch Linear [prod(out), prod(in)] as our kernel [*in, *out]."""
    o, i = int(np.prod(out_dims)), int(np.prod(in_dims))
    return TensorSpec(
        key,
        (o, i),
        lambda w: w.T.reshape(*in_dims, *out_dims),
        lambda k: k.reshape(i, o).T,
    )
