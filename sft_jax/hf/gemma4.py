"""Gemma 4 `config.json` -> ModelConfig, read as transformers reads it (Gemma4TextConfig's
defaults for the fields a file may omit; its per-layer overrides from `per_layer_config`, else
from `global_head_dim` and `num_global_key_value_heads` as Gemma4TextConfig derives them).

The Hub ships Gemma 4 as `Gemma4ForConditionalGeneration` (model_type "gemma4": vision and
audio towers plus the language model under `text_config`); text-only fine-tuning reads the
language model (its tensors under `model.language_model.`) and an export is that same class,
the towers' tensors copied through from the source (sft_jax/hf/layout.py). `Gemma4ForCausalLM`
files (model_type "gemma4_text") load and export as themselves.

The mixture-of-experts block (`enable_moe_block`: `num_experts`, `top_k_experts`,
`moe_intermediate_size`) runs sft_jax/model/moe.py's layer beside the dense MLP, its top-k
weights renormalised as Gemma4TextRouter does; transformers computes no load-balancing loss
for it, so its coefficient stays 0.

What our decoder does not compute is refused here, naming the file and the field:
bidirectional attention over all tokens, attention biases, another activation or RoPE type.
`gemma4_moe_specs` names the block's tensors for sft_jax/hf/params.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from sft_jax.hf.tensor_spec import TensorSpec, linear_spec
from sft_jax.model.config import ModelConfig
from sft_jax.model.gemma4_config import FULL, SLIDING, Gemma4Features

CAUSAL_LM = "Gemma4ForCausalLM"
MULTIMODAL = "Gemma4ForConditionalGeneration"
MODEL_TYPES = ("gemma4", "gemma4_text")
# The multimodal checkpoint's other modules, which import skips and export copies through.
MULTIMODAL_MODULES = (
    "model.vision_tower.",
    "model.audio_tower.",
    "model.embed_vision.",
    "model.embed_audio.",
)
# Gemma4TextConfig's defaults (transformers' configuration_gemma4.py).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "sliding_window": 512,
    "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 256,
    "global_head_dim": 512,
}
_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def is_gemma4(raw: dict) -> bool:
    """Whether config.json describes a Gemma 4 model (text or multimodal)."""
    names = raw.get("architectures") or []
    return raw.get("model_type") in MODEL_TYPES or any(n in (CAUSAL_LM, MULTIMODAL) for n in names)


def is_gemma4_multimodal(raw: dict) -> bool:
    names = raw.get("architectures") or []
    return MULTIMODAL in names or (not names and raw.get("model_type") == "gemma4")


def load_gemma4_config(
    raw: dict, file: str, unsupported: Callable[[str], Exception], **section: Any
) -> ModelConfig:
    """ModelConfig of a Gemma 4 config.json (`section`: dtype, param_dtype, remat);
    `unsupported(why)` builds the error for what our decoder does not compute."""
    text = (raw.get("text_config") or {}) if is_gemma4_multimodal(raw) else raw
    if not isinstance(text, dict):
        raise unsupported(f"needs 'text_config' a JSON object in {file}")
    where = "text_config." if text is not raw else ""  # messages name fields as f"{where}{key}"
    text = {**_DEFAULTS, **text}

    def need(key: str) -> int:
        value = text.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise unsupported(f"needs field '{where}{key}' a positive integer, got {value!r}")
        return value

    _refuse_features(text, where, unsupported)
    types = _layer_types(text, need("num_hidden_layers"), where, unsupported)
    local_rope, full_rope = _rope(text, where, unsupported)
    softcap = text.get("final_logit_softcapping")
    tied = raw if text is not raw and "tie_word_embeddings" in raw else text
    try:
        return ModelConfig(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=len(types),
            num_heads=need("num_attention_heads"),
            num_kv_heads=need("num_key_value_heads"),
            head_dim=need("head_dim"),
            rope_theta=float(full_rope["rope_theta"]),
            local_rope_theta=float(local_rope["rope_theta"]),
            rms_norm_eps=float(text["rms_norm_eps"]),
            tie_embeddings=bool(tied.get("tie_word_embeddings", True)),
            qk_norm=True,
            attention_bias=False,
            max_position_embeddings=need("max_position_embeddings"),
            rope_scaling=None,
            norm_scale_float32=True,
            embed_scale=True,
            mlp_activation="gelu_tanh",
            sandwich_norms=True,
            final_softcap=None if softcap is None else float(softcap),
            query_scale=1.0,  # no score scaling: transformers' Gemma4TextAttention.scaling = 1
            sliding_window=need("sliding_window") if SLIDING in types else None,
            local_layers=tuple(t == SLIDING for t in types),
            gemma4=_features(text, types, full_rope, where, need, unsupported),
            **_moe_fields(text, need),
            **section,
        )
    except ValueError as e:
        raise unsupported(f"is a config our decoder cannot run: {e}") from None


def _features(
    text: dict, types: list[str], full_rope: dict, where: str, need: Callable,
    unsupported: Callable,
) -> Gemma4Features:  # fmt: skip
    """What Gemma 4 adds to the layer (Gemma4Features), with the fields' checks."""
    shared = text.get("num_kv_shared_layers") or 0
    first = len(types) - shared
    if not isinstance(shared, int) or not 0 <= shared <= len(types):
        raise unsupported(f"has field '{where}num_kv_shared_layers'={shared!r}")
    if set(types[first:]) - set(types[:first]):
        raise unsupported(
            f"has field '{where}num_kv_shared_layers'={shared}: a layer sharing keys and values "
            "needs an earlier layer of its type to read them from"
        )
    global_head_dim, global_kv = _full_layer_shape(text, types, where, unsupported)
    per_layer = text.get("hidden_size_per_layer_input") or 0
    return Gemma4Features(
        global_head_dim=global_head_dim or need("global_head_dim"),
        global_kv_heads=global_kv or need("num_key_value_heads"),
        global_rotary_factor=float(full_rope.get("partial_rotary_factor", 1.0)),
        global_rope_factor=float(full_rope.get("factor", 1.0)),
        kv_shared_layers=shared,
        k_eq_v=bool(text.get("attention_k_eq_v", False)),
        double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        per_layer_input_size=per_layer and need("hidden_size_per_layer_input"),
        per_layer_vocab_size=need("vocab_size_per_layer_input") if per_layer else 0,
    )


def _moe_fields(text: dict, need: Callable) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields of `enable_moe_block` (none without it)."""
    if not text.get("enable_moe_block"):
        return {}
    return {
        "num_experts": need("num_experts"),
        "num_experts_per_tok": need("top_k_experts"),
        "moe_intermediate_size": need("moe_intermediate_size"),
        "norm_topk_prob": True,
    }


def _refuse_features(text: dict, where: str, unsupported: Callable) -> None:
    act = text.get("hidden_activation") or text.get("hidden_act")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise unsupported(f"uses field '{where}hidden_activation'={act!r}")
    if text.get("use_bidirectional_attention") == "all":
        raise unsupported(
            f"has field '{where}use_bidirectional_attention'='all' (we attend causally)"
        )
    if text.get("attention_bias"):
        raise unsupported(f"has field '{where}attention_bias'=true")


def _layer_types(text: dict, num_layers: int, where: str, unsupported: Callable) -> list[str]:
    """`layer_types`, else every 6th layer full; the last layer always full (transformers
    forces it)."""
    types = text.get("layer_types")
    if types is None:
        types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
    types = list(types)
    if len(types) != num_layers or set(types) - {SLIDING, FULL}:
        raise unsupported(
            f"field '{where}layer_types' must name {num_layers} layers as {SLIDING!r} or "
            f"{FULL!r}, got {types}"
        )
    types[-1] = FULL
    return types


def _full_layer_shape(
    text: dict, types: list[str], where: str, unsupported: Callable
) -> tuple[int | None, int | None]:
    """(head dim, kv heads) of the full-attention layers from `per_layer_config` (None: not
    given, so `global_head_dim` / the model's kv heads, as Gemma4TextConfig derives them)."""
    overrides = text.get("per_layer_config")
    if overrides is None:
        kv = text.get("num_global_key_value_heads") if text.get("attention_k_eq_v") else None
        return None, kv
    by_layer = {int(k): v for k, v in overrides.items()}
    full = {tuple(sorted(by_layer.get(i, {}).items())) for i, t in enumerate(types) if t == FULL}
    sliding = [i for i, t in enumerate(types) if t == SLIDING and by_layer.get(i)]
    if (
        len(full) > 1
        or sliding
        or set(dict(next(iter(full), ()))) - {"head_dim", "num_key_value_heads"}
    ):
        raise unsupported(
            f"field '{where}per_layer_config' overrides more than the full-attention layers' "
            f"head_dim and num_key_value_heads, alike in all of them ({overrides})"
        )
    shape = dict(next(iter(full), ()))
    return shape.get("head_dim"), shape.get("num_key_value_heads")


def _rope(text: dict, where: str, unsupported: Callable) -> tuple[dict, dict]:
    """(sliding layers', full layers') rope parameters, as transformers accepts them."""
    params = text.get("rope_parameters") or _ROPE
    local, full = params.get(SLIDING) or {}, params.get(FULL) or {}
    if local.get("rope_type", "default") != "default" or "rope_theta" not in local:
        raise unsupported(
            f"field '{where}rope_parameters' must give {SLIDING!r} a default RoPE with a "
            f"rope_theta, got {local}"
        )
    if (
        full.get("rope_type", "default") not in ("default", "proportional")
        or "rope_theta" not in full
    ):
        raise unsupported(
            f"field '{where}rope_parameters' must give {FULL!r} a default or proportional "
            f"RoPE with a rope_theta, got {full}"
        )
    if full.get("rope_type", "default") == "default":
        full = {"rope_theta": full["rope_theta"]}  # every frequency rotates, unscaled
    return local, full


def gemma4_moe_specs(c: ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
    """One Gemma 4 layer's mixture-of-experts block (relative to layers/layer_{j}): its router
    with its scales, its experts fused as transformers stores them (gate_up_proj [E, 2F, D],
    gate rows then up rows; down_proj [E, D, F]) and its three norms."""
    d, f, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    layer = "model.layers.{i}."
    swap = lambda w: w.transpose(0, 2, 1)
    fuse = lambda gate, up: np.concatenate([swap(gate), swap(up)], axis=1)
    up = ("moe", "experts", "up_proj")
    gate_up = TensorSpec(
        layer + "experts.gate_up_proj", (e, 2 * f, d), lambda w: swap(w[:, :f]), fuse, joins=(up,)
    )
    specs = {
        ("moe", "router", "kernel"): linear_spec((e,), (d,), layer + "router.proj.weight"),
        ("moe", "router_scale"): TensorSpec(layer + "router.scale", (d,)),
        ("moe", "per_expert_scale"): TensorSpec(layer + "router.per_expert_scale", (e,)),
        ("moe", "experts", "gate_proj"): gate_up,
        up: dataclasses.replace(gate_up, convert=lambda w: swap(w[:, f:]), joins=(), joined=True),
        ("moe", "experts", "down_proj"): TensorSpec(
            layer + "experts.down_proj", (e, d, f), swap, swap
        ),
    }
    for ours, theirs in (
        ("moe_norm", "pre_feedforward_layernorm_2"),
        ("post_mlp_norm_1", "post_feedforward_layernorm_1"),
        ("post_moe_norm", "post_feedforward_layernorm_2"),
    ):
        specs[ours, "scale"] = TensorSpec(f"{layer}{theirs}.weight", (d,))
    return specs
