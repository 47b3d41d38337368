"""Mixture-of-experts families from and to Hugging Face (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE):
logits, packed rows, KV-cache generation and the train objective against transformers; every
checkpoint layout loads; exports load back in transformers; config.json parsing and refusals;
LoRA on the attention of a MoE model trains and exports for PEFT."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from sft_jax import hf
from sft_jax.export import export_hf
from sft_jax.model.decode import greedy_generate
from sft_jax.model.decoder import Transformer, count_params
from sft_jax.training import step
from tests.helpers import model_only_state

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
    num_experts_per_tok=2,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
# Each family with what sets it apart; router_aux_loss_coef off its default so the objective
# test shows it is read from config.json.
FAMILIES = {
    "qwen3_moe": (
        Qwen3MoeConfig,
        dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32),
        "Qwen3MoeForCausalLM",
    ),
    "qwen2_moe": (  # shared expert with its sigmoid gate; q/k/v biases; raw top-k weights
        Qwen2MoeConfig,
        dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48),
        "Qwen2MoeForCausalLM",
    ),
    "mixtral": (
        MixtralConfig,
        dict(num_local_experts=4, intermediate_size=32),
        "MixtralForCausalLM",
    ),
    "olmoe": (  # q/k norm over all heads; raw top-k weights
        OlmoeConfig,
        dict(num_experts=8, intermediate_size=32, norm_topk_prob=False),
        "OlmoeForCausalLM",
    ),
}
AUX_COEF = 0.25


def _hf_config(family, **overrides):
    config_cls, fields, _ = FAMILIES[family]
    return config_cls(**{**TINY, **fields, "router_aux_loss_coef": AUX_COEF, **overrides})


def _save_tiny(family, path, seed=0, **save_kwargs):
    """A tiny random HF model, weights off their init: norms not all ones, routers peaked
    enough that experts differ clearly in load (and top-k choices are not near ties)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_hf_config(family), attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    model.eval().save_pretrained(path, **save_kwargs)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (its directory, the transformers model): each family saved once."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[family] = (path, _save_tiny(family, path))
        return cache[family]

    return get


def _load(path):
    config = hf.load_model_config(str(path), dtype="float32", param_dtype="float32", remat="none")
    return config, hf.load_params(str(path), config)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, params, tokens, positions, segment_ids):
    return Transformer(config).apply({"params": params}, tokens, positions, segment_ids)


def _hf_logits(model, tokens, positions=None, attention_mask=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.asarray(tokens)),
            position_ids=None if positions is None else torch.from_numpy(np.asarray(positions)),
            attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask),
        )
    return out.logits.float().numpy()


def _tokens(batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(1, TINY["vocab_size"], size=(batch, length))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_packing_and_export_round_trip(family, saved, tmp_path, stories_dir):
    """HF -> ours: logits equal transformers' (row 1 at offset positions); a packed row gives
    each example transformers' logits for it alone; ours -> export (the Hub's per-expert
    layout, sharded) -> transformers: the same logits and bit-identical weights."""
    path, model = saved(family)
    config, params = _load(path)
    assert config.is_moe and config.router_aux_loss_coef == AUX_COEF
    assert config.qk_norm_full == (family == "olmoe")
    assert count_params(params) == model.num_parameters()
    tokens = _tokens()
    positions = np.stack([np.arange(12), np.arange(12) + 37])
    ours = np.asarray(_apply(config, params, tokens, positions, np.ones_like(tokens)))
    expected = _hf_logits(model, tokens, positions)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(ours, expected, atol=MODEL_TOL)

    a, b = tokens[0, :7], tokens[1, :5]
    packed = np.concatenate([a, b])[None]
    packed_pos = np.concatenate([np.arange(7), np.arange(5)])[None]
    segments = np.asarray([[1] * 7 + [2] * 5])
    logits = np.asarray(_apply(config, params, packed, packed_pos, segments))
    np.testing.assert_allclose(logits[:, :7], _hf_logits(model, a[None]), atol=MODEL_TOL)
    np.testing.assert_allclose(logits[:, 7:], _hf_logits(model, b[None]), atol=MODEL_TOL)

    out = tmp_path / "out"
    export_hf(
        params,
        config,
        str(out),
        tokenizer_dir=str(stories_dir),
        source_model_dir=str(path),
        max_shard_bytes=64 * 1024,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with safe_open(str(path / "model.safetensors"), "np") as f:
        assert set(index["weight_map"]) == set(f.keys())  # the layout save_pretrained writes
    moe = "block_sparse_moe.experts.3.w2" if family == "mixtral" else "mlp.experts.3.down_proj"
    assert f"model.layers.1.{moe}.weight" in index["weight_map"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, positions), ours, atol=MODEL_TOL)
    for (name, x), y in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_fused_transformers5_layout_loads_the_same_weights(family, saved, tmp_path):
    """transformers 5's own layout (fused gate_up_proj [E, 2F, D], down_proj [E, D, F], router
    under mlp.gate), as save_pretrained(save_original_format=False) writes it."""
    path, model = saved(family)
    model.save_pretrained(tmp_path, save_original_format=False)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "model.layers.0.mlp.gate.weight"
    _, expected = _load(path)
    config, fused = _load(tmp_path)
    hf.check_checkpoint(str(tmp_path), config)
    assert jax.tree.structure(fused) == jax.tree.structure(expected)
    for x, y in zip(jax.tree.leaves(fused), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(family, saved):
    path, model = saved(family)
    config, params = _load(path)
    prompts = [[5, 17, 99, 3, 42], [7, 8]]
    ours = greedy_generate(Transformer(config), params, prompts, max_new_tokens=6, stop_ids=[])
    for prompt, generated in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6
            )
        assert generated == out[0, len(prompt) :].tolist()


def _batch(seed=0):
    """Two right-padded rows (lengths 12 and 8 of 12) and a loss mask that skips some targets."""
    rng = np.random.default_rng(seed)
    rows, length, lengths = 2, 12, (12, 8)
    inputs = rng.integers(1, TINY["vocab_size"], size=(rows, length))
    segment_ids = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), bool)
    for r, n in enumerate(lengths):
        inputs[r, n:] = 0
        segment_ids[r, :n] = 1
        loss_mask[r, 2 : n - 1] = rng.random(n - 3) < 0.8  # target t = input t + 1
    targets = np.concatenate([inputs[:, 1:], np.zeros((rows, 1), inputs.dtype)], axis=1)
    positions = np.broadcast_to(np.arange(length), (rows, length)).copy()
    return dict(
        inputs=inputs,
        targets=targets,
        positions=positions,
        segment_ids=segment_ids,
        loss_mask=loss_mask,
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_objective_equals_transformers_loss(family, saved):
    """Objective / loss tokens = transformers' loss with output_router_logits=True: its mean
    cross-entropy (labels -100 where the mask is off, shifted inside transformers) plus the
    family's router_aux_loss_coef (from config.json) x the load-balancing loss over the
    unpadded tokens of every layer."""
    path, model = saved(family)
    config, params = _load(path)
    b = _batch()
    options = step.StepOptions(router_stats=True, router_aux_coef=config.router_aux_loss_coef)
    state = model_only_state(Transformer(config).apply)
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    objective, parts = step.loss_fn(params, state, batch, jax.random.PRNGKey(0), options)
    ours = float(objective) / float(parts.tokens)

    labels = np.full_like(b["inputs"], -100)
    labels[:, 1:] = np.where(b["loss_mask"][:, :-1], b["inputs"][:, 1:], -100)
    mask = (b["segment_ids"] > 0).astype(np.int64)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(b["inputs"]),
            attention_mask=torch.from_numpy(mask),
            labels=torch.from_numpy(labels),
            output_router_logits=True,
        )
    assert float(AUX_COEF * out.aux_loss) > 1e-2  # the router term is not negligible
    np.testing.assert_allclose(ours, float(out.loss), rtol=1e-5)
    np.testing.assert_allclose(
        float(parts.cross_entropy) / float(parts.tokens),
        float(out.loss) - AUX_COEF * float(out.aux_loss),
        rtol=1e-5,
    )
