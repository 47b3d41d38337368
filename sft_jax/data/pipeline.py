"""The data stage as the training loop sees it: config in, packed iterators and statistics out.

`prepare_data` runs before any compute, so bad files, formats, templates or masks fail the run with
a clear message before a model is loaded:

    read (per mixture group) -> split train/eval -> encode (render + mask, workers) -> mix
    -> pack -> statistics + sanity check -> TrainIterator / eval batches / eval prompts
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sft_jax.config import Config, ConfigError
from sft_jax.data.encode import EncodeSettings, EvalPrompt, encode_examples, eval_prompt
from sft_jax.data.formats import Conversation, Example, FormatSpec, Text, read_examples
from sft_jax.data.loader import TrainIterator, eval_batches
from sft_jax.data.mixture import mix, mixture_counts, parse_mixture
from sft_jax.data.pack import pack_examples, packing_stats
from sft_jax.data.source import DataError
from sft_jax.data.templates import ChatTemplate, load_chat_template
from sft_jax.data.tokenize import TokenizedExample, load_tokenizer

logger = logging.getLogger(__name__)
_AUTO_WORKERS_MIN_EXAMPLES = 4096  # below this, spawning workers costs more than it saves


@dataclasses.dataclass
class DataBundle:
    """Everything the loop needs from the data section, prepared before any compute."""

    train_iter: TrainIterator
    eval_batches: list[dict[str, np.ndarray]]
    eval_prompts: list[EvalPrompt]
    tokenizer: Any
    stats: dict[str, Any]


@dataclasses.dataclass
class Splits:
    """Examples read from disk: train per mixture group, eval, and the weights of the groups."""

    train_groups: list[list[Example]]
    weights: list[float] | None
    eval: list[Example]
    skipped: int


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split of `fraction` of the rows (at least one when fraction > 0)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = max(1, round(fraction * len(rows))) if fraction > 0 else 0
    held = {int(i) for i in order[:n_eval]}
    train = [r for i, r in enumerate(rows) if i not in held]
    return train, [r for i, r in enumerate(rows) if i in held]


def read_splits(config: Config) -> Splits:
    """Reads every mixture group and the eval data (a file, or a fraction of each group)."""
    dc = config.data
    spec = FormatSpec.parse(dc.format, dc.field_map, dc.ignore_fields)
    entries = parse_mixture(dc.train_files)
    groups, held, skipped = [], [], 0
    for pattern, _ in entries:
        examples, n = read_examples(pattern, spec, on_bad_row=dc.on_bad_row)
        skipped += n
        if not dc.eval_files:
            examples, part = split_rows(examples, dc.eval_fraction, config.seed)
            held.extend(part)
        groups.append(examples)
    if dc.eval_files:
        held, n = read_examples(dc.eval_files, spec, on_bad_row=dc.on_bad_row)
        skipped += n
    weights = [w for _, w in entries] if entries[0][1] is not None else None
    return Splits(groups, weights, held[: dc.max_eval_examples], skipped)


def encode_settings(config: Config, tokenizer: Any, examples: Sequence[Example]) -> EncodeSettings:
    """The chat template is loaded only when some example is a conversation, so prompt/completion
    data works with a tokenizer that has no template (stories260K)."""
    dc = config.data
    template: ChatTemplate | None = None
    if any(isinstance(e, Conversation) for e in examples):
        template = load_chat_template(dc.chat_template, tokenizer)
    return EncodeSettings(template, dc.train_on, dc.seq_len, dc.overlong, dc.on_bad_row)


def num_workers(config: Config, n_examples: int) -> int:
    """data.num_workers, or with 0 ("auto") all cores once the dataset is large enough."""
    if config.data.num_workers > 0:
        return config.data.num_workers
    if n_examples < _AUTO_WORKERS_MIN_EXAMPLES:
        return 1
    return min(16, len(os.sched_getaffinity(0)))


def prepare_data(config: Config) -> DataBundle:
    """Reads, tokenises, mixes and packs train and eval data; returns iterators and statistics."""
    dc = config.data
    tokenizer_path = dc.tokenizer or config.model.path
    if not tokenizer_path:
        raise ConfigError("set data.tokenizer (or model.path, whose tokenizer is then used)")
    tokenizer = load_tokenizer(tokenizer_path)
    splits = read_splits(config)
    everything = [e for g in splits.train_groups for e in g] + splits.eval
    settings = encode_settings(config, tokenizer, everything)
    workers = num_workers(config, len(everything))
    encoded, counts, skipped = [], None, splits.skipped
    for group in splits.train_groups:
        examples, c, s = encode_examples(group, tokenizer, settings, num_workers=workers)
        encoded.append(examples)
        counts, skipped = (c if counts is None else counts + c), skipped + s
    train = mix(encoded, splits.weights, config.seed)
    if not train:
        raise DataError(f"no trainable examples in {dc.train_files}")
    eval_examples, _, _ = encode_examples(splits.eval, tokenizer, settings, num_workers=1)
    packed = pack_examples(train, seq_len=dc.seq_len, window=dc.pack_window, seed=config.seed)
    stats = packing_stats(packed)
    stats.update(
        examples=len(train),
        skipped=skipped,
        truncated=counts.truncated,
        split=counts.split,
        dropped=counts.dropped,
        eval_examples=len(eval_examples),
        packing_efficiency=1.0 - stats["padding_fraction"],
        mixture=mixture_counts([len(g) for g in encoded], splits.weights)
        if splits.weights
        else [len(g) for g in encoded],
    )
    check_trainable(stats, dc.train_on, only_text=all(isinstance(e, Text) for e in everything))
    logger.info("data statistics: %s", format_stats(stats))
    train_iter = TrainIterator(
        packed,
        global_batch_size=config.train.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    prompts = [eval_prompt(e, tokenizer, settings.template) for e in splits.eval]
    return DataBundle(
        train_iter,
        _eval_batches(eval_examples, config),
        [p for p in prompts if p is not None],
        tokenizer,
        stats,
    )


def _eval_batches(examples: list[TokenizedExample], config: Config) -> list[dict[str, np.ndarray]]:
    if not examples:
        return []
    dc = config.data
    packed = pack_examples(examples, seq_len=dc.seq_len, window=dc.pack_window, seed=config.seed)
    return eval_batches(packed, batch_size=config.eval.batch_size)


def check_trainable(stats: dict[str, Any], train_on: str, *, only_text: bool) -> None:
    """Fails before step 0 on a mask that trains nothing, or everything when it should not.

    An all-ones mask with train_on != "all" means prompts are being trained as if they were
    answers (a broken template or mask); an empty one means the run would learn nothing.
    """
    fraction = stats["trainable_fraction"]
    if stats["loss_tokens"] == 0 or fraction == 0.0:
        raise DataError(
            f"the loss mask is empty: no token is trained (train_on={train_on!r}); "
            "check data.train_on, data.chat_template and the data format"
        )
    if fraction == 1.0 and train_on != "all" and not only_text:
        raise DataError(
            f"the loss mask covers every token although train_on={train_on!r}: prompts would be "
            "trained as answers. Check data.chat_template / data.format, or set train_on='all'"
        )


def format_stats(stats: dict[str, Any]) -> str:
    """One line for the log: examples, tokens, trainable fraction, length handling, packing."""
    return (
        "{examples} examples ({skipped} skipped, {truncated} truncated, {split} split, "
        "{dropped} dropped), {rows} packed rows, {real_tokens} tokens, trainable fraction "
        "{trainable_fraction:.3f}, packing efficiency {packing_efficiency:.2%}, mixture "
        "{mixture}; {eval_examples} eval examples"
    ).format(**stats)
