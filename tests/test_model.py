"""The decoder's pieces against transformers' own, packing invariance, remat, and stories260K."""

import dataclasses
import functools
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama

from sft_jax import hf
from sft_jax.config import ArchConfig, ModelSection
from sft_jax.model.attention import (
    apply_rope,
    attention_mask,
    rope_inv_freq,
    rope_tables,
    window_mask,
)
from sft_jax.model.decoder import (
    ModelConfig,
    RMSNorm,
    RopeScaling,
    Transformer,
    count_params,
    model_config_from_arch,
)
from tests.helpers import tiny_model_config

SMALL_TOL = 1e-5
MODEL_TOL = 1e-4


def _config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        head_dim=16,
        qk_norm=True,
        attention_bias=True,
        max_position_embeddings=256,
    )
    return tiny_model_config(**{**base, **overrides})


def _random_params(config: ModelConfig, seed: int = 0):
    """Random host-numpy parameters for the model's tree: norms near 1, everything else ~N(0, 0.1).

    Built with numpy from the abstract tree (no jitted init, no per-leaf random programs) to
    keep the CPU test suite fast.
    """
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    abstract = jax.eval_shape(
        Transformer(config).init, jax.random.PRNGKey(0), tokens, tokens, tokens
    )
    flat = flax.traverse_util.flatten_dict(nn.unbox(abstract["params"]))
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in flat.items():
        noise = rng.normal(size=leaf.shape).astype(np.float32) * 0.1
        params[path] = jnp.asarray(noise + 1.0 if path[-1] == "scale" else noise)
    return flax.traverse_util.unflatten_dict(params)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, params, tokens, positions, segment_ids):
    return Transformer(config).apply({"params": params}, tokens, positions, segment_ids)


def _forward(config, params, tokens, positions=None, segment_ids=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    return np.asarray(_apply(config, params, tokens, positions, segment_ids))


def test_rope_inv_freq_matches_transformers_default_and_llama3():
    scaled = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    for rope_parameters, scaling in [
        ({"rope_type": "default", "rope_theta": 10000.0}, None),
        (scaled, RopeScaling(8.0, 1.0, 4.0, 64)),
    ]:
        hf_config = LlamaConfig(
            hidden_size=256, num_attention_heads=4, head_dim=64, rope_parameters=rope_parameters
        )
        if scaling is None:
            expected = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
        else:
            expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, None)
        ours = rope_inv_freq(
            _config(head_dim=64, rope_theta=rope_parameters["rope_theta"], rope_scaling=scaling)
        )
        np.testing.assert_allclose(ours, expected.numpy(), rtol=SMALL_TOL, atol=0)
    assert scaling is not None and not np.allclose(ours, rope_inv_freq(_config(head_dim=64)))


def test_apply_rope_matches_transformers_rotate_half():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)  # [B, T, heads, H]
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 0, 1, 2]])
    cos, sin = rope_tables(jnp.asarray(positions), rope_inv_freq(_config()))
    ours = apply_rope(jnp.asarray(q), cos, sin)
    cos_full = torch.from_numpy(np.concatenate([np.asarray(cos)] * 2, axis=-1))
    sin_full = torch.from_numpy(np.concatenate([np.asarray(sin)] * 2, axis=-1))
    q_t = torch.from_numpy(q).transpose(1, 2)  # HF layout [B, heads, T, H]
    expected, _ = modeling_llama.apply_rotary_pos_emb(q_t, q_t, cos_full, sin_full)
    np.testing.assert_allclose(ours, expected.transpose(1, 2).numpy(), atol=SMALL_TOL)


def test_rms_norm_matches_transformers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 64)).astype(np.float32) * 3
    weight = rng.normal(size=(64,)).astype(np.float32)
    norm = RMSNorm(1e-5, ("embed",))
    ours = norm.apply({"params": {"scale": jnp.asarray(weight)}}, jnp.asarray(x))
    ref = modeling_llama.LlamaRMSNorm(64, eps=1e-5)
    ref.weight.data = torch.from_numpy(weight)
    np.testing.assert_allclose(ours, ref(torch.from_numpy(x)).detach().numpy(), atol=SMALL_TOL)


def test_attention_mask_is_causal_within_segments():
    mask = np.asarray(attention_mask(jnp.array([[1, 1, 2, 2, 0]])))[0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(mask, expected)


GEMMA_LIKE = dict(
    norm_offset=True,
    embed_scale=True,
    mlp_activation="gelu_tanh",
    sandwich_norms=True,
    attn_softcap=2.0,
    final_softcap=3.0,
    query_scale=24.0,
    sliding_window=3,
    local_layers=(True, False),
    local_rope_theta=500.0,
)
# Sliding-window layers without soft-capping: "auto" picks the blocked kernel on CPU, whose
# window is a traced per-layer bound (the soft-capped GEMMA_LIKE runs the reference).
SLIDING_BLOCKED = {**GEMMA_LIKE, "attn_softcap": None, "attention": "blocked"}


@pytest.mark.parametrize(
    "overrides",
    [{}, GEMMA_LIKE, SLIDING_BLOCKED],
    ids=["llama", "gemma_sliding", "sliding_blocked"],
)
def test_packed_row_equals_examples_run_alone(overrides):
    """Row 0 packs two examples and padding; rows 1 and 2 hold each example alone (trailing
    padding cannot reach earlier tokens causally, and one shape means one compile). With a
    window of 3 the sliding layers must also stay inside each packed example."""
    config = _config(**overrides)
    params = _random_params(config)
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 128, size=5), rng.integers(0, 128, size=4)
    tokens = np.zeros((3, 12), np.int32)
    positions = np.zeros((3, 12), np.int32)
    segments = np.zeros((3, 12), np.int32)
    tokens[0, :9], segments[0, :9] = np.concatenate([first, second]), [1] * 5 + [2] * 4
    positions[0, :9] = [0, 1, 2, 3, 4, 0, 1, 2, 3]
    for row, example in ((1, first), (2, second)):
        tokens[row, : len(example)], segments[row, : len(example)] = example, 1
        positions[row, : len(example)] = np.arange(len(example))
    logits = _forward(config, params, tokens, jnp.asarray(positions), jnp.asarray(segments))
    np.testing.assert_allclose(logits[0, :5], logits[1, :5], atol=SMALL_TOL)
    np.testing.assert_allclose(logits[0, 5:9], logits[2, :4], atol=SMALL_TOL)
    assert np.all(np.isfinite(logits))
    # Leakage would show: the second example's logits differ when the first is visible.
    leaky = _forward(config, params, tokens, jnp.asarray(positions), jnp.ones_like(tokens))
    assert np.abs(leaky[0, 5:9] - logits[2, :4]).max() > 1e-2


@pytest.mark.parametrize(
    ("attention", "dense"), [("blocked", False), ("reference", True), ("xla", True)]
)
def test_dense_mask_is_built_only_for_implementations_that_read_it(attention, dense):
    """Training-path memory linear in T: with the blocked kernel (sliding-window layers too) the
    forward holds no [B, T, T] array; the reference and xla still read the dense mask."""
    overrides = {**SLIDING_BLOCKED, "attention": attention}
    config = _config(**overrides)
    params = _random_params(config)
    tokens = jnp.zeros((3, 130), jnp.int32)  # longer than one block of the blocked kernel
    segments = jnp.ones_like(tokens)
    closed = jax.make_jaxpr(
        lambda p: Transformer(config).apply({"params": p}, tokens, tokens, segments)
    )(params)
    assert ("[3,130,130]" in str(closed)) == dense


def _remat_policies(config, params, tokens, positions, key: str = "policy") -> list:
    """The `key` parameter (policy, prevent_cse) of every jax.checkpoint ("remat2") in the
    model's forward jaxpr."""
    segments = jnp.ones_like(tokens)
    closed = jax.make_jaxpr(
        lambda p: Transformer(config).apply({"params": p}, tokens, positions, segments)
    )(params)
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "remat2":
                found.append(eqn.params[key])
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(closed.jaxpr)
    return found


def test_remat_policy_wraps_each_scanned_layer_and_keeps_the_tree():
    config = _config()
    params = _random_params(config)
    tokens = jnp.zeros((2, 8), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    assert _remat_policies(config, params, tokens, positions) == []
    for remat, policy in (
        ("dots", jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims),
        ("dots_saveable", jax.checkpoint_policies.dots_saveable),
        ("full", jax.checkpoint_policies.nothing_saveable),
    ):
        other = dataclasses.replace(config, remat=remat)
        assert _remat_policies(other, params, tokens, positions) == [policy]  # once, in the scan
        other_params = _random_params(other)
        assert jax.tree.structure(other_params) == jax.tree.structure(params)
        # The rolled scan keeps XLA from merging the recomputation with the forward by itself;
        # unrolled, only prevent_cse does (without it XLA merged them: no recompute, no saving).
        assert _remat_policies(other, params, tokens, positions, "prevent_cse") == [False]
        unrolled = dataclasses.replace(other, scan_layers=False)
        assert _remat_policies(unrolled, params, tokens, positions, "prevent_cse") == [True]


GEMMA_LIKE = dict(
    num_layers=2, local_layers=(True, False), sliding_window=3, local_rope_theta=10000.0,
    norm_offset=True, sandwich_norms=True, mlp_activation="gelu_tanh",
)  # fmt: skip


@functools.partial(jax.jit, static_argnums=1)
@jax.value_and_grad
def _weighted_log_likelihood(params, config, tokens, positions, segments, weights):
    """Module level, so every option compared against one model's reference reuses the
    reference's compiled program instead of tracing and compiling it again."""
    logits = Transformer(config).apply({"params": params}, tokens, positions, segments)
    return jnp.sum(jax.nn.log_softmax(logits) * weights)


@pytest.mark.parametrize(
    "model,change",
    [
        ({}, {"remat": "full"}),
        ({}, {"remat": "dots"}),
        # Another policy name through the same remat wrapper as "dots" (the name-to-policy
        # mapping is checked by test_remat_policy_wraps_each_scanned_layer_and_keeps_the_tree).
        pytest.param({}, {"remat": "dots_saveable"}, marks=pytest.mark.slow),
        ({}, {"scan_layers": False}),
        # Each attention implementation on the plain model in the slow tier: the Gemma-like
        # model runs it in default, on its global and its sliding-window layers.
        pytest.param({}, {"attention": "xla"}, marks=pytest.mark.slow),
        (GEMMA_LIKE, {"attention": "xla"}),  # sliding-window layers through the mask
        pytest.param({}, {"attention": "blocked"}, marks=pytest.mark.slow),
        (GEMMA_LIKE, {"attention": "blocked"}),
        (GEMMA_LIKE, {"scan_layers": False, "remat": "full"}),
    ],
)
def test_performance_options_change_neither_loss_nor_gradients(model, change):
    """Remat policies, the unrolled layer loop and each CPU-runnable attention implementation
    give the reference's loss and gradients on packed rows (two segments and padding)."""
    config = _config(**{"num_layers": 1, "attention": "reference", **model})
    params = _random_params(config)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 128, size=(2, 8)), jnp.int32)
    segments = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 0], list(range(8))], jnp.int32)
    weights = jnp.asarray(rng.normal(size=(2, 8, 128)), jnp.float32) * (segments > 0)[..., None]
    inputs = (tokens, positions, segments, weights)

    base_loss, base_grads = _weighted_log_likelihood(params, config, *inputs)
    changed = dataclasses.replace(config, **change)
    other_loss, other_grads = _weighted_log_likelihood(params, changed, *inputs)
    np.testing.assert_allclose(other_loss, base_loss, rtol=SMALL_TOL)
    # Relative to each gradient's scale: entries reach ~50 here, so a small entry that is a sum
    # of large terms, summed in another order (blocked attention), moves by ~1e-5 absolute.
    for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(base_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=SMALL_TOL * max(1.0, float(np.abs(b).max())))


def test_parameter_tree_shapes_and_logical_names():
    c = _config()
    tokens = jnp.zeros((1, 4), jnp.int32)
    boxed = jax.eval_shape(Transformer(c).init, jax.random.PRNGKey(0), tokens, tokens, tokens)
    specs = nn.get_partition_spec(boxed)["params"]
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed)["params"])
    L, D, N, K, H, F, V = 2, 64, 4, 2, 16, 96, 128
    attn, attn_specs = shapes["layers"]["attn"], specs["layers"]["attn"]
    assert shapes["embed"]["embedding"] == (V, D)
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    assert shapes["lm_head"]["kernel"] == (D, V)
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    assert attn["q_proj"]["kernel"] == (L, D, N, H)
    assert tuple(attn_specs["q_proj"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert attn["k_proj"]["bias"] == (L, K, H)
    assert tuple(attn_specs["k_proj"]["bias"]) == ("layers", "kv_heads", "head_dim")
    assert attn["o_proj"] == {"kernel": (L, N, H, D)}
    assert tuple(attn_specs["o_proj"]["kernel"]) == ("layers", "heads", "head_dim", "embed")
    assert attn["q_norm"]["scale"] == (L, H)
    assert shapes["layers"]["mlp"]["down_proj"]["kernel"] == (L, F, D)
    assert tuple(specs["layers"]["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["layers"]["attn_norm"]["scale"]) == ("layers", "embed")
    assert tuple(specs["final_norm"]["scale"]) == ("embed",)
    tied = dataclasses.replace(c, tie_embeddings=True, qk_norm=False, attention_bias=False)
    tied_shapes = jax.eval_shape(
        Transformer(tied).init, jax.random.PRNGKey(0), tokens, tokens, tokens
    )
    tied_tree = nn.unbox(tied_shapes)["params"]
    assert "lm_head" not in tied_tree
    assert set(tied_tree["layers"]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(tied_tree["layers"]["attn"]["q_proj"]) == {"kernel"}
    assert count_params(boxed) == count_params(tied_shapes) + D * V + L * (2 * H + (N + 2 * K) * H)


def test_model_config_from_arch():
    arch = ArchConfig(512, 64, 172, 2, 4, 2, 16, 10000.0, 1e-5, True, False, False, 2048)
    section = ModelSection(
        path="",
        dtype="bfloat16",
        param_dtype="float32",
        remat="dots",
        attention="xla",
        scan_layers=False,
        loss_chunk=0,
        arch=arch,
    )
    config = model_config_from_arch(arch, section)
    assert config.num_layers == 2 and config.head_dim == 16 and config.tie_embeddings
    assert (config.dtype, config.param_dtype, config.remat) == ("bfloat16", "float32", "dots")
    assert (config.attention, config.scan_layers) == ("xla", False)
    assert config.rope_scaling is None
    assert hf.build_model_config(section) == config


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
    config = _config()
    params = _random_params(config)
    tokens = np.random.default_rng(3).integers(0, 128, size=(3, 12))  # shape of the packing test
    full = _forward(config, params, tokens)
    low = _forward(dataclasses.replace(config, dtype="bfloat16"), params, tokens)
    assert low.dtype == np.float32
    # A bf16 smoke check, not a parity test: bf16 carries ~3 significant digits.
    assert np.abs(low - full).max() < 0.1 * np.abs(full).max()


def test_stories260k_logits_match_golden(stories_dir, golden_dir):
    config = hf.load_model_config(
        str(stories_dir), dtype="float32", param_dtype="float32", remat="none"
    )
    params = hf.load_params(str(stories_dir), config)
    golden = json.loads((golden_dir / "golden.json").read_text())
    expected = np.load(golden_dir / "golden_logits.npz")["logits"]
    logits = _forward(config, params, [golden["input_ids"]])[0]
    np.testing.assert_allclose(logits, expected, atol=MODEL_TOL)
    assert int(np.argmax(logits[-1])) == golden["argmax_next_after_prompt"]


def test_window_mask_keeps_keys_less_than_window_behind():
    mask = attention_mask(jnp.array([[1, 1, 1, 1, 2, 2]]))
    windowed = np.asarray(window_mask(mask, jnp.arange(6), 2))[0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 1, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(windowed, expected)


def test_gemma_tree_adds_sandwich_norms_with_zero_init():
    """Existing leaves keep their names; Gemma adds post_attn_norm/post_mlp_norm, and every
    (1 + w) norm starts at w = 0 so a fresh model normalises with scale 1."""
    config = _config(**GEMMA_LIKE)
    tokens = jnp.zeros((1, 4), jnp.int32)
    rng = jax.random.key(0, impl="rbg")  # threefry compiles one program per leaf on CPU
    params = jax.jit(Transformer(config).init)(rng, tokens, tokens, tokens)["params"]
    params = nn.unbox(params)
    layers = params["layers"]
    assert {"attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm"} <= set(layers)
    assert np.all(np.asarray(layers["post_mlp_norm"]["scale"]) == 0)
    assert np.all(np.asarray(params["final_norm"]["scale"]) == 0)
    plain = _random_params(_config())
    assert set(flax.traverse_util.flatten_dict(plain)) < set(
        flax.traverse_util.flatten_dict(params)
    )
