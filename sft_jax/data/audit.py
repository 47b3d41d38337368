"""Data audit: problems that do not break a run but silently hurt it, or that a run would refuse.

Reported per category with a count and up to a few examples each:

* duplicates            the same prompt and answer twice ("a:7 = a:2");
* empty_or_placeholder  empty answers (rows a run refuses, counted here instead of aborting) and
                        placeholder answers ("{{name}}", "TODO", "N/A", "...");
* contradictory         one prompt with different answers, both rows named ("a:3 vs a:9");
* overlong              more than seq_len + 1 tokens before data.overlong acts;
* dropped               dropped whole by data.overlong (e.g. a last turn cut off at seq_len);
* control_text          content holding special-token text (data.on_control_tokens);
* bad_rows              rows a run refuses or skips for any other reason (a template error, a
                        template that drops a message, nothing trained), with the reason;
* train_eval_overlap    the same prompt in the training and held-out data.

`audit` returns the JSON-ready dict; `summary` the same as lines a person reads.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Any

from sft_jax.data.formats import Conversation, Example, Row, Text
from sft_jax.data.render import TokenCounts
from sft_jax.data.source import DataError, EmptyAnswer

_PLACEHOLDER = re.compile(r"\{\{\s*\w+\s*\}\}|^\s*(todo|tbd|n/?a|none|null|\.\.\.|-)\s*$", re.I)
_SHOWN = 5
CATEGORIES = {
    "duplicates": "duplicate examples",
    "empty_or_placeholder": "empty or placeholder answers",
    "contradictory": "prompts with contradictory answers",
    "overlong": "over-long examples (longer than seq_len + 1 tokens)",
    "dropped": "examples dropped whole by data.overlong",
    "control_text": "examples holding special-token text (data.on_control_tokens)",
    "bad_rows": "rows a run would refuse or skip",
    "train_eval_overlap": "training prompts also in the held-out data",
}


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
    train: Sequence[Example],
    eval_: Sequence[Example],
    lengths: dict[str, int],
    seq_len: int,
    *,
    errors: Sequence[DataError] = (),
    counts: TokenCounts | None = None,
    skipped: int = 0,
) -> dict[str, Any]:
    """Counts and example sources per category. `lengths` maps source -> token count; `errors`
    are the rows that failed to read (skipped), `counts` and `skipped` what encoding the training
    examples with the run's settings reported (encode_examples with on_bad_row="skip")."""
    counts = counts or TokenCounts()
    found: dict[str, list[str]] = collections.defaultdict(list)
    total: dict[str, int] = {}
    pairs = [(prompt_and_response(e), e.source) for e in train]
    seen: dict[tuple[str, str], str] = {}
    answers: dict[str, dict[str, str]] = collections.defaultdict(dict)  # prompt -> answer -> src
    for (prompt, response), source in pairs:
        if (prompt, response) in seen:
            found["duplicates"].append(f"{source} = {seen[(prompt, response)]}")
        seen.setdefault((prompt, response), source)
        if not response.strip() or _PLACEHOLDER.search(response):
            found["empty_or_placeholder"].append(source)
        if prompt:
            answers[prompt].setdefault(response.strip(), source)
    for error in errors:
        kind = "empty_or_placeholder" if isinstance(error, EmptyAnswer) else "bad_rows"
        found[kind].append(str(error))
    found["contradictory"] = [
        " vs ".join(list(a.values())[:2]) for a in answers.values() if len(a) > 1
    ]
    found["overlong"] = [s for s, n in lengths.items() if n > seq_len + 1]
    eval_prompts = {prompt_and_response(e)[0]: e.source for e in eval_}
    found["train_eval_overlap"] = [
        f"{source} ~ {eval_prompts[p]}" for (p, _), source in pairs if p and p in eval_prompts
    ]
    found["dropped"], total["dropped"] = list(counts.named_dropped), counts.dropped
    found["control_text"], total["control_text"] = list(counts.named_control), counts.control_text
    found["bad_rows"] += counts.named_skipped
    total["bad_rows"] = len(found["bad_rows"]) - len(counts.named_skipped) + skipped
    return {
        k: {"count": total.get(k, len(found[k])), "examples": found[k][:_SHOWN]} for k in CATEGORIES
    }


def summary(report: dict[str, Any], n_train: int, n_eval: int) -> str:
    """The audit as lines for a person: one per category with its first examples."""
    problems = sum(v["count"] for v in report.values())
    lines = [f"audit of {n_train} training and {n_eval} held-out examples: {problems} finding(s)"]
    for key, title in CATEGORIES.items():
        entry = report[key]
        lines.append(f"{entry['count']:>7}  {title} [{key}]")
        lines += [f"           {example}" for example in entry["examples"]]
    return "\n".join(lines)
