"""`config.json` -> ModelConfig (a random init's config.json is written by config_export.py).

Only what the decoder in `sft_jax.model.decoder` computes exactly is accepted; anything else
(another architecture, an unknown RoPE scaling, a sliding window our model would not apply the way
HF does, an o_proj bias) fails loudly with `UnsupportedModelError` rather than loading into wrong
logits. Per-layer attention types come from `layer_types` when the file has it (transformers 5
writes it), else from each family's documented default pattern.

Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss) are read with
transformers' defaults for the fields a file may omit, under either name of the expert count
(`num_experts`, `num_local_experts`: transformers maps one to the other). Our decoder puts the
MoE layer in every layer, so a config with dense layers among the sparse ones is refused.
gpt-oss adds attention sinks, biases on all four attention projections, YaRN RoPE,
sliding-window layers from `layer_types`, router and expert biases and its clamped SwiGLU; its
Hub checkpoints' MXFP4 `quantization_config` is accepted because the loader dequantizes the
experts (any other quantization is refused).

Qwen3.5 (dense and MoE; hybrid linear attention) is read by its own module, sft_jax/hf/qwen35.py,
and so is Gemma 4 (sft_jax/hf/gemma4.py).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from sft_jax import paths
from sft_jax.config import ModelSection
from sft_jax.hf import families, gemma4, qwen35
from sft_jax.hf.errors import ModelFileError, UnsupportedModelError
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
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
    "GptOssForCausalLM",
    *families.ARCHITECTURES,
    *qwen35.DENSE,  # Qwen3.5 (hybrid linear attention) is read by sft_jax/hf/qwen35.py
    *qwen35.MOE,
    gemma4.CAUSAL_LM,  # Gemma 4 is read by sft_jax/hf/gemma4.py
    gemma4.MULTIMODAL,
)
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    **families.ARCH_BY_MODEL_TYPE,
}
_GPT_OSS = "GptOssForCausalLM"
_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_QK_NORM_MOE = ("Qwen3MoeForCausalLM", "OlmoeForCausalLM")
_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# Mixture-of-experts families: transformers' defaults for (norm_topk_prob, router_aux_loss_coef)
# when config.json omits them (Mixtral always renormalises its top-k weights).
_MOE_DEFAULTS = {
    "MixtralForCausalLM": (True, 0.001),
    "Qwen2MoeForCausalLM": (False, 0.001),
    "Qwen3MoeForCausalLM": (False, 0.001),
    "OlmoeForCausalLM": (False, 0.01),
    _GPT_OSS: (True, 0.001),  # a softmax over the top-k logits: renormalised top-k weights
}


def read_config_json(file: str) -> dict[str, Any]:
    """`file` parsed as a JSON object, else ModelFileError naming the file and the position."""
    try:
        with paths.open_text(file, encoding="utf-8") as f:  # a workdir's may be on gs://
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
    if qwen35.is_qwen35(raw):
        fields = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
        error = lambda why: UnsupportedModelError(f"{file}: Qwen3.5 {why}")
        return qwen35.load_qwen35_config(raw, file, error, **fields)
    if gemma4.is_gemma4(raw):
        fields = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
        error = lambda why: UnsupportedModelError(f"{file}: Gemma 4 {why}")
        return gemma4.load_gemma4_config(raw, file, error, **fields)
    raw = families.normalized(raw, file)
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
    moe = (
        _moe_fields(raw, arch, file, num_layers, need, unsupported) if arch in _MOE_DEFAULTS else {}
    )
    head_dim = raw.get("head_dim") or hidden // heads
    if arch == _GPT_OSS and "head_dim" not in raw:
        head_dim = 64  # GptOssConfig's default
    if arch == "OlmoeForCausalLM" and head_dim * heads != hidden:  # its q_norm spans hidden_size
        raise unsupported(f"has head_dim={head_dim} with {heads} heads != hidden_size={hidden}")
    config = ModelConfig(
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope_theta=float(theta),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5 if arch == _GPT_OSS else 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
        qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM", *_QK_NORM_MOE),
        qk_norm_full=arch == "OlmoeForCausalLM",
        attention_bias=attention_bias,
        o_proj_bias=attention_bias and arch == _GPT_OSS,
        attention_sinks=arch == _GPT_OSS,
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
        **moe,
    )
    return families.refined(config, raw, arch, unsupported)


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
    if arch == _GPT_OSS:
        quant = raw.get("quantization_config")
        if quant and quant.get("quant_method") != "mxfp4":
            raise unsupported(f"is quantized with {quant.get('quant_method')!r} (only mxfp4 loads)")
        return bool(raw.get("attention_bias", True))  # then all four projections have biases
    if arch == "Qwen2ForCausalLM":
        return True  # Qwen2 always has q/k/v biases and never an o_proj bias.
    if arch == "Qwen2MoeForCausalLM":
        return bool(raw.get("qkv_bias", True))  # q/k/v biases by default, never an o_proj bias
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        return False  # Mistral's and Mixtral's attention have no biases at all.
    if raw.get("attention_bias", False):  # Llama, Qwen3, Gemma: then also an o_proj bias
        raise unsupported("has attention_bias=true, which includes an o_proj bias")
    return False


def _moe_fields(
    raw: dict, arch: str, file: str, num_layers: int, need: Callable, unsupported: Callable
) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields; refuses what our every-layer MoE cannot run."""
    counts = {k: raw[k] for k in ("num_experts", "num_local_experts") if raw.get(k) is not None}
    if len(set(counts.values())) > 1:
        raise ModelFileError(f"{file}: num_experts and num_local_experts disagree ({counts})")
    if not counts:
        raise ModelFileError(f"{file}: required field 'num_experts' is missing")
    experts = need(next(iter(counts)))
    norm_topk, aux_coef = _MOE_DEFAULTS[arch]
    if arch.startswith("Qwen"):  # dense layers where (i + 1) % step != 0 or i in mlp_only_layers
        step, dense = raw.get("decoder_sparse_step", 1), raw.get("mlp_only_layers") or []
        if step != 1:
            raise unsupported(f"has decoder_sparse_step={step} (dense layers among MoE layers)")
        if any(i in dense for i in range(num_layers)):
            raise unsupported(f"has mlp_only_layers={dense} (dense layers among MoE layers)")
    if arch == "MixtralForCausalLM" and raw.get("router_jitter_noise"):
        raise unsupported(
            f"trains with router_jitter_noise={raw['router_jitter_noise']}, which we do not apply"
            " (set it to 0 to fine-tune without it)"
        )
    if arch == "OlmoeForCausalLM" and raw.get("clip_qkv") is not None:
        raise unsupported(f"clips q/k/v (clip_qkv={raw['clip_qkv']})")
    gpt_oss = {}
    if arch == _GPT_OSS:  # biased router and experts, clamped SwiGLU (transformers' defaults)
        limit, alpha = raw.get("swiglu_limit", 7.0), raw.get("swiglu_alpha", 1.702)
        gpt_oss = dict(router_bias=True, expert_bias=True, swiglu_limit=float(limit))
        gpt_oss["swiglu_alpha"] = float(alpha)
    coef = raw.get("router_aux_loss_coef", aux_coef)
    if isinstance(coef, bool) or not isinstance(coef, int | float) or coef < 0:
        raise ModelFileError(f"{file}: field 'router_aux_loss_coef' must be >= 0, got {coef!r}")
    if arch not in ("MixtralForCausalLM", _GPT_OSS):  # these always renormalise
        norm_topk = bool(raw.get("norm_topk_prob", norm_topk))
    width = (
        "intermediate_size"
        if arch in ("MixtralForCausalLM", "OlmoeForCausalLM", _GPT_OSS)
        else None
    )
    shared = need("shared_expert_intermediate_size") if arch == "Qwen2MoeForCausalLM" else 0
    return {
        "num_experts": experts,
        "num_experts_per_tok": need("num_experts_per_tok"),
        "moe_intermediate_size": need(width or "moe_intermediate_size"),
        "norm_topk_prob": norm_topk,
        "shared_expert_intermediate_size": shared,
        "router_aux_loss_coef": float(coef),
        **gpt_oss,
    }


def _sliding(
    raw: dict, arch: str, max_pos: int, num_layers: int, unsupported: Callable
) -> tuple[int | None, tuple[bool, ...]]:
    """(window, per-layer local flags); ((None, ()) when no layer's attention is cut."""
    if arch == "Qwen2MoeForCausalLM":
        types = raw.get("layer_types") or []
        if raw.get("use_sliding_window") or any(t != "full_attention" for t in types):
            raise unsupported("uses sliding-window attention (use_sliding_window, layer_types)")
        return None, ()
    window = raw.get("sliding_window", 128 if arch == _GPT_OSS else None)
    if arch == "OlmoeForCausalLM" and window is not None:  # applied by some kernels, not others
        raise unsupported(f"sets sliding_window={window}")
    if window is None or window >= max_pos:
        return None, ()
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        return window, (True,) * num_layers  # Mistral applies any window to every layer.
    if arch in (*_GEMMA, _GPT_OSS):
        types = raw.get("layer_types") or _gemma_layer_types(raw, arch, num_layers)
        if len(types) != num_layers:
            raise unsupported(f"has {len(types)} layer_types for {num_layers} layers")
        local = tuple(t == "sliding_attention" for t in types)
        return (window, local) if any(local) else (None, ())
    qwen = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    if arch in qwen and raw.get("use_sliding_window"):
        raise unsupported(f"uses sliding-window attention (sliding_window={window})")
    return None, ()


def _gemma_layer_types(raw: dict, arch: str, num_layers: int) -> list[str]:
    """transformers' defaults: Gemma 2 and gpt-oss alternate local/global; Gemma 3 has every
    `sliding_window_pattern`-th layer global."""
    alternate = arch in ("Gemma2ForCausalLM", _GPT_OSS)
    pattern = 2 if alternate else raw.get("sliding_window_pattern", 6)
    return [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
    ]


def _rope(
    raw: dict, arch: str, max_pos: int, unsupported: Callable
) -> tuple[float, RopeScaling | None, float | None]:
    """(theta, scaling, local theta) from `rope_parameters` (transformers 5; per layer type for
    Gemma 3) or the older top-level fields (`rope_scaling`, `rope_local_base_freq`)."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    if arch == _GPT_OSS and not params:
        params = dict(_GPT_OSS_ROPE)
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
    default_theta = {"MixtralForCausalLM": 1e6, _GPT_OSS: 150000.0}.get(arch, 10000.0)
    theta = params.get("rope_theta", raw.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    yarn = (_GPT_OSS, *families.YARN_ARCHITECTURES)
    if rope_type not in _SUPPORTED_ROPE_TYPES and not (rope_type == "yarn" and arch in yarn):
        raise unsupported(f"uses rope type {rope_type!r}")
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise unsupported(f"uses partial_rotary_factor={factor}")
    if rope_type == "default":
        return theta, None, local_theta
    if rope_type == "linear":
        return theta, RopeScaling(float(params["factor"]), rope_type="linear"), local_theta
    if rope_type == "yarn":
        return theta, _yarn(params, max_pos), local_theta
    scaling = RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings") or max_pos
        ),
    )
    return theta, scaling, local_theta


# GptOssConfig's RoPE when config.json gives none.
_GPT_OSS_ROPE = dict(
    rope_type="yarn",
    factor=32.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
    original_max_position_embeddings=4096,
)


def _yarn(params: dict, max_pos: int) -> RopeScaling:
    """YaRN's fields with transformers' defaults (modeling_rope_utils._compute_yarn_parameters):
    beta_fast 32, beta_slow 1, truncate true; the attention factor from config.json, else from
    mscale / mscale_all_dim when both are set, else 0.1 ln(factor) + 1."""
    original = int(params.get("original_max_position_embeddings") or max_pos)  # as transformers
    factor = params.get("factor")
    factor = float(max_pos / original if factor is None else factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    if attention is None:
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return RopeScaling(
        factor=factor,
        original_max_position_embeddings=original,
        rope_type="yarn",
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention),
    )
