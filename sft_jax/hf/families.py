"""Family-specific reading of config.json, kept out of config.py's common path.

Gemma 3 4B/12B/27B ship as `Gemma3ForConditionalGeneration` (model_type "gemma3"): the language
model's config is the `text_config` sub-dict (a Gemma3TextConfig, whose defaults fill the many
fields the Hub's files omit), next to a `vision_config`. We fine-tune the language model only:
`text_config` is read as a `Gemma3ForCausalLM` config, the checkpoint's language-model tensors
load (sft_jax.hf.params finds them under `model.language_model.` or the older
`language_model.model.`), and an export copies the vision tower and projector through from the
source checkpoint untouched, under the source's config.json, so transformers loads it back as
the same multimodal class.

The dense families here differ from Llama by a few features, each read as transformers reads
its config: SmolLM3's NoPE layers (`nope_layers`), OLMo 2/3's post-norm layers with q/k norm
over all heads (and OLMo 3's sliding-window layers with their own RoPE), Phi-3/4's LongRoPE,
partial rotary factor and all-layer sliding window (its fused projections are a checkpoint
layout: sft_jax.hf.layout). `normalized` fills in a family's defaults before config.py's
common path; `refined` adds the family's features to its result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from sft_jax.hf.errors import ModelFileError, UnsupportedModelError
from sft_jax.model.config import ModelConfig, RopeScaling

GEMMA3_MULTIMODAL = "Gemma3ForConditionalGeneration"
SMOLLM3, OLMO2, OLMO3 = "SmolLM3ForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"
PHI3 = "Phi3ForCausalLM"
# The architectures this module reads (config.py lists them), and their model types.
ARCHITECTURES: tuple[str, ...] = (GEMMA3_MULTIMODAL, SMOLLM3, OLMO2, OLMO3, PHI3)
ARCH_BY_MODEL_TYPE: dict[str, str] = {
    "smollm3": SMOLLM3,
    "olmo2": OLMO2,
    "olmo3": OLMO3,
    "phi3": PHI3,
}
YARN_ARCHITECTURES = (OLMO3, SMOLLM3)  # besides gpt-oss: families whose YaRN config.py reads
# transformers' defaults for fields config.json may omit, where they differ from config.py's
# (Llama's) defaults.
_DEFAULTS: dict[str, dict[str, Any]] = {
    SMOLLM3: {"rope_theta": 2_000_000.0, "tie_word_embeddings": True},
    OLMO2: {"rms_norm_eps": 1e-5},
    OLMO3: {"rms_norm_eps": 1e-5},
    PHI3: {"rms_norm_eps": 1e-5, "original_max_position_embeddings": 4096},
}
_OLMO3_THETA = 500_000.0  # Olmo3Config.default_theta

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


def _arch(raw: dict) -> str | None:
    for name in raw.get("architectures") or []:
        if name in ARCHITECTURES:
            return name
    return None if raw.get("architectures") else ARCH_BY_MODEL_TYPE.get(raw.get("model_type"))


def normalized(raw: dict, file: str) -> dict:
    """The config.json fields of the language model to fine-tune: a Gemma 3 multimodal file's
    `text_config` as a Gemma3ForCausalLM config; a Gemma 3 text file with Gemma3TextConfig's
    defaults filled in; this module's families with their defaults; any other file as it is."""
    arch = _arch(raw)
    if arch in _DEFAULTS:
        defaults = dict(_DEFAULTS[arch])
        if (raw.get("rope_parameters") or {}).get("rope_theta") is not None:
            defaults.pop("rope_theta", None)  # transformers 5's own field wins
        raw = {**defaults, **raw}
        if arch == PHI3:
            return _phi3_rope(raw, file)
        return _olmo3_rope(raw, file) if arch == OLMO3 else raw
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


def refined(config: ModelConfig, raw: dict, arch: str, unsupported: Callable) -> ModelConfig:
    """`config` (read by config.py's common path) with what sets this module's families apart;
    other families' configs unchanged."""
    if arch == SMOLLM3:
        return _smollm3(config, raw, unsupported)
    if arch in (OLMO2, OLMO3):
        return _olmo(config, raw, arch, unsupported)
    if arch == PHI3:
        return _phi3(config, raw)
    return config


def needs_source(c: ModelConfig) -> bool:
    """Whether `c` computes something only its source checkpoint's config.json describes (no
    config.json is derived for it from ModelConfig alone): anything but a Llama-style layer."""
    if c.norm_offset or c.sandwich_norms or c.has_local_layers or c.mlp_activation != "silu":
        return True
    longrope = c.rope_scaling is not None and c.rope_scaling.rope_type == "longrope"
    return any(c.nope_layers) or not c.pre_norms or longrope or c.partial_rotary_factor != 1.0


def _smollm3(c: ModelConfig, raw: dict, unsupported: Callable) -> ModelConfig:
    """SmolLM3's NoPE layers: `no_rope_layers[i]` is 1 where layer i applies RoPE, 0 where it
    does not; without it every `no_rope_layer_interval`-th layer (default 4) is NoPE. Sliding
    windows only with `use_sliding_window`, on the layers `layer_types` names (by default the
    NoPE layers), as SmolLM3Config derives them."""
    n = c.num_layers
    flags = raw.get("no_rope_layers")
    if flags is None:
        interval = raw.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    if not isinstance(flags, list) or len(flags) < n:
        raise unsupported(f"has no_rope_layers={flags!r}, not one flag per layer ({n})")
    nope = tuple(not flag for flag in flags[:n])
    window = raw.get("sliding_window")
    local: tuple[bool, ...] = ()
    if raw.get("use_sliding_window") and window is not None and window < c.max_position_embeddings:
        types = raw.get("layer_types") or [
            "sliding_attention" if not flags[i] else "full_attention" for i in range(n)
        ]
        if len(types) != n:
            raise unsupported(f"has {len(types)} layer_types for {n} layers")
        local = tuple(t == "sliding_attention" for t in types)
    return dataclasses.replace(
        c,
        nope_layers=nope if any(nope) else (),
        sliding_window=window if any(local) else None,
        local_layers=local if any(local) else (),
    )


def _olmo3_rope(raw: dict, file: str) -> dict:
    """OLMo 3's RoPE per layer type as Olmo3Config reads it: `rope_parameters` per layer type,
    else the top-level fields, `rope_scaling` (YaRN on the long-context models) scaling only the
    full-attention layers. The full layers' RoPE becomes the file's flat RoPE for config.py;
    the sliding layers' is kept aside (`_sliding_rope`) for `_olmo`. As in transformers, a
    top-level rope_theta sets the full layers' base only; the sliding layers keep the default
    unless rope_parameters gives theirs."""
    params = raw.get("rope_parameters") or {}
    if params and not all(isinstance(params.get(t), dict | None) for t in params):
        raise UnsupportedModelError(
            f"{file}: Olmo3ForCausalLM with rope_parameters not per layer type"
        )
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    full.update(raw.get("rope_scaling") or {})
    full.setdefault("rope_theta", raw.get("rope_theta", _OLMO3_THETA))
    sliding = dict(params.get("sliding_attention") or {"rope_type": "default"})
    sliding.setdefault("rope_theta", _OLMO3_THETA)
    out = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_theta")}
    return {**out, "rope_parameters": full, "_sliding_rope": sliding}


def _olmo(c: ModelConfig, raw: dict, arch: str, unsupported: Callable) -> ModelConfig:
    """OLMo 2/3: norms after attention and after the MLP only (no input norms), q/k RMSNorm over
    all heads (N*H, K*H) before RoPE, every norm multiplying by its weight in float32; OLMo 3
    adds sliding-window layers (`layer_types`, by default three sliding then one full; window
    4096) with their own, unscaled RoPE."""
    olmo = dict(sandwich_norms=True, pre_norms=False, qk_norm=True, qk_norm_full=True)
    c = dataclasses.replace(c, **olmo, norm_scale_float32=True)  # Olmo2RMSNorm's numerics
    if raw.get("clip_qkv") is not None:
        raise unsupported(f"clips q/k/v (clip_qkv={raw['clip_qkv']})")
    if arch == OLMO2:
        if raw.get("sliding_window") is not None or raw.get("layer_types"):
            raise unsupported("sets sliding_window or layer_types, which Olmo2 never applies")
        return c
    n = c.num_layers
    types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n)
    ]
    if len(types) != n:
        raise unsupported(f"has {len(types)} layer_types for {n} layers")
    local = tuple(t == "sliding_attention" for t in types)
    if not any(local):
        return c
    window = raw.get("sliding_window", 4096)
    sliding = raw["_sliding_rope"]
    if window is None or sliding.get("rope_type", "default") != "default":
        raise unsupported(
            f"has sliding_attention layers with sliding_window={window!r} and RoPE {sliding}"
        )
    return dataclasses.replace(
        c,
        sliding_window=int(window),
        local_layers=local,
        local_rope_theta=float(sliding["rope_theta"]),
    )


def _phi3_rope(raw: dict, file: str) -> dict:
    """Phi-3/4's RoPE as Phi3Config reads it: `rope_scaling` (or else `rope_parameters`), its
    theta and partial_rotary_factor defaulting to the top-level fields; the older types "su"
    and "yarn" are LongRoPE; only "default" and "longrope" are valid. The file's flat RoPE for
    config.py becomes the unscaled one; LongRoPE and the partial factor are kept aside
    (`_phi3_rope`) for `_phi3`."""
    rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope.setdefault("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_type"] = "longrope" if kind in ("su", "yarn") else kind
    if rope["rope_type"] not in ("default", "longrope"):
        raise UnsupportedModelError(f"{file}: {PHI3} uses rope type {kind!r}")
    heads = raw.get("num_attention_heads") or 1
    head_dim = raw.get("head_dim") or (raw.get("hidden_size") or 0) // heads
    half = int(head_dim * rope["partial_rotary_factor"]) // 2
    for name in ("short_factor", "long_factor") if rope["rope_type"] == "longrope" else ():
        factors = rope.get(name)
        if not isinstance(factors, list) or len(factors) != half:
            raise ModelFileError(
                f"{file}: rope_scaling's {name} must be a list of {half} numbers (half the "
                f"rotated head dims), got {factors!r}"
            )
    drop = ("rope_scaling", "rope_parameters", "partial_rotary_factor", "rope_theta")
    out = {k: v for k, v in raw.items() if k not in drop}
    flat = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    return {**out, "rope_parameters": flat, "_phi3_rope": rope}


def _phi3(c: ModelConfig, raw: dict) -> ModelConfig:
    """Phi-3/4: LongRoPE (transformers' _compute_longrope_parameters: the attention factor from
    config.json, else sqrt(1 + ln(factor) / ln(original)) with factor max_position_embeddings /
    original_max_position_embeddings when unset; the top-level original_max_position_embeddings
    wins over rope_scaling's), the partial rotary factor, and a sliding window on every layer
    when it is shorter than max_position_embeddings (as Mistral's)."""
    rope = raw["_phi3_rope"]
    c = dataclasses.replace(c, partial_rotary_factor=float(rope["partial_rotary_factor"]))
    window = raw.get("sliding_window")
    if window is not None and window < c.max_position_embeddings:
        c = dataclasses.replace(c, sliding_window=window, local_layers=(True,) * c.num_layers)
    if rope["rope_type"] != "longrope":
        return c
    original = int(raw["original_max_position_embeddings"])
    factor = rope.get("factor") or c.max_position_embeddings / original
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    scaling = RopeScaling(
        factor=float(factor),
        original_max_position_embeddings=original,
        rope_type="longrope",
        attention_factor=float(attention),
        short_factor=tuple(float(x) for x in rope["short_factor"]),
        long_factor=tuple(float(x) for x in rope["long_factor"]),
    )
    return dataclasses.replace(c, rope_scaling=scaling)
