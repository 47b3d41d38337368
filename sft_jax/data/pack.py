"""Packing tokenised examples into fixed-length rows with per-segment ids and positions.

An example of n tokens becomes n - 1 slots (inputs = tokens[:-1], targets = tokens[1:], loss_mask =
loss_mask[1:]). Several examples share a row of seq_len slots; `segment_ids` (1..k, 0 on padding)
let attention stay inside an example and `positions` restart at 0 for each example, so a packed
row computes exactly what the examples would compute alone (both must reset: resetting attention
but not RoPE positions, or the reverse, leaks across examples).

Which examples share a row is decided by best-fit-decreasing within windows of `window` examples
(after a seeded shuffle, so rows mix examples from the whole dataset): sizes are sorted largest
first and each goes into the open row with the *least* remaining space that still fits, else a new
row. This is true best fit, not first fit.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from sft_jax.data.tokenize import TokenizedExample

PACKED_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, in placement order), in the order the bins were opened.

    Open bins live in a list of (remaining, bin) kept sorted, so the tightest bin that fits is one
    bisect away. Cost: O(n log n) to sort, then per item O(log b) to search plus an O(b) list
    insert/delete (a memmove) for b open bins, so O(n * b) worst case, with b <= n <= the packing
    window. Full bins leave the list. Ties go to the earliest bin, which makes the result
    deterministic.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted ascending
    for i in order:
        size = sizes[i]
        if not 1 <= size <= capacity:
            raise ValueError(f"item {i} has size {size}; sizes must be in [1, {capacity}]")
        j = bisect.bisect_left(open_bins, (size, -1))
        if j < len(open_bins):
            remaining, b = open_bins.pop(j)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - size > 0:
            bisect.insort(open_bins, (remaining - size, b))
    return bins


def pack_examples(
    examples: list[TokenizedExample], *, seq_len: int, window: int, seed: int
) -> dict[str, np.ndarray]:
    """Examples -> packed arrays [R, seq_len]: inputs/targets int32, loss_mask bool, segment_ids and
    positions int32; padding slots are 0 / False. Rows come window by window, each window's rows
    in the order they were opened, so the result depends only on (examples, seq_len, window, seed).
    """
    if seq_len < 1 or window < 1:
        raise ValueError(f"seq_len and window must be >= 1, got {seq_len} and {window}")
    for ex in examples:
        if not 2 <= len(ex.tokens) <= seq_len + 1 or len(ex.loss_mask) != len(ex.tokens):
            raise ValueError(
                f"{ex.source}: example of {len(ex.tokens)} tokens (mask {len(ex.loss_mask)}) "
                f"cannot be packed into rows of {seq_len} slots; it needs 2..{seq_len + 1} tokens"
            )
    order = np.random.default_rng(seed).permutation(len(examples))
    rows: list[list[int]] = []  # example indices per packed row, in segment order
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        sizes = [len(examples[k].tokens) - 1 for k in chunk]
        rows.extend([int(chunk[i]) for i in b] for b in best_fit_decreasing(sizes, seq_len))
    return _fill(examples, rows, seq_len)


def _fill(
    examples: list[TokenizedExample], rows: list[list[int]], seq_len: int
) -> dict[str, np.ndarray]:
    shape = (len(rows), seq_len)
    out = {
        "inputs": np.zeros(shape, np.int32),
        "targets": np.zeros(shape, np.int32),
        "loss_mask": np.zeros(shape, bool),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    arange = np.arange(seq_len, dtype=np.int32)
    for r, members in enumerate(rows):
        offset = 0
        for segment, k in enumerate(members, start=1):
            ex = examples[k]
            n = len(ex.tokens) - 1
            span = slice(offset, offset + n)
            out["inputs"][r, span] = ex.tokens[:-1]
            out["targets"][r, span] = ex.tokens[1:]
            out["loss_mask"][r, span] = ex.loss_mask[1:]
            out["segment_ids"][r, span] = segment
            out["positions"][r, span] = arange[:n]
            offset += n
    return out


def packing_stats(packed: dict[str, np.ndarray]) -> dict[str, float]:
    """Counts for the log: rows, slots, real (non-padding) and loss tokens, and two fractions.

    trainable_fraction near 0 means the run trains on almost nothing (prompts dominate); a high
    padding_fraction means compute spent on padding (raise pack_window or lower seq_len).
    """
    check_packed(packed)
    rows, seq_len = packed["inputs"].shape
    slots = rows * seq_len
    real = int(np.count_nonzero(packed["segment_ids"]))
    loss = int(np.count_nonzero(packed["loss_mask"]))
    return {
        "rows": rows,
        "slots": slots,
        "real_tokens": real,
        "loss_tokens": loss,
        "padding_fraction": 1.0 - real / slots if slots else 0.0,
        "trainable_fraction": loss / real if real else 0.0,
    }


def check_packed(packed: dict[str, np.ndarray]) -> None:
    """Packed arrays must have exactly PACKED_KEYS, all of one [R, seq_len] shape."""
    if set(packed) != set(PACKED_KEYS):
        raise ValueError(f"packed data must have keys {PACKED_KEYS}, got {sorted(packed)}")
    shapes = {k: np.shape(v) for k, v in packed.items()}
    if len(set(shapes.values())) != 1 or len(shapes["inputs"]) != 2:
        raise ValueError(f"packed arrays must share one [rows, seq_len] shape, got {shapes}")
