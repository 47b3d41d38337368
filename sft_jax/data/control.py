"""Control-token text inside content: finding it, telling it from the template's, tokenising it.

A tokenizer parses its special tokens (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...) out of any text it
is given, so an answer that merely *mentions* `</s>` or `<|im_start|>user` would become real
structure: a turn end in mid-answer, a forged user turn, and an "EOS already written" that stops
render.py from appending the real one. Only the chat template may write structure. For every
conversation whose content (message text, reasoning, tool calls, tool schemas) holds the text of
a special token, `data.on_control_tokens` decides:

* "warn"  (default) the literal text is tokenised as plain text (the tokenizer's
          split_special_tokens), so the model learns the characters the data holds and can never
          be taught to emit structure from content; the rows are counted and named in the data
          summary and in `audit`;
* "keep"  tokenised as special tokens, as transformers does by default (for data that writes
          control tokens on purpose); counted and named the same way;
* "error" the row is bad input (raised, or skipped and counted under data.on_bad_row="skip").

In every case the EOS check of render.py ignores content: only an EOS the template writes counts.

Which occurrences came from content is found by rendering the conversation a second time with
each control string in the content replaced by a same-length run of a private-use character:
the runs mark the content-born positions exactly, because the replacement keeps every length.
The second rendering, restored, must equal the first; a template that treats the replaced text
differently (rare) cannot be told apart and the row is refused.

Prompt/completion and plain-text rows have no template: their text is the structure the user
wrote (a pre-rendered chat prompt is a supported input), so their control-token text stays
special tokens; such rows are still counted and reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sft_jax.data.source import DataError

ON_CONTROL_TOKENS = ("warn", "keep", "error")
_PRIVATE = 0xF0000  # supplementary private-use plane: never in real text, one char per code point


def control_strings(tokenizer: Any) -> tuple[str, ...]:
    """The texts the tokenizer turns into special tokens, longest first (so that a regex finds
    `<|im_start|>` before a shorter token that is a prefix of it). Non-special added tokens
    (Qwen's <think>, <tool_call>) are ordinary vocabulary that content may use."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = {t.content for t in decoder.values() if t.special and t.content}
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


def strings_of(value: Any, field: str) -> Iterator[tuple[str, str]]:
    """(field path, string) for every string inside nested lists and dicts."""
    if isinstance(value, str):
        yield field, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings_of(v, f"{field}.{k}")
    elif isinstance(value, list | tuple):
        for j, v in enumerate(value):
            yield from strings_of(v, f"{field}[{j}]")


def first_control(
    fields: Sequence[tuple[str, str]], strings: Sequence[str]
) -> tuple[str, str] | None:
    """(field, control string) of the first control-token text in `fields`, or None."""
    if not strings:
        return None
    pattern = _pattern(tuple(strings))
    for field, text in fields:
        match = pattern.search(text)
        if match:
            return field, match.group(0)
    return None


def conversation_fields(messages: Sequence[dict], tools: Sequence[dict] | None) -> list:
    """Every string a template may print: messages (by index and role) and tool schemas."""
    out = []
    for i, m in enumerate(messages):
        out += strings_of({k: v for k, v in m.items() if k != "role"}, f"message {i} ({m['role']})")
    out += strings_of(list(tools or []), "tools")
    return out


def refuse(source: str, field: str, text: str) -> DataError:
    """The error of data.on_control_tokens='error', naming row, field and token."""
    return DataError(
        f"{source}: {field} contains the text of the special token {text!r}; the tokenizer "
        "would turn it into real structure. Set data.on_control_tokens='warn' to train it as "
        "plain text, or 'keep' to keep it as a special token"
    )


def content_spans(
    full: str, render: Any, messages: Sequence[dict], tools: Any, strings: Sequence[str]
) -> tuple[tuple[int, int], ...]:
    """Character spans of `full` (the rendering of `messages`) that are control strings written
    by content, not by the template: `render(messages, tools)` is called once more with them
    masked (module docstring). Raises DataError when the masked rendering does not restore."""
    if len(strings) > 0xFFFD:
        raise DataError("too many special tokens to mask")
    index = {s: k for k, s in enumerate(strings)}
    pattern = _pattern(tuple(strings))

    def mask(value: Any) -> Any:
        if isinstance(value, str):
            return pattern.sub(lambda m: chr(_PRIVATE + index[m.group(0)]) * len(m.group(0)), value)
        if isinstance(value, dict):
            return {k: mask(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [mask(v) for v in value]
        return value

    masked = render([mask(m) for m in messages], mask(list(tools)) if tools else None)
    runs = re.compile(f"[{chr(_PRIVATE)}-{chr(_PRIVATE + len(strings) - 1)}]+")
    spans, restored, last = [], [], 0
    for m in runs.finditer(masked):
        text = _unmask(m.group(0), strings)
        if text is None:
            break
        restored += [masked[last : m.start()], text]
        spans.append(m.span())
        last = m.end()
    restored.append(masked[last:])
    if "".join(restored) != full:
        raise DataError(
            "the chat template renders content holding special-token text differently when that "
            "text is masked, so the template's own tokens cannot be told from the content's; "
            "set data.on_control_tokens='keep' or 'error'"
        )
    return tuple(spans)


def _unmask(run: str, strings: Sequence[str]) -> str | None:
    """A run of private-use characters back to the control strings it stands for."""
    out, j = [], 0
    while j < len(run):
        s = strings[ord(run[j]) - _PRIVATE]
        if run[j : j + len(s)] != chr(ord(run[j])) * len(s):
            return None
        out.append(s)
        j += len(s)
    return "".join(out)


def tokenize_pieces(
    tokenizer: Any, text: str, literal: Sequence[tuple[int, int]]
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """`text` tokenised with the character spans `literal` as plain text (their special-token
    text split into ordinary tokens) and the rest as usual -> (ids, offsets into `text`)."""
    cuts = [0, *[p for span in literal for p in span], len(text)]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for k in range(len(cuts) - 1):
        a, b = cuts[k], cuts[k + 1]
        if a == b:
            continue
        enc = tokenizer(
            text[a:b],
            add_special_tokens=False,
            return_offsets_mapping=True,
            split_special_tokens=k % 2 == 1,
            verbose=False,
        )
        ids += enc["input_ids"]
        offsets += [(s + a, e + a) for s, e in enc["offset_mapping"]]
    return np.asarray(ids, np.int32), offsets


_PATTERNS: dict[tuple[str, ...], re.Pattern] = {}


def _pattern(strings: tuple[str, ...]) -> re.Pattern:
    if strings not in _PATTERNS:
        _PATTERNS[strings] = re.compile("|".join(re.escape(s) for s in strings))
    return _PATTERNS[strings]
