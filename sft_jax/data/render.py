"""Conversations -> tokens + loss mask, by turn-by-turn prefix rendering (works on stock templates).

`return_assistant_tokens_mask` needs `{% generation %}` markers that almost no shipped template has
(without them transformers returns an all-zero mask and only warns). Instead, for every assistant
turn i that is trained we render

    P_i = render(messages[:i], add_generation_prompt=True)   # everything before turn i's content
    F_i = render(messages[:i + 1])                           # ... up to the end of turn i
    full = render(messages)

and require P_i to be a string prefix of F_i and F_i a prefix of `full`. Turn i's trained span is
the characters [len(P_i), len(F_i.rstrip())): its content, its end-of-turn token(s) (<|im_end|>,
<|eot_id|>, <end_of_turn>, an EOS the template writes), but not the whitespace separator the
template puts after the turn. `full` is tokenised once (add_special_tokens=False: the template
writes BOS itself, so there is never a second one) with offsets, and a token is trained when it
*starts* inside a span. If the tokenizer's EOS does not occur in the last assistant turn, EOS is
appended, and trained when that turn is, so the model always learns to stop after what it learns
(a last turn excluded by loss_weight 0 teaches nothing, not even to stop there). Pad is never used
as EOS: the mask is data, padding is segment 0.

A template that renders earlier turns differently once later turns exist (Qwen3 drops the empty
<think></think> of earlier assistant turns; some templates only print the system prompt with the
last user message) breaks the prefix property. We never guess in that case: DataError names the
template, the example and the first differing characters, and suggests train_on="last_assistant"
(only the final turn's prefix must match) or a prefix-preserving training template such as
the named qwen3_thinking (templates.py).

Over-long examples (more than seq_len + 1 tokens) follow data.overlong: "truncate" cuts the end,
"drop" drops the example, "split" cuts a conversation at the ends of assistant turns into pieces
that fit (a piece that alone is too long is truncated, and the example then counts as truncated
too); all of them are counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sft_jax.data.formats import Conversation
from sft_jax.data.source import DataError
from sft_jax.data.templates import ChatTemplate
from sft_jax.data.tokenize import TokenizedExample

TRAIN_ON = ("all_assistant", "last_assistant", "completion", "all")
OVERLONG = ("truncate", "split", "drop")


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A conversation rendered once: text, trained char spans, turn-end boundaries (for split)."""

    text: str
    spans: tuple[tuple[int, int], ...]
    turn_ends: tuple[int, ...]
    last_span: tuple[int, int]  # the final assistant turn, for the EOS check
    last_trained: bool  # is that turn trained (then so is an EOS appended after it)


@dataclasses.dataclass(frozen=True)
class TokenCounts:
    """What happened to over-long examples (all counted and printed before step 0), in examples:
    a split example one of whose pieces had to be cut counts once in `split` and once in
    `truncated`, since tokens of it are lost."""

    truncated: int = 0
    split: int = 0
    dropped: int = 0

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, int, int]:
        return (self.truncated, self.split, self.dropped)


def render_conversation(conv: Conversation, template: ChatTemplate, train_on: str) -> Rendered:
    """Full rendering + trained character spans, verified turn by turn (see module docstring)."""
    msgs, tools = conv.messages, conv.tools
    full = template.render(msgs, tools, add_generation_prompt=False, where=conv.source)
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    trainable = [i for i in assistant if conv.train is None or conv.train[i]]
    if train_on in ("last_assistant", "completion"):
        chosen = trainable[-1:]
    elif train_on == "all_assistant":
        chosen = trainable
    else:
        chosen = []
    last = assistant[-1]
    needed = sorted(set(chosen) | {last})
    spans = {i: _turn_span(conv, template, full, i) for i in needed}
    if train_on == "all":
        trained: tuple[tuple[int, int], ...] = ((0, len(full)),)
    else:
        trained = tuple(spans[i] for i in chosen)
    last_trained = train_on == "all" or last in chosen
    ends = tuple(spans[i][1] for i in needed)
    return Rendered(full, trained, ends, spans[last], last_trained)


def _turn_span(conv: Conversation, template: ChatTemplate, full: str, i: int) -> tuple[int, int]:
    where = conv.source
    before = template.render(conv.messages[:i], conv.tools, add_generation_prompt=True, where=where)
    upto = template.render(
        conv.messages[: i + 1], conv.tools, add_generation_prompt=False, where=where
    )
    _require_prefix(
        before, upto, template, conv, f"messages[:{i}] + generation prompt", f"[:{i + 1}]"
    )
    _require_prefix(upto, full, template, conv, f"messages[:{i + 1}]", "all messages")
    end = len(upto.rstrip())
    return len(before), max(end, len(before))


def _require_prefix(
    prefix: str, text: str, template: ChatTemplate, conv: Conversation, a: str, b: str
) -> None:
    if text.startswith(prefix):
        return
    k = next((j for j, (x, y) in enumerate(zip(prefix, text, strict=False)) if x != y), len(text))
    raise DataError(
        f"{conv.source}: chat template {template.name!r} is not prefix-preserving: the rendering "
        f"of {a} is not a prefix of the rendering of {b}; they differ at character {k}: "
        f"{prefix[max(0, k - 30) : k + 30]!r} vs {text[max(0, k - 30) : k + 30]!r}. The loss "
        "mask cannot be derived safely. Use data.train_on='last_assistant', or a prefix-preserving "
        "training template (data.chat_template=qwen3_thinking, qwen3_nothink, qwen3_5_thinking, "
        "qwen3_5_nothink, or path/to/template.jinja)."
    )


def mask_from_offsets(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> np.ndarray:
    """bool [n]: token t is trained when its first character lies inside a trained span."""
    starts = np.fromiter((o[0] for o in offsets), np.int64, len(offsets))
    mask = np.zeros(len(offsets), bool)
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    return mask


def tokenize_rendered(
    rendered: Sequence[Rendered], sources: Sequence[str], tokenizer: Any, *, train_on: str
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batch tokenisation -> per conversation (tokens int32, mask bool, token-index turn ends)."""
    if not rendered:
        return []
    enc = tokenizer(
        [r.text for r in rendered],
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        verbose=False,
    )
    eos = int(tokenizer.eos_token_id)
    out = []
    for r, ids, offsets, source in zip(
        rendered, enc["input_ids"], enc["offset_mapping"], sources, strict=True
    ):
        tokens = np.asarray(ids, np.int32)
        mask = mask_from_offsets(offsets, r.spans)
        in_last = mask_from_offsets(offsets, [r.last_span])
        if not np.any(tokens[in_last] == eos):  # the template never says "stop": we do
            tokens = np.append(tokens, np.int32(eos))
            mask = np.append(mask, r.last_trained)
        starts = np.fromiter((o[0] for o in offsets), np.int64, len(offsets))
        ends = np.searchsorted(starts, np.asarray(r.turn_ends), side="left")
        ends[-1] = len(tokens)  # the last turn keeps the appended EOS
        if not mask.any():
            raise DataError(f"{source}: no token is trained (train_on={train_on!r})")
        out.append((tokens, mask, ends))
    return out


def fit_length(
    tokens: np.ndarray,
    mask: np.ndarray,
    turn_ends: np.ndarray,
    source: str,
    *,
    seq_len: int,
    overlong: str,
) -> tuple[list[TokenizedExample], TokenCounts]:
    """Applies data.overlong to one example; pieces with no trained target are dropped."""
    limit = seq_len + 1
    if len(tokens) <= limit:
        return [TokenizedExample(tokens, mask, source)], TokenCounts()
    if overlong == "drop":
        return [], TokenCounts(dropped=1)
    if overlong == "split":
        pieces = _split_points(turn_ends, len(tokens), limit)
    else:
        pieces = [(0, len(tokens))]
    out, cut = [], False
    for n, (a, b) in enumerate(pieces):
        cut |= b - a > limit
        b = min(b, a + limit)
        if mask[a + 1 : b].any():  # slot 0 of a row is never a target
            name = source if len(pieces) == 1 else f"{source} (part {n + 1})"
            out.append(TokenizedExample(tokens[a:b], mask[a:b], name))
    counts = TokenCounts(truncated=int(cut), split=int(overlong == "split"))
    if not out:
        counts = counts + TokenCounts(dropped=1)
    return out, counts


def _split_points(turn_ends: np.ndarray, n: int, limit: int) -> list[tuple[int, int]]:
    """Greedy pieces [a, b) cut at turn ends so that each holds at most `limit` tokens if it can."""
    cuts = sorted({int(e) for e in turn_ends if 0 < e < n} | {n})
    pieces, start, prev = [], 0, 0
    for cut in cuts:
        if cut - start > limit and prev > start:
            pieces.append((start, prev))
            start = prev
        prev = cut
    pieces.append((start, n))
    return pieces
