"""Tokenisation of prompt/completion rows with an explicit loss mask.

Every example is `prefix + prompt + completion + [EOS]`, where `prefix` is what the tokenizer puts
in front of a text on its own (BOS for Llama-style tokenizers, nothing for Qwen). The loss mask is
True on the completion tokens and the final EOS: the tokens the model must learn to predict. It is
carried as data next to the tokens, never re-derived from token values, so a completion that
contains the EOS or pad id mid-text is still trained and padding is never confused with EOS.

Why prompt and completion are tokenised separately and concatenated (rather than tokenising the
joined text and locating the boundary by character offsets): the mask boundary is then exact by
construction, and no token can straddle it (BPE would otherwise merge the prompt's last characters
with the completion's first). The price is that tokens at the boundary can differ from those of the
joined text; generation sees the same `encode_prompt` prefix, so training and inference agree. For
SentencePiece-style tokenizers such as stories260K this means the completion starts a new word:
"Hello" and " Hello" tokenise alike. Byte-level BPE tokenizers (Llama 3, Qwen) keep whitespace as
written, so the separator belongs in the data (a completion " Paris", or a prompt ending in "\n").

Slot 0 of a row has no predecessor, so it is never a target. Where the tokenizer adds nothing in
front of a text (Qwen) and the prompt is empty, the first completion token would sit in slot 0 and
silently never be learnt; such an example starts with a start token instead: BOS when the
tokenizer has one, else EOS (as documents follow one another in pre-training). `encode_prompt`
returns the same start token for an empty prompt, so generation sees what training saw.

Special tokens written in the text (e.g. a pre-rendered "<|im_start|>" chat prompt) are parsed as
special tokens, as the user wrote them. Two guards keep that from doubling structure tokens: the
tokenizer's prefix is not added when the prompt already starts with it (a pre-rendered BOS), and
EOS is not appended when the completion already ends with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from sft_jax.data.formats import Row
from sft_jax.data.source import DataError

if TYPE_CHECKING:
    import transformers

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One example: tokens int32 [n] and loss_mask bool [n] (True = a token to be predicted)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    source: str


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def check_tokenizer_dir(path: str) -> None:
    """DataError unless `path` is a directory holding tokenizer files (no tokenizer is built)."""
    if not path:
        raise DataError("no tokenizer directory given (set data.tokenizer or model.path)")
    if not os.path.isdir(path):
        raise DataError(f"tokenizer directory {path!r} does not exist")
    present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:  # else transformers builds an empty tokenizer from config.json alone
        raise DataError(
            f"no tokenizer files in {path!r}: expected one of {', '.join(TOKENIZER_FILES)}"
        )


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
    """Loads a Hugging Face tokenizer from a local directory (never the network); needs an EOS id,
    because every example ends with EOS so the model learns to stop."""
    check_tokenizer_dir(path)
    import transformers  # Deferred: importing transformers costs seconds.

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {path!r}: {e}") from e
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer in {path!r} has no eos_token; examples must end with EOS")
    return tokenizer


class LazyTokenizer:
    """The tokenizer of `path`, built by `load_tokenizer` on first use (any attribute, len() or
    call), then that tokenizer's answers.

    Building it imports transformers and torch, seconds of a start; a restart whose prepared rows
    come from the tokenisation cache needs no tokenizer in the data stage (the cache key hashes
    the tokenizer's files, the chat template is kept with the rows), so `prepare_data` hands this
    out and only what encodes or decodes pays the load. `length`, when set (the prepared rows
    record it), answers len() without loading: the trainer's vocabulary check. The directory is
    checked at once, so a missing tokenizer still fails before anything is read."""

    def __init__(self, path: str):
        check_tokenizer_dir(path)
        self.path = path
        self.length: int | None = None
        self._tokenizer: transformers.PreTrainedTokenizerBase | None = None

    @property
    def loaded(self) -> bool:
        return self._tokenizer is not None

    def load(self) -> transformers.PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def __getattr__(self, name: str):
        if name.startswith("_"):  # private and protocol lookups (pickle, copy) stay on the proxy
            raise AttributeError(name)
        return getattr(self.load(), name)

    def __len__(self) -> int:
        if self._tokenizer is None and self.length is not None:
            return self.length
        return len(self.load())

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)


def tokenize_rows(
    rows: list[Row], tokenizer: transformers.PreTrainedTokenizerBase, *, seq_len: int
) -> tuple[list[TokenizedExample], int]:
    """Rows -> examples of at most seq_len + 1 tokens (seq_len input/target slots once shifted).

    Longer examples are cut from the right, keeping the start of the prompt; an example with no
    trainable target left after the cut is dropped. Returns (examples, truncated), where `truncated`
    counts every over-long example, dropped ones included (those are also logged).
    """
    results = tokenize_each_row(rows, tokenizer, seq_len=seq_len)
    dropped = [row.source for row, (ex, _) in zip(rows, results, strict=True) if ex is None]
    if dropped:
        logger.warning(
            "dropped %d examples whose prompt alone fills seq_len=%d (first: %s)",
            len(dropped),
            seq_len,
            dropped[0],
        )
    truncated = sum(t for _, t in results)
    return [ex for ex, _ in results if ex is not None], truncated


def tokenize_each_row(
    rows: list[Row], tokenizer: transformers.PreTrainedTokenizerBase, *, seq_len: int
) -> list[tuple[TokenizedExample | None, bool]]:
    """Per row, in order: (example or None when nothing trainable is left, was it truncated).

    One batch call for all prompts and one for all completions (the Rust tokenizer parallelises).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not rows:
        return []
    prefix = special_prefix(tokenizer)
    start = start_token(tokenizer)
    eos = int(tokenizer.eos_token_id)
    prompts = token_ids(tokenizer, [r.prompt for r in rows])
    completions = token_ids(tokenizer, [r.completion for r in rows])
    out: list[tuple[TokenizedExample | None, bool]] = []
    for row, prompt_ids, completion_ids in zip(rows, prompts, completions, strict=True):
        if not completion_ids:
            raise DataError(f"{row.source}: field 'completion': tokenizes to no tokens")
        head = _with_prefix(prefix, prompt_ids) or [start]
        tail = completion_ids if completion_ids[-1] == eos else [*completion_ids, eos]
        tokens = np.asarray(head + tail, dtype=np.int32)
        mask = np.zeros(len(tokens), dtype=bool)
        mask[len(head) :] = True
        truncated = len(tokens) > seq_len + 1
        if truncated:
            tokens, mask = tokens[: seq_len + 1], mask[: seq_len + 1]
        if not mask[1:].any():  # Slot 0 is never a target, so mask[0] alone trains nothing.
            out.append((None, truncated))
        else:
            out.append(
                (TokenizedExample(tokens=tokens, loss_mask=mask, source=row.source), truncated)
            )
    return out


def encode_prompt(tokenizer: transformers.PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Exactly the prompt prefix `tokenize_rows` builds (prefix/BOS + prompt, or the start token
    alone for an empty prompt), for generation."""
    head = _with_prefix(special_prefix(tokenizer), token_ids(tokenizer, [prompt])[0])
    return head or [start_token(tokenizer)]


def start_token(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
    """What a row starts with when nothing else would: BOS, else EOS (module docstring)."""
    bos = tokenizer.bos_token_id
    return int(bos if bos is not None else tokenizer.eos_token_id)


def token_ids(tokenizer: transformers.PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Batch call (parallel in the Rust fast tokenizer), without special tokens: we add them."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]


def _with_prefix(prefix: list[int], prompt_ids: list[int]) -> list[int]:
    """prefix + prompt, unless the prompt text already begins with the prefix (no double BOS)."""
    if prefix and prompt_ids[: len(prefix)] == prefix:
        return list(prompt_ids)
    return prefix + list(prompt_ids)


def special_prefix(tokenizer: transformers.PreTrainedTokenizerBase) -> list[int]:
    """The tokens the tokenizer adds before a text (e.g. [BOS]), found by comparing one probe text
    with and without special tokens. Using only the prefix, not the whole special-token template,
    keeps a tokenizer that also appends EOS (add_eos_token) from ending the prompt with EOS."""
    probe = "a"
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    raise DataError(
        f"cannot tell which special tokens the tokenizer adds: {plain} is not inside {full}"
    )
