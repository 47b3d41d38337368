"""LoRA adapters of a mixture-of-experts layer's experts, applied inside the grouped matmuls of
sft_jax/model/moe.py (its `Experts` reads them from the "lora" collection; sft_jax/lora/tree.py
makes, merges and exports them).

Each assignment row of the grouped layout goes through its own expert's adapters, in the same
layout as the base matmuls (`GroupedRows`: on the CPU the same padded blocks), so the adapters
cost two thin grouped matmuls per adapted parameter and never form W + a b. Under shard_map
(token shards, expert parallelism) each device holds its experts' adapters, split over the
expert axis like the kernels, and draws its own dropout mask (`rng_axes`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sft_jax.lora.tree import EXPERT_KERNELS
from sft_jax.model.grouped_matmul import GroupedRows
from sft_jax.training.sharding import logical_to_spec


@dataclasses.dataclass(frozen=True)
class ExpertLora:
    """The experts' LoRA adapters as the grouped matmuls use them (one device's experts):
    `adapters` maps "gate_up_proj" to {a [E, D, R], b [E, R, 2F]} and "down_proj" to
    {a [E, F, R], b [E, R, D]}, in the compute dtype.

    Why this shape: transformers stores each layer's experts as fused parameters (gate_up_proj
    [E, 2F, D], down_proj [E, D, F]) and PEFT adapts each with one rank-R adapter per expert
    (`target_parameters`), so gate and up share one adapter whose output is split like the
    fused weight. Each assignment row goes through its own expert's adapter in the base's
    grouped layout (same padding, same blocks): scale * (x @ a_e) @ b_e, never W + a b.
    """

    adapters: dict
    scale: float
    dropout: float = 0.0
    key: jax.Array | None = None  # training: dropout on the adapters' input rows

    def term(self, layout: GroupedRows, name: str, rows: jax.Array) -> jax.Array:
        """scale * (rows @ a_e) @ b_e of adapter `name` for rows in `layout` [.., in]."""
        a, b = self.adapters[name]["a"], self.adapters[name]["b"]
        if self.key is not None and self.dropout > 0:
            key = jax.random.fold_in(self.key, list(EXPERT_KERNELS).index(name))
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, rows.shape)
            rows = jnp.where(keep, rows / (1.0 - self.dropout), 0.0).astype(rows.dtype)
        # Scaled at rank R, as Einsum does: one pass over R values per row, not over `out`.
        low = layout.matmul(rows, a) * jnp.asarray(self.scale, rows.dtype)
        return layout.matmul(low, b)


def rng_axes(
    mesh: Any, rules: tuple, shape: tuple[int, ...], ep: tuple[str, ...]
) -> tuple[str, ...]:
    """The mesh axes over which devices compute different assignment rows (the axes splitting
    the tokens [B, T, D] `shape`, and the expert-parallel ones `ep`): a device's dropout key is
    folded with its index over these, so no two devices draw the same mask for different rows,
    while devices that compute the same rows (replicas along other axes) draw the same one."""
    if mesh is None or mesh.size == 1:
        return ()
    spec = logical_to_spec(("batch", "seq", None), shape, mesh, rules)
    split = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    return tuple(dict.fromkeys([*split, *ep]))


def device_lora(
    scale: float, dropout: float, axes: tuple[str, ...], adapters: dict, key: jax.Array | None
) -> ExpertLora | None:
    """The `ExpertLora` of one device's adapters ({}: None, no LoRA), its dropout key (None: no
    dropout) folded over `axes` (`rng_axes`; under shard_map)."""
    if not adapters:
        return None
    if key is not None and axes:
        key = jax.random.fold_in(key, jax.lax.axis_index(axes))
    return ExpertLora(adapters, scale, dropout, key)
