"""config.json written for a model with no source checkpoint (a random init): the HF family
whose computation equals the ModelConfig (Llama, Qwen2, Qwen3, or the mixture-of-experts family
that matches), or UnsupportedModelError when none does. Reading config.json is
sft_jax/hf/config.py's."""

from __future__ import annotations

from typing import Any

from sft_jax.hf import families
from sft_jax.hf.errors import UnsupportedModelError
from sft_jax.model.config import ModelConfig


def hf_config_dict(c: ModelConfig, *, bos_token_id: Any, eos_token_id: Any) -> dict[str, Any]:
    """config.json for a model with no source checkpoint (random init): Llama, or Qwen2 (q/k/v
    biases) or Qwen3 (q/k norm), the HF families whose computation equals that config; for a
    mixture-of-experts config, the MoE family whose computation equals it (`_moe_family`)."""
    gpt_oss = (c.attention_sinks, c.o_proj_bias, c.router_bias, c.expert_bias, c.swiglu_limit)
    if any(gpt_oss) or (c.rope_scaling is not None and c.rope_scaling.rope_type == "yarn"):
        raise UnsupportedModelError(
            "gpt-oss features (attention sinks, o_proj/router/expert biases, clamped SwiGLU, "
            "YaRN) are exported only with their source checkpoint's config.json"
        )
    if families.needs_source(c):
        raise UnsupportedModelError("only Llama-style configs can be exported without a source")
    if c.qk_norm and c.attention_bias:
        raise UnsupportedModelError("no HF family has both q/k norm and q/k/v-only biases")
    if c.qk_norm_full and not c.is_moe:
        raise UnsupportedModelError("no dense HF family normalises q/k over all heads")
    arch, model_type = "LlamaForCausalLM", "llama"
    if c.is_moe:
        arch, model_type = _moe_family(c)
    elif c.qk_norm:
        arch, model_type = "Qwen3ForCausalLM", "qwen3"
    elif c.attention_bias:
        arch, model_type = "Qwen2ForCausalLM", "qwen2"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    s = c.rope_scaling
    if s is not None and s.rope_type == "linear":
        rope.update(rope_type="linear", factor=s.factor)
    elif s is not None:
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    } | (_moe_config_fields(c, arch) if c.is_moe else {})


def _moe_family(c: ModelConfig) -> tuple[str, str]:
    """(architecture, model_type) of the MoE family that computes what `c` does: q/k norm over
    all heads is OLMoE, per head Qwen3-MoE, a shared expert Qwen2-MoE, plain routing with
    renormalised top-k weights Mixtral."""
    if c.qk_norm_full and not c.shared_expert_intermediate_size:
        if c.head_dim * c.num_heads != c.hidden_size:
            raise UnsupportedModelError("OLMoE needs head_dim * num_heads == hidden_size")
        return "OlmoeForCausalLM", "olmoe"
    if c.qk_norm and not c.qk_norm_full and not c.shared_expert_intermediate_size:
        return "Qwen3MoeForCausalLM", "qwen3_moe"
    if c.shared_expert_intermediate_size and not c.qk_norm:
        return "Qwen2MoeForCausalLM", "qwen2_moe"
    if not (c.qk_norm or c.attention_bias) and c.norm_topk_prob:
        return "MixtralForCausalLM", "mixtral"
    raise UnsupportedModelError(
        "no HF mixture-of-experts family computes this config (q/k norm "
        f"{'over all heads' if c.qk_norm_full else c.qk_norm}, attention_bias="
        f"{c.attention_bias}, shared expert {c.shared_expert_intermediate_size}, "
        f"norm_topk_prob={c.norm_topk_prob})"
    )


def _moe_config_fields(c: ModelConfig, arch: str) -> dict[str, Any]:
    """The MoE fields of config.json, named as `arch` names them."""
    fields: dict[str, Any] = {
        "num_experts_per_tok": c.num_experts_per_tok,
        "router_aux_loss_coef": c.router_aux_loss_coef,
        "output_router_logits": False,
    }
    if arch in ("MixtralForCausalLM", "OlmoeForCausalLM"):  # the expert width is intermediate_size
        fields["intermediate_size"] = c.moe_intermediate_size
    else:
        fields["moe_intermediate_size"] = c.moe_intermediate_size
        fields.update(decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)
    if arch == "MixtralForCausalLM":
        fields.update(num_local_experts=c.num_experts, sliding_window=None, router_jitter_noise=0.0)
    else:
        fields.update(num_experts=c.num_experts, norm_topk_prob=c.norm_topk_prob)
    if arch == "Qwen2MoeForCausalLM":
        fields.update(
            shared_expert_intermediate_size=c.shared_expert_intermediate_size,
            qkv_bias=c.attention_bias,
        )
    if arch == "OlmoeForCausalLM":
        fields["clip_qkv"] = None
    return fields
