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

`split=True` (data.pack_split, opt-in) removes most of the remaining padding: best fit cannot put
two examples longer than half a row into one row, so a length distribution with many of them
leaves gaps (measured in docs/benchmarks.md). The least-filled rows are then dissolved into the
gaps of the others, cutting an example where a gap ends (`split_into_gaps`). A continuation piece
keeps its positions (RoPE sees the example's true offsets) and gets its own segment id, so it does
*not* attend to the example's earlier part: its tokens are trained with less context. Every slot is
still placed exactly once with its own target and loss-mask bit, so the set of trained targets is
unchanged. `packing_stats` counts the continuation pieces.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from sft_jax.data.tokenize import TokenizedExample

# The arrays of a packed row, hence of every batch the train and eval steps take.
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


def whole_example_row_floor(sizes: Sequence[int], capacity: int, max_k: int = 32) -> int:
    """A lower bound on the rows any packing of these items needs without cutting one.

    The best of the volume bound ceil(sum / capacity) and Fekete and Schepers' dual feasible
    functions u_k, k = 1..max_k: an item of x = size / capacity counts floor((k + 1) x) / k, or
    x where (k + 1) x is a whole number, and no row's items can count more than 1 in total.
    k = 1 counts the items over half a row (no two share one), k = 3 the items over a quarter
    at 1/3 each, and so on. A bound, not always reachable (items of 0.3 each need a row per
    three, a third more than their volume); where the padding is at it, the lengths cause the
    padding, not the packer.
    """
    if len(sizes) == 0:
        return 0
    return row_floor_from_terms(row_floor_terms(sizes, capacity, max_k), capacity)


def row_floor_terms(sizes: Sequence[int], capacity: int, max_k: int = 32) -> np.ndarray:
    """The bound's sums, int64 [max_k + 1]: the total size, then for each k the numerator of
    sum u_k (times k * capacity). Terms of disjoint sets of items add up, so a stream of items
    (stream.count_epoch) can be bounded window by window without keeping every size."""
    s = np.asarray(sizes, np.int64)
    terms = np.zeros(max_k + 1, np.int64)
    terms[0] = s.sum()
    for k in range(1, max_k + 1):
        steps, exact = np.divmod((k + 1) * s, capacity)
        whole = exact == 0
        # sum of u_k = (sum of steps off the exact points) / k + (sum of exact sizes) / capacity
        terms[k] = int(steps[~whole].sum()) * capacity + int(s[whole].sum()) * k
    return terms


def row_floor_from_terms(terms: np.ndarray, capacity: int) -> int:
    """whole_example_row_floor from (summed) `row_floor_terms`."""
    best = -(-int(terms[0]) // capacity)
    for k in range(1, len(terms)):
        best = max(best, -(-int(terms[k]) // (k * capacity)))
    return best


def pack_examples(
    examples: list[TokenizedExample],
    *,
    seq_len: int,
    window: int,
    seed: int | Sequence[int],
    split: bool = False,
) -> dict[str, np.ndarray]:
    """Examples -> packed arrays [R, seq_len]: inputs/targets int32, loss_mask bool, segment_ids and
    positions int32; padding slots are 0 / False. Rows come window by window, each window's rows
    in the order they were opened, so the result depends only on (examples, seq_len, window, seed,
    split). `split=True` then fills the gaps left by best fit with pieces of the least-filled rows
    (`split_into_gaps`; opt-in, see the module docstring for what a split piece loses).
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
    rows: list[list[Piece]] = []  # pieces per packed row, in segment order
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        sizes = [len(examples[k].tokens) - 1 for k in chunk]
        bins = best_fit_decreasing(sizes, seq_len)
        window_rows = [[Piece(int(chunk[i]), 0, sizes[i]) for i in b] for b in bins]
        rows.extend(split_into_gaps(window_rows, seq_len) if split else window_rows)
    return fill_rows(examples, rows, seq_len)


class Piece(NamedTuple):
    """Slots [start, start + length) of example `example` (slot j: input token j, target j + 1)."""

    example: int
    start: int
    length: int


MIN_SPLIT_PIECE = 16  # gaps smaller than this get no split piece (too little context to train on)


def split_into_gaps(rows: list[list[Piece]], capacity: int) -> list[list[Piece]]:
    """Dissolves the least-filled rows into the gaps of the others, splitting pieces as needed.

    Best fit leaves gaps when large examples cannot share a row (two examples over half a row
    never can). While the other rows' gaps (those >= MIN_SPLIT_PIECE) can hold all of the
    least-filled row, that row's pieces, largest first, go whole into the tightest gap that holds
    them, else the head fills the largest gap and the tail goes on. Every slot of every example
    is still placed exactly once, so the loss mask is unchanged; a continuation piece keeps its
    positions (`start` onward) but cannot attend to its earlier part. Deterministic.
    """
    rows = [list(r) for r in rows]
    fill = [sum(p.length for p in r) for r in rows]
    alive = list(range(len(rows)))
    candidates = set(alive)  # each original row is dissolved at most once: the loop ends
    while candidates and len(alive) > 1:
        donor = min(candidates, key=lambda r: (fill[r], r))
        candidates.discard(donor)
        room = sum(
            capacity - fill[r]
            for r in alive
            if r != donor and capacity - fill[r] >= MIN_SPLIT_PIECE
        )
        if room < fill[donor]:
            break
        alive.remove(donor)
        for piece in sorted(rows[donor], key=lambda p: (-p.length, p)):
            _place(piece, rows, fill, alive, capacity)
    return [rows[r] for r in sorted(alive)]


def _place(
    piece: Piece, rows: list[list[Piece]], fill: list[int], alive: list[int], capacity: int
) -> None:
    """Puts `piece` whole into the tightest gap that holds it, else its head into the largest gap
    (if >= MIN_SPLIT_PIECE) and goes on with the tail; if no gap is left, a new row takes it."""
    while piece.length > 0:
        fits = [r for r in alive if capacity - fill[r] >= piece.length]
        if fits:
            target = min(fits, key=lambda r: (capacity - fill[r], r))
        else:
            target = max(alive, key=lambda r: (capacity - fill[r], -r))
            if capacity - fill[target] < MIN_SPLIT_PIECE:  # whole pieces used up the room
                rows.append([])
                fill.append(0)
                alive.append(len(rows) - 1)
                target = len(rows) - 1
        take = min(piece.length, capacity - fill[target])
        rows[target].append(Piece(piece.example, piece.start, take))
        fill[target] += take
        piece = Piece(piece.example, piece.start + take, piece.length - take)


def fill_rows(
    examples: list[TokenizedExample], rows: list[list[Piece]], seq_len: int
) -> dict[str, np.ndarray]:
    shape = (len(rows), seq_len)
    out = {
        "inputs": np.zeros(shape, np.int32),
        "targets": np.zeros(shape, np.int32),
        "loss_mask": np.zeros(shape, bool),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    for r, members in enumerate(rows):
        offset = 0
        for segment, (k, start, n) in enumerate(members, start=1):
            ex = examples[k]
            span, source = slice(offset, offset + n), slice(start, start + n)
            target = slice(start + 1, start + n + 1)
            out["inputs"][r, span] = ex.tokens[source]
            out["targets"][r, span] = ex.tokens[target]
            out["loss_mask"][r, span] = ex.loss_mask[target]
            out["segment_ids"][r, span] = segment
            out["positions"][r, span] = np.arange(start, start + n, dtype=np.int32)
            offset += n
    return out


def packing_stats(packed: dict[str, np.ndarray]) -> dict[str, float]:
    """Counts for the log: rows, slots, real (non-padding) and loss tokens, and two fractions.

    trainable_fraction near 0 means the run trains on almost nothing (prompts dominate); a high
    padding_fraction means compute spent on padding (raise pack_window, lower seq_len, or set
    data.pack_split); continued_segments counts pieces that continue an example split across rows.
    """
    check_packed(packed)
    rows, seq_len = packed["inputs"].shape
    slots = rows * seq_len
    real = int(np.count_nonzero(packed["segment_ids"]))
    loss = int(np.count_nonzero(packed["loss_mask"]))
    seg = packed["segment_ids"]
    starts = seg > 0
    starts[:, 1:] &= seg[:, 1:] != seg[:, :-1]
    continued = int(np.count_nonzero(starts & (packed["positions"] != 0)))
    return {
        "rows": rows,
        "slots": slots,
        "real_tokens": real,
        "loss_tokens": loss,
        "padding_fraction": 1.0 - real / slots if slots else 0.0,
        "trainable_fraction": loss / real if real else 0.0,
        "continued_segments": continued,
    }


def check_packed(packed: dict[str, np.ndarray]) -> None:
    """Packed arrays must have exactly PACKED_KEYS, all of one [R, seq_len] shape."""
    if set(packed) != set(PACKED_KEYS):
        raise ValueError(f"packed data must have keys {PACKED_KEYS}, got {sorted(packed)}")
    shapes = {k: np.shape(v) for k, v in packed.items()}
    if len(set(shapes.values())) != 1 or len(shapes["inputs"]) != 2:
        raise ValueError(f"packed arrays must share one [rows, seq_len] shape, got {shapes}")
