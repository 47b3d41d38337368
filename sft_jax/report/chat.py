"""Reading a generation sample for the run report: the prompt's chat turns, and why the output was
marked wrong.

A sample's prompt is the decoded text the model saw, template markers included when they are not
special tokens of the tokenizer (stories260K with ChatML), so a conversation arrives as one long
line of `<|im_start|>user\\n...<|im_end|>`; split back into role-labelled turns it can be read.
The explanation follows the rule that decided "correct" (the first of eval.match, see
sft_jax/evaluation/evaluate.py): a reader should not have to diff two strings by eye to see that the
model answered "quiet.<|im" where "quiet." was expected, that is, it did not stop.
"""

from __future__ import annotations

import re
from typing import Any

# Turn markers of the common templates: (regex of a turn's header capturing the role, end token).
_MARKED = (
    (re.compile(r"<\|im_start\|>(\w+)\n?"), "<|im_end|>"),  # ChatML, Qwen
    (re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n*"), "<|eot_id|>"),  # Llama 3
    (re.compile(r"<start_of_turn>(\w+)\n?"), "<end_of_turn>"),  # Gemma
)
# The built-in alpaca and plain templates (sft_jax/data/templates.py): header -> role.
_LABELLED = (
    {"### Instruction:\n": "user", "### Response:\n": "assistant"},
    {"Human: ": "user", "Assistant:": "assistant"},
)
_BOS = ("<|begin_of_text|>", "<bos>", "<s>")
_EOS = ("</s>", "<eos>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>")
QUOTE_CHARS = 40  # longest excerpt quoted in an explanation


def chat_turns(row: dict[str, Any]) -> list[tuple[str, str]] | None:
    """[(role, text), ...] of a sample's prompt, the last one ("assistant", "") where generation
    starts; None when the prompt is not a recognisable chat (plain prompt/completion data)."""
    messages = row.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return [(str(m.get("role", "?")), str(m.get("content", ""))) for m in messages]
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        return None
    for header, end in _MARKED:
        if header.search(prompt):
            return _split(prompt, header, lambda m: m.group(1), end)
    for labels in _LABELLED:  # only when the prompt ends with the generation prompt
        generation_prompt = next(h for h, role in labels.items() if role == "assistant")
        if prompt.rstrip().endswith(generation_prompt.strip()):
            header = re.compile("|".join(re.escape(h) for h in labels))
            return _split(prompt, header, lambda m, labels=labels: labels[m.group(0)], "")
    return None


def _split(prompt: str, header: re.Pattern, role_of: Any, end: str) -> list[tuple[str, str]]:
    """Turns between successive headers; text before the first (a system prompt in alpaca and
    plain) becomes a "system" turn, beginning-of-sequence tokens dropped."""
    heads = list(header.finditer(prompt))
    preamble = prompt[: heads[0].start()]
    for bos in _BOS:
        preamble = preamble.replace(bos, "")
    turns = [("system", preamble.strip())] if preamble.strip() else []
    for i, found in enumerate(heads):
        stop = heads[i + 1].start() if i + 1 < len(heads) else len(prompt)
        text = prompt[found.end() : stop]
        if end:
            text = text.split(end)[0]
        text = text.strip()
        while text.endswith(_EOS):  # alpaca and plain end an answer with EOS
            text = text[: -len(next(e for e in _EOS if text.endswith(e)))].rstrip()
        turns.append((role_of(found), text))
    return turns


def quote(text: str) -> str:
    """A short excerpt quoted as Python does, so newlines and trailing spaces stay visible."""
    return repr(text) if len(text) <= QUOTE_CHARS else repr(text[:QUOTE_CHARS]) + "…"


def first_difference(expected: str, got: str) -> tuple[str, int]:
    """How `got` departs from `expected`, and the index in `got` where it does."""
    k = 0
    while k < min(len(expected), len(got)) and expected[k] == got[k]:
        k += 1
    if not got:
        return f"the output is empty; expected {quote(expected)}.", 0
    if k == len(expected):
        return (
            f"the output starts with the expected {quote(expected)} but goes on with "
            f"{quote(got[k:])}: the model did not stop after the answer.",
            k,
        )
    if k == len(got):
        return f"the output stops early: {quote(expected[k:])} is missing at the end.", k
    where = f"at character {k + 1}" if k else "from the first character"
    case = " (they differ only in letter case)" if expected.lower() == got.lower() else ""
    return (
        f"they differ {where}: expected {quote(expected[k:])}, got {quote(got[k:])}{case}.",
        k,
    )


def explain_sample(reference: Any, output: Any, rule: str, pattern: str) -> tuple[str, int | None]:
    """(why `output` fails `rule` against `reference`, the index in `output` where the wrong part
    starts, or None when no single place is to blame)."""
    reference, output = str(reference or ""), str(output or "")
    lead = len(output) - len(output.lstrip())
    if rule == "exact":
        why, at = first_difference(reference.strip(), output.strip())
        return "exact match (whitespace around both ignored): " + why, lead + at
    if rule == "contains":
        why = f"contains: the expected {quote(reference.strip())} does not occur in the output"
        if reference.strip().lower() in output.lower():
            why += " (it does with other letter case)"
        return why + ".", None
    if rule == "regex":
        # Lazy: the evaluation module pulls in the model code, which a page without a regex
        # rule does not need.
        from sft_jax.evaluation.evaluate import extract_answer

        try:
            compiled = re.compile(pattern)
        except re.error as e:
            return f"regex: eval.answer_regex {quote(pattern)} does not compile ({e}).", None
        got = extract_answer(output, compiled)
        if got is None:
            return f"regex: eval.answer_regex {quote(pattern)} finds no answer in the output.", None
        expected = extract_answer(reference, compiled) or reference.strip()
        why, at = first_difference(expected, got)
        start = output.find(got)
        return f"regex: extracted {quote(got)}, expected {quote(expected)}; " + why, (
            start + at if start >= 0 else None
        )
    return f"the {rule!r} rule judged it wrong.", None
