"""Mixture-of-experts families from and to Hugging Face (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE):
logits, packed rows, KV-cache generation and the train objective against transformers; every
checkpoint layout loads; exports load back in transformers; config.json parsing and refusals;
LoRA on the attention of a MoE model trains and exports for PEFT."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
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


def test_mixtral_sliding_window_logits(tmp_path):
    """Mixtral applies a sliding window (here 5, shorter than the input) to every layer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        _hf_config("mixtral", sliding_window=5), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.copy_((1.0 if "mlp.gate" in name else 0.1) * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    config, params = _load(tmp_path)
    assert config.local_layers == (True, True) and config.sliding_window == 5
    tokens = _tokens()
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    ours = np.asarray(_apply(config, params, tokens, positions, np.ones_like(tokens)))
    np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=MODEL_TOL)
    full = dataclasses.replace(config, sliding_window=None, local_layers=())
    unwindowed = np.asarray(_apply(full, params, tokens, positions, np.ones_like(tokens)))
    assert np.abs(unwindowed - ours)[:, 6:].max() > 1e-3  # the window matters here


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


# Decoding runs the same cache path for every family (what sets them apart is checked on the
# full forward above): Qwen3-MoE and Qwen2-MoE (shared expert) in the default tier.
@pytest.mark.parametrize(
    "family",
    [f if f in ("qwen3_moe", "qwen2_moe") else pytest.param(f, marks=pytest.mark.slow)
     for f in FAMILIES],
)  # fmt: skip
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
    loss_fn = jax.jit(step.loss_fn, static_argnums=4)  # the MoE model op by op is far slower
    objective, parts = loss_fn(params, state, batch, jax.random.PRNGKey(0), options)
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


# --- config.json as the Hub has it, and what is refused -------------------------------------

SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    num_experts_per_tok=2,
)
# Older field layouts still on the Hub (fields as in Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B,
# Mixtral-8x7B-v0.1 and OLMoE-1B-7B-0924, at tiny sizes): top-level rope_theta, Qwen3-MoE's
# num_experts where transformers 5 writes num_local_experts.
HUB_CONFIGS = {
    "qwen2_moe": dict(
        architectures=["Qwen2MoeForCausalLM"],
        model_type="qwen2_moe",
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=4,
        rope_theta=1e6,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=21,
        decoder_sparse_step=1,
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
    ),
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        head_dim=32,
        attention_bias=False,
        rope_scaling=None,
        rope_theta=1e6,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=48,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
    ),
    "mixtral": dict(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        intermediate_size=32,
        num_local_experts=4,
        rope_theta=1e6,
        sliding_window=None,
        router_aux_loss_coef=0.02,
        output_router_logits=False,
    ),
    "olmoe": dict(
        architectures=["OlmoeForCausalLM"],
        model_type="olmoe",
        intermediate_size=32,
        num_experts=8,
        clip_qkv=None,
        attention_bias=False,
        rope_scaling=None,
        rope_theta=10000.0,
        norm_topk_prob=False,
        router_aux_loss_coef=0.01,
    ),
}
# Fields transformers fills in with the family's defaults when config.json omits them.
OPTIONAL = ("rope_theta", "norm_topk_prob", "router_aux_loss_coef", "decoder_sparse_step")


def _write(path, fields):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))
    return str(path)


def _config(path):
    return hf.load_model_config(path, dtype="float32", param_dtype="float32", remat="none")


@pytest.mark.parametrize("family", list(HUB_CONFIGS))
@pytest.mark.parametrize("omit", [False, True])
def test_hub_config_fields_read_as_transformers_reads_them(family, omit, tmp_path):
    fields = {**SIZES, **HUB_CONFIGS[family]}
    if omit:
        fields = {k: v for k, v in fields.items() if k not in OPTIONAL}
    path = _write(tmp_path, fields)
    ours = _config(path)
    theirs = AutoConfig.from_pretrained(path)
    assert ours.num_experts == theirs.num_experts > 0
    assert ours.num_experts_per_tok == theirs.num_experts_per_tok
    width = getattr(theirs, "moe_intermediate_size", None) or theirs.intermediate_size
    assert ours.moe_intermediate_size == width
    assert ours.norm_topk_prob == getattr(theirs, "norm_topk_prob", True)  # Mixtral: always
    assert ours.router_aux_loss_coef == theirs.router_aux_loss_coef
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.shared_expert_intermediate_size == getattr(
        theirs, "shared_expert_intermediate_size", 0
    )
    assert ours.attention_bias == (family == "qwen2_moe")
    assert ours.qk_norm == (family in ("qwen3_moe", "olmoe"))
    assert ours.qk_norm_full == (family == "olmoe") and not ours.has_local_layers


def test_qwen2_moe_without_qkv_bias(tmp_path):
    path = _write(tmp_path, {**SIZES, **HUB_CONFIGS["qwen2_moe"], "qkv_bias": False})
    assert not _config(path).attention_bias and not AutoConfig.from_pretrained(path).qkv_bias


def test_mixtral_sliding_window_applies_to_every_layer(tmp_path):
    fields = {**SIZES, **HUB_CONFIGS["mixtral"], "sliding_window": 8}
    config = _config(_write(tmp_path, fields))
    assert config.sliding_window == 8 and config.local_layers == (True, True)


def test_expert_count_names_must_agree(tmp_path):
    fields = {**SIZES, **HUB_CONFIGS["qwen3_moe"], "num_local_experts": 8}
    assert _config(_write(tmp_path / "same", fields)).num_experts == 8
    with pytest.raises(hf.ModelFileError, match=r"config\.json.*num_experts.*num_local_experts"):
        _config(_write(tmp_path / "differ", {**fields, "num_local_experts": 4}))
    del fields["num_experts"], fields["num_local_experts"]
    with pytest.raises(hf.ModelFileError, match=r"config\.json.*'num_experts' is missing"):
        _config(_write(tmp_path / "none", fields))


def test_mlp_only_layers_beyond_the_last_layer_make_no_dense_layer(tmp_path):
    fields = {**SIZES, **HUB_CONFIGS["qwen3_moe"], "mlp_only_layers": [2, 5]}
    assert _config(_write(tmp_path, fields)).is_moe


@pytest.mark.parametrize(
    ("family", "fields", "named"),
    [
        ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
        ("qwen2_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8}, "sliding"),
        ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window"),
        ("qwen2_moe", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ("qwen3_moe", {"attention_bias": True}, "attention_bias"),
        ("qwen3_moe", {"hidden_act": "gelu"}, "hidden_act"),
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
        ("olmoe", {"attention_bias": True}, "attention_bias"),
        ("olmoe", {"head_dim": 32}, "head_dim"),
        ("olmoe", {"sliding_window": 8}, "sliding_window"),
        ("mixtral", {"router_jitter_noise": 0.01}, "router_jitter_noise"),
        ("mixtral", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ],
)
def test_unsupported_moe_features_fail_naming_file_and_field(family, fields, named, tmp_path):
    path = _write(tmp_path, {**SIZES, **HUB_CONFIGS[family], **fields})
    with pytest.raises(hf.UnsupportedModelError, match=rf"config\.json: .*{named}"):
        _config(path)


# --- random init exported as the family that computes it ------------------------------------

RANDOM_INIT = {
    "qwen3_moe": dict(qk_norm=True, head_dim=32, norm_topk_prob=True),
    "qwen2_moe": dict(attention_bias=True, shared_expert_intermediate_size=48),
    "mixtral": dict(norm_topk_prob=True, tie_embeddings=True),
    "olmoe": dict(qk_norm=True, qk_norm_full=True),
}


def _moe_model_config(**fields):
    from tests.helpers import tiny_model_config

    base = dict(
        vocab_size=128, hidden_size=64, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, router_aux_loss_coef=0.02, max_position_embeddings=256,
    )  # fmt: skip
    return tiny_model_config(**{**base, **fields})


def _random_params(config, seed=0):
    ids = jnp.zeros((1, 4), jnp.int32)
    abstract = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), ids, ids, ids)
    leaves, tree = jax.tree.flatten_with_path(nn.unbox(abstract["params"]))
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        out.append(noise * (1.0 if "router" in name else 0.1) + ("scale" in name))
    return jax.tree.unflatten(tree, [jnp.asarray(x) for x in out])


@pytest.mark.parametrize("family", list(RANDOM_INIT))
def test_random_init_exports_as_its_family(family, tmp_path, stories_dir):
    config = _moe_model_config(**RANDOM_INIT[family])
    params = _random_params(config)
    export_hf(params, config, str(tmp_path), tokenizer_dir=str(stories_dir))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == [FAMILIES[family][2]]
    back = _config(str(tmp_path))
    fields = ("num_experts", "moe_intermediate_size", "norm_topk_prob", "qk_norm_full")
    fields += ("shared_expert_intermediate_size", "router_aux_loss_coef", "tie_embeddings")
    assert all(getattr(back, f) == getattr(config, f) for f in fields)
    tokens = _tokens()
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    ours = np.asarray(_apply(config, params, tokens, positions, np.ones_like(tokens)))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    np.testing.assert_allclose(_hf_logits(model, tokens), ours, atol=MODEL_TOL)


def test_configs_no_family_computes_are_refused(stories_dir, tmp_path):
    for fields in (dict(norm_topk_prob=False), dict(attention_bias=True)):
        with pytest.raises(hf.UnsupportedModelError, match="no HF mixture-of-experts family"):
            hf.hf_config_dict(_moe_model_config(**fields), bos_token_id=1, eos_token_id=2)


# --- LoRA on the attention of a MoE checkpoint ----------------------------------------------


@pytest.mark.slow  # end to end; a MoE run logging its router (tests/test_moe_model.py) and
# PEFT parity on MoE checkpoints (tests/test_lora_moe.py) stay in the default tier
def test_lora_on_attention_trains_and_exports_for_peft(tmp_path, stories_dir):
    """A Qwen3-MoE checkpoint (the stories260K vocabulary) fine-tuned with LoRA on its attention
    projections: the loss falls, router statistics are logged, and the PEFT adapter applied by
    peft to the same checkpoint gives the logits of our merged model."""
    import peft

    from sft_jax import export
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.train import train_and_evaluate
    from sft_jax.training.metrics import read_metrics

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    config = _hf_config("qwen3_moe", vocab_size=512, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    c = load_config_file("configs/tiny.py")
    c.model.path = str(base_dir)
    c.lora.update(
        enabled=True, rank=4, base_dtype="float32", targets=("q_proj", "v_proj", "o_proj")
    )
    c.optim.learning_rate = 3e-2
    c.train.update(max_steps=6, log_every=1)
    c.eval.generate_examples = 0
    c.checkpoint.every_steps = 0
    workdir = tmp_path / "run"
    train_and_evaluate(parse(c), str(workdir))
    records = [r for r in read_metrics(str(workdir)) if "loss" in r and "kind" not in r]
    assert records[-1]["loss"] < records[0]["loss"] - 0.1, [r["loss"] for r in records]
    assert all(len(r["expert_load"]) == 8 for r in records)

    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "ad"), "--peft"]) == 0
    adapter_config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    run = export.load_workdir(str(workdir))
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 12))
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    ours = _apply(run.model_config, run.params, tokens, positions, np.ones_like(tokens))
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(model, tmp_path / "ad").eval()
    theirs = _hf_logits(model, tokens)
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=MODEL_TOL)
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    assert np.abs(_hf_logits(base, tokens) - theirs).max() > 1e-2  # the adapters changed it


def test_missing_expert_tensor_names_file_and_key(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = saved("mixtral")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    config = _config(str(tmp_path))
    for check in (hf.check_checkpoint, hf.load_params):
        with pytest.raises(hf.ModelFileError, match=r"model\.safetensors.*experts\.3\.w3\.weight"):
            check(str(tmp_path), config)
