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
*starts* inside a span. When the conversation ends with an assistant turn that is trained and the
template wrote no EOS in it, EOS is appended and trained, so the model learns to stop after what it
learns. Nothing is appended after a final user or tool turn (the model would learn to end the
document once a user has spoken) nor after an untrained final turn (it teaches nothing, not even to
stop there). Only an EOS the template writes counts: EOS *text* inside an answer is content
(control.py). Pad is never used as EOS: the mask is data, padding is segment 0.

Every message's content and every tool call must appear in the rendering: a template that drops
them (Llama 3's stock template has no tool calls, so a tool-call turn would train a bare
<|eot_id|>; some templates drop system prompts) is refused with the example and the template
named, never trained on what it left. Content is looked for without a leading <think> block
(templates move reasoning or drop it from earlier turns by design); a tool call by a marker put in
its name and rendered once more. The reasoning of a trained turn (reasoning_content, or that
<think> block) must appear in the turn's trained span.

A template that renders earlier turns differently once later turns exist (Qwen3 drops the empty
<think></think> of earlier assistant turns; some templates only print the system prompt with the
last user message) breaks the prefix property. We never guess in that case: DataError names the
template, the example and the first differing characters, and suggests train_on="last_assistant"
(only the final turn's prefix must match) or a prefix-preserving training template such as
the named qwen3_thinking (templates.py).

Over-long examples (more than seq_len + 1 tokens) follow data.overlong: "truncate" cuts the end,
"drop" drops the example, "split" cuts a conversation at the ends of assistant turns into pieces
that fit (a piece that alone is too long is truncated, and the example then counts as truncated
too); all of them are counted, and the first few examples of each are named (a conversation
whose trained turn lies wholly past seq_len is dropped, not trained empty).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from sft_jax.data.control import (
    content_spans,
    conversation_fields,
    first_control,
    refuse,
    strings_of,
    tokenize_pieces,
)
from sft_jax.data.formats import Conversation
from sft_jax.data.source import DataError
from sft_jax.data.templates import ChatTemplate
from sft_jax.data.tokenize import TokenizedExample

TRAIN_ON = ("all_assistant", "last_assistant", "completion", "all")
_MARK = "\U000f0001"  # a private-use character: marks tool-call names in a second rendering
OVERLONG = ("truncate", "split", "drop")


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A conversation rendered once: text, trained char spans, turn-end boundaries (for split)."""

    text: str
    spans: tuple[tuple[int, int], ...]
    turn_ends: tuple[int, ...]
    # The final message when it is a trained assistant turn: EOS is looked for in it, and
    # appended (trained) when the template wrote none. None: nothing is appended.
    stop: tuple[int, int] | None
    control: tuple[tuple[int, int], ...] = ()  # special-token text written by content


NAMED = 5  # examples named per kind of loss in the data summary


@dataclasses.dataclass(frozen=True)
class TokenCounts:
    """What happened to examples on the way to tokens (all counted and printed before step 0), in
    examples: a split example one of whose pieces had to be cut counts once in `split` and once in
    `truncated`, since tokens of it are lost. The first few examples truncated, dropped, skipped
    (as bad) or holding special-token text are named ("source (why)") so the summary can point at
    them: a cut example loses its end, never silently."""

    truncated: int = 0
    split: int = 0
    dropped: int = 0
    control_text: int = 0
    named_truncated: tuple[str, ...] = ()
    named_dropped: tuple[str, ...] = ()
    named_skipped: tuple[str, ...] = ()
    named_control: tuple[str, ...] = ()

    def __add__(self, other: TokenCounts) -> TokenCounts:
        out = {}
        for field in dataclasses.fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            out[field.name] = (a + b)[:NAMED] if isinstance(a, tuple) else a + b
        return TokenCounts(**out)


def render_conversation(
    conv: Conversation,
    template: ChatTemplate,
    train_on: str,
    *,
    control: Sequence[str] = (),
    on_control_tokens: str = "warn",
) -> Rendered:
    """Full rendering + trained character spans, verified turn by turn (see module docstring).

    `control`: the tokenizer's special-token texts (control.control_strings); content holding one
    is refused (on_control_tokens="error") or has its spans recorded for tokenisation."""
    msgs, tools = conv.messages, conv.tools
    full = template.render(msgs, tools, add_generation_prompt=False, where=conv.source)
    _check_everything_rendered(conv, template, full)
    literal = _content_control(conv, template, full, control, on_control_tokens)
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
    for i in chosen if train_on != "all" else [last]:
        thought = _reasoning(msgs[i])
        if thought and not _appears(thought, full[spans[i][0] : spans[i][1]]):
            raise _dropped(conv, template, i, REASONING)
    if train_on == "all":
        trained: tuple[tuple[int, int], ...] = ((0, len(full)),)
    else:
        trained = tuple(spans[i] for i in chosen)
    ends_trained = last == len(msgs) - 1 and (train_on == "all" or last in chosen)
    ends = tuple(spans[i][1] for i in needed)
    return Rendered(full, trained, ends, spans[last] if ends_trained else None, literal)


def _content_control(
    conv: Conversation, template: ChatTemplate, full: str, control: Sequence[str], policy: str
) -> tuple[tuple[int, int], ...]:
    """Spans of `full` where content wrote special-token text (control.py); raises for "error"."""
    hit = first_control(conversation_fields(conv.messages, conv.tools), control)
    if hit is None:
        return ()
    if policy == "error":
        raise refuse(conv.source, *hit)

    def render(messages: Any, tools: Any) -> str:
        return template.render(messages, tools, add_generation_prompt=False, where=conv.source)

    try:
        return content_spans(full, render, conv.messages, conv.tools, control)
    except DataError as e:
        raise DataError(f"{conv.source}: chat template {template.name!r}: {e}") from None


def _check_everything_rendered(conv: Conversation, template: ChatTemplate, full: str) -> None:
    """Refuses a template that leaves out a message's content or a tool call (module docstring)."""
    for i, m in enumerate(conv.messages):
        shown = m["content"].split("</think>")[-1].strip()
        if shown and not _appears(shown, full):
            raise _dropped(conv, template, i, "its content")
    calls = [
        (i, j, call)
        for i, m in enumerate(conv.messages)
        for j, call in enumerate(m.get("tool_calls") or [])
        if isinstance(call, dict)
    ]
    if not calls:
        return
    marked = [dict(m) for m in conv.messages]
    for i, j, call in calls:
        marker = f"{_MARK}{i}.{j}{_MARK}"
        call = dict(call)
        if isinstance(call.get("function"), dict):
            call["function"] = {**call["function"], "name": marker}
        if "name" in call:
            call["name"] = marker
        marked[i]["tool_calls"] = [*marked[i]["tool_calls"]]
        marked[i]["tool_calls"][j] = call
    text = template.render(marked, conv.tools, add_generation_prompt=False, where=conv.source)
    for i, j, call in calls:
        arguments = (call.get("function") or call).get("arguments")
        values = [v for _, v in strings_of(arguments, "")] + list(
            arguments if isinstance(arguments, dict) else []
        )
        if f"{_MARK}{i}.{j}{_MARK}" not in text or not all(_appears(v, full) for v in values):
            raise _dropped(conv, template, i, f"tool call {j}")


REASONING = "its reasoning"  # what a refused turn left out, in the error


def _reasoning(message: dict[str, Any]) -> str:
    """A message's reasoning: its reasoning_content, or the <think> block its content starts
    with. A trained turn's reasoning must be in its trained span: a template without reasoning
    (chatml, Llama 3.1, Qwen2.5) would otherwise train the answer alone and drop it silently.
    Earlier, untrained turns may lose theirs (templates drop them from the history by design)."""
    text = message.get("reasoning_content")
    if isinstance(text, str):
        return text.strip()
    content = message["content"]
    if "</think>" not in content:
        return ""
    return content.split("</think>")[0].strip().removeprefix("<think>").strip()


def _appears(needle: str, text: str) -> bool:
    """`needle` in `text`, as written or JSON-escaped (templates that print content with tojson)."""
    return any(
        form in text
        for form in (needle, json.dumps(needle)[1:-1], json.dumps(needle, ensure_ascii=False)[1:-1])
    )


def _dropped(conv: Conversation, template: ChatTemplate, i: int, what: str) -> DataError:
    role = conv.messages[i]["role"]
    if what == REASONING:
        hint = (
            "a thinking model's template (e.g. data.chat_template=qwen3_thinking), or remove the "
            "reasoning from the data if the answers alone are meant"
        )
    else:
        hint = (
            "data.chat_template=path/to/template.jinja; for tool calls e.g. the model family's "
            "tool-calling template"
        )
    return DataError(
        f"{conv.source}: message {i} ({role}): {what} does not appear in the rendering by chat "
        f"template {template.name!r}, which leaves it out; training would teach a conversation "
        f"the data does not hold. Use a template that renders it ({hint})"
    )


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
    rendered: Sequence[Rendered],
    sources: Sequence[str],
    tokenizer: Any,
    *,
    train_on: str,
    on_control_tokens: str = "warn",
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batch tokenisation -> per conversation (tokens int32, mask bool, token-index turn ends).

    Special-token text written by content is tokenised as plain text with on_control_tokens
    "warn", as special tokens with "keep"; either way it never counts as the turn's EOS."""
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
        if r.control and on_control_tokens == "warn":
            tokens, offsets = tokenize_pieces(tokenizer, r.text, r.control)
        mask = mask_from_offsets(offsets, r.spans)
        if r.stop is not None:
            written = mask_from_offsets(offsets, [r.stop]) & ~mask_from_offsets(offsets, r.control)
            if not np.any(tokens[written] == eos):  # the template never says "stop": we do
                tokens = np.append(tokens, np.int32(eos))
                mask = np.append(mask, True)
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
        return [], TokenCounts(dropped=1, named_dropped=(f"{source} (over-long)",))
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
    if cut:
        counts = counts + TokenCounts(named_truncated=(f"{source} ({len(tokens)} tokens)",))
    if not out:  # e.g. last_assistant with the last turn wholly past the cut
        why = f"{source} (no trained token within seq_len={seq_len})"
        counts = counts + TokenCounts(dropped=1, named_dropped=(why,))
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
