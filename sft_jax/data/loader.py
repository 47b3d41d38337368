"""Batches of packed rows: a sharded, checkpointable training iterator and one-pass eval batches.

Data shards. The training examples are split into S shards (`data.shards`, default the number of
processes); each process reads, tokenises and packs only its own S / P consecutive shards
(pipeline.py), so no process touches the whole dataset. A global batch of B rows is the
concatenation of B / S rows from every shard in shard order, and process p's local batch is the
rows of its shards: the local batches of all processes, in process order, concatenate to the
global batch, which is exactly what one process holding all S shards ("virtual" shards) yields.
So a run's data depends on S, never on the number of processes.

Order within a shard is a grain pipeline over *steps*: `MapDataset.range(huge).map(rows_of_step)`.
Shard s contributes, at step t, positions t * b .. t * b + b - 1 (b = B / S) of its endless stream
of rows; position q is row `perm[q // R][q % R]` where `perm[e]` is a seeded permutation of the
shard's rows for epoch e (`np.random.default_rng([seed, s, e])`; `[seed, e]` when S = 1) cut to its
first R rows. R, the epoch length of every shard, is the *smallest* shard's row count, agreed on
across processes (pipeline.py gathers it), so all shards have the same number of steps per epoch.
A larger shard leaves out its extra rows in each epoch, a different random few every epoch; the
total is `rows_dropped_per_epoch` in the data statistics. Batching the endless stream means the
last, partial batch of an epoch is completed with the first rows of the next epoch: no compute is
spent on padding rows, and every kept row of epoch e has been seen once
`ceil((e + 1) * R / b)` steps have run.

Why not grain's `.shuffle(seed).repeat().batch(...)`: it computes a shuffled index for every
element it hands out, which on small datasets costs orders of magnitude more per element than one
cached numpy permutation per epoch, and is paid in the training loop
(`benchmarks/bench_grain_shuffle.py`; figures in docs/benchmarks.md). grain still owns iteration
and checkpointing: its iterator state (`next_index`, a count of global steps) restores the exact
position, and it is the same on every process and for every process count with the same S.

Prefetch (`data.prefetch` batches, default 2): a background thread gathers the next batches into
a bounded queue so the training step does not wait for the host-side gather. `get_state` is the
position after the last batch *handed out*, never after the last one prefetched, so a checkpoint
resumes exactly at the next batch training would have consumed.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from sft_jax.data.pack import PACKED_KEYS, check_packed
from sft_jax.data.source import DataError

_STATE_VERSION = 2
# Settings a saved position only means something under; a restore with any of them changed would
# silently replay a different data order, so it is refused. All are global (equal on every
# process), so the state saved by process 0 is every process's state.
_STATE_KEYS = (
    "seed",
    "num_shards",
    "global_batch_size",
    "rows_per_shard",
    "seq_len",
    "loss_tokens",
)
Batch = dict[str, np.ndarray]


def shard_seed(seed: int, shard: int, num_shards: int) -> list[int]:
    """The random key of one shard's packing, mixing and order: [seed] alone with one shard (the
    unsharded behaviour), else [seed, shard], so shards draw independent streams."""
    return [seed % 2**64] if num_shards == 1 else [seed % 2**64, shard]


class TrainIterator:
    """Infinite, checkpointable iterator of this process's rows of each global batch.

    `shards` are this process's packed shards (one dict, or a list), shard indices
    `first_shard, first_shard + 1, ...` of `num_shards` (default: just these). `rows_per_shard`
    (default: the smallest local shard) and `loss_tokens` (default: the local count) must be the
    global values when there are other processes: pipeline.py gathers them. `steps_per_epoch` =
    ceil(rows_per_shard / (global_batch_size / num_shards)).
    """

    def __init__(
        self,
        shards: Batch | Sequence[Batch],
        *,
        global_batch_size: int,
        seed: int,
        first_shard: int = 0,
        num_shards: int | None = None,
        rows_per_shard: int | None = None,
        loss_tokens: int | None = None,
        prefetch: int = 0,
    ):
        local = [shards] if isinstance(shards, dict) else list(shards)
        num_shards = len(local) if num_shards is None else num_shards
        seq_len = _check_shards(local, global_batch_size, first_shard, num_shards)
        local_rows = [len(p["inputs"]) for p in local]
        rows_per_shard = min(local_rows) if rows_per_shard is None else rows_per_shard
        if not 1 <= rows_per_shard <= min(local_rows):
            raise DataError(f"rows_per_shard {rows_per_shard} not in [1, {min(local_rows)}]")
        if prefetch < 0:
            raise DataError(f"prefetch must be >= 0 batches, got {prefetch}")
        self._local = local
        self.num_shards = num_shards
        self.global_batch_size = global_batch_size
        self.rows_per_shard = rows_per_shard
        self.rows_per_epoch = rows_per_shard * num_shards
        self.rows_dropped_per_epoch = sum(local_rows) - rows_per_shard * len(local)  # this process
        self._shard_batch = global_batch_size // num_shards
        self.steps_per_epoch = math.ceil(rows_per_shard / self._shard_batch)
        if loss_tokens is None:
            loss_tokens = sum(int(np.count_nonzero(p["loss_mask"])) for p in local)
        self._identity = {
            "seed": seed,
            "num_shards": num_shards,
            "global_batch_size": global_batch_size,
            "rows_per_shard": rows_per_shard,
            "seq_len": seq_len,
            "loss_tokens": loss_tokens,  # cheap content fingerprint
        }
        orders = [
            _EpochOrder(rows, rows_per_shard, self._shard_batch, shard_seed(seed, s, num_shards))
            for s, rows in enumerate(local_rows, start=first_shard)
        ]
        dataset = grain.MapDataset.range(sys.maxsize // global_batch_size).map(
            lambda step: [order.rows_of_step(step) for order in orders]
        )
        # No grain worker threads: a batch of row indices is cheap to compute; the (optional)
        # prefetch thread below does the gather and keeps the consumed position exact.
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._iterator = dataset.to_iter_dataset(options).__iter__()
        self._prefetch = prefetch
        self._prefetcher: _Prefetcher | None = None
        self._consumed: dict | None = None  # grain state after the last batch handed out

    def steps_for_epochs(self, epochs: float) -> int:
        """Global steps that show every kept row `epochs` times (ceil, so none is left out)."""
        return math.ceil(epochs * self.rows_per_shard / self._shard_batch)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        """The next global batch's rows for this process: arrays [B * local shards / S, T]."""
        if not self._prefetch:
            return self._gather(next(self._iterator))
        if self._prefetcher is None:
            self._consumed = self._iterator.get_state()
            self._prefetcher = _Prefetcher(self._read, self._prefetch)
        batch, self._consumed = self._prefetcher.get()
        return batch

    def _read(self) -> tuple[Batch, dict]:
        """Runs on the prefetch thread: the next batch and the position just after it."""
        batch = self._gather(next(self._iterator))
        return batch, self._iterator.get_state()

    def _gather(self, indices: list[np.ndarray]) -> Batch:
        return {
            key: np.concatenate([p[key][i] for p, i in zip(self._local, indices, strict=True)])
            for key in PACKED_KEYS
        }

    def close(self) -> None:
        """Stops prefetching and rewinds to the last batch handed out (prefetched ones are read
        again by the next `__next__`, which restarts the thread)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
            self._iterator.set_state(self._consumed)

    def get_state(self) -> dict:
        """JSON-serialisable position (after the last batch handed out) plus the settings it is
        only valid under."""
        position = self._consumed if self._prefetcher is not None else self._iterator.get_state()
        return {"version": _STATE_VERSION, **self._identity, "grain": dict(position)}

    def set_state(self, state: dict) -> None:
        """Resumes exactly where `state` was taken; refuses a state from other settings or data."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise DataError(
                f"not a TrainIterator state of this version ({_STATE_VERSION}; states of older "
                f"versions cannot be resumed): {state!r:.200}"
            )
        changed = [
            f"{key} was {state.get(key)!r}, now {self._identity[key]!r}"
            for key in _STATE_KEYS
            if state.get(key) != self._identity[key]
        ]
        if changed:
            raise DataError(
                "cannot resume the data iterator from this checkpoint: "
                + "; ".join(changed)
                + ". The saved position would point into a different data order. Resume with "
                "the same data, seed, batch size and number of data shards (data.shards), or "
                "start a new run."
            )
        self.close()
        self._iterator.set_state(state["grain"])


def _check_shards(local: list[Batch], global_batch_size: int, first: int, num_shards: int) -> int:
    """Validates the local shards against the layout; returns the common row length."""
    if not local:
        raise DataError("a TrainIterator needs at least one shard")
    for p in local:
        check_packed(p)
    seq_lens = {p["inputs"].shape[1] for p in local}
    if len(seq_lens) != 1:
        raise DataError(f"shards have different row lengths {sorted(seq_lens)}")
    if not (first >= 0 and first + len(local) <= num_shards):
        raise DataError(f"shards {first}..{first + len(local) - 1} not in [0, {num_shards})")
    empty = [s for s, p in enumerate(local, start=first) if len(p["inputs"]) == 0]
    if empty:
        raise DataError(
            f"no training rows in data shard(s) {empty} of {num_shards}: the dataset is empty "
            "after reading and tokenising, or too small for this many shards (data.shards)"
        )
    if global_batch_size < 1:
        raise DataError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % num_shards:
        raise DataError(
            f"global_batch_size {global_batch_size} must be divisible by the number of data "
            f"shards ({num_shards}; data.shards, 0 = one per process) so each shard gives the "
            "same number of rows"
        )
    return seq_lens.pop()


class _EpochOrder:
    """Row indices of one shard at each global step; epoch e visits its own seeded permutation,
    cut to the agreed epoch length."""

    def __init__(self, rows: int, epoch_rows: int, batch: int, key: list[int]):
        self._rows, self._epoch_rows, self._batch, self._key = rows, epoch_rows, batch, key
        self._cache: dict[int, np.ndarray] = {}  # the few most recent epochs' permutations

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 4:
                del self._cache[next(iter(self._cache))]
            perm = np.random.default_rng([*self._key, epoch]).permutation(self._rows)
            self._cache[epoch] = perm[: self._epoch_rows]
        return self._cache[epoch]

    def rows_of_step(self, step: int) -> np.ndarray:
        positions = step * self._batch + np.arange(self._batch)  # int64 [shard batch]
        epochs, offsets = np.divmod(positions, self._epoch_rows)
        out = np.empty(self._batch, np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self._permutation(int(epoch))[offsets[where]]
        return out


class _Prefetcher:
    """Calls `read` on a daemon thread, keeping up to `depth` results in a queue.

    A failure in `read` is handed to the consumer and raised by `get`, so a data error surfaces
    in the training loop instead of dying silently on the thread. The thread ends there, so the
    error is kept and raised again by every later `get` (which would otherwise wait forever).
    """

    def __init__(self, read: Callable[[], Any], depth: int):
        self._read, self._queue, self._stop = read, queue.Queue(maxsize=depth), threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sft_jax-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item: tuple[Any, BaseException | None] = (self._read(), None)
            except BaseException as error:  # handed to the consumer, raised there
                item = (None, error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def get(self) -> Any:
        if self._error is not None:
            raise self._error
        value, self._error = self._queue.get()
        if self._error is not None:
            raise self._error
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def eval_batches(
    packed: Batch, *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> list[Batch]:
    """All rows once, in order, as global batches of `batch_size` rows, of which this process
    keeps its contiguous slice [batch_size / process_count, T]. The last batch is padded with
    empty rows (segment 0, loss_mask False, ids 0), which contribute nothing to a masked loss.

    Every process packs the same (replicated, capped by data.max_eval_examples) eval rows, so the
    global eval batches, and the eval loss, do not depend on the number of processes.
    """
    check_packed(packed)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size % process_count:
        raise DataError(
            f"eval.batch_size {batch_size} must be divisible by the number of processes "
            f"({process_count}) so each process gets the same number of eval rows"
        )
    local = batch_size // process_count
    rows = len(packed["inputs"])
    batches = []
    for start in range(0, rows, batch_size):
        lo = min(start + process_index * local, rows)
        hi = min(lo + local, start + batch_size, rows)
        batch = {key: packed[key][lo:hi] for key in PACKED_KEYS}
        missing = local - (hi - lo)
        if missing:
            batch = {
                key: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
                for key, v in batch.items()
            }
        batches.append(batch)
    return batches
