"""LoRA end to end: PEFT export loads in `peft` with the same logits (LoRA, rsLoRA, DoRA), PEFT
import continues from the same adapters, and a tiny LoRA run trains, checkpoints only its
adapters, resumes and exports (merged and PEFT)."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from test_export import BASE, MODEL_TOL, _random_params, _tokens
from transformers import AutoModelForCausalLM

from sft_jax import export, lora
from sft_jax.config import ConfigError, parse
from sft_jax.config_file import load_config_file
from sft_jax.model.decoder import Transformer
from sft_jax.training.metrics import read_metrics


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, variables, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return Transformer(config).apply(variables, tokens, positions, jnp.ones_like(tokens))


def _peft_logits(base_dir, adapter_dir, tokens):
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()


def _random_adapters(params, rank, dora, seed=1):
    """Random A and B (DoRA: m around the init's ||W||): numpy noise in the adapter tree's
    shapes, since a jax random tree compiles a program for each leaf shape."""
    init = lambda p: lora.init_adapters(p, lora.ALL_LINEAR, rank, jax.random.PRNGKey(0))
    adapters = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), jax.eval_shape(init, params))
    if dora:
        adapters = jax.jit(lora.init_magnitudes)(params, adapters)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32), adapters
    )


@pytest.mark.parametrize(("rslora", "dora"), [(False, False), (True, True)])
def test_peft_export_matches_peft(rslora, dora, tmp_path, stories_dir):
    """Our forward with the "lora" collection equals PEFT's on the exported base + adapter;
    with DoRA this is the reference check of our DoRA forward against peft's DoraLinearLayer."""
    params = _random_params(BASE)
    rank, alpha = 4, 8.0
    adapters = _random_adapters(params, rank, dora)
    export.export_hf(params, BASE, str(tmp_path / "base"), tokenizer_dir=str(stories_dir))
    config = lora.peft_config(
        adapters, rank=rank, alpha=alpha, rslora=rslora, dropout=0.0, base=str(tmp_path / "base")
    )
    assert config["use_dora"] is dora and len(config["target_modules"]) == 7
    lora.write_peft_adapter(str(tmp_path / "adapter"), adapters, config)
    tokens = _tokens()
    scale = lora.lora_scale(alpha, rank, rslora)
    model_config = dataclasses.replace(BASE, lora_scale=scale)
    ours = _apply(model_config, {"params": params, "lora": adapters}, jnp.asarray(tokens))
    theirs = _peft_logits(tmp_path / "base", tmp_path / "adapter", tokens)
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=MODEL_TOL)
    plain = np.asarray(_apply(BASE, {"params": params}, jnp.asarray(tokens)))
    assert np.abs(plain - theirs).max() > 1e-2  # the adapter changed the logits
    back = lora.read_peft_adapter(
        str(tmp_path / "adapter"), params, rank=rank, alpha=alpha, rslora=rslora, dora=dora
    )
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="r is 4 there but 8 here"):
        lora.read_peft_adapter(
            str(tmp_path / "adapter"), params, rank=8, alpha=alpha, rslora=rslora, dora=dora
        )


def test_adapter_gradients_match_peft(tmp_path, stories_dir):
    """The gradient of a masked mean cross-entropy w.r.t. A and B (B != 0) equals PEFT+torch's
    on the same weights and batch: rules out a wrong scale, init or layout in training itself."""
    params = _random_params(BASE)
    rank, alpha = 4, 8.0
    adapters = _random_adapters(params, rank, False)
    export.export_hf(params, BASE, str(tmp_path / "base"), tokenizer_dir=str(stories_dir))
    tokens = _tokens()
    targets, mask = np.roll(tokens, -1, axis=1), np.arange(tokens.shape[1]) >= 6
    model_config = dataclasses.replace(BASE, lora_scale=lora.lora_scale(alpha, rank, False))

    def loss(ad):
        logits = _apply(model_config, {"params": params, "lora": ad}, jnp.asarray(tokens))
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * mask) / (mask.sum() * len(tokens))

    ours = lora.to_peft_tensors(jax.jit(jax.grad(loss))(adapters))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(lora.ALL_LINEAR))
    model = peft.get_peft_model(model, config)
    state = {k: torch.from_numpy(v) for k, v in lora.to_peft_tensors(adapters).items()}
    peft.set_peft_model_state_dict(model, state)
    logp = torch.log_softmax(model(input_ids=torch.from_numpy(tokens)).logits.float(), -1)
    nll = -logp.gather(-1, torch.from_numpy(targets)[..., None])[..., 0]
    (nll * torch.from_numpy(mask)).sum().div(float(mask.sum() * len(tokens))).backward()
    named = model.named_parameters()
    theirs = {n.replace(".default", ""): p.grad.numpy() for n, p in named if p.grad is not None}
    assert sorted(ours) == sorted(theirs)
    for name, grad in ours.items():
        np.testing.assert_allclose(grad, theirs[name], atol=1e-5 * np.abs(grad).max() + 1e-9)


def test_modules_to_save_match_peft(tmp_path, stories_dir):
    """Saved modules (a trained tied embedding and the norms) export as PEFT modules_to_save:
    peft (with ensure_weight_tying) gives our logits, the merge equals the unmerged forward,
    and import gives back the same tree."""
    params = _random_params(BASE)
    modules = ("embed_tokens", "norm", "input_layernorm")
    adapters = lora.add_saved_modules(params, _random_adapters(params, 4, False), modules)
    adapters = _random_adapters(params, 4, False) | {
        lora.SAVED: jax.tree.map(lambda x: x * 1.5 + 0.01, adapters[lora.SAVED])
    }
    export.export_hf(params, BASE, str(tmp_path / "base"), tokenizer_dir=str(stories_dir))
    base = str(tmp_path / "base")
    with pytest.raises(ValueError, match="needs tied_embeddings"):
        lora.peft_config(adapters, rank=4, alpha=8.0, rslora=False, dropout=0.0, base=base)
    config = lora.peft_config(
        adapters, rank=4, alpha=8.0, rslora=False, dropout=0.0, base=base, tied_embeddings=True
    )
    saved = ["embed_tokens", "input_layernorm", "model.norm"]
    assert config["modules_to_save"] == saved and config["ensure_weight_tying"]
    lora.write_peft_adapter(str(tmp_path / "adapter"), adapters, config)
    tokens = _tokens()
    model_config = dataclasses.replace(BASE, lora_scale=2.0)
    variables = lora.apply_variables({"params": params, "lora": adapters})
    ours = np.asarray(_apply(model_config, variables, jnp.asarray(tokens)))
    theirs = _peft_logits(tmp_path / "base", tmp_path / "adapter", tokens)
    np.testing.assert_allclose(theirs, ours, atol=MODEL_TOL)
    merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, 2.0)
    np.testing.assert_allclose(
        np.asarray(_apply(BASE, {"params": merged}, jnp.asarray(tokens))), ours, atol=MODEL_TOL
    )
    back = lora.read_peft_adapter(
        str(tmp_path / "adapter"), params, rank=4, alpha=8.0, rslora=False, dora=False
    )
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not modules of this model"):
        lora.add_saved_modules(params, {}, ("post_feedforward_layernorm",))


def _tiny(**lora_overrides):
    c = load_config_file("configs/tiny.py")
    c.lora.enabled = True
    c.lora.rank = 2
    c.lora.base_dtype = "float32"
    c.optim.learning_rate = 3e-2  # a random base: only the adapters can lower the loss
    for key, value in lora_overrides.items():
        setattr(c.lora, key, value)
    return c


def _size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from sft_jax.train import train_and_evaluate

    workdir = tmp_path_factory.mktemp("tiny_lora")
    c = _tiny()
    c.train.max_steps = 10
    c.train.log_every = 1
    summary = train_and_evaluate(parse(c), str(workdir))
    return workdir, summary


def _export_both_ways(workdir, cfg, tmp_path, stories_dir):
    """Merged HF export, PEFT export of the same step, and the base they apply to; asserts that
    transformers (merged) and peft (base + adapter) give the same logits -> (run, mesh, rules,
    merged logits)."""
    from sft_jax.training.state import init_params

    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "merged")]) == 0
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "ad"), "--peft"]) == 0
    # The adapter directory also serves chat: tokenizer, training template, generation config.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "ad" / name).is_file(), name
    run = export.load_workdir(str(workdir))
    mesh = jax.sharding.Mesh(
        np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "context", "tensor")
    )
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    base = init_params(Transformer(run.model_config), "", mesh, rules, cfg.seed)
    export.export_hf(base, run.model_config, str(tmp_path / "base"), tokenizer_dir=str(stories_dir))
    tokens = _tokens()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=torch.from_numpy(tokens)).logits.numpy()
    peft_logits = _peft_logits(tmp_path / "base", tmp_path / "ad", tokens)
    np.testing.assert_allclose(merged_logits, peft_logits, atol=MODEL_TOL)
    return run, mesh, rules, merged_logits


def test_tiny_lora_trains_and_checkpoints_only_adapters(lora_run):
    from sft_jax.hf.config import build_model_config
    from sft_jax.model.decoder import count_params

    workdir, summary = lora_run
    losses = [r["loss"] for r in read_metrics(str(workdir)) if "loss" in r]
    # From ln(512) = 6.24 at step 1; embeddings and LM head stay frozen, so it falls slowly.
    assert max(losses[-3:]) < losses[0] - 0.15, losses
    assert summary["eval_loss"] < 6.0
    state_dir = workdir / "checkpoints" / "10" / "state"
    # What a full fine-tuning checkpoint of the same model at least holds: params + 2 Adam
    # moments in float32 (~1.5 MB; Orbax's metadata comes on top). LoRA r=2: adapters + moments
    # + Orbax's fixed metadata (~0.2 MB). The base is not in the checkpoint (config.json names
    # model.path).
    config = build_model_config(parse(_tiny()).model)
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    shapes = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens, tokens, tokens)
    full_bytes = 3 * 4 * count_params(shapes["params"])
    assert full_bytes > 1e6, full_bytes
    assert _size(state_dir) < 0.25 * full_bytes, (_size(state_dir), full_bytes)


@pytest.mark.slow  # end to end; PEFT parity of the export stays in the default tier
def test_lora_resume_and_export(lora_run, tmp_path, stories_dir):
    from sft_jax.train import train_and_evaluate

    workdir, _ = lora_run
    c = _tiny()
    c.train.max_steps = 12
    c.train.log_every = 1
    summary = train_and_evaluate(parse(c), str(workdir))
    steps = [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]
    assert steps[-3:] == [10, 11, 12] and steps.count(10) == 1  # resumed from step 10
    assert summary["steps"] == 12
    run, mesh, rules, _ = _export_both_ways(workdir, parse(c), tmp_path, stories_dir)
    # Continuing from the exported PEFT adapter starts from exactly the trained adapters.
    c2 = _tiny(init_from=str(tmp_path / "ad"))
    from sft_jax.training.optim import make_optimizer
    from sft_jax.training.state import StateSpec, create_train_state

    cfg = parse(c2)
    tx = make_optimizer(cfg.optim, 10, cfg.lora)
    state, _ = create_train_state(
        StateSpec(run.model_config, mesh, rules, tx, cfg.seed, lora=cfg.lora)
    )
    for a, b in zip(jax.tree.leaves(run.adapters), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad = parse(_tiny(init_from=str(tmp_path / "ad"), rank=4))
    with pytest.raises(ConfigError, match="r is 2 there but 4 here"):
        create_train_state(StateSpec(run.model_config, mesh, rules, tx, bad.seed, lora=bad.lora))


@pytest.mark.slow  # end to end; test_modules_to_save_match_peft stays in the default tier
def test_modules_to_save_run_exports_merged_and_peft(tmp_path, stories_dir):
    """A run that also trains the (tied) embedding exports both ways with equal logits."""
    from sft_jax.train import train_and_evaluate

    c = _tiny(modules_to_save=("embed_tokens",))
    c.train.max_steps = 2
    c.data.max_eval_examples = 8
    workdir = tmp_path / "run"
    train_and_evaluate(parse(c), str(workdir))
    *_, merged_logits = _export_both_ways(workdir, parse(c), tmp_path, stories_dir)
    tokens = _tokens()
    # The embedding was trained, so the merged model differs from the base.
    base_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        base_logits = base_model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(merged_logits - base_logits).max() > 1e-3
