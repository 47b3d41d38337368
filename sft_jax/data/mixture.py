"""Weighted mixtures of data files, e.g. 90% task data + 10% general data to limit forgetting.

`data.train_files = "task/*.jsonl:0.9,general.parquet:0.1"`: each comma-separated entry is a path
or glob with an optional ":weight". Either every entry has a weight or none does (no weights:
plain concatenation). Weights are normalised and apply to *examples* (after tokenisation and
length handling): an epoch holds N = (total examples) examples, round(w_i * N) of them from group i.
A group with fewer examples than its share is repeated (every example the same number of times,
the remainder drawn without replacement); a larger one is subsampled without replacement. The draw
is seeded, so the mixture is part of the deterministic data order. It is made once per run (per
data shard), so every epoch trains the same draw in a new order; `mixture_picks` gives it as index
arrays, which the streamed path (data.streaming) reads over the cache, drawing the same examples.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from sft_jax.data.source import DataError

T = TypeVar("T")


def parse_mixture(files: str) -> list[tuple[str, float | None]]:
    """'a.jsonl:0.9,b/*.json:0.1' -> [(pattern, weight)]; weight None when none is given."""
    entries: list[tuple[str, float | None]] = []
    for item in (p.strip() for p in files.split(",")):
        if not item:
            continue
        head, sep, tail = item.rpartition(":")
        weight = None
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                _check_not_a_weight(item, tail)
        if weight is None:
            entries.append((item, None))
        elif not weight > 0 or not np.isfinite(weight):
            raise DataError(f"data file weight in {item!r} must be a positive number")
        else:
            entries.append((head, weight))
    weighted = [w is not None for _, w in entries]
    if any(weighted) and not all(weighted):
        raise DataError(
            f"data.train_files {files!r}: give a ':weight' for every entry or for none "
            f"(missing for {[p for p, w in entries if w is None]})"
        )
    if not entries:
        raise DataError("no data files given (the file list is empty)")
    return entries


def _check_not_a_weight(item: str, tail: str) -> None:
    """A ':tail' that is no number is part of the path only when the whole entry names
    something on disk; otherwise it is a mistyped weight ('a.jsonl:abc'), which would else be
    reported as a file that does not exist."""
    if "/" in tail or os.path.exists(item) or glob.glob(item, recursive=True):
        return
    raise DataError(
        f"data file weight {tail!r} in {item!r} is not a number (each entry is a path or glob "
        "with an optional ':weight', e.g. 'a.jsonl:0.9,b.jsonl:0.1')"
    )


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Examples per group in one epoch: largest-remainder rounding of w_i * sum(sizes)."""
    if any(n == 0 for n, w in zip(sizes, weights, strict=True) if w > 0):
        empty = [i for i, n in enumerate(sizes) if n == 0]
        raise DataError(f"mixture group(s) {empty} have no examples but a positive weight")
    return proportional_counts(sum(sizes), weights)


def proportional_counts(total: int, weights: Sequence[float]) -> list[int]:
    """`total` shared out in proportion to `weights` (largest-remainder rounding, ties to the
    earlier entry): whole numbers that sum to `total` and each within 1 of its exact share."""
    share = np.asarray(weights, float) / float(sum(weights)) * total
    counts = np.floor(share).astype(int)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts.tolist()


def mixture_picks(
    sizes: Sequence[int], weights: Sequence[float], seed: int | Sequence[int]
) -> list[np.ndarray]:
    """The weighted draw as index arrays: for each group, the positions (int64, into the group's
    examples) of the examples one epoch takes from it, in the order `mix` lists them. Streaming
    (stream_prepare.py) reads these over the cached examples instead of a list of examples, so
    both paths draw exactly the same examples for the same seed."""
    counts = mixture_counts(sizes, weights)
    key = [seed] if isinstance(seed, int) else list(seed)
    rng = np.random.default_rng([*key, 7919])
    picks = []
    for size, count in zip(sizes, counts, strict=True):
        repeats, rest = divmod(count, size)
        whole = np.tile(np.arange(size, dtype=np.int64), repeats)
        picks.append(np.concatenate([whole, rng.permutation(size)[:rest].astype(np.int64)]))
    return picks


def mix(
    groups: Sequence[Sequence[T]], weights: Sequence[float] | None, seed: int | Sequence[int]
) -> list[T]:
    """Concatenation (weights None) or the weighted draw described in the module docstring.
    `seed` may be a key such as [seed, shard] (each data shard mixes its own examples)."""
    if weights is None:
        return [x for g in groups for x in g]
    picks = mixture_picks([len(g) for g in groups], weights, seed)
    return [group[i] for group, chosen in zip(groups, picks, strict=True) for i in chosen.tolist()]
