"""Hugging Face import: logits parity with transformers per family, config parsing, failures."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from sft_jax import hf
from sft_jax.export import export_hf
from sft_jax.model.decoder import RopeScaling, Transformer, count_params

MODEL_TOL = 1e-4
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # small, so positions ~100 are in the scaled regime
}
FAMILIES = {
    "llama": (LlamaConfig, {}),
    "llama_tied": (LlamaConfig, {"tie_word_embeddings": True}),
    "llama3_rope_scaling": (LlamaConfig, {"rope_parameters": LLAMA3_ROPE}),
    "mistral": (MistralConfig, {"sliding_window": 4096, "head_dim": 16}),  # window >= max pos
    "qwen2_qkv_bias": (Qwen2Config, {}),
    "qwen3_qk_norm": (Qwen3Config, {"head_dim": 32}),  # head_dim != hidden / heads
    "mistral_sliding_window": (MistralConfig, {"sliding_window": 5, "head_dim": 16}),
    # Gemma: windows shorter than the 12-token inputs, soft caps small enough to bite, a query
    # scale other than head_dim, local and global layers in one scan.
    "gemma2": (
        Gemma2Config,
        {
            "head_dim": 16,
            "num_hidden_layers": 3,
            "sliding_window": 5,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
            "pad_token_id": 0,
        },
    ),
    "gemma3": (
        Gemma3TextConfig,
        {
            "head_dim": 16,
            "num_hidden_layers": 3,
            "sliding_window": 5,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "attn_logit_softcapping": 2.0,  # transformers ignores it for Gemma 3; so must we
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0},
            },
            "pad_token_id": 0,
        },
    ),
}


def _save_tiny(config_cls, overrides, path, **save_kwargs):
    """Saves a tiny random HF model whose norms and biases are perturbed (not just 1 and 0)."""
    torch.manual_seed(0)
    config = config_cls(**{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(path, **save_kwargs)
    return model


def _inputs(batch=2, length=12, offset=37):
    """Random tokens; row 1 starts at position `offset` (positions are an input, not arange)."""
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(batch, length))
    positions = np.stack([np.arange(length) + i * offset for i in range(batch)])
    return tokens, positions


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, params, tokens, positions):
    return Transformer(config).apply({"params": params}, tokens, positions, jnp.ones_like(tokens))


def _our_logits(path, tokens, positions, **load_kwargs):
    config = hf.load_model_config(str(path), dtype="float32", param_dtype="float32", remat="none")
    params = hf.load_params(str(path), config, **load_kwargs)
    logits = _apply(config, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions))
    return np.asarray(logits), config, params


def _hf_logits(model, tokens, positions):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens), position_ids=torch.from_numpy(positions))
    return out.logits.numpy()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_import_logits_export_reload(family, tmp_path, stories_dir):
    """HF -> ours: logits match transformers; ours -> export -> transformers: same logits."""
    config_cls, overrides = FAMILIES[family]
    model = _save_tiny(config_cls, overrides, tmp_path / "src")
    tokens, positions = _inputs(offset=100 if "rope" in family else 37)
    ours, config, params = _our_logits(tmp_path / "src", tokens, positions)
    expected = _hf_logits(model, tokens, positions)
    assert np.abs(expected).max() > 0.5  # a meaningful comparison, not two near-zero tensors
    np.testing.assert_allclose(ours, expected, atol=MODEL_TOL)
    assert count_params(params) == model.num_parameters()
    assert config.tie_embeddings == ("tied" in family or "gemma" in family)
    assert config.qk_norm == ("qwen3" in family or "gemma3" in family)
    assert config.attention_bias == ("qwen2" in family)
    assert (config.rope_scaling is not None) == ("rope_scaling" in family or "gemma3" in family)
    assert config.has_local_layers == ("sliding" in family or "gemma" in family)

    out = tmp_path / "out"
    export_hf(
        params,
        config,
        str(out),
        tokenizer_dir=str(stories_dir),
        source_model_dir=str(tmp_path / "src"),
        max_shard_bytes=64 * 1024,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, positions), ours, atol=MODEL_TOL)
    for (name, a), b in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name  # fp32 export is bit-exact


def test_sliding_window_matters_in_the_tiny_configs(tmp_path):
    """Guards the Gemma/Mistral tests above: with the window removed the logits change."""
    config_cls, overrides = FAMILIES["gemma2"]
    _save_tiny(config_cls, overrides, tmp_path)
    tokens, positions = _inputs()
    windowed, config, params = _our_logits(tmp_path, tokens, positions)
    full = dataclasses.replace(config, sliding_window=None, local_layers=())
    logits = _apply(full, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions))
    assert np.abs(np.asarray(logits) - windowed)[:, 6:].max() > 1e-3


def test_sharded_checkpoint_with_index(tmp_path):
    model = _save_tiny(LlamaConfig, {}, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    tokens, positions = _inputs()
    ours, _, _ = _our_logits(tmp_path, tokens, positions)
    np.testing.assert_allclose(ours, _hf_logits(model, tokens, positions), atol=MODEL_TOL)


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    """BF16 is what real checkpoints ship in; safetensors' numpy backend cannot read it."""
    model = _save_tiny(LlamaConfig, {}, tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config = hf.load_model_config(
        str(tmp_path / "bf16"), dtype="float32", param_dtype="float32", remat="none"
    )
    params = hf.load_params(str(tmp_path / "bf16"), config)
    expected = model.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), expected)
    down = model.model.layers[1].mlp.down_proj.weight.float().detach().numpy()
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"][1]), down.T
    )
    bf16 = hf.load_params(
        str(tmp_path / "bf16"), dataclasses.replace(config, param_dtype="bfloat16")
    )
    assert bf16["embed"]["embedding"].dtype == jnp.bfloat16


def test_load_params_places_leaves_in_given_shardings(tmp_path):
    _save_tiny(LlamaConfig, {}, tmp_path)
    config = hf.load_model_config(
        str(tmp_path), dtype="float32", param_dtype="float32", remat="none"
    )
    plain = hf.load_params(str(tmp_path), config)
    mesh = jax.make_mesh((8,), ("fsdp",))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, plain)
    by_vocab = NamedSharding(mesh, PartitionSpec("fsdp", None))
    shardings["embed"]["embedding"] = by_vocab
    sharded = hf.load_params(str(tmp_path), config, shardings)
    embedding = sharded["embed"]["embedding"]
    assert embedding.sharding == by_vocab
    assert len(embedding.addressable_shards) == 8
    assert embedding.addressable_shards[0].data.shape == (
        TINY["vocab_size"] // 8,
        TINY["hidden_size"],
    )
    assert sharded["lm_head"]["kernel"].sharding == replicated
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- config.json parsing --------------------------------------------------------------------


def _write_config(path, **fields):
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": 16}
    base.update(TINY)
    base.update(fields)
    (path / "config.json").write_text(json.dumps(base))
    return str(path)


def _load_config(path):
    return hf.load_model_config(path, dtype="bfloat16", param_dtype="float32", remat="full")


def test_config_legacy_top_level_rope_fields(tmp_path):
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    path = _write_config(tmp_path, rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling})
    config = _load_config(path)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 32)
    assert (config.dtype, config.param_dtype, config.remat) == ("bfloat16", "float32", "full")


def test_config_transformers5_rope_parameters(tmp_path):
    path = _write_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    config = _load_config(path)
    assert config.rope_theta == 1e6 and config.rope_scaling is None
    assert config.num_kv_heads == 2 and config.head_dim == 16


def test_unsupported_architecture_lists_supported(tmp_path):
    path = _write_config(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(hf.UnsupportedModelError) as info:
        _load_config(path)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "config.json" in message
    for name in hf.SUPPORTED_ARCHITECTURES:
        assert name in message


@pytest.mark.parametrize(
    "fields",
    [
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
        {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": 64,
            "max_window_layers": 1,
        },
        {"attention_bias": True},  # Llama's attention_bias includes an o_proj bias
        {"hidden_act": "gelu"},
    ],
)
def test_unsupported_features_fail_loudly(tmp_path, fields):
    with pytest.raises(hf.UnsupportedModelError, match=r"config\.json"):
        _load_config(_write_config(tmp_path, **fields))


def test_unused_sliding_windows_are_accepted(tmp_path):
    qwen = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 64}
    assert _load_config(_write_config(tmp_path, **qwen, use_sliding_window=False)).attention_bias
    mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    assert not _load_config(_write_config(tmp_path, **mistral, sliding_window=None)).local_layers
    assert not _load_config(_write_config(tmp_path, **mistral, sliding_window=256)).local_layers
    windowed = _load_config(_write_config(tmp_path, **mistral, sliding_window=64))
    assert windowed.sliding_window == 64 and windowed.local_layers == (True, True)


def test_gemma_default_layer_patterns(tmp_path):
    """Without `layer_types`, transformers' defaults: Gemma 2 alternates starting local, Gemma 3
    makes every sliding_window_pattern-th layer global; Gemma 3 local layers get their own base."""
    gemma2 = {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "num_hidden_layers": 4,
    }
    config = _load_config(_write_config(tmp_path, **gemma2, sliding_window=8))
    assert config.local_layers == (True, False, True, False) and config.attn_softcap is None
    gemma3 = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "num_hidden_layers": 7,
        "sliding_window": 8,
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
    }
    config = _load_config(_write_config(tmp_path, **gemma3))
    assert config.local_layers == (True,) * 5 + (False, True)
    assert (config.rope_theta, config.local_rope_theta) == (1e6, 1e4)
    assert config.norm_offset and config.embed_scale and config.qk_norm and config.tie_embeddings


# --- tensor checks --------------------------------------------------------------------------


def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _load(path):
    config = hf.load_model_config(str(path), dtype="float32", param_dtype="float32", remat="none")
    return hf.load_params(str(path), config)


def test_missing_tensor_names_file_and_key(tmp_path):
    _save_tiny(LlamaConfig, {}, tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"model\.safetensors.*'model\.layers\.1\.mlp\.up_proj\.weight'"
    ):
        _load(tmp_path)


def test_unexpected_tensor_names_file_and_key(tmp_path):
    _save_tiny(LlamaConfig, {}, tmp_path)
    _rewrite(
        tmp_path,
        lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}),
    )
    with pytest.raises(ValueError, match=r"model\.safetensors.*unexpected.*o_proj\.bias"):
        _load(tmp_path)


def test_shape_mismatch_names_file_and_key(tmp_path):
    _save_tiny(LlamaConfig, {}, tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*'model\.norm\.weight'.*\(63,\)"):
        _load(tmp_path)


def test_tied_checkpoint_with_lm_head_only_if_identical(tmp_path):
    _save_tiny(LlamaConfig, {"tie_word_embeddings": True}, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    embedding = tensors["model.embed_tokens.weight"]
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": embedding.copy()}))
    assert "lm_head" not in _load(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": embedding + 1.0}))
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        _load(tmp_path)
