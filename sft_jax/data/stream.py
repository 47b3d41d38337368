"""Streaming packed rows: training data larger than host memory, with exact resume.

The default path (pipeline.py -> loader.TrainIterator) packs every example of a shard up front and
keeps all packed rows in memory. With `data.streaming` each shard is instead an endless stream
whose host memory is bounded by the shuffle buffer and the packing window, never the dataset:

    epoch e: the shard's examples in blocks of `buffer`, blocks in a seeded order ([key, e])
    -> a seeded shuffle buffer of `buffer` example indices (each draw takes a random slot and
       refills it with the next example)
    -> best-fit-decreasing over a window of `window` examples (pack.best_fit_decreasing, as the
       in-memory packer): the examples of the least-filled rows are carried into the next window
       (each at most once, at most window // 4), so a large example left alone can still meet a
       small one
    -> packed rows, filled from the source (a memory-mapped cache) only when handed out.

Only example *indices* live in the buffer, window and pending rows; tokens are read per batch.
An epoch ends when the shard's examples are used up: the last window carries nothing, so no row
mixes two epochs, and the next epoch starts with a new block order and buffer. Rows are built by
pack.fill_rows, so segment ids, positions and loss masks are those of the in-memory packer, and
`pack_split` cuts examples into gaps as it does there (then nothing is carried).

Layout and multi-process: as TrainIterator, a global batch of B rows is B / S rows from each of the
S shards in shard order, and each process streams only its own shards. Shards roll over into their
next epoch independently; `steps_per_epoch` uses the smallest shard's first-epoch row count (a
sizes-only counting pass at the first start, `count_epoch`, whose result stream_counts.py keeps
for later starts), like TrainIterator's agreed epoch length.

Resume: `get_state` is each shard's stream state after the last batch handed out (epoch, block
cursor, buffer indices, generator state, carried examples, packed rows not yet handed out), all
small integer lists, so a restored iterator continues with bitwise the batches an uninterrupted
one yields, without replaying. The checkpoint's data item is written by one process, so with
several processes `gather` (`gather_states`) merges every process's shards into one state.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import mmap
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from sft_jax.data.loader import Batch, _Prefetcher, shard_seed
from sft_jax.data.pack import (
    PACKED_KEYS,
    Piece,
    best_fit_decreasing,
    fill_rows,
    row_floor_from_terms,
    row_floor_terms,
    split_into_gaps,
)
from sft_jax.data.source import DataError
from sft_jax.data.tokenize import TokenizedExample

STATE_VERSION = "stream-1"
# Settings a saved stream position only means something under (as loader._STATE_KEYS).
_STATE_KEYS = (
    "seed",
    "num_shards",
    "global_batch_size",
    "rows_per_shard",
    "seq_len",
    "loss_tokens",
    "window",
    "buffer",
    "split",
)
_FLOOR_K = 32  # dual feasible functions tried by the whole-example row floor
_RELEASE_EVERY = 64  # batches (or counting windows) between releases of mapped pages
_CARRY_GAP = 8  # a row is carried when at least seq_len / _CARRY_GAP of it is padding


class ExampleSource(Protocol):
    """A shard's encoded examples, read one at a time (tokens stay on disk until used)."""

    def __len__(self) -> int: ...

    def sizes(self, indices: np.ndarray) -> np.ndarray:
        """Tokens of each example at `indices` (int64)."""
        ...

    def example(self, index: int) -> TokenizedExample: ...

    def loss_tokens(self) -> int:
        """Trained targets over all examples (loss_mask[1:] set), for the statistics."""
        ...

    def release(self) -> None:
        """Drops memory-mapped pages read so far from this process's resident memory."""
        ...


def release_mapped(*arrays: Any) -> None:
    """Unmaps the resident pages of memory-mapped arrays (np.load(mmap_mode="r")) from this
    process. They are clean file pages: the next read faults them in again from the page cache,
    so nothing is lost, but without this a pass over a large cache would leave all of it mapped
    into the process, counted in its RSS (and a container's memory limit) though reclaimable."""
    for array in arrays:
        mapping = getattr(array, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)


class ListExamples:
    """An in-memory list as a source (tests, and data without a cache)."""

    def __init__(self, examples: Sequence[TokenizedExample]):
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    def sizes(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray([len(self._examples[int(i)].tokens) for i in indices], np.int64)

    def example(self, index: int) -> TokenizedExample:
        return self._examples[index]

    def loss_tokens(self) -> int:
        return sum(int(np.count_nonzero(e.loss_mask[1:])) for e in self._examples)

    def release(self) -> None:
        pass  # nothing is mapped


class MappedExamples:
    """Examples stored back to back: example i is tokens[starts[j]:starts[j + 1]] with
    j = pieces[i]. Arrays may be memory-mapped .npy files; `pieces` may be a `range` (a shard's
    round-robin share costs no memory)."""

    def __init__(
        self,
        starts: np.ndarray,
        tokens: np.ndarray,
        loss_mask: np.ndarray,
        pieces: range | np.ndarray,
        name: str = "",
    ):
        self._starts, self._tokens, self._mask = starts, tokens, loss_mask
        self._pieces, self._name = pieces, name

    def __len__(self) -> int:
        return len(self._pieces)

    def _piece(self, indices: np.ndarray) -> np.ndarray:
        if isinstance(self._pieces, range):
            return self._pieces.start + self._pieces.step * np.asarray(indices, np.int64)
        return np.asarray(self._pieces)[indices]

    def sizes(self, indices: np.ndarray) -> np.ndarray:
        j = self._piece(indices)
        return np.asarray(self._starts[j + 1] - self._starts[j], np.int64)

    def example(self, index: int) -> TokenizedExample:
        j = int(self._piece(np.asarray([index]))[0])
        lo, hi = int(self._starts[j]), int(self._starts[j + 1])
        return TokenizedExample(
            np.asarray(self._tokens[lo:hi]), np.asarray(self._mask[lo:hi]), f"{self._name}#{j}"
        )

    def loss_tokens(self) -> int:
        total, chunk = 0, 1 << 16
        for lo in range(0, len(self), chunk):
            j = self._piece(np.arange(lo, min(lo + chunk, len(self))))
            for a, b in zip(self._starts[j].tolist(), self._starts[j + 1].tolist(), strict=True):
                total += int(np.count_nonzero(self._mask[a + 1 : b]))
            self.release()
        return total

    def release(self) -> None:
        release_mapped(self._starts, self._tokens, self._mask)


@dataclasses.dataclass
class StreamSettings:
    """How a shard is streamed: row length, packing window, shuffle buffer, pack_split."""

    seq_len: int
    window: int
    buffer: int
    split: bool = False

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.window < 1 or self.buffer < 1:
            raise DataError(
                f"streaming needs seq_len, window and buffer >= 1, got {self.seq_len}, "
                f"{self.window} and {self.buffer}"
            )


class ShardStream:
    """One shard's endless stream of packed rows (as piece lists), epoch after epoch."""

    def __init__(self, source: ExampleSource, settings: StreamSettings, key: list[int]):
        if len(source) == 0:
            raise DataError("a streamed data shard has no examples")
        self.source, self.settings, self._key = source, settings, key
        self._blocks_cache: tuple[int, np.ndarray] | None = None
        self.pending: collections.deque[list[Piece]] = collections.deque()
        self.carry: list[int] = []
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.block, self.offset = epoch, 0, 0
        self.rng = np.random.default_rng([*self._key, epoch])
        self.buffer: list[int] = []
        while len(self.buffer) < self.settings.buffer and (i := self._next_index()) is not None:
            self.buffer.append(i)

    def _blocks(self) -> np.ndarray:
        """This epoch's order of the blocks of `buffer` consecutive examples."""
        if self._blocks_cache is None or self._blocks_cache[0] != self.epoch:
            count = -(-len(self.source) // self.settings.buffer)
            order = np.random.default_rng([*self._key, self.epoch, 1]).permutation(count)
            self._blocks_cache = (self.epoch, order)
        return self._blocks_cache[1]

    def _next_index(self) -> int | None:
        """The next example of this epoch's block order, or None when all were read."""
        blocks, size = self._blocks(), self.settings.buffer
        while self.block < len(blocks):
            first = int(blocks[self.block]) * size
            if first + self.offset < min(first + size, len(self.source)):
                self.offset += 1
                return first + self.offset - 1
            self.block, self.offset = self.block + 1, 0
        return None

    def _draw(self, n: int) -> list[int]:
        """Up to n examples from the shuffle buffer, each slot refilled from the block order."""
        out = []
        for u in self.rng.random(n).tolist():
            if not self.buffer:
                break
            j = int(u * len(self.buffer))
            out.append(self.buffer[j])
            refill = self._next_index()
            if refill is None:
                self.buffer[j] = self.buffer[-1]
                self.buffer.pop()
            else:
                self.buffer[j] = refill
        return out

    def pack_window(self) -> int:
        """Packs the next window into `pending`; returns the epoch the rows belong to (the
        stream moves on to the next epoch when this one's examples are used up)."""
        s, epoch = self.settings, self.epoch
        items = self.carry + self._draw(s.window - len(self.carry))
        last = not self.buffer
        sizes = (self.source.sizes(np.asarray(items, np.int64)) - 1).tolist()
        bins = best_fit_decreasing(sizes, s.seq_len)
        rows = [[Piece(items[k], 0, sizes[k]) for k in b] for b in bins]
        carried, self.carry = set(self.carry), []
        if s.split:
            rows = split_into_gaps(rows, s.seq_len)
        elif not last:
            rows, self.carry = _carry(rows, carried, s.seq_len, s.window // 4)
        self.pending.extend(rows)
        if last:
            self._start_epoch(epoch + 1)
        return epoch

    def rows(self, n: int) -> list[list[Piece]]:
        while len(self.pending) < n:
            self.pack_window()
        return [self.pending.popleft() for _ in range(n)]

    def fill(self, rows: list[list[Piece]]) -> Batch:
        """The rows' arrays, reading each example they hold once."""
        local: dict[int, int] = {}
        examples: list[TokenizedExample] = []
        remapped = []
        for row in rows:
            for p in row:
                if p.example not in local:
                    local[p.example] = len(examples)
                    examples.append(self.source.example(p.example))
            remapped.append([Piece(local[p.example], p.start, p.length) for p in row])
        return fill_rows(examples, remapped, self.settings.seq_len)

    def get_state(self) -> dict[str, Any]:
        rng = self.rng.bit_generator.state
        return {
            "epoch": self.epoch,
            "block": self.block,
            "offset": self.offset,
            "buffer": list(self.buffer),
            "rng": [str(rng["state"][k]) for k in ("state", "inc")]
            + [rng["has_uint32"], rng["uinteger"]],
            "carry": list(self.carry),
            "pending": [[list(p) for p in row] for row in self.pending],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.block, self.offset = state["epoch"], state["block"], state["offset"]
        self.rng = np.random.default_rng([*self._key, self.epoch])
        rng = self.rng.bit_generator.state
        saved = state["rng"]
        rng["state"] = {"state": int(saved[0]), "inc": int(saved[1])}
        rng["has_uint32"], rng["uinteger"] = int(saved[2]), int(saved[3])
        self.rng.bit_generator.state = rng
        self.buffer, self.carry = [int(i) for i in state["buffer"]], list(state["carry"])
        self.pending = collections.deque(
            [Piece(*(int(x) for x in p)) for p in row] for row in state["pending"]
        )


def _carry(
    rows: list[list[Piece]], carried: set[int], seq_len: int, limit: int
) -> tuple[list[list[Piece]], list[int]]:
    """Keeps the least-filled rows' examples for the next window (at most `limit` examples, none
    carried before, only rows with at least seq_len / _CARRY_GAP padding); the rest are done."""
    free = [seq_len - sum(p.length for p in row) for row in rows]
    keep, carry = set(range(len(rows))), []
    for r in sorted(range(len(rows)), key=lambda r: (-free[r], r)):
        if free[r] * _CARRY_GAP < seq_len:
            break
        members = [p.example for p in rows[r]]
        if len(carry) + len(members) > limit or carried.intersection(members):
            continue
        carry += members
        keep.discard(r)
    return [rows[r] for r in sorted(keep)], carry


@dataclasses.dataclass
class EpochCount:
    """What one shard's first epoch packs into (sizes only; no token is read)."""

    rows: int
    real_tokens: int
    continued_segments: int
    row_floor: int  # pack.whole_example_row_floor of the examples' slots


def count_epoch(source: ExampleSource, settings: StreamSettings, key: list[int]) -> EpochCount:
    """Runs the shard's stream through its first epoch, counting rows and tokens."""
    stream = ShardStream(source, settings, key)
    rows = real = continued = windows = 0
    terms = np.zeros(_FLOOR_K + 1, np.int64)
    while stream.epoch == 0:
        stream.pack_window()
        windows += 1
        if windows % _RELEASE_EVERY == 0:
            source.release()
        slots = []
        for row in stream.pending:
            rows += 1
            real += sum(p.length for p in row)
            continued += sum(1 for p in row if p.start > 0)
            slots += [p.length for p in row if p.start == 0]
        terms += row_floor_terms(slots, settings.seq_len, _FLOOR_K)
        stream.pending.clear()
    source.release()
    return EpochCount(rows, real, continued, row_floor_from_terms(terms, settings.seq_len))


class StreamIterator:
    """Infinite, checkpointable iterator of this process's rows of each global batch, streamed.

    The interface is TrainIterator's (`__next__`, `get_state`, `set_state`, `close`,
    `steps_per_epoch`, `steps_for_epochs`). `sources` are this process's shards
    `first_shard, first_shard + 1, ...` of `num_shards`; `rows_per_shard` (the smallest shard's
    first-epoch rows) and `loss_tokens` are global values (pipeline agrees on them). `gather`
    merges the shard states of all processes (default: this process's only).
    """

    def __init__(
        self,
        sources: Sequence[ExampleSource],
        settings: StreamSettings,
        *,
        global_batch_size: int,
        seed: int,
        rows_per_shard: int,
        loss_tokens: int,
        first_shard: int = 0,
        num_shards: int | None = None,
        prefetch: int = 0,
        gather: Callable[[dict], dict] | None = None,
    ):
        num_shards = len(sources) if num_shards is None else num_shards
        if not sources or not (first_shard >= 0 and first_shard + len(sources) <= num_shards):
            raise DataError(f"shards {first_shard}..+{len(sources)} not in [0, {num_shards})")
        if global_batch_size < 1 or global_batch_size % num_shards:
            raise DataError(
                f"global_batch_size {global_batch_size} must be a positive multiple of the "
                f"number of data shards ({num_shards}; data.shards)"
            )
        if rows_per_shard < 1 or prefetch < 0:
            raise DataError(f"need rows_per_shard >= 1 and prefetch >= 0: {rows_per_shard}")
        self._shards = {
            s: ShardStream(src, settings, shard_seed(seed, s, num_shards))
            for s, src in enumerate(sources, start=first_shard)
        }
        self.num_shards, self.global_batch_size = num_shards, global_batch_size
        self.rows_per_shard = rows_per_shard
        self._shard_batch = global_batch_size // num_shards
        self.steps_per_epoch = math.ceil(rows_per_shard / self._shard_batch)
        self._identity = {
            "seed": seed,
            "num_shards": num_shards,
            "global_batch_size": global_batch_size,
            "rows_per_shard": rows_per_shard,
            "seq_len": settings.seq_len,
            "loss_tokens": loss_tokens,
            "window": settings.window,
            "buffer": settings.buffer,
            "split": settings.split,
        }
        self._gather = gather or (lambda shards: shards)
        self._prefetch = prefetch
        self._prefetcher: _Prefetcher | None = None
        self._consumed: dict | None = None  # shard states after the last batch handed out
        self._batches = 0  # read since the start (for releasing mapped pages now and then)

    def steps_for_epochs(self, epochs: float) -> int:
        """Global steps that show the smallest shard's first-epoch rows `epochs` times."""
        return math.ceil(epochs * self.rows_per_shard / self._shard_batch)

    def __iter__(self) -> StreamIterator:
        return self

    def __next__(self) -> Batch:
        """The next global batch's rows for this process: arrays [B * local shards / S, T]."""
        if not self._prefetch:
            return self._next_batch()
        if self._prefetcher is None:
            self._consumed = self._local_state()
            self._prefetcher = _Prefetcher(self._read, self._prefetch)
        batch, self._consumed = self._prefetcher.get()
        return batch

    def _read(self) -> tuple[Batch, dict]:
        """Runs on the prefetch thread: the next batch and the shard states just after it."""
        return self._next_batch(), self._local_state()

    def _next_batch(self) -> Batch:
        parts = [st.fill(st.rows(self._shard_batch)) for st in self._shards.values()]
        self._batches += 1
        if self._batches % _RELEASE_EVERY == 0:
            for stream in self._shards.values():
                stream.source.release()
        return {key: np.concatenate([p[key] for p in parts]) for key in PACKED_KEYS}

    def _local_state(self) -> dict:
        return {str(s): st.get_state() for s, st in self._shards.items()}

    def close(self) -> None:
        """Stops prefetching and rewinds to the last batch handed out."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
            self._restore(self._consumed or {})

    def get_state(self) -> dict:
        """JSON-serialisable position of every shard (all processes', through `gather`) after
        the last batch handed out, plus the settings it is only valid under. With several
        processes every one must call it (it is a collective)."""
        local = self._consumed if self._prefetcher is not None else self._local_state()
        return {"version": STATE_VERSION, **self._identity, "shards": self._gather(local)}

    def set_state(self, state: dict) -> None:
        """Resumes exactly where `state` was taken; refuses a state from other settings."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(
                "cannot resume the streamed data iterator from this checkpoint: it holds no "
                f"streaming position of version {STATE_VERSION!r} (was data.streaming changed?): "
                f"{state!r:.200}"
            )
        changed = [
            f"{key} was {state.get(key)!r}, now {self._identity[key]!r}"
            for key in _STATE_KEYS
            if state.get(key) != self._identity[key]
        ]
        if changed:
            raise DataError(
                "cannot resume the streamed data iterator from this checkpoint: "
                + "; ".join(changed)
                + ". Resume with the same data, seed, batch size, shards, window and buffer."
            )
        self.close()
        self._restore(state["shards"])

    def _restore(self, shards: dict) -> None:
        missing = [s for s in self._shards if str(s) not in shards]
        if missing:
            raise DataError(f"the saved data position has no state for data shard(s) {missing}")
        for s, stream in self._shards.items():
            stream.set_state(shards[str(s)])
