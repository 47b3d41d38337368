"""`config.json` <-> ModelConfig.

Only what the decoder in `sft_jax.model.decoder` computes exactly is accepted; anything else
(another architecture, an unknown RoPE scaling, a sliding window our model would not apply the way
HF does, an o_proj bias) fails loudly with `UnsupportedModelError` rather than loading into wrong
logits. Per-layer attention types come from `layer_types` when the file has it (transformers 5
writes it), else from each family's documented default pattern.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from sft_jax.config import ModelSection
from sft_jax.model.config import (
    ModelConfig,
    RopeScaling,
    model_config_from_arch,
    with_section_options,
)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its features is not implemented by our decoder."""


class ModelFileError(ValueError):
    """A file of the model directory is unreadable, incomplete or inconsistent (config.json that
    is not JSON or lacks a field, a truncated safetensors file, a missing tensor): bad input,
    reported in one line naming the file, like bad data."""


def read_config_json(file: str) -> dict[str, Any]:
    """`file` parsed as a JSON object, else ModelFileError naming the file and the position."""
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(raw, dict):
        raise ModelFileError(f"{file}: expected a JSON object, found {type(raw).__name__}")
    return raw


def load_model_config(path: str, *, dtype: str, param_dtype: str, remat: str) -> ModelConfig:
    """Reads `path/config.json`; raises UnsupportedModelError for anything we cannot reproduce
    and ModelFileError for a file that is not a usable config."""
    file = os.path.join(path, "config.json")
    raw = read_config_json(file)
    arch = _architecture(raw, file)

    def unsupported(why: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{file}: {arch} {why}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} with "
            f"SiLU (GeGLU for Gemma) MLPs and rope types {_SUPPORTED_ROPE_TYPES}"
        )

    def need(key: str) -> int:
        value = raw.get(key)
        if value is None:
            raise ModelFileError(f"{file}: required field '{key}' is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelFileError(f"{file}: field '{key}' must be a positive integer, got {value!r}")
        return value

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    max_pos, num_layers = need("max_position_embeddings"), need("num_hidden_layers")
    attention_bias = _check_features(raw, arch, unsupported)
    theta, scaling, local_theta = _rope(raw, arch, max_pos, unsupported)
    window, local_layers = _sliding(raw, arch, max_pos, num_layers, unsupported)
    gemma = arch in _GEMMA
    return ModelConfig(
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rope_theta=float(theta),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
        qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
        attention_bias=attention_bias,
        max_position_embeddings=max_pos,
        rope_scaling=scaling,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        norm_offset=gemma,
        embed_scale=gemma,
        mlp_activation="gelu_tanh" if gemma else "silu",
        sandwich_norms=gemma,
        # Gemma 3 keeps `attn_logit_softcapping` in its config but transformers never applies it
        # (only Gemma 2 does), so applying it here would break logit parity with the reference.
        attn_softcap=_float_or_none(raw.get("attn_logit_softcapping"))
        if arch == "Gemma2ForCausalLM"
        else None,
        final_softcap=_float_or_none(raw.get("final_logit_softcapping")) if gemma else None,
        query_scale=float(raw.get("query_pre_attn_scalar", 256)) if gemma else None,
        sliding_window=window,
        local_layers=local_layers,
        local_rope_theta=local_theta,
    )


def build_model_config(section: ModelSection) -> ModelConfig:
    """The model config of a run: from the HF directory when `path` is set, else from `arch`."""
    if section.path:
        loaded = load_model_config(
            section.path, dtype=section.dtype, param_dtype=section.param_dtype, remat=section.remat
        )
        return with_section_options(loaded, section)
    return model_config_from_arch(section.arch, section)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _architecture(raw: dict, file: str) -> str:
    names = raw.get("architectures") or []
    if not names and raw.get("model_type") in _ARCH_BY_MODEL_TYPE:
        names = [_ARCH_BY_MODEL_TYPE[raw["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = names or f"model_type={raw.get('model_type')!r}"
    raise UnsupportedModelError(
        f"{file}: unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _check_features(raw: dict, arch: str, unsupported: Callable) -> bool:
    """Rejects features our decoder lacks; returns whether q/k/v carry biases."""
    if arch in _GEMMA:
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise unsupported(f"uses hidden_activation={act!r}")
        if raw.get("use_bidirectional_attention"):
            raise unsupported("uses bidirectional attention")
    else:
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise unsupported(f"uses hidden_act={act!r}")
    if raw.get("mlp_bias", False):
        raise unsupported("has MLP biases (mlp_bias=true)")
    if arch == "Qwen2ForCausalLM":
        return True  # Qwen2 always has q/k/v biases and never an o_proj bias.
    if arch == "MistralForCausalLM":
        return False  # Mistral's attention has no biases at all.
    if raw.get("attention_bias", False):  # Llama, Qwen3, Gemma: then also an o_proj bias
        raise unsupported("has attention_bias=true, which includes an o_proj bias")
    return False


def _sliding(
    raw: dict, arch: str, max_pos: int, num_layers: int, unsupported: Callable
) -> tuple[int | None, tuple[bool, ...]]:
    """(window, per-layer local flags); ((None, ()) when no layer's attention is cut."""
    window = raw.get("sliding_window")
    if window is None or window >= max_pos:
        return None, ()
    if arch == "MistralForCausalLM":
        return window, (True,) * num_layers  # Mistral applies any window to every layer.
    if arch in _GEMMA:
        types = raw.get("layer_types") or _gemma_layer_types(raw, arch, num_layers)
        if len(types) != num_layers:
            raise unsupported(f"has {len(types)} layer_types for {num_layers} layers")
        local = tuple(t == "sliding_attention" for t in types)
        return (window, local) if any(local) else (None, ())
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and raw.get("use_sliding_window"):
        raise unsupported(f"uses sliding-window attention (sliding_window={window})")
    return None, ()


def _gemma_layer_types(raw: dict, arch: str, num_layers: int) -> list[str]:
    """transformers' defaults: Gemma 2 alternates local/global; Gemma 3 has every
    `sliding_window_pattern`-th layer global."""
    pattern = 2 if arch == "Gemma2ForCausalLM" else raw.get("sliding_window_pattern", 6)
    return [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
    ]


def _rope(
    raw: dict, arch: str, max_pos: int, unsupported: Callable
) -> tuple[float, RopeScaling | None, float | None]:
    """(theta, scaling, local theta) from `rope_parameters` (transformers 5; per layer type for
    Gemma 3) or the older top-level fields (`rope_scaling`, `rope_local_base_freq`)."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    local_theta = None
    if arch == "Gemma3ForCausalLM":
        local = params.pop("sliding_attention", None) or {}
        full = params.pop("full_attention", None) or {}
        params.update(full)
        if local.get("rope_type", "default") != "default":
            raise unsupported("scales the RoPE of its sliding-window layers")
        local_theta = float(local.get("rope_theta", raw.get("rope_local_base_freq", 10000.0)))
        params.setdefault("rope_theta", raw.get("rope_theta", 1_000_000.0))
    if any(isinstance(v, dict) for v in params.values()):
        raise unsupported("has per-layer-type rope parameters")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise unsupported(f"uses rope type {rope_type!r}")
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise unsupported(f"uses partial_rotary_factor={factor}")
    if rope_type == "default":
        return theta, None, local_theta
    if rope_type == "linear":
        return theta, RopeScaling(float(params["factor"]), rope_type="linear"), local_theta
    scaling = RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings") or max_pos
        ),
    )
    return theta, scaling, local_theta


def hf_config_dict(c: ModelConfig, *, bos_token_id: Any, eos_token_id: Any) -> dict[str, Any]:
    """config.json for a model with no source checkpoint (random init): Llama, or Qwen2 (q/k/v
    biases) or Qwen3 (q/k norm), the HF families whose computation equals that config."""
    if c.norm_offset or c.sandwich_norms or c.has_local_layers or c.mlp_activation != "silu":
        raise UnsupportedModelError("only Llama-style configs can be exported without a source")
    if c.qk_norm and c.attention_bias:
        raise UnsupportedModelError("no HF family has both q/k norm and q/k/v-only biases")
    arch, model_type = "LlamaForCausalLM", "llama"
    if c.qk_norm:
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
    }
