"""Chat templates: which Jinja template renders a conversation, and rendering it in a sandbox.

`data.chat_template` is one of:

* "tokenizer"  the tokenizer's own template (tokenizer_config.json / chat_template.jinja);
* "chatml", "alpaca", "plain"  the built-ins below;
* a path to a .jinja file (for example a model family's template from chat-templates/).

Rendering goes through transformers' `render_jinja_template`, which compiles templates in jinja2's
`ImmutableSandboxedEnvironment` (templates are untrusted code: no attribute escapes, no mutation of
our objects), with the same globals the models' templates expect (raise_exception, strftime_now,
tojson) and the tokenizer's special tokens (bos_token, eos_token, ...) as variables.

The built-ins begin with `bos_token` when the tokenizer has one (as Llama's own templates do), so a
rendered conversation is tokenised with add_special_tokens=False and never gets a second BOS. The
alpaca and plain built-ins end each assistant turn with `eos_token`, so the model learns to stop;
chatml ends turns with <|im_end|>, and render.py appends EOS after the last assistant turn whenever
the template does not emit it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from sft_jax.data.source import DataError

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

        try:
            rendered, _ = render_jinja_template(
                conversations=[list(messages)],
                tools=list(tools) if tools else None,
                chat_template=self.source,
                add_generation_prompt=add_generation_prompt,
                **dict(self.variables),
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise DataError(
                f"{where}: chat template {self.name!r} failed to render "
                f"{len(messages)} message(s): {type(e).__name__}: {e}"
            ) from None
        return rendered[0]


def load_chat_template(spec: str, tokenizer: Any) -> ChatTemplate:
    """'tokenizer', a built-in name or a .jinja path -> ChatTemplate with the tokenizer's tokens."""
    if spec == "tokenizer":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise DataError(
                "data.chat_template is 'tokenizer' but the tokenizer has no chat template; set "
                f"data.chat_template to one of {sorted(BUILTIN_TEMPLATES)} or a .jinja file"
            )
        name = f"tokenizer:{getattr(tokenizer, 'name_or_path', '?')}"
    elif spec in BUILTIN_TEMPLATES:
        source, name = BUILTIN_TEMPLATES[spec], spec
    elif os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            source, name = f.read(), spec
    else:
        raise DataError(
            f"data.chat_template {spec!r} is neither 'tokenizer', a built-in "
            f"{sorted(BUILTIN_TEMPLATES)}, nor an existing .jinja file"
        )
    return ChatTemplate(name, source, template_variables(tokenizer))


def template_variables(tokenizer: Any) -> tuple[tuple[str, Any], ...]:
    """The special-token strings templates read (bos_token, eos_token, ...); "" when unset."""
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return tuple((n, str(getattr(tokenizer, n, None) or "")) for n in names)
