"""The data stage as the training loop sees it: config in, packed iterators and statistics out.

`prepare_data` runs before any compute, so bad files, formats, templates or masks fail the run with
a clear message before a model is loaded. Each process prepares only its own data shards
(shards.py):

    list records (per mixture group) -> split train/eval -> deal train records to shards
    -> per own shard: parse -> encode (render + mask, workers) -> mix -> pack
    -> agree on counts with the other processes -> statistics + sanity check
    -> TrainIterator over the own shards / eval batches / eval prompts

Eval data is replicated: every process encodes and packs the same held-out examples (at most
data.max_eval_examples) and keeps its slice of each global eval batch, so the eval batches, and
the eval loss, are the same for any number of processes.

A process whose own preparation fails (a bad row in its shard, say) still takes part in the
count exchange with a failure flag, so every process stops with an error instead of the others
waiting for it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from sft_jax.config import Config
from sft_jax.data import cache, stream_prepare
from sft_jax.data.encode import (
    EncodedSplits,
    EncodeSettings,
    EvalPrompt,
    encode_examples,
    encode_held_out,
)
from sft_jax.data.formats import (
    Example,
    FormatSpec,
    Text,
    parse_selected,
    read_examples,
)
from sft_jax.data.loader import TrainIterator, eval_batches, shard_seed
from sft_jax.data.mixture import mix, mixture_counts, parse_mixture
from sft_jax.data.pack import pack_examples, packing_stats, whole_example_row_floor
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
from sft_jax.data.raw_records import RawRecords, lazy_records
from sft_jax.data.render import TokenCounts
from sft_jax.data.shards import (
    ShardPlan,
    agree,
    empty_shard_error,
    held_out_shares,
    shard_plan,
    shard_positions,
    split_position_arrays,
)
from sft_jax.data.source import DataError, SkipCounter
from sft_jax.data.templates import ChatTemplate, load_chat_template
from sft_jax.data.tokenize import LazyTokenizer, TokenizedExample

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DataBundle:
    """Everything the loop needs from the data section, prepared before any compute."""

    train_iter: TrainIterator  # or stream.StreamIterator (data.streaming), which acts the same
    eval_batches: list[dict[str, np.ndarray]]
    eval_prompts: list[EvalPrompt]
    tokenizer: Any
    stats: dict[str, Any]
    template: ChatTemplate | None = None  # the chat template, when some example is a chat


@dataclasses.dataclass
class Splits:
    """Examples read from disk: train per own shard and mixture group, eval, group weights."""

    train: list[list[list[Example]]]  # [own shard][mixture group] -> examples
    weights: list[float] | None
    eval: list[Example]
    skipped_train: int
    skipped_eval: int

    @property
    def train_groups(self) -> list[list[Example]]:
        """Each mixture group's examples over all own shards."""
        return [[e for shard in self.train for e in shard[g]] for g in range(len(self.train[0]))]

    @property
    def skipped(self) -> int:
        return self.skipped_train + self.skipped_eval


def read_splits(
    config: Config, plan: ShardPlan | None = None, errors: list[DataError] | None = None
) -> Splits:
    """Reads the records of every mixture group and parses only those of the shards in `plan`
    (default: all data as one shard) plus the eval records (a file, or a fraction of each group:
    the held-out positions are drawn from all records, so every process holds out the same;
    `held_out_shares` caps them). Skipped rows' errors are appended to `errors` when given
    (audit lists them)."""
    dc = config.data
    plan = plan or ShardPlan(1, 0, 1)
    spec = FormatSpec.parse(dc.format, dc.field_map, dc.ignore_fields)
    train: list[list[list[Example]]] = [[] for _ in plan.local]
    listed: list[RawRecords] = []
    held: list[np.ndarray] = []  # [group] -> held-out record positions
    trained: list[int] = []
    train_skips = SkipCounter(dc.on_bad_row, errors)
    eval_skips = SkipCounter(dc.on_bad_row, errors)
    for pattern, _ in parse_mixture(dc.train_files):
        records = lazy_records(pattern)
        positions, held_positions = split_position_arrays(
            len(records), dc.eval_fraction, config.seed, hold_out=not dc.eval_files
        )
        listed.append(records)
        held.append(held_positions)
        trained.append(len(positions))
        for slot, shard in enumerate(plan.local):
            mine = shard_positions(positions, shard, plan.num_shards)
            train[slot].append(parse_selected(records, mine, spec, train_skips))
    shares = held_out_shares([len(h) for h in held], trained, dc.max_eval_examples, plan)
    evals: list[Example] = []
    for g, (records, group, share) in enumerate(zip(listed, held, shares, strict=True)):
        evals.extend(parse_selected(records, group[: share.keep], spec, eval_skips))
        for slot, extra in enumerate(share.extra):
            extra_positions = group[np.asarray(extra, np.int64)]
            train[slot][g].extend(parse_selected(records, extra_positions, spec, train_skips))
    skipped_eval = eval_skips.finish()
    if dc.eval_files:
        evals, skipped_eval = read_examples(
            dc.eval_files, spec, on_bad_row=dc.on_bad_row, errors=errors
        )
    entries = parse_mixture(dc.train_files)
    weights = [w for _, w in entries] if entries[0][1] is not None else None
    return Splits(train, weights, evals[: dc.max_eval_examples], train_skips.finish(), skipped_eval)


def prepare_data(
    config: Config,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    exchange: Callable[[Sequence[int], int], np.ndarray] = agree,
    cache_dir: str | None = None,
) -> DataBundle:
    """Reads, tokenises, mixes and packs this process's train shards and the (replicated) eval
    data; returns iterators and global statistics. `process_index` / `process_count` default to
    JAX's; tests pass them, and an in-memory `exchange` in place of the collective `agree`, to
    build several processes' views in one process. `cache_dir` is where the tokenisation cache
    goes when data.cache_dir is "" (the trainer passes its workdir's data_cache; None: no cache)."""
    dc = config.data
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    tokenizer = LazyTokenizer(tokenizer_path(config))  # built when first used: not on a restart
    plan = shard_plan(dc.shards, index, count)
    groups = len(parse_mixture(dc.train_files))
    try:
        cache = resolve_cache_dir(dc.cache_dir, cache_dir)
        prepare = _prepare_local
        if dc.streaming:
            prepare = stream_prepare.prepare_local
        local, failure = prepare(config, tokenizer, plan, cache), None
    except DataError as error:
        local, failure = None, error
    counts = local.counts if local else ProcessCounts.failure(groups)
    gathered = [ProcessCounts.from_vector(v) for v in exchange(counts.to_vector(), count)]
    if failure is not None:
        raise failure
    failed = [p for p, c in enumerate(gathered) if c.failed]
    if failed:
        raise DataError(f"data preparation failed on process(es) {failed}; see their logs")
    assert local is not None
    stats = _global_stats(gathered, plan, local, dc.train_files)
    if dc.eval_files and dc.max_eval_examples > 0 and not stats["eval_examples"]:
        # Named eval files that yield nothing would silently turn validation (and stopping on
        # it) off; every process holds the same eval examples, so all stop here together.
        raise DataError(
            f"no eval examples in {dc.eval_files} ({local.skipped_eval} skipped as bad; empty "
            "files, or every example dropped by data.overlong); fix the files or set "
            'data.eval_files="" to run without them'
        )
    only_text = not any(c.not_only_text for c in gathered)
    masked = any(c.masks_a_token for c in gathered)
    check_trainable(stats, dc.train_on, only_text=only_text, masks_a_token=masked)
    logger.info("data statistics: %s", format_stats(stats))
    if dc.streaming:
        train_iter = stream_prepare.stream_iterator(config, local, plan, stats, count)
    else:
        train_iter = TrainIterator(
            local.shards,
            global_batch_size=config.train.global_batch_size,
            seed=config.seed,
            first_shard=plan.first,
            num_shards=plan.num_shards,
            rows_per_shard=stats["rows_per_shard"],
            loss_tokens=stats["loss_tokens"],
            prefetch=dc.prefetch,
        )
    eval_data = held_out_batches(local.eval_examples, config, index, count)
    return DataBundle(train_iter, eval_data, local.eval_prompts, tokenizer, stats, local.template)


def resolve_cache_dir(configured: str, default: str | None) -> str | None:
    """data.cache_dir: "" = `default` (the workdir's), "off" = no cache, else that directory."""
    if configured == "off":
        return None
    return configured or default


def _prepare_local(
    config: Config, tokenizer: Any, plan: ShardPlan, cache_dir: str | None = None
) -> LocalData:
    """Encodes (through the tokenisation cache when `cache_dir` is set), mixes and packs the own
    shards; encodes the eval examples. With a cache, a restart with the same data, encoding,
    seed, shards and packing loads this process's prepared rows instead (cache.py)."""
    if not cache_dir:
        return _pack_local(config, plan, _encode_uncached(config, tokenizer, plan))
    roots = cache.group_roots(config, tokenizer_path(config), cache_dir)
    key = cache.prepared_key(config, roots, plan)
    hit = cache.load_prepared(cache_dir, key)
    if hit is not None:
        for named in hit.meta["named"]:
            counts = TokenCounts(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in named.items()}
            )
            log_named(counts, config.data.seq_len, config.data.on_control_tokens)
        template = _saved_template(hit.meta, config.data.chat_template, tokenizer)
        if isinstance(tokenizer, LazyTokenizer):  # its length is fixed by the key, as the template
            tokenizer.length = hit.meta.get("tokenizer_length")
        counts = ProcessCounts.from_vector(hit.meta["counts"])
        return LocalData(
            hit.shards,
            counts,
            hit.eval_examples,
            hit.eval_prompts,
            hit.meta["skipped_eval"],
            template,
        )

    def prepare(examples: Sequence[Example]) -> tuple[EncodeSettings, int]:
        return encode_settings(config, tokenizer, examples), num_workers(config, len(examples))

    encoded = cache.encode_cached(config, tokenizer, roots, plan, prepare)
    local = _pack_local(config, plan, encoded)
    meta = {
        "counts": local.counts.to_vector(),
        "skipped_eval": local.skipped_eval,
        "template": local.template is not None,
        "template_def": dataclasses.asdict(local.template) if local.template else None,
        "tokenizer_length": len(tokenizer),
        "named": [dataclasses.asdict(c) for c in encoded.counts],
    }
    prepared = cache.Prepared(local.shards, local.eval_examples, local.eval_prompts, meta)
    cache.save_prepared(cache_dir, key, prepared)
    return local


def _saved_template(meta: dict[str, Any], spec: str, tokenizer: Any) -> ChatTemplate | None:
    """The chat template kept with prepared rows (its source and the tokenizer's special-token
    strings, fixed by the key); prepared rows saved without it load it with the tokenizer."""
    if not meta["template"]:
        return None
    saved = meta.get("template_def")
    if saved is None:
        return load_chat_template(spec, tokenizer)
    variables = tuple((name, value) for name, value in saved["variables"])
    return ChatTemplate(saved["name"], saved["source"], variables)


def _pack_local(config: Config, plan: ShardPlan, encoded: EncodedSplits) -> LocalData:
    """Mixes and packs the own shards' encoded examples; the counts to agree on."""
    shards, summed, min_rows, mixture = [], np.zeros(len(SUMMED), np.int64), None, None
    for slot, shard in enumerate(plan.local):
        log_named(encoded.counts[slot], config.data.seq_len, config.data.on_control_tokens)
        packed, shard_counts, shard_mixture = _build_shard(
            encoded.train[slot], encoded.weights, shard, plan, config
        )
        shard_counts.update(token_counts(encoded.counts[slot]), skipped=encoded.skipped[slot])
        shards.append(packed)
        summed += [shard_counts[k] for k in SUMMED]
        rows = shard_counts["rows"]
        min_rows = rows if min_rows is None else min(min_rows, rows)
        mixture = (
            shard_mixture
            if mixture is None
            else [a + b for a, b in zip(mixture, shard_mixture, strict=True)]
        )
    summed[SUMMED.index("skipped")] += encoded.skipped_unassigned
    counts = ProcessCounts(
        dict(zip(SUMMED, summed.tolist(), strict=True)),
        min_rows,
        encoded.not_only_text,
        some_token_masked(e for slot in encoded.train for group in slot for e in group),
        False,
        mixture,
    )
    return LocalData(
        shards,
        counts,
        encoded.eval_examples,
        encoded.eval_prompts,
        encoded.skipped_eval,
        encoded.template,
    )


def _encode_uncached(config: Config, tokenizer: Any, plan: ShardPlan) -> EncodedSplits:
    """Reads and parses the own shards' and the eval records, and encodes them."""
    splits = read_splits(config, plan)
    everything = [e for g in splits.train_groups for e in g] + splits.eval
    settings = encode_settings(config, tokenizer, everything)
    workers = num_workers(config, len(everything))
    train, slot_counts, slot_skipped = [], [], []
    for groups in splits.train:
        encoded, counts, skipped = [], TokenCounts(), 0
        for group in groups:
            examples, c, s = encode_examples(group, tokenizer, settings, num_workers=workers)
            encoded.append(examples)
            counts, skipped = counts + c, skipped + s
        train.append(encoded)
        slot_counts.append(counts)
        slot_skipped.append(skipped)
    eval_examples, prompts, eval_skipped = encode_held_out(splits.eval, tokenizer, settings)
    return EncodedSplits(
        train,
        slot_counts,
        slot_skipped,
        splits.skipped_train,
        splits.weights,
        eval_examples,
        prompts,
        splits.skipped_eval + eval_skipped,
        settings.template,
        not all(isinstance(e, Text) for e in everything),
    )


def _build_shard(
    encoded: list[list[TokenizedExample]],
    weights: list[float] | None,
    shard: int,
    plan: ShardPlan,
    config: Config,
) -> tuple[dict[str, np.ndarray], dict[str, int], list[int]]:
    """One shard: mix its encoded mixture groups, pack -> (packed rows, counts, mixture)."""
    dc = config.data
    key = shard_seed(config.seed, shard, plan.num_shards)
    empty = [i for i, g in enumerate(encoded) if weights and weights[i] > 0 and not g]
    if empty:
        raise empty_shard_error(shard, plan, dc.train_files, empty)
    train = mix(encoded, weights, key)
    packed = pack_examples(
        train, seq_len=dc.seq_len, window=dc.pack_window, seed=key, split=dc.pack_split
    )
    stats = packing_stats(packed)
    slots = [len(e.tokens) - 1 for e in train]  # per example
    shard_counts = {
        **stats,
        "examples": len(train),
        "row_floor": whole_example_row_floor(slots, dc.seq_len),
        "row_floor_split": -(-sum(slots) // dc.seq_len),
    }
    sizes = [len(g) for g in encoded]
    return packed, shard_counts, mixture_counts(sizes, weights) if weights else sizes


def _global_stats(
    gathered: list[ProcessCounts], plan: ShardPlan, local: LocalData, train_files: str
) -> dict[str, Any]:
    """Statistics over all shards of all processes, from every process's agreed counts."""
    stats: dict[str, Any] = {k: sum(c.summed[k] for c in gathered) for k in SUMMED}
    if stats["rows"] == 0:
        raise DataError(f"no trainable examples in {train_files}")
    rows_per_shard = min(c.min_rows for c in gathered)
    if rows_per_shard == 0:
        raise DataError(
            f"a data shard has no training rows ({train_files} split into {plan.num_shards} "
            "shards): use fewer data shards (data.shards) or more data"
        )
    real, slots = stats["real_tokens"], stats["slots"]
    stats.update(
        skipped=stats["skipped"] + local.skipped_eval,
        padding_fraction=1.0 - real / slots,
        # The least padding packing could reach (each shard packs alone: per-shard row floors).
        padding_floor=1.0 - real / (stats["row_floor"] * slots / stats["rows"]),
        padding_floor_split=1.0 - real / (stats["row_floor_split"] * slots / stats["rows"]),
        packing_efficiency=real / slots,
        trainable_fraction=stats["loss_tokens"] / real if real else 0.0,
        shards=plan.num_shards,
        rows_per_shard=rows_per_shard,
        rows_dropped_per_epoch=stats["rows"] - rows_per_shard * plan.num_shards,
        eval_examples=len(local.eval_examples),
        mixture=[sum(column) for column in zip(*(c.mixture for c in gathered), strict=True)],
    )
    return stats


def held_out_batches(
    examples: list[TokenizedExample], config: Config, process_index: int, process_count: int
) -> list[dict[str, np.ndarray]]:
    """Eval rows always keep every example whole (no data.pack_split): a cut piece loses its
    context, so the eval loss would change with a training-throughput setting. Examples longer
    than a row were already cut, dropped or split by data.overlong when encoded."""
    if not examples:
        return []
    dc = config.data
    packed = pack_examples(examples, seq_len=dc.seq_len, window=dc.pack_window, seed=config.seed)
    return eval_batches(
        packed,
        batch_size=config.eval.batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def check_trainable(
    stats: dict[str, Any], train_on: str, *, only_text: bool, masks_a_token: bool = False
) -> None:
    """Fails before step 0 on a mask that trains nothing, or everything when it should not.

    An all-ones mask with train_on != "all" means prompts are being trained as if they were
    answers (a broken template or mask); an empty one means the run would learn nothing. The
    fraction counts shifted targets, so prompts of one token (never a target) give 1.0 too:
    `masks_a_token` (some example's unshifted mask has a zero, `prepared.some_token_masked`) says
    the prompts are masked after all.
    """
    fraction = stats["trainable_fraction"]
    if stats["loss_tokens"] == 0 or fraction == 0.0:
        raise DataError(
            f"the loss mask is empty: no token is trained (train_on={train_on!r}); "
            "check data.train_on, data.chat_template and the data format"
        )
    if fraction == 1.0 and train_on != "all" and not only_text and not masks_a_token:
        raise DataError(
            f"the loss mask covers every token although train_on={train_on!r}: prompts would be "
            "trained as answers. Check data.chat_template / data.format, or set train_on='all'"
        )


def format_stats(stats: dict[str, Any]) -> str:
    """One line for the log: examples, tokens, trainable fraction, length handling, packing."""
    return (
        "{examples} examples ({skipped} skipped, {truncated} truncated, {split} split, "
        "{dropped} dropped, {control_text} with special-token text), {rows} packed rows in "
        "{shards} shard(s) ({rows_per_shard} rows per shard and epoch, "
        "{rows_dropped_per_epoch} left out per epoch), {real_tokens} tokens, "
        "trainable fraction {trainable_fraction:.3f}, packing efficiency "
        "{packing_efficiency:.2%} ({continued_segments} split pieces), mixture {mixture}; "
        "{eval_examples} eval examples"
    ).format(**stats)


def padding_line(stats: dict[str, Any]) -> str:
    """The padding and its two lower bounds at these lengths: packing whole examples
    (`whole_example_row_floor`) and splitting them (whole rows of real tokens). Padding at the
    first says the lengths cause it and only data.pack_split (or another seq_len) removes it."""
    return (
        f"padding {stats['padding_fraction']:.2%} (lower bounds {stats['padding_floor']:.2%} "
        f"for whole examples, {stats['padding_floor_split']:.2%} with data.pack_split)"
    )
