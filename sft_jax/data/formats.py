"""Record formats: a raw record (dict) -> one normalised example, or a DataError naming the field.

Every supported format converts into one of three internal records:

* `Row`          prompt/completion text (kept on its exact fast path, see tokenize.py);
* `Text`         plain text for continued pre-training (every token trained);
* `Conversation` a list of messages {role, content, tool_calls?, name?, tool_call_id?,
                 reasoning_content?} plus an optional tools schema, rendered later by a chat
                 template (render.py).

| format            | fields                                                      |
|-------------------|-------------------------------------------------------------|
| text              | text                                                        |
| prompt_completion | prompt, completion                                          |
| alpaca            | instruction, input?, output, system?, history?              |
| sharegpt          | conversations [{from, value}], system?, tools?              |
| messages          | messages [{role, content, ...}], tools?                      |

`format="auto"` picks the format from the fields of each record. `field_map` ("prompt=question,
completion=answer") renames the user's fields to the canonical ones first. Fields that are neither
known nor in `IGNORED_FIELDS`/`ignore_fields` are refused, not ignored, so that a typo such as
"completon" cannot silently drop the text it was meant to carry.

A message key holding None counts as absent (JSONL `"tool_calls": null`; Arrow rows arrive from
source.py with their null fill-ins already dropped).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from sft_jax.data.raw_records import RawRecords
from sft_jax.data.source import (
    DataError,
    EmptyAnswer,
    SkipCounter,
    decode_record,
    expand_files,
    field_error,
    iter_records,
)

FORMATS = ("auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages")
PROMPT_COMPLETION_FIELDS = ("prompt", "completion")
_FIELDS = {
    "text": (("text",), ()),
    "prompt_completion": (PROMPT_COMPLETION_FIELDS, ()),
    "alpaca": (("instruction", "output"), ("input", "system", "history")),
    "sharegpt": (("conversations",), ("system", "tools")),
    "messages": (("messages",), ("tools",)),
}
# A record id (ShareGPT dumps carry one); other metadata fields must be listed in ignore_fields.
IGNORED_FIELDS = ("id",)
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
_MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id", "reasoning_content")
_KNOWN_FIELDS = tuple(sorted({f for req, opt in _FIELDS.values() for f in (*req, *opt)}))


@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt/completion record as read from disk; `source` ("path:line") is for messages."""

    prompt: str
    completion: str
    source: str


@dataclasses.dataclass(frozen=True)
class Text:
    """Plain text for continued pre-training: every token (and the final EOS) is trained."""

    text: str
    source: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Messages as the chat template sees them; `train[i]` False excludes assistant turn i from the
    loss (messages-format `loss_weight: 0`, ShareGPT `weight: 0`)."""

    messages: tuple[dict[str, Any], ...]
    source: str
    tools: tuple[dict[str, Any], ...] | None = None
    train: tuple[bool, ...] | None = None


Example = Row | Text | Conversation


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """How records are read: the format, field renames and extra fields to ignore."""

    format: str = "auto"
    field_map: tuple[tuple[str, str], ...] = ()
    ignore_fields: tuple[str, ...] = ()

    @classmethod
    def parse(cls, fmt: str, field_map: str, ignore_fields: str) -> FormatSpec:
        if fmt not in FORMATS:
            raise DataError(f"data.format is {fmt!r}; choose one of {FORMATS}")
        pairs = []
        for item in filter(None, (p.strip() for p in field_map.split(","))):
            canonical, sep, theirs = item.partition("=")
            if not sep or not canonical.strip() or not theirs.strip():
                raise DataError(f"data.field_map item {item!r} is not 'canonical=field'")
            pairs.append((canonical.strip(), theirs.strip()))
        ignored = tuple(f.strip() for f in ignore_fields.split(",") if f.strip())
        return cls(fmt, tuple(pairs), ignored)


def parse_record(record: dict[str, Any], source: str, spec: FormatSpec) -> Example:
    """One raw record -> Row | Text | Conversation; DataError names source and field."""
    record = _apply_field_map(record, source, spec)
    fmt = spec.format if spec.format != "auto" else detect_format(record, source)
    required, optional = _FIELDS[fmt]
    _check_fields(record, source, fmt, required, optional, spec.ignore_fields)
    if fmt == "text":
        return Text(_string(record, "text", source, nonempty=True), source)
    if fmt == "prompt_completion":
        prompt = _string(record, "prompt", source)
        return Row(
            prompt, _string(record, "completion", source, nonempty=True, answer=True), source
        )
    if fmt == "alpaca":
        return _alpaca(record, source)
    if fmt == "sharegpt":
        return _sharegpt(record, source)
    return _messages(record, source)


def detect_format(record: dict[str, Any], source: str) -> str:
    """The format whose required fields the record has (messages > sharegpt > alpaca > ...)."""
    for fmt in ("messages", "sharegpt", "alpaca", "prompt_completion", "text"):
        if all(k in record for k in _FIELDS[fmt][0]):
            return fmt
    expected = "; ".join(f"{f}: {list(req)}" for f, (req, _) in _FIELDS.items())
    hint = ""
    for key in record:  # a typo ("completon") is the likeliest reason: name the field it means
        close = _close_field(key, _KNOWN_FIELDS) if key not in _KNOWN_FIELDS else None
        if close:
            hint = f"; did you mean '{close}' instead of '{key}'?"
            break
    raise field_error(
        source,
        None,
        f"cannot tell the format from the fields {sorted(record)}{hint}; expected {expected}"
        " (or set data.format and data.field_map)",
    )


def _close_field(key: str, known: Sequence[str]) -> str | None:
    """The known field name closest to `key` (difflib ratio >= 0.6), for "did you mean" hints."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _apply_field_map(record: dict[str, Any], source: str, spec: FormatSpec) -> dict[str, Any]:
    if not spec.field_map:
        return record
    renamed = {theirs for _, theirs in spec.field_map}
    out = {k: v for k, v in record.items() if k not in renamed}
    for canonical, theirs in spec.field_map:
        if theirs not in record:
            continue
        if canonical in out:  # keeping either value would silently drop the other's text
            raise field_error(
                source,
                canonical,
                f"the record has both {theirs!r} (renamed to {canonical!r} by data.field_map) "
                f"and {canonical!r}",
            )
        out[canonical] = record[theirs]
    return out


def _check_fields(record, source, fmt, required, optional, ignored) -> None:
    known = (*required, *optional)
    unknown = [k for k in record if k not in known and k not in IGNORED_FIELDS + ignored]
    if unknown:
        key = unknown[0]
        close = _close_field(key, known)
        hint = f"; did you mean '{close}'?" if close else ""
        others = f" (unknown fields: {unknown})" if len(unknown) > 1 else ""
        raise field_error(
            source,
            key,
            f"unknown field{others}; {fmt} records have the fields {list(known)}{hint} "
            "(list metadata fields in data.ignore_fields)",
        )
    for field in required:
        if field not in record:
            raise field_error(source, field, "missing")


def _string(
    record: dict, field: str, source: str, *, nonempty: bool = False, label=None, answer=False
) -> str:
    value = record.get(field)
    label = label or field
    if not isinstance(value, str):
        raise field_error(source, label, f"must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        kind = EmptyAnswer if answer else DataError
        raise field_error(source, label, "is empty (nothing to train on)", kind)
    return value


def _alpaca(record: dict[str, Any], source: str) -> Conversation:
    """instruction (+ "\\n\\n" + input) -> user; output -> assistant; history pairs before them."""
    messages: list[dict[str, Any]] = []
    if record.get("system"):
        messages.append({"role": "system", "content": _string(record, "system", source)})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise field_error(source, "history", f"must be a list, got {type(history).__name__}")
    for i, pair in enumerate(history):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        ):
            raise field_error(
                source, f"history[{i}]", "must be a [user, assistant] pair of strings"
            )
        messages += [
            {"role": "user", "content": pair[0]},
            {"role": "assistant", "content": pair[1]},
        ]
    user = _string(record, "instruction", source, nonempty=True)
    if record.get("input") is not None:
        extra = _string(record, "input", source)
        user = f"{user}\n\n{extra}" if extra.strip() else user
    messages.append({"role": "user", "content": user})
    messages.append(
        {
            "role": "assistant",
            "content": _string(record, "output", source, nonempty=True, answer=True),
        }
    )
    return Conversation(tuple(messages), source)


def _sharegpt(record: dict[str, Any], source: str) -> Conversation:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise field_error(
            source, "conversations", "must be a non-empty list of {from, value} turns"
        )
    messages: list[dict[str, Any]] = []
    train: list[bool] = []
    if record.get("system"):
        messages.append({"role": "system", "content": _string(record, "system", source)})
        train.append(True)
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise field_error(source, field, f"must be an object, got {type(turn).__name__}")
        extra = [k for k in turn if k not in ("from", "value", "weight")]
        if extra or "from" not in turn or "value" not in turn:
            raise field_error(
                source,
                field,
                f"needs 'from' and 'value' (and optionally 'weight'), got {sorted(turn)}",
            )
        train.append(_weight_flag(turn.get("weight"), source, f"{field}.weight"))
        who = turn["from"]
        if who not in _SHAREGPT_ROLES:
            raise field_error(
                source, f"{field}.from", f"unknown role {who!r}; known: {sorted(_SHAREGPT_ROLES)}"
            )
        value = _string(turn, "value", source, label=f"{field}.value")
        if who == "function_call":
            messages.append(_tool_call_message(value, source, f"{field}.value"))
        else:
            messages.append({"role": _SHAREGPT_ROLES[who], "content": value})
    return _finish(messages, source, _tools(record, source), tuple(train))


def _weight_flag(weight: Any, source: str, field: str) -> bool:
    """A turn's `loss_weight` (messages) or `weight` (ShareGPT, axolotl's convention): 0 = not
    trained, 1, null or absent = trained. Anything else is refused: sft_jax has no fractional
    loss weights, and silently rounding 0.5 either way would train what the user did not ask."""
    if weight is None:
        return True
    if isinstance(weight, int | float) and weight in (0, 1):
        return bool(weight)
    raise field_error(source, field, f"must be 0 (not trained) or 1 (trained), got {weight!r}")


def _tool_call_message(value: str, source: str, field: str) -> dict[str, Any]:
    """ShareGPT function_call value {"name", "arguments"} (JSON) -> an assistant tool call."""
    try:
        call = json.loads(value)
    except json.JSONDecodeError as e:
        raise field_error(source, field, f"function_call is not JSON: {e.msg}") from None
    calls = call if isinstance(call, list) else [call]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise field_error(source, field, "function_call must be {'name': str, 'arguments': {...}}")
    tool_calls = []
    for c in calls:
        arguments = c.get("arguments", {})
        if isinstance(arguments, str):  # double-encoded, as OpenAI sends it
            arguments = _json_arguments(arguments, source, f"{field}.arguments")
        tool_calls.append(
            {"type": "function", "function": {"name": c["name"], "arguments": arguments}}
        )
    return {"role": "assistant", "content": "", "tool_calls": tool_calls}


def _json_arguments(text: str, source: str, field: str) -> dict[str, Any]:
    """Tool-call arguments given as a JSON string (the OpenAI wire format) -> the object.

    Templates serialise arguments with `tojson` (Llama 3.1) or print strings as they are (Qwen3);
    a string would be trained double-encoded ("{\\"city\\": ...}") by the first kind, while an
    object renders right in both."""
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as e:
        raise field_error(source, field, f"is a string but not JSON: {e.msg}") from None
    if not isinstance(arguments, dict):
        raise field_error(
            source, field, f"must be a JSON object of arguments, got {type(arguments).__name__}"
        )
    return arguments


def _tool_calls(calls: Any, source: str, field: str) -> Any:
    """OpenAI tool calls with string `function.arguments` parsed into objects. Other shapes pass
    through to the template unchanged."""
    if not isinstance(calls, list):
        return calls
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            where = f"{field}[{j}].function.arguments"
            function = {
                **function,
                "arguments": _json_arguments(function["arguments"], source, where),
            }
            call = {**call, "function": function}
        out.append(call)
    return out


def _tools(record: dict[str, Any], source: str) -> tuple[dict[str, Any], ...] | None:
    """tools as a list of JSON schemas, or a JSON string of one (glaive/LLaMA-Factory style)."""
    tools = record.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise field_error(source, "tools", f"is a string but not JSON: {e.msg}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise field_error(source, "tools", "must be a list of JSON schema objects")
    return tuple({"type": "function", "function": t} if "type" not in t else t for t in tools)


def _messages(record: dict[str, Any], source: str) -> Conversation:
    turns = record["messages"]
    if not isinstance(turns, list) or not turns:
        raise field_error(
            source, "messages", "must be a non-empty list of {role, content} messages"
        )
    messages, train = [], []
    for i, turn in enumerate(turns):
        field = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise field_error(source, field, f"must be an object, got {type(turn).__name__}")
        extra = [k for k in turn if k not in (*_MESSAGE_KEYS, "loss_weight")]
        if extra:
            raise field_error(
                source, f"{field}.{extra[0]}", f"unknown message field; known: {_MESSAGE_KEYS}"
            )
        role = turn.get("role")
        if role not in ROLES:
            raise field_error(
                source, f"{field}.role", f"unknown or missing role {role!r}; known: {ROLES}"
            )
        # A None key means "absent" (`"tool_calls": null` in JSONL): templates test
        # `'tool_calls' in message` or `message.name is defined`, which a None would satisfy.
        if role in ("user", "system") and turn.get("content") is None:
            # Only an assistant tool-call turn may have none (OpenAI format); a user or system
            # turn without text would be trained on as an empty turn without anyone noticing.
            raise field_error(
                source, f"{field}.content", f"{role} message without content (null or missing)"
            )
        message = {k: v for k, v in turn.items() if k in _MESSAGE_KEYS and v is not None}
        message["content"] = _content(turn.get("content"), source, f"{field}.content")
        for key in ("reasoning_content", "name", "tool_call_id"):  # templates test `is string`
            if key in message and not isinstance(message[key], str):
                kind = type(message[key]).__name__
                raise field_error(source, f"{field}.{key}", f"must be a string, got {kind}")
        if "tool_calls" in message:
            message["tool_calls"] = _tool_calls(
                message["tool_calls"], source, f"{field}.tool_calls"
            )
        messages.append(message)
        train.append(_weight_flag(turn.get("loss_weight"), source, f"{field}.loss_weight"))
    return _finish(messages, source, _tools(record, source), tuple(train))


def _content(content: Any, source: str, field: str) -> str:
    """str, None (tool-call turns) or a list of text parts {type: text, text|value} -> str."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            text = part.get("text", part.get("value")) if isinstance(part, dict) else None
            if (
                not isinstance(part, dict)
                or part.get("type", "text") != "text"
                or not isinstance(text, str)
            ):
                raise field_error(
                    source, f"{field}[{j}]", "only text parts {type: text, text} are supported"
                )
            parts.append(text)
        return "".join(parts)
    raise field_error(
        source, field, f"must be a string or a list of text parts, got {type(content).__name__}"
    )


def _finish(messages, source, tools, train) -> Conversation:
    """Checks that make a conversation trainable: an assistant turn, none of them empty."""
    if not any(m["role"] == "assistant" for m in messages):
        raise field_error(source, None, "conversation has no assistant turn (nothing to train on)")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise field_error(
                source, f"message {i} (assistant)", "empty assistant turn", EmptyAnswer
            )
    return Conversation(tuple(messages), source, tools, train)


def read_examples(
    files: str, spec: FormatSpec, *, on_bad_row: str, errors: list[DataError] | None = None
) -> tuple[list[Example], int]:
    """Every record of `files` (comma-separated paths/globs) as examples; returns (examples,
    skipped). With on_bad_row="error" the first bad record raises; with "skip" it is counted
    (and its error appended to `errors` when given)."""
    counter = SkipCounter(on_bad_row, errors)
    examples: list[Example] = []
    for path in expand_files(files):
        for source, record in iter_records(path):
            try:
                if isinstance(record, DataError):
                    raise record
                examples.append(parse_record(record, source, spec))
            except DataError as error:
                counter.bad(error)
    return examples, counter.finish()


def parse_selected(
    records: RawRecords,
    indices: Iterable[int],
    spec: FormatSpec,
    counter: SkipCounter,
) -> list[Example]:
    """The records at `indices` (of `raw_records.lazy_records`) as examples, in the order given;
    only these are read and parsed. Bad ones raise or are counted by `counter`
    (data.on_bad_row)."""
    examples: list[Example] = []
    for source, item in records.take(indices):
        try:
            record = decode_record(source, item)
            if isinstance(record, DataError):
                raise record
            examples.append(parse_record(record, source, spec))
        except DataError as error:
            counter.bad(error)
    return examples


def read_rows(files: str, *, on_bad_row: str) -> tuple[list[Row], int]:
    """prompt/completion records only (the original reader, kept for callers and tests)."""
    examples, skipped = read_examples(
        files, FormatSpec(format="prompt_completion"), on_bad_row=on_bad_row
    )
    return examples, skipped  # type: ignore[return-value]  # all Rows by construction
