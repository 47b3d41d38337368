"""Data audit: problems that do not break a run but silently hurt it.

Reported per category with up to a few example sources each: exact duplicates, empty or placeholder
responses ("{{name}}", "TODO", "N/A", "..."), contradictory answers (one prompt, several different
responses), over-long examples (more than seq_len + 1 tokens before truncation) and train/eval
overlap (the same prompt in both splits).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Any

from sft_jax.data.formats import Conversation, Example, Text
from sft_jax.data.source import Row

_PLACEHOLDER = re.compile(r"\{\{\s*\w+\s*\}\}|^\s*(todo|tbd|n/?a|none|null|\.\.\.|-)\s*$", re.I)
_SHOWN = 5


def prompt_and_response(example: Example) -> tuple[str, str]:
    """A comparable (prompt, response) pair: the conversation before the last assistant turn."""
    if isinstance(example, Row):
        return example.prompt, example.completion
    if isinstance(example, Text):
        return "", example.text
    assert isinstance(example, Conversation)
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    prompt = "\n".join(f"{m['role']}: {m['content']}" for m in example.messages[:last])
    return prompt, example.messages[last]["content"]


def audit(
    train: Sequence[Example], eval_: Sequence[Example], lengths: dict[str, int], seq_len: int
) -> dict[str, Any]:
    """Counts and example sources per category; `lengths` maps source -> token count."""
    pairs = [(prompt_and_response(e), e.source) for e in train]
    found: dict[str, list[str]] = collections.defaultdict(list)
    seen: dict[tuple[str, str], str] = {}
    answers: dict[str, set[str]] = collections.defaultdict(set)
    first: dict[str, str] = {}
    for (prompt, response), source in pairs:
        if (prompt, response) in seen:
            found["duplicates"].append(f"{source} = {seen[(prompt, response)]}")
        seen.setdefault((prompt, response), source)
        if not response.strip() or _PLACEHOLDER.search(response):
            found["empty_or_placeholder"].append(source)
        if prompt:
            answers[prompt].add(response.strip())
            first.setdefault(prompt, source)
    found["contradictory"] = [first[p] for p, a in answers.items() if len(a) > 1]
    found["overlong"] = [s for s, n in lengths.items() if n > seq_len + 1]
    eval_prompts = {prompt_and_response(e)[0]: e.source for e in eval_}
    found["train_eval_overlap"] = [
        f"{source} ~ {eval_prompts[p]}" for (p, _), source in pairs if p and p in eval_prompts
    ]
    keys = ("duplicates", "empty_or_placeholder", "contradictory", "overlong", "train_eval_overlap")
    return {k: {"count": len(found[k]), "examples": found[k][:_SHOWN]} for k in keys}
