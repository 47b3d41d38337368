"""Examples of any format -> TokenizedExamples, in chunks, optionally on several worker processes.

Rendering chat templates is Python (Jinja) work, about 2 renders per assistant turn, so a few
hundred thousand conversations would take minutes on one core. `encode_examples` cuts the list
into chunks and maps them over a `spawn` process pool (fork is unsafe once JAX has started
threads); each worker receives the tokenizer and settings once. Output order equals input order
whatever the worker count, so packing and the data order do not depend on `num_workers`.

Per kind:
* Row (prompt/completion): tokenize.py's exact path (prompt and completion tokenised apart);
  train_on="all" trains the prompt too.
* Text: [BOS] + text + [EOS], every token trained (a tokenizer without BOS starts it with EOS,
  tokenize.py's start token, so that the first word is a target too); overlong "split" cuts it
  into chunks.
* Conversation: render.py (turn-by-turn prefix rendering).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
from collections.abc import Sequence
from typing import Any

import numpy as np

from sft_jax.data.control import (
    content_spans,
    conversation_fields,
    first_control,
    tokenize_pieces,
)
from sft_jax.data.formats import Conversation, Example, Row, Text
from sft_jax.data.render import (
    NAMED,
    TokenCounts,
    fit_length,
    render_conversation,
    tokenize_rendered,
)
from sft_jax.data.source import DataError
from sft_jax.data.templates import ChatTemplate
from sft_jax.data.tokenize import (
    TokenizedExample,
    encode_prompt,
    special_prefix,
    start_token,
    token_ids,
    tokenize_each_row,
)

_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """Everything a worker needs besides the tokenizer."""

    template: ChatTemplate | None  # None when no example needs one
    train_on: str
    seq_len: int
    overlong: str
    on_bad_row: str
    on_control_tokens: str = "warn"
    control: tuple[str, ...] = ()  # the tokenizer's special-token texts (control.py)


@dataclasses.dataclass
class EncodedSplits:
    """A process's encoded data, ready to mix and pack: per own shard and mixture group the
    training examples, per own shard what happened to them, and the held-out examples."""

    train: list[list[list[TokenizedExample]]]  # [own shard][mixture group] -> examples
    counts: list[TokenCounts]  # per own shard
    skipped: list[int]  # per own shard: records skipped as bad
    skipped_unassigned: int  # skipped training records not counted per shard
    weights: list[float] | None  # mixture weights
    eval_examples: list[TokenizedExample]
    eval_prompts: list[EvalPrompt]
    skipped_eval: int
    template: ChatTemplate | None  # the chat template, when some example is a conversation
    not_only_text: bool  # some example is not plain text


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """A held-out generation prompt: token ids up to the answer, and the reference answer."""

    prompt_ids: list[int]
    reference: str
    source: str


def encode_examples(
    examples: Sequence[Example], tokenizer: Any, settings: EncodeSettings, *, num_workers: int
) -> tuple[list[TokenizedExample], TokenCounts, int]:
    """Returns (tokenized examples in input order, over-length counts, skipped bad examples)."""
    chunks = [list(examples[i : i + _CHUNK]) for i in range(0, len(examples), _CHUNK)]
    if num_workers <= 1 or len(chunks) <= 1:
        results = [_encode_chunk(c, tokenizer, settings) for c in chunks]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            num_workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(tokenizer, settings),
        ) as pool:
            results = list(pool.map(_worker_chunk, chunks))
    out: list[TokenizedExample] = []
    counts, skipped = TokenCounts(), 0
    for examples_part, counts_part, skipped_part in results:
        out.extend(examples_part)
        counts, skipped = counts + counts_part, skipped + skipped_part
    return out, counts, skipped


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, settings: EncodeSettings) -> None:
    _WORKER["tokenizer"], _WORKER["settings"] = tokenizer, settings


def _worker_chunk(chunk: list[Example]) -> tuple[list[TokenizedExample], TokenCounts, int]:
    return _encode_chunk(chunk, _WORKER["tokenizer"], _WORKER["settings"])


def _encode_chunk(
    chunk: list[Example], tokenizer: Any, settings: EncodeSettings
) -> tuple[list[TokenizedExample], TokenCounts, int]:
    """One chunk, all three kinds; results are put back in chunk order. Counts are summed kind
    by kind (rows, texts, skipped conversations, conversations), which orders the named ones."""
    each, order = _encode_each(chunk, tokenizer, settings)
    counts = TokenCounts()
    for k in order:
        counts = counts + each[k].counts
    return [ex for result in each for ex in result.pieces], counts, sum(r.skipped for r in each)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One example's encoding: its pieces (none when dropped or skipped), what happened to it,
    and whether it was skipped as bad (on_bad_row="skip"; its reason is in counts)."""

    pieces: list[TokenizedExample]
    counts: TokenCounts
    skipped: bool = False


def encode_each(
    examples: Sequence[Example], tokenizer: Any, settings: EncodeSettings, *, num_workers: int
) -> list[Encoded]:
    """Like `encode_examples`, per example (in input order): the tokenisation cache keeps each
    record's encoding on its own, so any later selection of records can be assembled from it."""
    chunks = [list(examples[i : i + _CHUNK]) for i in range(0, len(examples), _CHUNK)]
    if num_workers <= 1 or len(chunks) <= 1:
        results = [_encode_each(c, tokenizer, settings)[0] for c in chunks]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            num_workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(tokenizer, settings),
        ) as pool:
            results = list(pool.map(_worker_each, chunks))
    return [result for part in results for result in part]


def _worker_each(chunk: list[Example]) -> list[Encoded]:
    return _encode_each(chunk, _WORKER["tokenizer"], _WORKER["settings"])[0]


def _encode_each(
    chunk: list[Example], tokenizer: Any, settings: EncodeSettings
) -> tuple[list[Encoded], list[int]]:
    """Per example of the chunk, its encoding; and the order in which `_encode_chunk` sums their
    counts (rows, texts, skipped conversations, conversations)."""
    each = [Encoded([], TokenCounts()) for _ in chunk]
    order: list[int] = []
    rows = [(k, e) for k, e in enumerate(chunk) if isinstance(e, Row)]
    texts = [(k, e) for k, e in enumerate(chunk) if isinstance(e, Text)]
    convs = [(k, e) for k, e in enumerate(chunk) if isinstance(e, Conversation)]
    for part in (
        _encode_rows(rows, tokenizer, settings),
        _encode_texts(texts, tokenizer, settings),
    ):
        for k, pieces, c in part:
            each[k] = Encoded(pieces, c)
            order.append(k)
    conv_results, skipped = _encode_conversations(convs, tokenizer, settings)
    for n, (k, error) in enumerate(skipped):
        named = (error,) if n < NAMED else ()
        each[k] = Encoded([], TokenCounts(named_skipped=named), skipped=True)
        order.append(k)
    for k, pieces, c in conv_results:
        each[k] = Encoded(pieces, c)
        order.append(k)
    return each, order


def _encode_rows(rows, tokenizer, settings):
    """prompt/completion rows on the exact fast path; "split" acts like "truncate" (a row has one
    turn boundary only), "drop" drops over-long rows. Everything is counted."""
    results = tokenize_each_row([r for _, r in rows], tokenizer, seq_len=settings.seq_len)
    out = []
    for (k, row), (example, truncated) in zip(rows, results, strict=True):
        fields = [("prompt", row.prompt), ("completion", row.completion)]
        counts = _control_counts(row.source, fields, settings)
        if truncated and settings.overlong == "drop":
            dropped = (f"{row.source} (over-long)",)
            out.append((k, [], counts + TokenCounts(dropped=1, named_dropped=dropped)))
            continue
        if example is not None and settings.train_on == "all":
            example = dataclasses.replace(example, loss_mask=np.ones_like(example.loss_mask))
        if example is None:
            why = f"{row.source} (no completion token within seq_len={settings.seq_len})"
            counts = counts + TokenCounts(truncated=1, dropped=1, named_dropped=(why,))
        else:
            named = (f"{row.source} (over-long)",) if truncated else ()
            counts = counts + TokenCounts(truncated=int(truncated), named_truncated=named)
        out.append((k, [example] if example is not None else [], counts))
    return out


def _control_counts(source: str, fields: list, settings: EncodeSettings) -> TokenCounts:
    """Counts (and names) an example whose text holds special-token text (control.py)."""
    hit = first_control(fields, settings.control)
    if hit is None:
        return TokenCounts()
    return TokenCounts(control_text=1, named_control=(f"{source} ({hit[0]}: {hit[1]!r})",))


def _encode_texts(texts, tokenizer, settings):
    """[prefix] + text + [EOS], all trained (continued pre-training)."""
    if not texts:  # the prefix probe costs two tokenizer calls
        return []
    prefix = special_prefix(tokenizer) or [start_token(tokenizer)]  # every token a target
    eos = int(tokenizer.eos_token_id)
    encoded = token_ids(tokenizer, [t.text for _, t in texts])
    out = []
    for (k, text), ids in zip(texts, encoded, strict=True):
        tokens = np.asarray([*prefix, *ids, eos], np.int32)
        ends = np.arange(settings.seq_len + 1, len(tokens), settings.seq_len + 1)
        pieces, counts = fit_length(
            tokens,
            np.ones(len(tokens), bool),
            ends,
            text.source,
            seq_len=settings.seq_len,
            overlong=settings.overlong,
        )
        control = _control_counts(text.source, [("text", text.text)], settings)
        out.append((k, pieces, counts + control))
    return out


def _encode_conversations(convs, tokenizer, settings):
    """Render, tokenise the batch, fit lengths; a conversation that fails to render or trains no
    token is skipped (counted, the first few named) or raised per on_bad_row.
    Returns (per kept conversation: (index, pieces, counts), per skipped one: (index, error);
    render failures first, then those that train no token)."""
    kept, rendered, errors = [], [], []
    for k, conv in convs:
        try:
            if settings.template is None:
                raise DataError(f"{conv.source}: a chat example needs data.chat_template")
            rendered.append(
                render_conversation(
                    conv,
                    settings.template,
                    settings.train_on,
                    control=settings.control,
                    on_control_tokens=settings.on_control_tokens,
                )
            )
            kept.append((k, conv))
        except DataError as error:
            if settings.on_bad_row == "error":
                raise
            errors.append((k, str(error)))
    kept, tokenized, untrained = _tokenize_kept(kept, rendered, tokenizer, settings)
    errors += untrained
    out = []
    for (k, conv), (tokens, mask, ends) in zip(kept, tokenized, strict=True):
        pieces, counts = fit_length(
            tokens, mask, ends, conv.source, seq_len=settings.seq_len, overlong=settings.overlong
        )
        fields = conversation_fields(conv.messages, conv.tools)
        out.append((k, pieces, counts + _control_counts(conv.source, fields, settings)))
    return out, errors


def _tokenize_kept(kept, rendered, tokenizer, settings):
    """tokenize_rendered on the whole batch (fast); when it refuses one conversation (no token
    trained) and on_bad_row is "skip", again one by one to drop and count only the refused ones.
    Returns (kept, tokenized, (index, message) of the skipped)."""
    sources = [conv.source for _, conv in kept]

    def tokenize(batch: list, names: list) -> list:
        return tokenize_rendered(
            batch,
            names,
            tokenizer,
            train_on=settings.train_on,
            on_control_tokens=settings.on_control_tokens,
        )

    try:
        return kept, tokenize(rendered, sources), []
    except DataError:
        if settings.on_bad_row == "error":
            raise
    survivors, tokenized, errors = [], [], []
    for item, one, source in zip(kept, rendered, sources, strict=True):
        try:
            tokenized += tokenize([one], [source])
            survivors.append(item)
        except DataError as error:
            errors.append((item[0], str(error)))
    return survivors, tokenized, errors


def encode_held_out(
    examples: Sequence[Example], tokenizer: Any, settings: EncodeSettings
) -> tuple[list[TokenizedExample], list[EvalPrompt], int]:
    """Held-out examples -> (tokenized, generation prompts, skipped bad examples).

    Encoded one by one (there are at most data.max_eval_examples) so that an example skipped as
    bad (on_bad_row="skip": it failed to render, or trains no token) gives no generation prompt
    either; one dropped as over-long is still a valid prompt and keeps it.
    """
    encoded: list[TokenizedExample] = []
    prompts: list[EvalPrompt] = []
    skipped = 0
    for example in examples:
        pieces, _, bad = _encode_chunk([example], tokenizer, settings)
        encoded.extend(pieces)
        skipped += bad
        if bad:
            continue
        prompt = eval_prompt(
            example,
            tokenizer,
            settings.template,
            settings.on_bad_row,
            control=settings.control,
            on_control_tokens=settings.on_control_tokens,
        )
        if prompt is not None:
            prompts.append(prompt)
    return encoded, prompts, skipped


def eval_prompt(
    example: Example,
    tokenizer: Any,
    template: ChatTemplate | None,
    on_bad_row: str = "error",
    *,
    control: Sequence[str] = (),
    on_control_tokens: str = "warn",
) -> EvalPrompt | None:
    """The generation prompt of a held-out example (None for plain text, which has no answer).

    prompt/completion: exactly `encode_prompt` (the training prefix). Conversations: the messages
    before the last assistant turn rendered with the generation prompt; reference = that turn;
    special-token text in their content is tokenised as training tokenised it (control.py).
    A prompt that fails to render raises, or with on_bad_row="skip" gives None (no prompt).
    """
    if isinstance(example, Row):
        return EvalPrompt(
            encode_prompt(tokenizer, example.prompt), example.completion, example.source
        )
    if not isinstance(example, Conversation) or template is None:
        return None
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    messages, tools = example.messages[:last], example.tools

    def render(messages: Any, tools: Any) -> str:
        return template.render(messages, tools, add_generation_prompt=True, where=example.source)

    try:
        text, literal = render(messages, tools), ()
        if on_control_tokens == "warn" and first_control(
            conversation_fields(messages, tools), control
        ):
            literal = content_spans(text, render, messages, tools, control)
    except DataError:
        if on_bad_row == "error":
            raise
        return None
    if literal:
        ids = tokenize_pieces(tokenizer, text, literal)[0].tolist()
    else:
        ids = token_ids(tokenizer, [text])[0]
    return EvalPrompt(ids, example.messages[last]["content"], example.source)
