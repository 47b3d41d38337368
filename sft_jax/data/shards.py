"""Which data shards a process owns, which records belong to a shard, and agreeing on counts.

The training records of each mixture group (after the held-out split) are dealt round-robin into
S shards by their position in the group's file list: shard s gets positions s, s + S, s + 2S, ...
Round-robin on positions needs no record count in advance, spreads any order in the files (by
topic, by length) evenly over the shards, and keeps the shards within one record of each other.
A process owns S / P consecutive shards; everything about a shard (its records, packing, order)
depends on (data, seed, s, S) only, never on the process count, which is what makes one process
holding S "virtual" shards produce exactly the global batches of S / k processes.

Processes then agree on a few numbers with one small collective (`agree`): each contributes a
vector of counts and all receive every vector, so statistics are global and the epoch length
(the smallest shard's row count) is the same everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sft_jax.data.mixture import parse_mixture, proportional_counts
from sft_jax.data.source import DataError

_LOW_BITS = 31  # counts travel as two int32 halves: JAX without x64 has no int64 collectives


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Shards `first .. first + count - 1` of `num_shards` belong to this process."""

    num_shards: int
    first: int
    count: int

    @property
    def local(self) -> range:
        return range(self.first, self.first + self.count)


def shard_plan(configured: int, process_index: int, process_count: int) -> ShardPlan:
    """data.shards (0 = one per process) -> this process's consecutive share of the shards."""
    num_shards = configured or process_count
    if num_shards % process_count:
        raise DataError(
            f"data.shards = {num_shards} must be a multiple of the number of processes "
            f"({process_count}) so every process owns the same number of shards"
        )
    count = num_shards // process_count
    return ShardPlan(num_shards, process_index * count, count)


def empty_shard_error(
    shard: int, plan: ShardPlan, files: str, groups: Sequence[int] = ()
) -> DataError:
    """A shard left without examples (of the mixture `groups`, when given). With one shard the
    files themselves yield none, and the usual advice (fewer shards) cannot help: say so."""
    names = [parse_mixture(files)[g][0] for g in groups]
    which = f" of mixture group(s) {names}" if groups else ""
    if plan.num_shards == 1:
        return DataError(
            f"no trainable examples{which} in {files}: the files are empty, or every row was "
            "skipped as bad or dropped by data.overlong"
        )
    return DataError(
        f"data shard {shard} of {plan.num_shards} has no examples{which} ({files}); use fewer "
        "data shards or more data"
    )


def shard_positions(positions: Sequence[int], shard: int, num_shards: int) -> Sequence[int]:
    """The round-robin share of `positions` (a group's training records) that `shard` owns."""
    return positions[shard::num_shards]


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split of `fraction` of the rows (at least one when fraction > 0)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = max(1, round(fraction * len(rows))) if fraction > 0 else 0
    held = {int(i) for i in order[:n_eval]}
    train = [r for i, r in enumerate(rows) if i not in held]
    return train, [r for i, r in enumerate(rows) if i in held]


def split_positions(
    count: int, fraction: float, seed: int, *, hold_out: bool
) -> tuple[list[int], list[int]]:
    """A group's record positions -> (training positions, held-out positions), in file order;
    nothing is held out when there are eval files (`hold_out` False)."""
    train, held = split_position_arrays(count, fraction, seed, hold_out=hold_out)
    return train.tolist(), held.tolist()


def split_position_arrays(
    count: int, fraction: float, seed: int, *, hold_out: bool
) -> tuple[np.ndarray, np.ndarray]:
    """`split_positions` as int64 arrays (the held-out draw of `split_rows`, without a Python
    object per record): the streamed data stage selects millions of records through them."""
    n_eval = max(1, round(fraction * count)) if fraction > 0 else 0
    if not hold_out or not n_eval:
        return np.arange(count, dtype=np.int64), np.zeros(0, np.int64)
    held = np.zeros(count, bool)
    held[np.random.default_rng(seed).permutation(count)[:n_eval]] = True
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class HeldOutShare:
    """A group's held-out records as used: the first `keep` (in file order) are evaluated on; the
    rest are trained on, `extra[slot]` (indices into the held-out list) by each own shard."""

    keep: int
    extra: list[range]


def held_out_shares(
    held: Sequence[int], trained: Sequence[int], cap: int, plan: ShardPlan
) -> list[HeldOutShare]:
    """At most `cap` held-out records are evaluated on, each group's share in proportion to its
    held-out count `held[g]` (the first ones in file order), so the eval set is not mostly the
    first group. The records beyond a group's share are not lost: they are dealt round-robin to
    the shards as if they came after the group's `trained[g]` training positions. All of it
    depends only on the record counts, so every process and shard plan agrees."""
    cap = max(cap, 0)
    keep = list(held) if sum(held) <= cap else proportional_counts(cap, held)
    return [
        HeldOutShare(
            k,
            [range(k + (s - t) % plan.num_shards, n, plan.num_shards) for s in plan.local],
        )
        for n, t, k in zip(held, trained, keep, strict=True)
    ]


def agree(local: Sequence[int], process_count: int) -> np.ndarray:
    """Every process's count vector, int64 [process_count, len(local)], on every process.

    One `process_allgather` of a few int32 values; with one process no collective runs. All
    processes must call it with vectors of the same length (a failed one sends a vector with its
    failure flag set, so the others stop with it instead of waiting).
    """
    values = np.asarray(local, np.int64)[None]
    if process_count == 1:
        return values
    from jax.experimental import multihost_utils

    halves = np.stack([values[0] >> _LOW_BITS, values[0] & ((1 << _LOW_BITS) - 1)]).astype(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(halves), np.int64)  # [P, 2, K]
    return (gathered[:, 0] << _LOW_BITS) + gathered[:, 1]
