"""Chat templates: which Jinja template renders a conversation, and rendering it in a sandbox.

`data.chat_template` is one of:

* "tokenizer"  the tokenizer's own template (tokenizer_config.json / chat_template.jinja);
* "chatml", "alpaca", "plain"  the built-ins below;
* a name from NAMED_TEMPLATES: prefix-preserving training variants of thinking models' stock
  templates (qwen3_thinking, qwen3_nothink, and the same for qwen3_5 and qwen3_6), shipped in
  sft_jax/assets/chat_templates; see docs/data.md for when to use which;
* a path to a .jinja file (for example a model family's template from chat-templates/).

Rendering goes through transformers' `render_jinja_template`, which compiles templates in jinja2's
`ImmutableSandboxedEnvironment` (templates are untrusted code: no attribute escapes, no mutation of
our objects), with the same globals the models' templates expect (raise_exception, strftime_now,
tojson) and the tokenizer's special tokens (bos_token, eos_token, ...) as variables. A render is
also bounded, since a template is a program that can loop for ever or print without end:
`ChatTemplate.render` fails with a DataError once one rendering has run `RENDER_SECONDS` or written
`RENDER_CHARS` characters (both far beyond any real conversation). The checks ride on the compiled
template's sandbox environment: its `concat` (which joins the output chunks) and `call` (which
sandboxed code goes through for every call, `range()` included), so a loop that calls or prints
anything is stopped; only nested loops over literal lists that neither call nor print escape
them. Recursion ends in Python's RecursionError, reported the same way.

The built-ins begin with `bos_token` when the tokenizer has one (as Llama's own templates do), so a
rendered conversation is tokenised with add_special_tokens=False and never gets a second BOS. The
alpaca and plain built-ins end each assistant turn with `eos_token`, so the model learns to stop;
chatml ends turns with <|im_end|>, and render.py appends EOS after the last assistant turn whenever
the template does not emit it.

End of turn: whatever a template writes right after an assistant answer (<|im_end|>, <|eot_id|>,
<end_of_turn>, </s>) is what the trained model emits to end its turn, so generation and
evaluation stop there (`end_of_turn`). It must be one token of the tokenizer: spelled out in
several tokens (chatml's <|im_end|> on a tokenizer that lacks it) the model would learn a
delimiter that inference servers never stop at, and it could occur inside ordinary text.
`load_chat_template` refuses such a pairing and names the templates that work with the tokenizer.
We do not add the delimiters as new tokens: that would grow the embedding (rows that LoRA does
not train) and change the tokenizer the export must copy byte for byte.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from sft_jax.assets import asset_path
from sft_jax.data.source import DataError

logger = logging.getLogger(__name__)

BUILTIN_TEMPLATES = {
    "chatml": (
        "{{ bos_token or '' }}"
        "{%- for m in messages %}"
        "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{%- for call in m.get('tool_calls') or [] %}"
        "{{- '\n<tool_call>\n' + (call['function'] | tojson) + '\n</tool_call>' }}"
        "{%- endfor %}"
        "{{- '<|im_end|>\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    ),
    "alpaca": (
        "{{ bos_token or '' }}"
        "{%- for m in messages %}"
        "{%- if m['role'] == 'system' %}{{- m['content'] + '\n\n' }}"
        "{%- elif m['role'] == 'user' %}{{- '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{%- elif m['role'] == 'assistant' %}"
        "{{- '### Response:\n' + m['content'] + (eos_token or '') + '\n\n' }}"
        "{%- else %}{{- raise_exception('the alpaca template has no ' + m['role'] + ' role') }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}"
    ),
    "plain": (
        "{{ bos_token or '' }}"
        "{%- for m in messages %}"
        "{%- if m['role'] == 'system' %}{{- m['content'] + '\n\n' }}"
        "{%- elif m['role'] == 'user' %}{{- 'Human: ' + m['content'] + '\n\n' }}"
        "{%- elif m['role'] == 'assistant' %}"
        "{{- 'Assistant: ' + m['content'] + (eos_token or '') + '\n\n' }}"
        "{%- else %}{{- raise_exception('the plain template has no ' + m['role'] + ' role') }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
    ),
}

# Prefix-preserving variants of stock templates that drop earlier turns' <think> blocks (each
# file's header says what changed); name -> file under sft_jax/assets/chat_templates.
NAMED_TEMPLATES = {
    name: f"chat_templates/{name}.jinja"
    for family in ("qwen3", "qwen3_5", "qwen3_6")
    for name in (f"{family}_thinking", f"{family}_nothink")
}
_PROBE = "Probe answer 7."  # assistant content for finding a template's end of turn


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A template's Jinja source, the name it is reported under, and the variables it sees."""

    name: str
    source: str
    variables: tuple[tuple[str, Any], ...]

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        *,
        add_generation_prompt: bool,
        where: str,
    ) -> str:
        """Renders in the sandbox; template errors become DataError naming template and example."""
        import jinja2
        from transformers.utils.chat_template_utils import render_jinja_template

        _bound_environment(self.source)
        _LIMIT.deadline, _LIMIT.chars = time.monotonic() + RENDER_SECONDS, 0
        try:
            rendered, _ = render_jinja_template(
                conversations=[list(messages)],
                tools=list(tools) if tools else None,
                chat_template=self.source,
                add_generation_prompt=add_generation_prompt,
                **dict(self.variables),
            )
        except _RenderLimit as e:
            raise DataError(
                f"{where}: chat template {self.name!r} {e} while rendering {len(messages)} "
                "message(s); a template that loops or prints without end is broken"
            ) from None
        except RecursionError:
            raise DataError(
                f"{where}: chat template {self.name!r} recursed without end while rendering "
                f"{len(messages)} message(s)"
            ) from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise DataError(
                f"{where}: chat template {self.name!r} failed to render "
                f"{len(messages)} message(s): {type(e).__name__}: {e}"
            ) from None
        finally:
            _LIMIT.deadline = None
        return rendered[0]


RENDER_SECONDS = 10.0  # one rendering of one conversation; real ones take milliseconds
RENDER_CHARS = 1 << 25  # 33M characters, some millions of tokens: beyond any seq_len
_LIMIT = threading.local()  # this thread's deadline (None outside ChatTemplate.render) and size


class _RenderLimit(Exception):
    """Raised inside the template's code when the render runs out of time or size."""


def _check_limit(chars: int = 0) -> None:
    deadline = getattr(_LIMIT, "deadline", None)
    if deadline is None:
        return
    _LIMIT.chars += chars
    if _LIMIT.chars > RENDER_CHARS:
        raise _RenderLimit(f"wrote more than {RENDER_CHARS} characters")
    if time.monotonic() > deadline:
        raise _RenderLimit(f"ran longer than {RENDER_SECONDS:g} s")


def _bound_environment(source: str) -> None:
    """Installs the checks on the sandbox environment transformers compiled `source` in (one per
    template, cached by transformers); outside `ChatTemplate.render` they do nothing."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    env = _compile_jinja_template(source).environment
    if getattr(env, "_sft_jax_bounded", False):
        return

    def concat(chunks: Any) -> str:
        out = []
        for chunk in chunks:
            _check_limit(len(chunk))
            out.append(chunk)
        return "".join(out)

    def checked(method: Any) -> Any:  # (not on getattr/getitem: they cost more than they catch)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _check_limit()
            return method(*args, **kwargs)

        return wrapper

    env.concat = concat
    env.call = checked(env.call)
    env._sft_jax_bounded = True


def load_chat_template(spec: str, tokenizer: Any) -> ChatTemplate:
    """'tokenizer', a built-in or named template or a .jinja path -> ChatTemplate with the
    tokenizer's tokens; refused when its end of turn is not one token (module docstring)."""
    if spec == "tokenizer":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise DataError(
                "data.chat_template is 'tokenizer' but the tokenizer has no chat template; set "
                f"data.chat_template to {_working_builtins(tokenizer)} or a .jinja file"
            )
        name = f"tokenizer:{getattr(tokenizer, 'name_or_path', '?')}"
    elif spec in BUILTIN_TEMPLATES:
        source, name = BUILTIN_TEMPLATES[spec], spec
    elif spec in NAMED_TEMPLATES or os.path.isfile(spec):
        path = asset_path(NAMED_TEMPLATES[spec]) if spec in NAMED_TEMPLATES else spec
        try:
            with open(path, encoding="utf-8") as f:
                source, name = f.read(), spec
        except UnicodeDecodeError as e:
            raise DataError(
                f"chat template {spec!r} is not UTF-8 text (byte {e.start}: {e.reason})"
            ) from None
    else:
        raise DataError(
            f"data.chat_template {spec!r} is neither 'tokenizer', a built-in "
            f"{sorted(BUILTIN_TEMPLATES)}, a named template {sorted(NAMED_TEMPLATES)}, nor an "
            "existing .jinja file"
        )
    _check_syntax(source, name)
    template = ChatTemplate(name, source, template_variables(tokenizer))
    _warn_without_generation_prompt(template)
    text, ids = end_of_turn(template, tokenizer)
    if len(ids) > 1:
        raise DataError(
            f"chat template {name!r} ends an assistant turn with {text!r}, which the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} splits into {len(ids)} tokens, so the "
            "model could not learn to stop and inference would not stop there; use "
            f"data.chat_template={_working_builtins(tokenizer)}, or a template whose turns end "
            "with one of the tokenizer's special tokens"
        )
    return template


def _check_syntax(source: str, name: str) -> None:
    """Compiles the template once when it is loaded: a Jinja syntax error is the template's
    fault, not any row's, so it stops the run here with the template's name and line (rendering
    would otherwise raise it from the first example, outside the errors it reports)."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(
            f"chat template {name!r} is not valid Jinja: line {e.lineno}: {e.message}"
        ) from None


_WARNED: set[str] = set()  # templates already warned about in this process


def _warn_without_generation_prompt(template: ChatTemplate) -> None:
    """A template that ignores add_generation_prompt but writes an assistant header leaves that
    header out of the prompt, so the trained span of every assistant turn starts with it
    (`<|assistant|>` is trained, not only the answer). That matches how such a template is used
    at inference (the model writes the header), but it is not the usual mask: say so once.
    Templates whose answer follows the prompt directly (Mistral's `[/INST]`) have no header."""
    if template.name in _WARNED:
        return
    _WARNED.add(template.name)
    user = [{"role": "user", "content": "Hello."}]
    try:
        bare = template.render(user, None, add_generation_prompt=False, where="probe")
        prompt = template.render(user, None, add_generation_prompt=True, where="probe")
        full = template.render(
            [*user, {"role": "assistant", "content": _PROBE}],
            None,
            add_generation_prompt=False,
            where="probe",
        )
    except DataError:  # needs a system message or image content: the rows decide
        return
    header = full[len(bare) : full.find(_PROBE)] if full.startswith(bare) else ""
    if prompt == bare and _PROBE in full and header.strip():
        logger.warning(
            "chat template %r writes nothing for add_generation_prompt, so the assistant header "
            "%r is trained with every answer (at inference the model writes it itself)",
            template.name,
            header,
        )


def end_of_turn(template: ChatTemplate, tokenizer: Any) -> tuple[str, tuple[int, ...]]:
    """(text, token ids) of the delimiter that ends an assistant turn, as training tokenises it.

    It is the first token the template writes after the answer when that is one of the
    tokenizer's own (added or special) tokens: "<|im_end|>", "<|eot_id|>", "<end_of_turn>",
    "</s>" (whatever follows it, such as phi3's EOS or command-a's next-turn header, comes after
    the stop). Otherwise it is all the text written there, in however many tokens that takes;
    ("", ()) when only whitespace follows, and render.py then appends EOS; ("", ()) too for a
    template that cannot render a plain user/assistant pair (one that needs a system message or
    image content): the data's own rows then decide whether it renders, and EOS still stops.
    """
    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": _PROBE}]
    try:
        rendered = template.render(messages, None, add_generation_prompt=False, where="probe")
    except DataError:
        return "", ()
    at = rendered.rfind(_PROBE)
    rest = rendered[at + len(_PROBE) :] if at >= 0 else ""
    text = rest.strip()
    if not text:
        return "", ()
    after, end = at + len(_PROBE), at + len(_PROBE) + rest.index(text) + len(text)
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    pieces = [  # tokens starting after the answer (a SentencePiece "▁word" starts at its space)
        (int(i), (a, b))
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        if after <= a < end
    ]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    if pieces and pieces[0][0] in special:
        first, (a, b) = pieces[0]
        return rendered[a:b], (first,)
    return text, tuple(i for i, _ in pieces)


@dataclasses.dataclass(frozen=True)
class Stops:
    """Where generation ends: token ids, multi-token id sequences, and texts to cut a decoded
    answer at (an end of turn the model spelled in other tokens)."""

    ids: tuple[int, ...]
    sequences: tuple[tuple[int, ...], ...] = ()
    texts: tuple[str, ...] = ()


def generation_stops(template: ChatTemplate | None, tokenizer: Any) -> Stops:
    """EOS plus the template's end of turn (`end_of_turn`): what a model trained on `template`
    emits when its answer is complete."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = () if eos is None else (int(eos),)
    if template is None:
        return Stops(ids)
    text, turn = end_of_turn(template, tokenizer)
    if len(turn) == 1:
        return Stops(tuple(dict.fromkeys((*ids, *turn))), (), (text,))
    return Stops(ids, (turn,) if turn else (), (text,) if text else ())


def _working_builtins(tokenizer: Any) -> str:
    """The built-in names whose end of turn is one token of this tokenizer ("plain" always is:
    it ends turns with EOS), as 'a', 'b' or 'c'."""
    names = []
    for name, source in BUILTIN_TEMPLATES.items():
        _, ids = end_of_turn(ChatTemplate(name, source, template_variables(tokenizer)), tokenizer)
        if len(ids) <= 1:
            names.append(repr(name))
    return ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1]


def template_variables(tokenizer: Any) -> tuple[tuple[str, Any], ...]:
    """The special-token strings templates read (bos_token, eos_token, ...); "" when unset."""
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return tuple((n, str(getattr(tokenizer, n, None) or "")) for n in names)
