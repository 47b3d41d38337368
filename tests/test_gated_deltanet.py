"""Gated DeltaNet (sft_jax/model/gated_deltanet.py): the chunked and recurrent forms of the delta
rule equal each other and transformers' torch reference; packed rows equal their examples run
alone (state and convolution reset at segment boundaries); gradients agree between the forms;
decoding token by token with the carried state equals the full forward; the chunked form in
float32 is within float32 rounding of the recurrence in float64; the layer compiles for TPU."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import tiny_model_config
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from sft_jax.model.gated_deltanet import (
    GatedDeltaNet,
    chunked_delta_rule,
    init_delta_state,
    recurrent_delta_rule,
    segment_runs,
    unit_lower_inverse,
)
from sft_jax.model.hybrid import LinearAttention
from sft_jax.planning import tpu

B, T, M, N, HK, HV = 2, 37, 2, 4, 8, 6
# Jitted once for the module: each form op by op (a scan of many small steps) runs far slower
# than its compile.
recurrent = jax.jit(recurrent_delta_rule)
chunked = jax.jit(chunked_delta_rule, static_argnames="chunk_size")


def inputs(seed: int = 0, t: int = T):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, t, M, HK)).astype(np.float32)
    k = rng.normal(size=(B, t, M, HK)).astype(np.float32)
    v = rng.normal(size=(B, t, N, HV)).astype(np.float32)
    g = -rng.uniform(0.01, 1.5, size=(B, t, N)).astype(np.float32)
    beta = rng.uniform(0.05, 0.95, size=(B, t, N)).astype(np.float32)
    return q, k, v, g, beta


def test_chunked_equals_recurrent_equals_transformers():
    q, k, v, g, beta = inputs()
    state = np.random.default_rng(1).normal(size=(B, N, HK, HV)).astype(np.float32)
    torch_args = [torch.from_numpy(x) for x in (q, k, v, g, beta)]
    kw = dict(initial_state=torch.from_numpy(state), output_final_state=True)
    kw["use_qk_l2norm_in_kernel"] = True
    ref_chunk, ref_chunk_s = hf.torch_chunk_gated_delta_rule(*torch_args, chunk_size=16, **kw)
    ref_rec, ref_rec_s = hf.torch_recurrent_gated_delta_rule(*torch_args, **kw)
    args = [jnp.asarray(x) for x in (q, k, v, g, beta)]
    ours_rec, rec_s = recurrent(*args, state=jnp.asarray(state))
    for chunk in (8, 16, 64):  # shorter than, dividing and longer than nothing in particular
        ours, s = chunked(*args, state=jnp.asarray(state), chunk_size=chunk)
        np.testing.assert_allclose(ours, ours_rec, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(s, rec_s, atol=1e-4, rtol=1e-4)
    for ref, ref_s in ((ref_chunk, ref_chunk_s), (ref_rec, ref_rec_s)):
        np.testing.assert_allclose(ours_rec, ref.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(rec_s, ref_s.numpy(), atol=1e-4, rtol=1e-4)


def packed_segments(lengths, t):
    seg = np.zeros((t,), np.int32)
    start = 0
    for i, n in enumerate(lengths):
        seg[start : start + n] = i + 1
        start += n
    return seg


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_packed_rows_equal_each_example_alone(form):
    """Three examples in one row (the boundaries fall inside and between chunks of 8): each one's
    outputs equal the example run alone from a zero state."""
    q, k, v, g, beta = inputs(2)
    lengths = (11, 16, 7)
    seg = np.stack([packed_segments(lengths, T)] * B)
    runs = segment_runs(jnp.asarray(seg))
    rule = {"chunked": functools.partial(chunked, chunk_size=8)}.get(form, recurrent)
    packed, _ = rule(*[jnp.asarray(x) for x in (q, k, v, g, beta)], runs=runs)
    start = 0
    for n in lengths:
        part = [jnp.asarray(x[:, start : start + n]) for x in (q, k, v, g, beta)]
        alone, _ = rule(*part)
        np.testing.assert_allclose(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.slow
def test_gradients_are_finite_and_equal_between_forms():
    args = [jnp.asarray(x) for x in inputs(3)]
    seg = jnp.asarray(np.stack([packed_segments((20, 12), T)] * B))
    runs = segment_runs(seg)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, N, HV)), jnp.float32)

    def loss(rule, *a):
        out, s = rule(*a, runs=runs)
        return jnp.sum(out * weights) + jnp.sum(s)

    chunked = lambda *a, **kw: chunked_delta_rule(*a, chunk_size=8, **kw)
    grads_c = jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2, 3, 4))(*args)
    grads_r = jax.grad(lambda *a: loss(recurrent_delta_rule, *a), argnums=(0, 1, 2, 3, 4))(*args)
    for gc, gr in zip(grads_c, grads_r, strict=True):
        assert np.all(np.isfinite(gc)) and float(jnp.max(jnp.abs(gc))) > 0
        np.testing.assert_allclose(gc, gr, atol=1e-4, rtol=1e-4)


def numpy_delta_rule(q, k, v, g, beta, runs):
    """The recurrence token by token in float64 numpy: the ground truth of the precision test."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    rep = v.shape[2] // q.shape[2]
    q, k = np.repeat(q, rep, axis=2), np.repeat(k, rep, axis=2)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) * q.shape[-1] ** -0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    s = np.zeros((*v.shape[:1], v.shape[2], q.shape[-1], v.shape[-1]))
    out = np.zeros(v.shape)
    for t in range(v.shape[1]):
        keep = np.ones(len(runs)) if t == 0 else (runs[:, t] == runs[:, t - 1]).astype(float)
        s = s * (np.exp(g[:, t]) * keep[:, None])[..., None, None]
        delta = (v[:, t] - np.einsum("bnk,bnkv->bnv", k[:, t], s)) * beta[:, t, :, None]
        s = s + k[:, t, :, :, None] * delta[:, :, None, :]
        out[:, t] = np.einsum("bnk,bnkv->bnv", q[:, t], s)
    return out, s


@pytest.mark.parametrize(
    ("decays", "beta_low", "lengths"),
    [
        ((1e-3, 60.0), 0.05, (300,)),  # strong decays: exp of the block's log-decays underflows
        ((1e-4, 1e-2), 0.8, (300,)),  # almost none, writes near 1: the worst-conditioned inverse
        ((1e-3, 60.0), 0.05, (50, 120, 130)),  # packed: boundaries inside blocks
    ],
)
def test_chunked_float32_is_within_rounding_of_float64(decays, beta_low, lengths):
    """Five 64-token blocks (the default chunk size, the last one padded) in float32 against the
    recurrence in float64 numpy, within float32 rounding of the recurrence's size (our float32
    token-by-token form is off by 2e-7 of the largest output). With strong decays, pairwise
    decays taken as differences of the block's running log-decay sum were off by 2e-5, as
    transformers' float32 chunked rule still is. Our code in float64 (x64) equals the numpy
    recurrence: the float32 error is rounding, not a different computation."""
    t = sum(lengths)
    rng = np.random.default_rng(7)
    q, k, v, _, _ = inputs(6, t)
    g = -np.exp(rng.uniform(*np.log(decays), size=(B, t, N))).astype(np.float32)
    beta = rng.uniform(beta_low, 1.0, size=(B, t, N)).astype(np.float32)
    runs = np.asarray(segment_runs(jnp.asarray(np.stack([packed_segments(lengths, t)] * B))))
    expected, expected_s = numpy_delta_rule(q, k, v, g, beta, runs)
    scale = np.abs(expected).max()
    args = [jnp.asarray(x) for x in (q, k, v, g, beta)]
    ours, s = chunked(*args, runs=jnp.asarray(runs), chunk_size=64)
    assert ours.dtype == s.dtype == jnp.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(s, expected_s, rtol=0, atol=2e-6 * np.abs(expected_s).max())
    with jax.enable_x64():
        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v, g, beta)]
        ours64, _ = chunked(*args, runs=jnp.asarray(runs), chunk_size=64)
        assert ours64.dtype == jnp.float64
        np.testing.assert_allclose(ours64, expected, rtol=0, atol=1e-12 * scale)


@pytest.fixture(scope="module")
def layer():
    config = tiny_model_config(
        linear_attention=LinearAttention(2, 4, 8, 6, conv_kernel=4, chunk_size=8)
    )
    module = GatedDeltaNet(config)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, config.hidden_size)), jnp.float32)
    params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x)["params"])
    # Off init: a gated norm that is not all ones, a non-trivial conv.
    params["norm"] = params["norm"] + 0.3 * jnp.arange(params["norm"].shape[0])
    params["conv1d"] = params["conv1d"] * 20
    return module, params, x


def test_layer_packed_rows_reset_state_and_convolution(layer):
    module, params, x = layer
    lengths = (2, 13, 9, 13)  # a 2-token example: shorter than the conv kernel
    seg = jnp.asarray(np.stack([packed_segments(lengths, T)] * B))
    apply = jax.jit(lambda x, seg=None: module.apply({"params": params}, x, seg))
    packed, _ = apply(x, seg)
    start = 0
    for n in lengths:
        alone, _ = apply(x[:, start : start + n])
        np.testing.assert_allclose(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


def test_layer_decoding_token_by_token_equals_full_forward(layer):
    module, params, x = layer
    apply = jax.jit(lambda x, cache=None: module.apply({"params": params}, x, cache=cache))
    full, _ = apply(x)
    cache = init_delta_state(module.config.linear_attention, B, "float32")
    prefix = 10  # a prefill of 10 tokens, then one token at a time
    out, cache = apply(x[:, :prefix], cache)
    outs = [out]
    for t in range(prefix, T):
        out, cache = apply(x[:, t : t + 1], cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)


def test_layer_matches_transformers(layer):
    """Our layer with transformers' weights == Qwen3_5GatedDeltaNet (fp32, no cache)."""
    module, params, x = layer
    c, la = module.config, module.config.linear_attention
    hf_config = hf.Qwen3_5TextConfig(
        hidden_size=c.hidden_size,
        linear_num_key_heads=la.num_key_heads,
        linear_num_value_heads=la.num_value_heads,
        linear_key_head_dim=la.key_head_dim,
        linear_value_head_dim=la.value_head_dim,
        linear_conv_kernel_dim=la.conv_kernel,
        rms_norm_eps=c.rms_norm_eps,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
    )
    ref = hf.Qwen3_5GatedDeltaNet(hf_config, 0).eval()
    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params)
    with torch.no_grad():
        for name in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"):
            getattr(ref, name).weight.copy_(p[name]["kernel"].T)
        ref.conv1d.weight.copy_(p["conv1d"].T[:, None, :])
        ref.A_log.copy_(p["A_log"])
        ref.dt_bias.copy_(p["dt_bias"])
        ref.norm.weight.copy_(p["norm"])
        expected = ref(torch.from_numpy(np.array(x))).numpy()
    ours, _ = jax.jit(module.apply)({"params": params}, x)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [1, 5, 8, 64])
def test_unit_lower_inverse_equals_the_inverse(size):
    """The block inverse the chunked form uses instead of a triangular solve, at a power of two
    and not; entries of both signs and of size near 1, as the delta rule's system has. The
    inverse's entries grow into the thousands at 64, so the bound is relative to the largest
    (float32 forward substitution is off by the same amount)."""
    rng = np.random.default_rng(size)
    strict = np.tril(rng.uniform(-1, 1, size=(3, 2, size, size)), -1).astype(np.float32)
    expected = np.linalg.inv(strict.astype(np.float64) + np.eye(size))
    got = jax.jit(unit_lower_inverse)(jnp.asarray(strict))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


@pytest.mark.slow  # a minute of compile on the 2-core CI machine
def test_layer_gradient_compiles_for_tpu():
    """The layer in bfloat16 at TPU-sized heads (128-dim, 64-token blocks), forward and backward
    over packed rows, rows split over the four chips of v5e:2x2 (libtpu's compiler, no TPU
    needed): the chunked form's block scan and block inverse compile for the TPU."""
    if tpu.libtpu_missing():
        pytest.skip(f"no TPU compiler: {tpu.libtpu_missing()}")
    devices = tpu.topology_devices("v5e:2x2")
    config = tiny_model_config(
        hidden_size=256,
        dtype="bfloat16",
        linear_attention=LinearAttention(2, 4, 128, 128, conv_kernel=4, chunk_size=64),
    )
    module = GatedDeltaNet(config)
    mesh = Mesh(np.asarray(devices), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    x = jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16, sharding=rows)
    seg = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=rows)
    params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated), nn.unbox(params)
    )

    def loss(params, x, seg):
        out, _ = module.apply({"params": params}, x, seg)
        return jnp.sum(out.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, (0, 1))).lower(params, x, seg)
    assert "while" in lowered.as_text()  # the block scan
    lowered.compile()  # the TPU compiler raises where it cannot
