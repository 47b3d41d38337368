"""What each process's data preparation yields, in memory (pipeline.py) or streamed
(stream_prepare.py): the counts it agrees on with the other processes, its local result, and the
settings both read from the config. Kept apart from pipeline.py so the streamed preparation
builds on them without importing the pipeline that dispatches to it."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sft_jax.config import Config, ConfigError
from sft_jax.data.control import control_strings
from sft_jax.data.encode import EncodeSettings, EvalPrompt
from sft_jax.data.formats import Conversation, Example
from sft_jax.data.render import TokenCounts
from sft_jax.data.templates import ChatTemplate, load_chat_template
from sft_jax.data.tokenize import TokenizedExample

logger = logging.getLogger(__name__)
_AUTO_WORKERS_MIN_EXAMPLES = 4096  # below this, spawning workers costs more than it saves
# ProcessCounts.summed: per-process counts that are summed over processes.
SUMMED = (
    "rows",
    "slots",
    "real_tokens",
    "loss_tokens",
    "continued_segments",
    "examples",
    "skipped",
    "truncated",
    "split",
    "dropped",
    "control_text",
    "row_floor",
    "row_floor_split",
)


def tokenizer_path(config: Config) -> str:
    """Where the tokenizer comes from: data.tokenizer, else model.path (the model's own)."""
    path = config.data.tokenizer or config.model.path
    if not path:
        raise ConfigError("set data.tokenizer (or model.path, whose tokenizer is then used)")
    return path


def encode_settings(config: Config, tokenizer: Any, examples: Sequence[Example]) -> EncodeSettings:
    """The chat template is loaded only when some example is a conversation, so prompt/completion
    data works with a tokenizer that has no template (stories260K)."""
    dc = config.data
    template: ChatTemplate | None = None
    if any(isinstance(e, Conversation) for e in examples):
        template = load_chat_template(dc.chat_template, tokenizer)
    return EncodeSettings(
        template,
        dc.train_on,
        dc.seq_len,
        dc.overlong,
        dc.on_bad_row,
        dc.on_control_tokens,
        control_strings(tokenizer),
    )


def num_workers(config: Config, n_examples: int) -> int:
    """data.num_workers, or with 0 ("auto") all cores once the dataset is large enough."""
    if config.data.num_workers > 0:
        return config.data.num_workers
    if n_examples < _AUTO_WORKERS_MIN_EXAMPLES:
        return 1
    return min(16, len(os.sched_getaffinity(0)))


@dataclasses.dataclass
class ProcessCounts:
    """What one process tells every other one about its preparation. It travels as one int vector
    (`to_vector`, through the `exchange`), of the same length on every process: summed counts,
    then min rows, the three flags, then the mixture."""

    summed: dict[str, int]  # each of SUMMED, over the own shards
    min_rows: int  # packed rows of the smallest own shard
    not_only_text: bool  # some example is not plain text (a loss mask of all ones is suspect)
    masks_a_token: bool  # some training example's loss mask (position 0 included) has a zero
    failed: bool  # this process's preparation raised a DataError
    mixture: list[int]  # examples per mixture group, over the own shards

    @classmethod
    def failure(cls, groups: int) -> ProcessCounts:
        """A failed process's counts: all zero, with the failure flag set."""
        return cls(dict.fromkeys(SUMMED, 0), 0, False, False, True, [0] * groups)

    def to_vector(self) -> list[int]:
        summed = [self.summed[k] for k in SUMMED]
        flags = [int(self.not_only_text), int(self.masks_a_token), int(self.failed)]
        return [*summed, self.min_rows, *flags, *self.mixture]

    @classmethod
    def from_vector(cls, vector: Sequence[int]) -> ProcessCounts:
        n = len(SUMMED)
        summed = {k: int(v) for k, v in zip(SUMMED, vector[:n], strict=True)}
        flags = bool(vector[n + 1]), bool(vector[n + 2]), bool(vector[n + 3])
        return cls(summed, int(vector[n]), *flags, [int(x) for x in vector[n + 4 :]])


@dataclasses.dataclass
class LocalData:
    """What one process prepared: its packed shards, eval data, and counts to agree on."""

    shards: list[dict[str, np.ndarray]]
    counts: ProcessCounts
    eval_examples: list[TokenizedExample]
    eval_prompts: list[EvalPrompt]
    skipped_eval: int
    template: ChatTemplate | None = None
    sources: list[Any] | None = None  # with data.streaming: the own shards' example sources


def some_token_masked(examples: Iterable[TokenizedExample]) -> bool:
    """Whether some example leaves a token of its own mask untrained, position 0 included.

    The trainable fraction counts shifted targets (loss_mask[1:]), so prompts of one token (an
    empty prompt is the start token alone) give a fraction of 1.0 although they are masked; the
    unshifted mask still has their 0, where a broken template's mask is all ones. Stops at the
    first such example: with correctly masked data that is the first one."""
    return any(not np.all(ex.loss_mask) for ex in examples)


def token_counts(counts: TokenCounts) -> dict[str, int]:
    return {
        "truncated": counts.truncated,
        "split": counts.split,
        "dropped": counts.dropped,
        "control_text": counts.control_text,
    }


def log_named(counts: TokenCounts, seq_len: int, on_control_tokens: str) -> None:
    """Names the first examples behind the summary's dropped / skipped / control-text counts,
    so a user can open them (each process names its own)."""
    how = {"warn": "trained as plain text", "keep": "kept as special tokens"}
    cut = (
        f"{counts.truncated} example(s) cut at seq_len={seq_len} (their ends are not trained; "
        "a longer data.seq_len keeps them whole, data.overlong='split' cuts conversations at "
        "turn ends)"
    )
    for names, what in (
        (counts.named_truncated, cut),
        (counts.named_dropped, f"{counts.dropped} example(s) dropped by data.overlong / seq_len"),
        (counts.named_skipped, "example(s) skipped as bad (data.on_bad_row='skip')"),
        (
            counts.named_control,
            f"{counts.control_text} example(s) hold special-token text, "
            f"{how.get(on_control_tokens, on_control_tokens)} (data.on_control_tokens)",
        ),
    ):
        if names:
            logger.warning("%s; first: %s", what, "; ".join(names))
