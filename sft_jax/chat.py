"""A conversation's side of generation: the prompt it becomes and the ids that end a reply.

`encode` renders messages with the tokenizer's chat template (for a workdir, the template used
in training, set on the tokenizer by `sft_jax.api.from_trained`) and a generation prompt; a
tokenizer without a template gets the raw text, encoded with its special tokens (BOS).
`chat_stops` gives what ends a reply: EOS (generation_config's eos ids, plus the tokenizer's) and
the template's end of turn, one token or several. The `python -m sft_jax.generate` command and
`sft_jax.load(...).generate` both use these, so the command line and Python stop alike; this
module does not import the decoder, which imports it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sft_jax.data.templates import ChatTemplate, Stops, generation_stops, template_variables


def stop_ids(tokenizer: Any, model_dir: str) -> list[int]:
    """EOS and end-of-turn ids: generation_config.json's eos_token_id(s) and the tokenizer's."""
    ids = {tokenizer.eos_token_id}
    path = os.path.join(model_dir, "generation_config.json") if model_dir else ""
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def chat_stops(tokenizer: Any, model_dir: str) -> Stops:
    """`stop_ids` plus the end of turn of the tokenizer's chat template (when it has one)."""
    source = getattr(tokenizer, "chat_template", None)
    template = None
    if isinstance(source, str) and source:
        template = ChatTemplate("chat", source, template_variables(tokenizer))
    turn = generation_stops(template, tokenizer)
    ids = tuple(sorted(set(stop_ids(tokenizer, model_dir)) | set(turn.ids)))
    return Stops(ids, turn.sequences, turn.texts)


def encode(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation, ready for the assistant's reply."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n".join(m["content"] for m in messages))
