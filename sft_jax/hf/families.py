"""Family-specific reading of config.json, kept out of config.py's common path.

Gemma 3 4B/12B/27B ship as `Gemma3ForConditionalGeneration` (model_type "gemma3"): the language
model's config is the `text_config` sub-dict (a Gemma3TextConfig, whose defaults fill the many
fields the Hub's files omit), next to a `vision_config`. We fine-tune the language model only:
`text_config` is read as a `Gemma3ForCausalLM` config, the checkpoint's language-model tensors
load (sft_jax.hf.params finds them under `model.language_model.` or the older
`language_model.model.`), and an export copies the vision tower and projector through from the
source checkpoint untouched, under the source's config.json, so transformers loads it back as
the same multimodal class.
"""

from __future__ import annotations

from typing import Any

from sft_jax.hf.errors import ModelFileError, UnsupportedModelError

GEMMA3_MULTIMODAL = "Gemma3ForConditionalGeneration"
# Gemma3TextConfig's defaults for the fields config.json may omit (transformers'
# configuration_gemma3.py); the Hub's multimodal files give only a few of them.
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "tie_word_embeddings": True,
}


def is_gemma3_multimodal(raw: dict) -> bool:
    return GEMMA3_MULTIMODAL in (raw.get("architectures") or []) or (
        not raw.get("architectures") and raw.get("model_type") == "gemma3"
    )


def text_config(raw: dict, file: str) -> dict:
    """The config.json fields of the language model to fine-tune: a Gemma 3 multimodal file's
    `text_config` as a Gemma3ForCausalLM config; a Gemma 3 text file with Gemma3TextConfig's
    defaults filled in; any other file as it is."""
    if raw.get("model_type") == "gemma3_text" or "Gemma3ForCausalLM" in (
        raw.get("architectures") or []
    ):
        return {**GEMMA3_TEXT_DEFAULTS, **raw}
    if not is_gemma3_multimodal(raw):
        return raw
    text = raw.get("text_config") or {}
    if not isinstance(text, dict):
        raise ModelFileError(f"{file}: 'text_config' must be a JSON object")
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise UnsupportedModelError(
            f"{file}: {GEMMA3_MULTIMODAL} with a text_config of model_type "
            f"{text['model_type']!r} (only gemma3_text loads)"
        )
    if raw.get("tie_word_embeddings", True) is False or text.get("tie_word_embeddings") is False:
        raise UnsupportedModelError(
            f"{file}: {GEMMA3_MULTIMODAL} with an untied LM head (tie_word_embeddings=false)"
        )
    return {
        **GEMMA3_TEXT_DEFAULTS,
        **text,
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        # transformers' multimodal class never applies it (only Gemma3ForCausalLM does).
        "final_logit_softcapping": None,
    }
