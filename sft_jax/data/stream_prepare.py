"""The data stage with `data.streaming`: this process's shards as sources over the tokenisation
cache, counted, and streamed by stream.StreamIterator.

pipeline.prepare_data calls `prepare_local` in place of packing everything: the records are
selected and (once) encoded exactly as without streaming (cache.encode_selected), but the training
examples are never assembled into memory: each own shard becomes a `CachedExamples` source, two
memory-mapped arrays naming each example's part and piece in the memory-mapped cache, whose tokens
are read when a packed row is handed out. A sizes-only pass over each shard's first epoch
(stream.count_epoch) gives the rows, tokens and padding the statistics report and the epoch
length the step count uses; its result is kept beside the cache (stream_counts.py), so a restart
reads it instead of counting again. The eval data is encoded and packed whole, as without
streaming (data.max_eval_examples caps it).

Weighted mixtures (data.train_files with ':weight'): each shard draws exactly the examples the
in-memory path draws (mixture.mixture_picks, same seed key), as index arrays over the shard's
cached examples written into the shard's source (`mixed`), so the source holds the epoch's
examples (repeats included) in the in-memory path's order and the stream shuffles and packs it as
any other shard. As without streaming, the draw is made once per run and every epoch sees the same
examples, in a new order; the order within an epoch differs from the in-memory path's as for
any streamed data (a shuffle buffer, not a whole-shard shuffle).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from sft_jax.config import Config
from sft_jax.data import cache, stream_counts
from sft_jax.data.cache_store import CONVERSATION, TEXT, UNPARSEABLE, Part, RecordStore
from sft_jax.data.encode import EncodeSettings
from sft_jax.data.formats import Example
from sft_jax.data.loader import shard_seed
from sft_jax.data.mixture import mixture_counts, mixture_picks, parse_mixture
from sft_jax.data.prepared import (
    SUMMED,
    LocalData,
    ProcessCounts,
    encode_settings,
    log_named,
    num_workers,
    some_token_masked,
    token_counts,
    tokenizer_path,
)
from sft_jax.data.render import TokenCounts
from sft_jax.data.shards import ShardPlan, agree, empty_shard_error
from sft_jax.data.source import DataError
from sft_jax.data.stream import StreamIterator, StreamSettings, release_mapped
from sft_jax.data.templates import load_chat_template
from sft_jax.data.tokenize import TokenizedExample
from sft_jax.paths import is_url

_RELEASE_EXAMPLES = 1 << 16  # examples counted between releases of mapped pages
_INDEX_RECORDS = 1 << 18  # records looked up at a time when a shard's index is built


class CachedExamples:
    """A shard's examples in the cache's parts: example i is piece `piece[i]` of part
    `part_of[i]`, read from the part's memory-mapped arrays when asked for. The parts are opened
    lazily: every read goes through the part's block guards (`Part.span`, `Part.check_at`), so
    a block is verified against its digest the first time any of its bytes is read."""

    def __init__(self, parts: Sequence[Part], part_of: np.ndarray, piece: np.ndarray):
        self._parts, self._part_of, self._piece = parts, part_of, piece

    def __len__(self) -> int:
        return len(self._piece)

    def sizes(self, indices: np.ndarray) -> np.ndarray:
        part_of, piece = self._part_of[indices], self._piece[indices]
        out = np.zeros(len(piece), np.int64)
        for p in np.unique(part_of).tolist():
            where = part_of == p
            part, mine = self._parts[p], piece[where]
            part.check_at("piece_starts", mine)
            part.check_at("piece_starts", mine + 1)
            starts = part.arrays["piece_starts"]
            out[where] = starts[mine + 1] - starts[mine]
        return out

    def example(self, index: int) -> TokenizedExample:
        part, k = self._parts[int(self._part_of[index])], int(self._piece[index])
        lo, hi = part.span("piece_starts", k, k + 2).tolist()
        tokens = np.asarray(part.span("tokens", lo, hi))
        mask = np.asarray(part.span("loss_mask", lo, hi))
        return TokenizedExample(tokens, mask, part.source(k))

    def loss_tokens(self) -> int:
        total = 0
        for p in np.unique(self._part_of).tolist():
            part = self._parts[p]
            for n, k in enumerate(self._piece[self._part_of == p].tolist(), start=1):
                lo, hi = part.span("piece_starts", k, k + 2).tolist()
                total += int(np.count_nonzero(part.span("loss_mask", lo + 1, hi)))
                if n % _RELEASE_EXAMPLES == 0:
                    self.release()
        self.release()
        return total

    def subset(self, chosen: Sequence[np.ndarray], cache_dir: str) -> CachedExamples:
        """The examples at the indices of each array of `chosen` in turn (repeats allowed) as a
        source of their own, its two arrays written `_INDEX_RECORDS` at a time to unlinked files
        beside the cache (as `shard_index`'s) and memory-mapped."""
        directory = None if is_url(cache_dir) else os.fspath(cache_dir)
        with _index_file(directory) as part_file, _index_file(directory) as piece_file:
            for indices in chosen:
                for lo in range(0, len(indices), _INDEX_RECORDS):
                    at = np.asarray(indices[lo : lo + _INDEX_RECORDS], np.int64)
                    part_file.write(np.asarray(self._part_of[at], np.int32).tobytes())
                    piece_file.write(np.asarray(self._piece[at], np.int64).tobytes())
                    release_mapped(self._part_of, self._piece)
            part_of, piece = _mapped(part_file, np.int32), _mapped(piece_file, np.int64)
        return CachedExamples(self._parts, part_of, piece)

    def release(self) -> None:
        """Unmaps the pages read so far of the index and of every part's arrays."""
        release_mapped(self._part_of, self._piece)
        for part in self._parts:
            release_mapped(*part.arrays.values())


def stream_settings(config: Config) -> StreamSettings:
    dc = config.data
    return StreamSettings(dc.seq_len, dc.pack_window, dc.stream_buffer, dc.pack_split)


def prepare_local(
    config: Config, tokenizer: Any, plan: ShardPlan, cache_dir: str | None
) -> LocalData:
    """This process's streamed shards (`LocalData.sources`), their counts and the eval data."""
    dc = config.data
    if not cache_dir:
        raise DataError(
            "data.streaming reads the tokenisation cache: give a workdir or data.cache_dir"
        )
    entries = parse_mixture(dc.train_files)
    weights = [w for _, w in entries] if entries[0][1] is not None else None
    roots = cache.group_roots(config, tokenizer_path(config), cache_dir)

    def prepare(examples: Sequence[Example]) -> tuple[EncodeSettings, int]:
        return encode_settings(config, tokenizer, examples), num_workers(config, len(examples))

    s = cache.encode_selected(config, tokenizer, roots, plan, prepare)
    no_train = [[[] for _ in entries] for _ in plan.local]
    encoded = cache.assemble(
        config, tokenizer, s.stores, no_train, s.eval, s.spec, prepare, entries
    )
    settings = stream_settings(config)
    sources, kinds, summed, min_rows = [], set(), np.zeros(len(SUMMED), np.int64), None
    mixture = [0] * len(entries)
    groups = [root.name for root in roots]
    for slot, shard in enumerate(plan.local):
        index = shard_index(s.stores, s.train[slot], cache_dir)
        kinds |= index.kinds
        log_named(index.counts, dc.seq_len, dc.on_control_tokens)
        source, per_group = _mix_shard(index, weights, config, shard, plan, cache_dir)
        mixture = [m + n for m, n in zip(mixture, per_group, strict=True)]
        key = shard_seed(config.seed, shard, plan.num_shards)
        identity = stream_counts.counts_key(groups, s.train[slot], settings, key, weights)
        shard_counts = dict(stream_counts.shard_counts(source, settings, key, cache_dir, identity))
        shard_counts.update(token_counts(index.counts), skipped=index.skipped)
        summed += [shard_counts[k] for k in SUMMED]
        min_rows = min(shard_counts["rows"], min_rows or shard_counts["rows"])
        sources.append(source)
    kinds.discard(UNPARSEABLE)
    template = encoded.template
    if template is None and CONVERSATION in kinds:
        template = load_chat_template(dc.chat_template, tokenizer)
    not_only_text = encoded.not_only_text or bool(kinds - {TEXT})
    # Text, and every example under train_on="all", is trained whole: no need to look.
    masked = dc.train_on != "all" and bool(kinds - {TEXT}) and _masks_a_token(sources)
    process = ProcessCounts(
        dict(zip(SUMMED, summed.tolist(), strict=True)),
        min_rows or 0,
        not_only_text,
        masked,
        False,
        mixture,
    )
    return LocalData(
        [],
        process,
        encoded.eval_examples,
        encoded.eval_prompts,
        encoded.skipped_eval,
        template,
        sources,
    )


def _masks_a_token(sources: Sequence[CachedExamples]) -> bool:
    """`some_token_masked` over the shards' examples, read one at a time; correctly masked data
    answers at its first example, only an all-ones mask is read through (mapped pages released
    as `loss_tokens` does)."""

    def examples() -> Iterator[TokenizedExample]:
        for source in sources:
            for i in range(len(source)):
                yield source.example(i)
                if (i + 1) % _RELEASE_EXAMPLES == 0:
                    source.release()
            source.release()

    return some_token_masked(examples())


def _mix_shard(
    index: ShardIndex,
    weights: list[float] | None,
    config: Config,
    shard: int,
    plan: ShardPlan,
    cache_dir: str,
) -> tuple[CachedExamples, list[int]]:
    """The shard's source and examples per mixture group: its examples as they are, or with
    weights the shard's mixture draw (`mixed`), each shard with its own seed key as in memory."""
    source, per_group = index.source, index.per_group
    if weights is not None:
        empty = [g for g, n in enumerate(per_group) if n == 0]
        if empty:
            raise empty_shard_error(shard, plan, config.data.train_files, empty)
        key = shard_seed(config.seed, shard, plan.num_shards)
        source = mixed(source, per_group, weights, key, cache_dir)
        per_group = mixture_counts(per_group, weights)
    if not len(source):
        raise empty_shard_error(shard, plan, config.data.train_files)
    return source, per_group


@dataclasses.dataclass
class ShardIndex:
    """One shard's examples in the cache (`source`) and what selecting its records counted."""

    source: CachedExamples
    counts: TokenCounts
    skipped: int
    kinds: set[int]
    per_group: list[int]  # examples of each mixture group


def shard_index(
    stores: Sequence[RecordStore], chosen: Sequence[np.ndarray], cache_dir: str
) -> ShardIndex:
    """A shard's `CachedExamples` over the records `chosen[g]` of each group's store. The
    records are looked up `_INDEX_RECORDS` at a time and the two per-example arrays written to
    unlinked files beside the cache and memory-mapped, so neither building nor holding the
    index costs memory per record (with the cache in an object store, the system's temporary
    directory holds them)."""
    parts = [part for store in stores for part in store.parts]
    first_part = np.cumsum([0] + [len(store.parts) for store in stores]).tolist()
    directory = None if is_url(cache_dir) else os.fspath(cache_dir)
    counts, skipped, kinds, per_group = TokenCounts(), 0, set(), []
    with _index_file(directory) as part_file, _index_file(directory) as piece_file:
        for g, (store, positions) in enumerate(zip(stores, chosen, strict=True)):
            positions, examples = np.asarray(positions, np.int64), 0
            for lo in range(0, len(positions), _INDEX_RECORDS):
                block = positions[lo : lo + _INDEX_RECORDS]
                selection = store.select(block, pieces=False)
                counts, skipped = counts + selection.counts, skipped + selection.skipped
                kinds |= selection.kinds
                part_of, piece = store.piece_index(block)
                part_file.write((part_of + first_part[g]).astype(np.int32).tobytes())
                piece_file.write(piece.astype(np.int64).tobytes())
                examples += len(piece)
                for part in store.parts:  # the lookups' pages: read once, not kept mapped
                    release_mapped(*part.arrays.values())
            per_group.append(examples)
        part_of, piece = _mapped(part_file, np.int32), _mapped(piece_file, np.int64)
    source = CachedExamples(parts, part_of, piece)
    source.release()  # the lookups read every selected record's entries
    return ShardIndex(source, counts, skipped, kinds, per_group)


def mixed(
    source: CachedExamples,
    per_group: Sequence[int],
    weights: Sequence[float],
    key: list[int],
    cache_dir: str,
) -> CachedExamples:
    """A shard's mixture draw over its examples (`source`: group after group, `per_group[g]` of
    group g): exactly the examples, in the order, that mixture.mix gives the in-memory path for
    the same seed key, as a source of their own (no memory per example beyond the draw itself,
    8 bytes per drawn example while it is written out)."""
    picks = mixture_picks(per_group, weights, key)
    first = np.cumsum([0, *per_group]).tolist()
    return source.subset([p + first[g] for g, p in enumerate(picks)], cache_dir)


def _index_file(directory: str | None) -> Any:
    """An unnamed temporary file beside the cache; in the system's temporary directory when the
    cache's directory takes no new file (the cache only saves time: it must not stop training)."""
    try:
        return tempfile.TemporaryFile(dir=directory)
    except OSError:
        return tempfile.TemporaryFile()


def _mapped(file: Any, dtype: Any) -> np.ndarray:
    """The array written to `file`, memory-mapped read-only (the mapping outlives the file)."""
    file.flush()
    if not file.tell():
        return np.zeros(0, dtype)
    return np.memmap(file, dtype, mode="r")


def stream_iterator(
    config: Config, local: LocalData, plan: ShardPlan, stats: dict[str, Any], process_count: int
) -> StreamIterator:
    """The streamed training iterator over this process's shards (global epoch length and loss
    tokens from `stats`; with several processes its state gathers every process's shards)."""
    return StreamIterator(
        local.sources,
        stream_settings(config),
        global_batch_size=config.train.global_batch_size,
        seed=config.seed,
        rows_per_shard=stats["rows_per_shard"],
        loss_tokens=stats["loss_tokens"],
        first_shard=plan.first,
        num_shards=plan.num_shards,
        prefetch=config.data.prefetch,
        gather=gather_states if process_count > 1 else None,
    )


def gather_states(local: dict) -> dict:
    """Every process's shard states merged into one dict (a collective: every process calls it
    when a checkpoint is saved). JSON bytes travel as one padded uint8 allgather."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(local).encode("utf-8"), np.uint8)
    sizes = agree([len(data)], jax.process_count())[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    merged: dict = {}
    for row, size in zip(gathered, sizes.tolist(), strict=True):
        merged.update(json.loads(row[:size].tobytes()))
    return merged
