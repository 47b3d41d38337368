"""Hub ids in, local directories out: `meta-llama/Llama-3.2-1B` -> a snapshot directory.

Resolved once at the edge (the command line), so every later stage and the saved config see a
local path. Only model files are fetched (config, safetensors, tokenizer, chat template,
generation config), never pickled `.bin` weights. Tests never download: they run with
HF_HUB_OFFLINE=1, where an unknown id fails with the message below.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(path: str) -> bool:
    """`owner/name` that is not an existing local path."""
    return bool(path) and not os.path.exists(path) and bool(_HUB_ID.fullmatch(path))


def resolve_model_dir(path: str) -> str:
    """A local directory for `path`: itself when local, else a Hub snapshot of its model files."""
    if not looks_like_hub_id(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=path, allow_patterns=MODEL_FILES)
    except Exception as e:  # offline, unknown repo, gated model, no network: all user-facing
        raise FileNotFoundError(
            f"'{path}' is not a local directory, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Pass a local "
            "directory with config.json and model.safetensors, or log in / go online."
        ) from e


def resolve_config_hub_ids(config: Any) -> Any:
    """A Config with a Hub id in model.path / data.tokenizer replaced by its local snapshot
    directory (downloaded once, safetensors and tokenizer files only); local paths unchanged."""
    model = dataclasses.replace(config.model, path=resolve_model_dir(config.model.path))
    data_section = dataclasses.replace(
        config.data, tokenizer=resolve_model_dir(config.data.tokenizer)
    )
    return dataclasses.replace(config, model=model, data=data_section)


def absolute_local_paths(config: Any) -> Any:
    """A Config whose local paths (model.path, data.tokenizer, a .jinja data.chat_template,
    lora.init_from) are absolute. The workdir's config.json records them, and export, generate
    and `sft_jax.load` read them later, from whatever directory they are run in."""
    from sft_jax.data.templates import BUILTIN_TEMPLATES

    absolute = lambda path: os.path.abspath(path) if path else path
    template = config.data.chat_template
    if template != "tokenizer" and template not in BUILTIN_TEMPLATES and os.path.isfile(template):
        template = os.path.abspath(template)
    model = dataclasses.replace(config.model, path=absolute(config.model.path))
    data_section = dataclasses.replace(
        config.data, tokenizer=absolute(config.data.tokenizer), chat_template=template
    )
    lora = dataclasses.replace(config.lora, init_from=absolute(config.lora.init_from))
    return dataclasses.replace(config, model=model, data=data_section, lora=lora)
