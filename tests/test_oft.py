"""OFT (orthogonal fine-tuning) against PEFT 0.21: the rotation math equals PEFT's rotation
module (Neumann default, exact Cayley, COFT), the model with OFT rotations gives PEFT's logits on
an exported adapter (merged = unmerged), gradients equal PEFT's, import gives back the same
tree, and a tiny OFT run (also on an NF4 base) trains and exports both ways."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import scipy.linalg
import torch
from peft.tuners.oft.layer import OFTRotationModule
from test_export import BASE, MODEL_TOL, _random_params, _tokens
from test_lora_model import MODEL, RULES, batch, lora_cfg, optim_cfg
from transformers import AutoModelForCausalLM

from sft_jax import export, lora
from sft_jax.config import ConfigError, MeshSection, parse
from sft_jax.config_file import load_config_file
from sft_jax.lora import oft
from sft_jax.model.decoder import Transformer
from sft_jax.training.metrics import read_metrics
from sft_jax.training.optim import make_optimizer
from sft_jax.training.sharding import make_mesh
from sft_jax.training.state import StateSpec, create_train_state

OFT_KEYS = {
    "oft_block_size": 8,
    "oft_block_share": False,
    "oft_coft": False,
    "oft_eps": 6e-5,
    "oft_cayley_neumann": True,
    "oft_neumann_terms": 5,
}


def _torch_module(vec, neumann, terms=5, coft=False, eps=6e-5, share=False, in_features=None):
    blocks, n = vec.shape
    b = oft.block_size(n)
    module = OFTRotationModule(
        blocks,
        n,
        b,
        in_features or blocks * b,
        coft=coft,
        eps=eps,
        block_share=share,
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=terms,
    )
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(np.asarray(vec, np.float32)))
    return module


@pytest.mark.parametrize(("neumann", "terms"), [(True, 5), (True, 3), (True, 2), (False, 5)])
def test_rotation_blocks_equal_peft(neumann, terms):
    vec = 0.1 * np.random.default_rng(0).standard_normal((3, 28)).astype(np.float32)
    theirs = _torch_module(vec, neumann, terms).get_weight().detach().numpy()
    ours = np.asarray(jax.jit(oft.cayley, static_argnums=1)(vec, terms if neumann else 0))
    np.testing.assert_allclose(scipy.linalg.block_diag(*ours), theirs, atol=1e-6)
    if not neumann:  # the exact transform is orthogonal
        np.testing.assert_allclose(
            ours @ ours.transpose(0, 2, 1), np.eye(8)[None].repeat(3, 0), atol=1e-5
        )


def test_coft_projection_equals_peft():
    vec = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    vec[0] *= 1e-6  # inside the ball: unchanged
    module = _torch_module(vec, True, coft=True, eps=1e-2)
    theirs = module._project_batch(torch.from_numpy(vec), eps=1e-2).numpy()
    ours = np.asarray(jax.jit(oft.project, static_argnums=1)(vec, 1e-2))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(ours[0], vec[0])


def test_adjusted_block_size_is_peft_s():
    layer = torch.nn.Linear(96, 4)
    from peft.tuners.oft.layer import OFTLayer

    for in_features, size in [(96, 7), (64, 7), (48, 32), (16, 32), (96, 9)]:
        expected = OFTLayer.adjust_oft_parameters(None, in_features, size)
        assert oft.adjust_block_size(in_features, size) == expected, (in_features, size)
    del layer


def _random_oft(params, size=8, share=False, seed=1):
    shapes = jax.eval_shape(lambda p: lora.init_oft(p, lora.ALL_LINEAR, size, share), params)
    rng = np.random.default_rng(seed)  # numpy: a jax random tree compiles per leaf shape
    return jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape, np.float32), shapes)


# One program, not an op-by-op compile for each leaf shape.
_merge = jax.jit(lora.merge, static_argnums=(2, 3))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(config, spec, variables, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    variables = lora.apply_variables(variables, spec)
    return Transformer(config).apply(variables, tokens, positions, jnp.ones_like(tokens))


def _peft_logits(base_dir, adapter_dir, tokens):
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()


@pytest.mark.parametrize(
    ("size", "share", "neumann", "coft"),
    [(8, False, True, False), (7, False, False, False), (8, True, True, True)],
)
def test_peft_export_matches_peft(size, share, neumann, coft, tmp_path, stories_dir):
    """Default path (Neumann, 5 terms), exact Cayley with a block size PEFT adjusts per module
    (7 -> 8 on 64 inputs, 6 on 96), and shared blocks with COFT: PEFT's logits, merged =
    unmerged, and the adapter reads back as written (COFT: projected)."""
    params = _random_params(BASE)
    adapters = _random_oft(params, size, share)
    keys = dict(OFT_KEYS, oft_block_size=size, oft_block_share=share)
    keys.update(oft_cayley_neumann=neumann, oft_coft=coft, oft_eps=0.5)
    spec = oft.spec_of({"method": "oft", **keys})
    base = str(tmp_path / "base")
    export.export_hf(params, BASE, base, tokenizer_dir=str(stories_dir))
    written = jax.jit(lora.oft_projected, static_argnums=1)(adapters, spec)
    config = lora.oft_peft_config(written, keys, base=base, tied_embeddings=True)
    lora.write_peft_adapter(str(tmp_path / "adapter"), written, config)
    tokens = _tokens()
    ours = np.asarray(_apply(BASE, spec, {"params": params, "lora": adapters}, jnp.asarray(tokens)))
    theirs = _peft_logits(base, tmp_path / "adapter", tokens)
    np.testing.assert_allclose(theirs, ours, atol=MODEL_TOL)
    plain = np.asarray(_apply(BASE, None, {"params": params}, jnp.asarray(tokens)))
    assert np.abs(plain - theirs).max() > 1e-2  # the rotations changed the logits
    merged = _merge(params, adapters, 1.0, spec)
    merged_logits = _apply(BASE, None, {"params": merged}, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(merged_logits), ours, atol=MODEL_TOL)
    back = lora.read_peft_adapter(str(tmp_path / "adapter"), params, oft_spec=spec)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(written), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"OFT adapter but config\.lora\.method is 'lora'"):
        lora.read_peft_adapter(str(tmp_path / "adapter"), params, rank=4)
    other = dataclasses.replace(spec, neumann_terms=3 if neumann else 5)
    with pytest.raises(ValueError, match="OFT settings"):
        lora.read_peft_adapter(str(tmp_path / "adapter"), params, oft_spec=other)


def test_gradients_match_peft(tmp_path, stories_dir):
    """d(masked mean cross-entropy) / d(oft_R) equals PEFT+torch's on the same weights."""
    params = _random_params(BASE)
    adapters = _random_oft(params)
    spec = oft.OftSpec()
    export.export_hf(params, BASE, str(tmp_path / "base"), tokenizer_dir=str(stories_dir))
    tokens = _tokens()
    targets, mask = np.roll(tokens, -1, axis=1), np.arange(tokens.shape[1]) >= 6

    def loss(ad):
        logits = _apply(BASE, spec, {"params": params, "lora": ad}, jnp.asarray(tokens))
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * mask) / (mask.sum() * len(tokens))

    ours = lora.to_peft_tensors(jax.jit(jax.grad(loss))(adapters))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    config = peft.OFTConfig(oft_block_size=8, r=0, target_modules=list(lora.ALL_LINEAR))
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


def _oft_cfg(**kw):
    return lora_cfg(method="oft", **{**OFT_KEYS, **kw})


@pytest.mark.slow  # builds and compiles two train states
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_oft_state_starts_at_base_and_learns(quant):
    """An OFT train state (float32 or NF4 base) equals the base at init; one gradient step moves
    only the rotation vectors, and the forward equals the merged model's."""
    cfg = _oft_cfg(base_quant=quant)
    mesh = make_mesh(MeshSection(-1, 1, 1, rules=RULES), jax.devices()[:1])
    tx = make_optimizer(optim_cfg(), 10, cfg)
    state, _ = create_train_state(StateSpec(MODEL, mesh, RULES, tx, lora=cfg))
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.shape[-1], state.params))) == {28}
    b = batch()
    base = lora.dequantize(state.frozen)

    def run(adapters, frozen):
        variables = {"params": frozen, "lora": adapters}
        return state.apply_fn(variables, b["inputs"], b["positions"], b["segment_ids"])

    plain = Transformer(MODEL).apply(
        {"params": base}, b["inputs"], b["positions"], b["segment_ids"]
    )
    np.testing.assert_allclose(run(state.params, state.frozen), plain, atol=1e-5)
    grads = jax.grad(lambda a: jnp.mean(run(a, state.frozen) ** 2))(state.params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    moved = jax.tree.map(lambda x, g: x - 0.5 * g / (jnp.abs(g).max() + 1e-12), state.params, grads)
    ours = run(moved, state.frozen)
    merged = lora.merge(base, moved, 1.0, lora.oft_spec(cfg))
    theirs = Transformer(MODEL).apply(
        {"params": merged}, b["inputs"], b["positions"], b["segment_ids"]
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(np.asarray(ours - plain)).max() > 1e-3


def test_config_refuses_lora_only_keys_with_oft():
    c = load_config_file("configs/tiny.py")
    c.lora.enabled = True
    c.lora.method = "oft"
    c.lora.dora = True
    with pytest.raises(ConfigError, match=r"lora\.dora"):
        parse(c)
    c.lora.dora = False
    c.lora.lr_ratio_b = 4.0
    with pytest.raises(ConfigError, match=r"lora\.lr_ratio_b"):
        parse(c)


def test_unrotated_vectors_are_refused():
    params = _random_params(BASE)
    adapters = _random_oft(params)
    tokens = jnp.asarray(_tokens())
    with pytest.raises(ValueError, match="unrotated"):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        Transformer(BASE).apply({"params": params, "lora": adapters}, tokens, positions, tokens)
    with pytest.raises(ValueError, match="OftSpec"):
        lora.merge(params, adapters, 1.0)


@pytest.mark.slow  # end to end: train, checkpoint, export merged and PEFT, continue from PEFT
def test_tiny_oft_run_trains_and_exports(tmp_path, stories_dir):
    from sft_jax.train import train_and_evaluate

    c = load_config_file("configs/tiny.py")
    c.lora.enabled = True
    c.lora.method = "oft"
    c.lora.oft_block_size = 8
    c.lora.base_dtype = "float32"
    c.optim.learning_rate = 3e-2
    c.train.max_steps = 10
    c.train.log_every = 1
    workdir = tmp_path / "run"
    train_and_evaluate(parse(c), str(workdir))
    losses = [r["loss"] for r in read_metrics(str(workdir)) if "loss" in r]
    assert max(losses[-3:]) < losses[0] - 0.05, losses
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "merged")]) == 0
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "ad"), "--peft"]) == 0
    run = export.load_workdir(str(workdir))
    from sft_jax.training.state import init_params

    mesh = jax.sharding.Mesh(
        np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "context", "tensor")
    )
    cfg = parse(c)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    base = init_params(Transformer(run.model_config), "", mesh, rules, cfg.seed)
    export.export_hf(base, run.model_config, str(tmp_path / "base"), tokenizer_dir=str(stories_dir))
    tokens = _tokens()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=torch.from_numpy(tokens)).logits.numpy()
    peft_logits = _peft_logits(tmp_path / "base", tmp_path / "ad", tokens)
    np.testing.assert_allclose(merged_logits, peft_logits, atol=MODEL_TOL)
    from sft_jax.api import load_peft  # the PEFT adapter merged onto its base by sft_jax

    loaded = load_peft(str(tmp_path / "ad"), base=str(tmp_path / "base"))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    again = Transformer(loaded.model_config).apply(
        {"params": loaded.params}, jnp.asarray(tokens), positions, jnp.ones_like(positions)
    )
    np.testing.assert_allclose(np.asarray(again), peft_logits, atol=MODEL_TOL)
    c.lora.init_from = str(tmp_path / "ad")
    cfg = parse(c)
    tx = make_optimizer(cfg.optim, 10, cfg.lora)
    state, _ = create_train_state(
        StateSpec(run.model_config, mesh, rules, tx, cfg.seed, lora=cfg.lora)
    )
    for a, b in zip(jax.tree.leaves(run.adapters), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
