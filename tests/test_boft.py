"""BOFT (PEFT's butterfly OFT) against PEFT 0.21 on tiny random models: an exported adapter gives
PEFT's logits (merged = unmerged, biases included), an adapter PEFT itself made (full, non-skew
boft_R and a random boft_s) imports to PEFT's logits, the tree reads back as written, and what
is not supported is refused with a message naming it. PEFT computes more than one butterfly
factor only through its CUDA extension (a batched block diagonal, `fbd_cuda`); the tests with
factors give PEFT that block diagonal in torch (`peft_butterfly`), so its own code computes
them on CPU."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file
from test_export import BASE, MODEL_TOL, _random_params, _tokens
from transformers import AutoModelForCausalLM

from sft_jax import export, lora
from sft_jax.config import ConfigError, parse
from sft_jax.config_file import load_config_file
from sft_jax.lora import oft
from sft_jax.model.decoder import Transformer

BIASED = dataclasses.replace(BASE, attention_bias=True, tie_embeddings=False)


class _BlockDiagonal:
    """What PEFT's CUDA extension computes: [F, D, b, b] -> [F, D b, D b] block diagonals."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


@pytest.fixture
def peft_butterfly(monkeypatch):
    """PEFT's BOFT with its extension 'loaded', so it builds and computes butterfly factors."""
    from peft.tuners.boft import layer

    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: _BlockDiagonal)


def _random_boft(params, size=8, num=0, factors=1, seed=1):
    """A BOFT tree with random rotations and output scales around 1."""
    shapes = jax.eval_shape(
        lambda p: lora.tree.init_boft(p, lora.ALL_LINEAR, size, num, factors), params
    )  # numpy noise: a jax random tree compiles a program for each leaf shape
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            (1.0 if path[-1].key == oft.SCALE else 0.0)
            + 0.1 * rng.standard_normal(x.shape, np.float32)
        ),
        shapes,
    )


# One program, not an op-by-op compile for each leaf shape.
_merge = jax.jit(lora.merge, static_argnums=(2, 3))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(config, spec, variables, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    variables = lora.apply_variables(variables, spec)
    return Transformer(config).apply(variables, tokens, positions, jnp.ones_like(tokens))


def _peft_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()


def _peft_model(base_dir, adapter_dir):
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    return peft.PeftModel.from_pretrained(model, adapter_dir).eval()


def test_butterfly_permutations_are_peft_s():
    from peft.tuners.boft.layer import BOFTLayer

    for blocks, b, factors in [(8, 8, 1), (16, 4, 2), (16, 4, 3), (12, 8, 3), (4, 24, 2)]:
        ours = oft.butterfly_perms(blocks, b, factors)
        for i in range(factors):
            theirs = BOFTLayer.block_butterfly_perm(
                None, blocks * b, blocks // 2**i, b // 2, factors - 1
            )
            np.testing.assert_array_equal(ours[i], theirs.numpy(), err_msg=str((blocks, b, i)))
    with pytest.raises(ValueError, match="boft_n_butterfly_factor 3 does not fit"):
        oft.boft_block(96, 0, 6, 3)  # 6 blocks do not pair up twice


@pytest.mark.parametrize(
    ("config", "size", "num", "factors"),
    [
        pytest.param(BASE, 8, 0, 1, marks=pytest.mark.slow),  # about 9 s each
        (BIASED, 0, 4, 1),
        pytest.param(BASE, 4, 0, 2, marks=pytest.mark.slow),
        (BIASED, 0, 8, 3),
    ],
    ids=["size8", "bias-num4", "size4-2factors", "bias-num8-3factors"],
)
def test_peft_export_matches_peft(config, size, num, factors, request, tmp_path, stories_dir):
    """Ours (rotated input, scaled output) = PEFT's forward on the written adapter = our merged
    model, and the adapter reads back as written."""
    if factors > 1:
        request.getfixturevalue("peft_butterfly")
    params = _random_params(config)
    adapters = _random_boft(params, size, num, factors)
    base = str(tmp_path / "base")
    export.export_hf(params, config, base, tokenizer_dir=str(stories_dir))
    keys = {"boft_block_size": size, "boft_block_num": num}
    tied = config.tie_embeddings
    peft_config = lora.boft_peft_config(adapters, keys, base=base, tied_embeddings=tied)
    lora.write_peft_adapter(str(tmp_path / "adapter"), adapters, peft_config)
    tokens = _tokens()
    spec = oft.BOFT_SPEC
    ours = np.asarray(_apply(config, spec, {"params": params, "lora": adapters}, tokens))
    theirs = _peft_logits(_peft_model(base, tmp_path / "adapter"), tokens)
    np.testing.assert_allclose(theirs, ours, atol=MODEL_TOL)
    plain = np.asarray(_apply(config, None, {"params": params}, tokens))
    assert np.abs(plain - theirs).max() > 1e-2  # the adapter changed the logits
    merged = _merge(params, adapters, 1.0, spec)
    merged_logits = np.asarray(_apply(config, None, {"params": merged}, tokens))
    np.testing.assert_allclose(merged_logits, ours, atol=MODEL_TOL)
    back = lora.read_peft_adapter(str(tmp_path / "adapter"), params, method="boft")
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
    with pytest.raises(ValueError, match=r"BOFT adapter but config\.lora\.method is 'oft'"):
        lora.read_peft_adapter(str(tmp_path / "adapter"), params, method="oft")


@pytest.mark.parametrize("extension", [False, True], ids=["cpu-fallback", "butterfly"])
def test_import_of_a_peft_made_adapter_gives_peft_logits(extension, request, tmp_path, stories_dir):
    """PEFT's own BOFT with random (not skew-symmetric) boft_R and random boft_s, asked for two
    butterfly factors: without its CUDA extension PEFT builds one (and warns), with it two; the
    import follows the tensors either way."""
    if extension:
        request.getfixturevalue("peft_butterfly")
    params = _random_params(BASE)
    base = str(tmp_path / "base")
    export.export_hf(params, BASE, base, tokenizer_dir=str(stories_dir))
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    config = peft.BOFTConfig(
        boft_block_size=8,
        boft_n_butterfly_factor=2,
        target_modules=list(lora.ALL_LINEAR),
        init_weights=False,
    )
    torch.manual_seed(0)
    if extension:
        model = peft.get_peft_model(model, config).eval()
    else:
        with pytest.warns(UserWarning, match="CUDA extension"):
            model = peft.get_peft_model(model, config).eval()
    tokens = _tokens()
    theirs = _peft_logits(model, tokens)
    model.save_pretrained(tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["boft_n_butterfly_factor"] == 2  # the tensors hold 2 only with the extension
    cfg = lora.read_peft_config(str(tmp_path / "adapter"))
    assert cfg.method == "boft" and cfg.oft == oft.BOFT_SPEC
    adapters = lora.read_peft_adapter(str(tmp_path / "adapter"), params)
    factors = {x.shape[1] for p, x in jax.tree_util.tree_leaves_with_path(adapters)
               if "oft_r" in str(p)}  # fmt: skip
    assert factors == {2 if extension else 1}
    ours = np.asarray(_apply(BASE, cfg.oft, {"params": params, "lora": adapters}, tokens))
    np.testing.assert_allclose(ours, theirs, atol=MODEL_TOL)
    plain = np.asarray(_apply(BASE, None, {"params": params}, tokens))
    assert np.abs(plain - theirs).max() > 1e-2


def test_boft_export_compiles_nothing_and_writes_the_skew_matrices(tmp_path):
    """Writing a BOFT adapter runs no XLA program (it once compiled a few for each module
    shape), and its boft_R are the skew matrices of the stored vectors."""
    import jax.monitoring

    params = _random_params(BASE)
    adapters = jax.tree.map(np.asarray, _random_boft(params, size=4, factors=2))
    keys = {"boft_block_size": 4, "boft_block_num": 0}
    config = lora.boft_peft_config(adapters, keys, base="", tied_embeddings=True)
    compiles = []

    def listener(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        lora.write_peft_adapter(str(tmp_path / "adapter"), adapters, config)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not compiles
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    vec = adapters["layers"]["mlp"]["down_proj"][oft.PARAM][1]
    key = "base_model.model.model.layers.1.mlp.down_proj.boft_R"
    np.testing.assert_array_equal(tensors[key], np.asarray(oft.skew(jnp.asarray(vec))))


def test_unsupported_boft_adapters_are_refused(tmp_path, stories_dir):
    params = _random_params(BASE)
    adapters = _random_boft(params)
    keys = {"boft_block_size": 8, "boft_block_num": 0}
    config = lora.boft_peft_config(adapters, keys, base="", tied_embeddings=True)
    adapter = tmp_path / "adapter"
    lora.write_peft_adapter(str(adapter), adapters, config)
    tensors = load_file(adapter / "adapter_model.safetensors")
    five = {k: np.concatenate([v] * 5) if k.endswith("boft_R") else v for k, v in tensors.items()}
    save_file(five, adapter / "adapter_model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match="boft_n_butterfly_factor 5 does not fit"):
        lora.read_peft_adapter(str(adapter), params)  # 8 blocks cannot pair up 4 times
    partial = {k: v for k, v in tensors.items() if not k.endswith("down_proj.boft_s")}
    save_file(partial, adapter / "adapter_model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match="lacks boft_R or boft_s"):
        lora.read_peft_adapter(str(adapter), params)
    save_file(tensors, adapter / "adapter_model.safetensors", {"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "bias": "boft_only"}))
    with pytest.raises(ValueError, match="BOFT with bias training"):
        lora.read_peft_config(str(adapter))
    with pytest.raises(ValueError, match="boft_block_size 7 does not divide"):
        lora.tree.init_boft(params, lora.ALL_LINEAR, 7, 0)
    with pytest.raises(ValueError, match="trained tied embedding"):
        saved = lora.add_saved_modules(params, adapters, ("embed_tokens",))
        lora.boft_peft_config(saved, keys, base="", tied_embeddings=True)


def test_config_checks_name_the_boft_fields():
    c = load_config_file("configs/tiny.py")
    c.lora.enabled, c.lora.method = True, "boft"
    c.lora.boft_n_butterfly_factor = 0
    with pytest.raises(ConfigError, match=r"lora\.boft_n_butterfly_factor.*>= 1"):
        parse(c)
    c.lora.boft_n_butterfly_factor = 1
    c.lora.boft_block_num = 4
    with pytest.raises(ConfigError, match=r"lora\.boft_block_size.*exactly one"):
        parse(c)
    c.lora.boft_block_size = 0
    assert parse(c).lora.boft_block_num == 4
    c.lora.dropout = 0.1
    with pytest.raises(ConfigError, match=r"lora\.dropout"):
        parse(c)


@pytest.mark.slow  # end to end: train, checkpoint, export merged and PEFT, load the PEFT adapter
def test_tiny_boft_run_trains_and_exports(tmp_path, stories_dir):
    from sft_jax.api import load_peft
    from sft_jax.train import train_and_evaluate
    from sft_jax.training.metrics import read_metrics
    from sft_jax.training.optim import make_optimizer
    from sft_jax.training.state import StateSpec, create_train_state, init_params

    c = load_config_file("configs/tiny.py")
    c.lora.enabled, c.lora.method = True, "boft"
    c.lora.boft_block_size, c.lora.base_dtype = 4, "float32"  # 4 divides 172 (MLP width)
    c.optim.learning_rate = 3e-2
    c.train.max_steps, c.train.log_every = 10, 1
    workdir = tmp_path / "run"
    train_and_evaluate(parse(c), str(workdir))
    losses = [r["loss"] for r in read_metrics(str(workdir)) if "loss" in r]
    assert max(losses[-3:]) < losses[0] - 0.05, losses
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "merged")]) == 0
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "ad"), "--peft"]) == 0
    run = export.load_workdir(str(workdir))
    scales = [x for p, x in jax.tree_util.tree_leaves_with_path(run.adapters) if "boft_s" in str(p)]
    assert scales and max(float(jnp.abs(x - 1).max()) for x in scales) > 1e-3  # trained
    mesh = jax.sharding.Mesh(
        np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "context", "tensor")
    )
    cfg = parse(c)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    base = init_params(Transformer(run.model_config), "", mesh, rules, cfg.seed)
    export.export_hf(base, run.model_config, str(tmp_path / "base"), tokenizer_dir=str(stories_dir))
    tokens = _tokens()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_logits = _peft_logits(merged, tokens)
    peft_logits = _peft_logits(_peft_model(tmp_path / "base", tmp_path / "ad"), tokens)
    np.testing.assert_allclose(merged_logits, peft_logits, atol=MODEL_TOL)
    loaded = load_peft(str(tmp_path / "ad"), base=str(tmp_path / "base"))
    again = _apply(loaded.model_config, None, {"params": loaded.params}, tokens)
    np.testing.assert_allclose(np.asarray(again), peft_logits, atol=MODEL_TOL)
    c.lora.init_from = str(tmp_path / "ad")  # a run continues from the PEFT adapter
    cfg = parse(c)
    tx = make_optimizer(cfg.optim, 10, cfg.lora)
    state, _ = create_train_state(
        StateSpec(run.model_config, mesh, rules, tx, cfg.seed, lora=cfg.lora)
    )
    assert jax.tree.structure(state.params) == jax.tree.structure(run.adapters)
    for a, b in zip(jax.tree.leaves(run.adapters), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


@pytest.mark.slow  # builds and compiles a train state
def test_boft_state_with_butterfly_factors_starts_at_base_and_learns():
    """A BOFT train state with two butterfly factors equals the base at init; one gradient step
    moves the vectors and scales, and the forward equals the merged model's."""
    from test_lora_model import MODEL, RULES, batch, lora_cfg, optim_cfg

    from sft_jax.config import MeshSection
    from sft_jax.training.optim import make_optimizer
    from sft_jax.training.sharding import make_mesh
    from sft_jax.training.state import StateSpec, create_train_state

    cfg = lora_cfg(method="boft", boft_block_size=4, boft_n_butterfly_factor=2)
    mesh = make_mesh(MeshSection(-1, 1, 1, rules=RULES), jax.devices()[:1])
    state, _ = create_train_state(
        StateSpec(MODEL, mesh, RULES, make_optimizer(optim_cfg(), 10, cfg), lora=cfg)
    )
    b = batch()

    def run(adapters):
        variables = {"params": state.frozen, "lora": adapters}
        return state.apply_fn(variables, b["inputs"], b["positions"], b["segment_ids"])

    plain = Transformer(MODEL).apply(
        {"params": state.frozen}, b["inputs"], b["positions"], b["segment_ids"]
    )
    np.testing.assert_allclose(run(state.params), plain, atol=1e-5)
    grads = jax.grad(lambda a: jnp.mean(run(a) ** 2))(state.params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    moved = jax.tree.map(lambda x, g: x - 0.5 * g / (jnp.abs(g).max() + 1e-12), state.params, grads)
    merged = lora.merge(state.frozen, moved, 1.0, lora.oft_spec(cfg))
    theirs = Transformer(MODEL).apply(
        {"params": merged}, b["inputs"], b["positions"], b["segment_ids"]
    )
    np.testing.assert_allclose(run(moved), theirs, atol=1e-4)
    assert np.abs(np.asarray(run(moved) - plain)).max() > 1e-3
