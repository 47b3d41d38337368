"""The data stage as the training loop sees it: config in, packed iterators and statistics out.

`prepare_data` runs before any compute, so bad files, formats or masks fail the run with a clear
message before a model is loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sft_jax.config import Config, ConfigError
from sft_jax.data.loader import TrainIterator, eval_batches
from sft_jax.data.pack import pack_examples, packing_stats
from sft_jax.data.source import DataError, Row, read_rows
from sft_jax.data.tokenize import load_tokenizer, tokenize_rows


@dataclasses.dataclass
class DataBundle:
    """Everything the loop needs from the data section, prepared before any compute."""

    train_iter: TrainIterator
    eval_batches: list[dict[str, np.ndarray]]
    eval_rows: list[Row]
    tokenizer: Any
    stats: dict[str, Any]


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split of `fraction` of the rows (at least one when fraction > 0)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = max(1, round(fraction * len(rows))) if fraction > 0 else 0
    held = {int(i) for i in order[:n_eval]}
    train = [r for i, r in enumerate(rows) if i not in held]
    return train, [r for i, r in enumerate(rows) if i in held]


def prepare_data(config: Config) -> DataBundle:
    """Reads, tokenises and packs train and eval data; returns iterators and statistics."""
    dc = config.data
    tokenizer_path = dc.tokenizer or config.model.path
    if not tokenizer_path:
        raise ConfigError("set data.tokenizer (or model.path, whose tokenizer is then used)")
    tokenizer = load_tokenizer(tokenizer_path)
    rows, skipped = read_rows(dc.train_files, on_bad_row=dc.on_bad_row)
    if dc.eval_files:
        eval_rows, eval_skipped = read_rows(dc.eval_files, on_bad_row=dc.on_bad_row)
        skipped += eval_skipped
    else:
        rows, eval_rows = split_rows(rows, dc.eval_fraction, config.seed)
    eval_rows = eval_rows[: dc.max_eval_examples]
    train_examples, truncated = tokenize_rows(rows, tokenizer, seq_len=dc.seq_len)
    eval_examples, _ = tokenize_rows(eval_rows, tokenizer, seq_len=dc.seq_len)
    if not train_examples:
        raise DataError(f"no trainable examples in {dc.train_files}")
    packed = pack_examples(
        train_examples, seq_len=dc.seq_len, window=dc.pack_window, seed=config.seed
    )
    stats = packing_stats(packed)
    stats.update(examples=len(train_examples), skipped=skipped, truncated=truncated)
    stats["eval_examples"] = len(eval_examples)
    if stats["loss_tokens"] == 0:
        raise DataError(f"no token of {dc.train_files} is trained on: the loss mask is empty")
    train_iter = TrainIterator(
        packed,
        global_batch_size=config.train.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    batches = []
    if eval_examples:
        eval_packed = pack_examples(
            eval_examples, seq_len=dc.seq_len, window=dc.pack_window, seed=config.seed
        )
        batches = eval_batches(eval_packed, batch_size=config.eval.batch_size)
    return DataBundle(train_iter, batches, eval_rows, tokenizer, stats)
