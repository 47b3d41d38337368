"""Prefix tuning and prompt tuning against PEFT 0.21: an exported adapter gives PEFT's logits
(prompt tuning: on the real tokens), it reads back as written, a packed row's logits equal its
examples' run alone, and KV-cache generation continues as the full forward predicts."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import save_file
from test_export import BASE, MODEL_TOL, _random_params, _tokens
from transformers import AutoModelForCausalLM

from sft_jax import export
from sft_jax.lora import prefix as lora_prefix
from sft_jax.model.decode import generate
from sft_jax.model.decoder import Transformer
from sft_jax.model.prefix import with_prompt_prefix

P = 3


def _adapters(method, params, seed=1):
    rng = jax.random.PRNGKey(seed)
    if method == "prompt":  # random directions of the embeddings' scale, not vocabulary rows
        return {lora_prefix.PROMPT: 0.5 * jax.random.normal(rng, (P, BASE.hidden_size))}
    c = BASE
    return lora_prefix.init_prefix(c.num_layers, P, c.num_kv_heads, c.head_dim, rng)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, variables, tokens, positions, segment_ids):
    model = Transformer(config)
    return model.apply(with_prompt_prefix(model, variables), tokens, positions, segment_ids)


def _logits(variables, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(
        _apply(BASE, variables, jnp.asarray(tokens), positions, jnp.ones_like(tokens))
    )


def _alone(variables, sequences, length=12):
    """Each sequence's logits run alone: as a row of a [2, length] batch, followed by padding
    (causal: later tokens change no earlier logit), so that every call shares one compiled
    program with `_logits` of the [2, 12] test tokens."""
    tokens = np.zeros((2, length), int)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = seq
    logits = _logits(variables, tokens)
    return [logits[i, : len(seq)] for i, seq in enumerate(sequences)]


def _write(adapter_dir, adapters, base):
    os.makedirs(adapter_dir, exist_ok=True)
    save_file(
        lora_prefix.to_peft_tensors(adapters),
        os.path.join(adapter_dir, "adapter_model.safetensors"),
        {"format": "pt"},
    )
    import json

    config = lora_prefix.peft_config(adapters, BASE, base=base)
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def _peft_logits(base_dir, adapter_dir, tokens):
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        ids = torch.from_numpy(tokens)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_peft_export_matches_peft(method, tmp_path, stories_dir):
    params = _random_params(BASE)
    adapters = _adapters(method, params)
    base = str(tmp_path / "base")
    export.export_hf(params, BASE, base, tokenizer_dir=str(stories_dir))
    _write(str(tmp_path / "adapter"), adapters, base)
    tokens = _tokens()
    ours = _logits({"params": params, "lora": adapters}, tokens)
    theirs = _peft_logits(base, tmp_path / "adapter", tokens)
    if method == "prompt":  # PEFT's logits include the virtual tokens' positions
        theirs = theirs[:, P:]
    np.testing.assert_allclose(theirs, ours, atol=MODEL_TOL)
    plain = _logits({"params": params}, tokens)
    assert np.abs(plain - ours).max() > 1e-2  # the prefix changed the logits
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    c = BASE
    back = lora_prefix.from_peft_tensors(tensors, method, c.num_layers, c.num_kv_heads, c.head_dim)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_packed_row_equals_examples_alone(method):
    """Two examples packed in one row (positions restart, segments 1 and 2, then padding) give
    the logits each gives alone: each sees the prefix and only its own tokens."""
    params = _random_params(BASE)
    variables = {"params": params, "lora": _adapters(method, params)}
    rng = np.random.default_rng(3)
    first, second = rng.integers(1, 512, 5), rng.integers(1, 512, 4)
    # The packed row beside a padding row: the [2, 12] shape of the other calls (one program).
    rows = np.stack([np.concatenate([first, second, [0, 0, 0]]), np.zeros(12, int)])
    positions = np.tile(np.concatenate([np.arange(5), np.arange(4), np.zeros(3, int)]), (2, 1))
    segments = np.tile(np.concatenate([np.ones(5, int), 2 * np.ones(4, int), np.zeros(3, int)]),
                       (2, 1))  # fmt: skip
    packed = np.asarray(
        _apply(BASE, variables, jnp.asarray(rows), jnp.asarray(positions), jnp.asarray(segments))
    )
    alone = _alone(variables, [first, second])
    np.testing.assert_allclose(packed[0, :5], alone[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:9], alone[1], atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_kv_cache_generation_follows_the_full_forward(method):
    """Greedy generation with the prefix (prompts of two lengths, so rows are left-padded)
    emits, at every step, the argmax of the full forward over prompt + generated tokens."""
    params = _random_params(BASE)
    variables = {"params": params, "lora": _adapters(method, params)}
    prefix = with_prompt_prefix(Transformer(BASE), variables)["lora"]
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 512, 6).tolist(), rng.integers(1, 512, 3).tolist()]
    outs = generate(
        Transformer(BASE), params, prompts, max_new_tokens=5, stop_ids=[], prefix=prefix
    )
    plain = generate(Transformer(BASE), params, prompts, max_new_tokens=5, stop_ids=[])
    assert outs != plain  # the prefix is used
    full = _alone(variables, [prompt + out for prompt, out in zip(prompts, outs, strict=True)])
    for prompt, out, logits in zip(prompts, outs, full, strict=True):
        assert len(out) == 5
        predicted = logits.argmax(-1)
        assert predicted[len(prompt) - 1 : -1].tolist() == out


@pytest.mark.slow  # end to end: train, evaluate, export PEFT, continue from it
@pytest.mark.parametrize("method", ["prefix", "prompt", "projection"])
def test_tiny_run_trains_and_exports_peft(method, tmp_path, stories_dir):
    from sft_jax.config import ConfigError, parse
    from sft_jax.config_file import load_config_file
    from sft_jax.train import train_and_evaluate
    from sft_jax.training.metrics import read_metrics
    from sft_jax.training.optim import make_optimizer
    from sft_jax.training.state import StateSpec, create_train_state, init_params

    c = load_config_file("configs/tiny.py")
    c.lora.enabled = True
    c.lora.method = "prefix" if method == "projection" else method
    c.lora.prefix_projection = method == "projection"
    c.lora.num_virtual_tokens = 4
    c.lora.base_dtype = "float32"
    c.optim.learning_rate = 1e-1
    c.train.max_steps = 10
    c.train.log_every = 1
    workdir = tmp_path / "run"
    summary = train_and_evaluate(parse(c), str(workdir))
    # The held-out loss (evaluated on the base + prefix tree) falls; train losses are too noisy
    # over 10 different batches of a random tiny model.
    before, after = (summary["comparison"][0][k] for k in ("before", "after"))
    assert after < before - 0.02, (before, after)
    assert len([r for r in read_metrics(str(workdir)) if "loss" in r]) == 10
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "merged")]) == 2
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "ad"), "--peft"]) == 0
    run = export.load_workdir(str(workdir))
    mesh = jax.sharding.Mesh(
        np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "context", "tensor")
    )
    cfg = parse(c)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    base = init_params(Transformer(run.model_config), "", mesh, rules, cfg.seed)
    export.export_hf(base, run.model_config, str(tmp_path / "base"), tokenizer_dir=str(stories_dir))
    tokens = _tokens()
    theirs = _peft_logits(tmp_path / "base", tmp_path / "ad", tokens)
    theirs = theirs[:, 4:] if method == "prompt" else theirs
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    ours = Transformer(run.model_config).apply(  # the loaded run's inference tree
        {"params": run.params}, jnp.asarray(tokens), positions, jnp.ones_like(positions)
    )
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=MODEL_TOL)
    from sft_jax.api import load_peft  # the PEFT adapter loaded back onto its base

    loaded = load_peft(str(tmp_path / "ad"), base=str(tmp_path / "base"))
    again = Transformer(loaded.model_config).apply(
        {"params": loaded.params}, jnp.asarray(tokens), positions, jnp.ones_like(positions)
    )
    np.testing.assert_allclose(theirs, np.asarray(again), atol=MODEL_TOL)
    if method == "projection":  # PEFT saved the K/V, not the encoder: no continuing from it
        c.lora.init_from = str(tmp_path / "ad")
        with pytest.raises(ConfigError, match="prefix_projection"):
            parse(c)
        return
    c.lora.init_from = str(tmp_path / "ad")
    cfg = parse(c)
    tx = make_optimizer(cfg.optim, 10, cfg.lora)
    state, _ = create_train_state(
        StateSpec(run.model_config, mesh, rules, tx, cfg.seed, lora=cfg.lora)
    )
    for a, b in zip(jax.tree.leaves(run.adapters), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sliding_window_models_are_refused():
    import dataclasses

    config = dataclasses.replace(BASE, sliding_window=4, local_layers=(True, False))
    params = _random_params(config)
    variables = {"params": params, "lora": _adapters("prefix", params)}
    tokens = jnp.asarray(_tokens())
    with pytest.raises(ValueError, match="sliding-window"):
        _apply(config, variables, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens))


def test_prefix_projection_matches_peft_training_model(tmp_path, stories_dir):
    """With prefix_projection, our encoder's K/V give the logits of PEFT's model in training
    mode (its PrefixEncoder MLP) on the same weights, and the exported adapter (the K/V, as
    PEFT saves) gives them too."""
    params = _random_params(BASE)
    c, hidden = BASE, 24
    adapters = lora_prefix.make_prefix_adapters(params, "prefix", P, jax.random.PRNGKey(2), hidden)
    enc = adapters[lora_prefix.ENCODER]
    base = str(tmp_path / "base")
    export.export_hf(params, BASE, base, tokenizer_dir=str(stories_dir))
    tokens = _tokens()
    ours = _logits({"params": params, "lora": adapters}, tokens)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
        encoder_hidden_size=hidden,
    )  # fmt: skip
    model = peft.get_peft_model(model, config)
    encoder = model.prompt_encoder["default"]
    weights = {
        "embedding.weight": enc["embedding"],
        "transform.0.weight": enc["w1"].T,
        "transform.0.bias": enc["b1"],
        "transform.2.weight": enc["w2"].reshape(hidden, -1).T,
        "transform.2.bias": enc["b2"].reshape(-1),
    }
    encoder.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
    with torch.no_grad():
        ids = torch.from_numpy(tokens)
        theirs = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=MODEL_TOL)
    _write(str(tmp_path / "adapter"), adapters, base)
    np.testing.assert_allclose(
        _peft_logits(base, tmp_path / "adapter", tokens), ours, atol=MODEL_TOL
    )
    assert c.num_kv_heads * c.head_dim != hidden  # the encoder's width is its own


@pytest.mark.slow  # builds two train states
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_train_state_on_an_nf4_base(method):
    """Prefix and prompt tuning over a QLoRA (NF4) base: the state's forward equals the plain
    model's on the dequantised base with the same prefix, and only the prefix gets gradients."""
    from test_lora_model import MODEL, RULES, batch, lora_cfg, optim_cfg

    from sft_jax import lora
    from sft_jax.config import MeshSection
    from sft_jax.training.optim import make_optimizer
    from sft_jax.training.sharding import make_mesh
    from sft_jax.training.state import StateSpec, create_train_state

    cfg = lora_cfg(method=method, base_quant="nf4", num_virtual_tokens=P)
    mesh = make_mesh(MeshSection(-1, 1, 1, rules=RULES), jax.devices()[:1])
    tx = make_optimizer(optim_cfg(), 10, cfg)
    state, _ = create_train_state(StateSpec(MODEL, mesh, RULES, tx, lora=cfg))
    b = batch()
    inputs = (b["inputs"], b["positions"], b["segment_ids"])
    ours = state.apply_fn({"params": state.frozen, "lora": state.params}, *inputs)
    model = Transformer(MODEL)
    base = lora.dequantize(state.frozen)
    plain = model.apply(with_prompt_prefix(model, {"params": base, "lora": state.params}), *inputs)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), atol=1e-4)
    loss = lambda a: jnp.mean(state.apply_fn({"params": state.frozen, "lora": a}, *inputs) ** 2)
    grads = jax.grad(loss)(state.params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
