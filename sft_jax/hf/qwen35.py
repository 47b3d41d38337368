"""Qwen3.5 `config.json` -> ModelConfig, read as transformers reads it (Qwen3_5TextConfig and
Qwen3_5MoeTextConfig defaults for the fields a file may omit).

Qwen3.5 is a hybrid: Gated DeltaNet linear-attention layers and gated full-attention layers
(`layer_types`, else every `full_attention_interval`-th layer full), partial RoPE
(`partial_rotary_factor`, 0.25 by default), RMSNorms applied as (1 + w), per-head q/k norms and a
sigmoid gate on the attention output that q_proj produces next to each head's query.

The Hub's checkpoints are `Qwen3_5ForConditionalGeneration` (or the MoE one): a vision tower
plus the language model under `text_config`. Fine-tuning here is text only: the language model
is read (its weights under `model.language_model.`, as transformers' Qwen3_5ForCausalLM reads
them) and the vision tower and the multi-token-prediction head (`mtp.*`, which transformers
ignores too) are left out; an export is the language model alone, a Qwen3_5ForCausalLM
(`text_only_config`). Qwen3.5-MoE puts the mixture-of-experts layer (softmax top-k routing,
renormalised, plus a sigmoid-gated shared expert, as Qwen2-MoE) in every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sft_jax.model.config import ModelConfig
from sft_jax.model.hybrid import FULL, LINEAR, LinearAttention, layer_period

# Architectures (config.json "architectures") and model types this module reads.
DENSE = ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
MOE = ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
_TEXT_ARCH = {"qwen3_5": "Qwen3_5ForCausalLM", "qwen3_5_moe": "Qwen3_5MoeForCausalLM"}


def is_qwen35(raw: dict) -> bool:
    """Whether config.json describes a Qwen3.5 (dense or MoE) model."""
    names = raw.get("architectures") or []
    return raw.get("model_type") in MODEL_TYPES or any(n in DENSE + MOE for n in names)


def text_config(raw: dict) -> dict:
    """The language model's fields: `text_config` of the multimodal wrapper, else the file."""
    return raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw


def text_only_config(raw: dict) -> dict:
    """config.json of the exported language model: the wrapper's text_config as a
    Qwen3_5(Moe)ForCausalLM (the tying the wrapper applied); other configs unchanged."""
    if "text_config" not in raw or raw.get("model_type") not in _TEXT_ARCH:
        return raw
    text = dict(raw["text_config"])
    text["model_type"] = raw["model_type"] + "_text"
    text["architectures"] = [_TEXT_ARCH[raw["model_type"]]]
    text["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", False))
    return text


def load_qwen35_config(
    raw: dict, file: str, unsupported: Callable[[str], Exception], **section: Any
) -> ModelConfig:
    """ModelConfig of a Qwen3.5 config.json (`section`: dtype, param_dtype, remat);
    `unsupported(why)` builds the error for what our decoder does not compute."""
    text = text_config(raw)
    where = f"{file}: text_config" if text is not raw else file
    moe = raw.get("model_type", "").startswith("qwen3_5_moe") or any(
        n in MOE for n in raw.get("architectures") or []
    )

    def need(key: str, default: int | None = None) -> int:
        value = text.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise unsupported(f"needs '{key}' a positive integer in {where}, got {value!r}")
        return value

    if text.get("hidden_act", "silu") != "silu":
        raise unsupported(f"uses hidden_act={text['hidden_act']!r}")
    if text.get("attention_bias", False):
        raise unsupported("has attention_bias=true")
    num_layers = need("num_hidden_layers", 40 if moe else 32)
    types = text.get("layer_types")
    if types is None:
        interval = need("full_attention_interval", 4)
        types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(num_layers)]
    if len(types) != num_layers:
        raise unsupported(f"has {len(types)} layer_types for {num_layers} layers ({where})")
    try:
        layer_period(tuple(types))
    except ValueError as e:
        raise unsupported(f"{where}: field 'layer_types': {e}") from None
    head_dim = need("head_dim", 256)
    rope = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise unsupported(f"uses rope type {rope.get('rope_type')!r}")
    factor = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    linear = LinearAttention(
        num_key_heads=need("linear_num_key_heads", 16),
        num_value_heads=need("linear_num_value_heads", 32),
        key_head_dim=need("linear_key_head_dim", 128),
        value_head_dim=need("linear_value_head_dim", 128),
        conv_kernel=need("linear_conv_kernel_dim", 4),
    )
    heads = need("num_attention_heads", 16)
    tied = raw if text is not raw else text
    fields = _moe_fields(text, need) if moe else {}
    return ModelConfig(
        vocab_size=need("vocab_size", 248320),
        hidden_size=need("hidden_size", 2048 if moe else 4096),
        intermediate_size=need("intermediate_size", 12288)
        if not moe
        else fields["moe_intermediate_size"],
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=need("num_key_value_heads", 2 if moe else 4),
        head_dim=head_dim,
        rope_theta=float(theta),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(tied.get("tie_word_embeddings", False)),
        qk_norm=True,
        attention_bias=False,
        max_position_embeddings=need("max_position_embeddings", 32768),
        rope_scaling=None,
        norm_offset=True,
        layer_types=tuple(types),
        linear_attention=linear,
        attn_output_gate=True,
        partial_rotary_factor=float(factor),
        **fields,
        **section,
    )


def _moe_fields(text: dict, need: Callable) -> dict[str, Any]:
    """Qwen3.5-MoE: every layer the MoE layer, top-k weights always renormalised."""
    coef = text.get("router_aux_loss_coef", 0.001)
    return {
        "num_experts": need("num_experts", 256),
        "num_experts_per_tok": need("num_experts_per_tok", 8),
        "moe_intermediate_size": need("moe_intermediate_size", 512),
        "shared_expert_intermediate_size": need("shared_expert_intermediate_size", 512),
        "norm_topk_prob": True,
        "router_aux_loss_coef": float(coef),
    }
