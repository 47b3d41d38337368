"""gpt-oss's layers on their own: attention sinks in every implementation that takes them
(blocked, unrolled and looped, and xla against the reference; splash in Pallas' interpreter on a
mesh) and refused by those that cannot; the biased, clamped experts on expert-parallel and data
meshes and in both grouped layouts; TPU compiles of those kernels and of a gpt-oss-shaped model
(libtpu's compiler, no TPU needed; the model's in the slow tier). Against transformers:
tests/test_hf_gpt_oss.py."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sft_jax.model.attention import (
    AttentionOptions,
    attend,
    attention_mask,
    grouped_attention,
    resolve_implementation,
    window_mask,
    xla_attention_with_sinks,
)
from sft_jax.model.blocked_attention import blocked_attention
from sft_jax.model.decoder import RopeScaling
from sft_jax.model.moe import (
    MoeConfig,
    MoeMlp,
    clamped_swiglu,
    expert_parallel_axes,
    grouped_swiglu,
)
from sft_jax.planning import tpu
from sft_jax.training.sharding import activation_sharding, param_shardings
from tests.test_attention_tpu import (
    SPLASH_CALL,
    compile_forward_backward,
    cpu_mesh,
    packed_segments,
    tpu_mesh,
    tpu_model,
)
from tests.test_attention_tpu import T as SPLASH_T
from tests.test_expert_parallel import RULES, expert_mesh, lower_layer_gradient, run

# --- attention sinks in each implementation -------------------------------------------------


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("kernel", [dict(block=16), dict(tile=16, loop_from=8)])
def test_blocked_and_xla_sinks_equal_the_reference(window, kernel):
    """Values and gradients (q, k, v and the sinks) of blocked attention, unrolled and looped
    (online softmax seeded with the sink), and of the XLA path, against the reference, on packed
    rows with padding."""
    b, t, n, kv, h = 2, 40, 4, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, t, kv, h))
    v = jax.random.normal(keys[2], (b, t, kv, h))
    sinks = 2.0 * jax.random.normal(keys[3], (n,))
    weights = jax.random.normal(keys[4], (b, t, n, h))
    segments = np.ones((b, t), np.int32)
    segments[0, 15:], segments[1, 30:] = 2, 0
    mask = attention_mask(jnp.asarray(segments))
    if window is not None:
        mask = window_mask(mask, jnp.arange(t), window)

    def loss(attend):
        return lambda q, k, v, s: jnp.sum(attend(q, k, v, s) * weights)

    reference = loss(lambda q, k, v, s: grouped_attention(q, k, v, mask, scale=0.3, sinks=s))
    blocked = loss(
        lambda q, k, v, s: blocked_attention(
            q, k, v, jnp.asarray(segments), scale=0.3, window=window, sinks=s, **kernel
        )
    )
    xla = loss(lambda q, k, v, s: xla_attention_with_sinks(q, k, v, mask, s, 0.3))
    args = (q, k, v, sinks)
    # Jitted (the blocked kernels' loops op by op run far slower than their compile), value
    # and gradients of each implementation from one program.
    both = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*args)
    reference_value, expected = both(reference)
    sinks_change = jax.jit(  # jitted: op by op, each step of both attentions compiles its own
        lambda q, k, v, s: jnp.abs(
            grouped_attention(q, k, v, mask, scale=0.3)
            - grouped_attention(q, k, v, mask, scale=0.3, sinks=s)
        ).max()
    )
    assert float(sinks_change(*args)) > 0.1
    for other in (blocked, xla):
        value, grads = both(other)
        np.testing.assert_allclose(value, reference_value, rtol=1e-5)
        for got, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_implementations_without_sinks_are_refused_or_avoided():
    """auto never picks one that would drop the sinks; an explicit one says why it cannot."""
    settings = dict(dtype="bfloat16", head_dim=64, softcap=None, seq_len=1024, sinks=True)
    assert resolve_implementation("auto", platform="cpu", **settings) == "blocked"
    assert resolve_implementation("auto", platform="gpu", **settings) == "xla"
    assert resolve_implementation("auto", platform="tpu", **settings) == "splash"
    assert resolve_implementation("auto", platform="gpu", **{**settings, "sinks": False}) == "cudnn"
    with pytest.raises(ValueError, match="cudnn attention has no attention sinks"):
        resolve_implementation("cudnn", platform="gpu", **settings)
    for requested in ("auto", "splash"):  # splash with gathered keys and the ring take none
        with pytest.raises(ValueError, match=r"mesh\.context=2.*sinks"):
            resolve_implementation(requested, platform="tpu", context=2, **settings)
    q = jnp.zeros((1, 128, 4, 8))
    options = AttentionOptions("cudnn")
    with pytest.raises(ValueError, match="cudnn attention has no attention sinks"):
        attend(
            q, q[:, :, :2], q[:, :, :2], jnp.ones((1, 128, 128), bool), options, sinks=q[0, 0, :, 0]
        )


# name: mesh (data, fsdp, tensor), batch rows, query heads N, kv heads K, window
SPLASH_CASES = {
    "fsdp": ((1, 8, 1), 8, 4, 2, None),
    "data_x_tensor_kv_heads_repeated": ((2, 1, 4), 2, 8, 2, None),
    "fsdp_x_tensor_sliding_window": ((1, 4, 2), 4, 4, 2, 24),
}


@pytest.mark.parametrize("case", SPLASH_CASES)
def test_sharded_splash_with_sinks_equals_reference(case):
    """The TPU kernel's own sinks, in Pallas' interpreter on the fake CPU devices, under
    shard_map (sinks split with the query heads): outputs and gradients, the sinks' summed over
    the batch shards, equal the reference on packed rows."""
    (data, fsdp, tensor), b, n, kv, window = SPLASH_CASES[case]
    mesh = cpu_mesh(data, fsdp, tensor)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, SPLASH_T, h, 16)), jnp.float32) for h in (n, kv, kv))
    sinks = jnp.asarray(2.0 * rng.normal(size=(n,)), jnp.float32)
    seg = jnp.asarray(packed_segments(b, seed=1))
    mask = attention_mask(seg)
    if window is not None:
        mask = window_mask(mask, jnp.arange(SPLASH_T), window)
    weights = jnp.asarray(rng.normal(size=(b, SPLASH_T, n, 16)), jnp.float32)
    real = (seg > 0)[:, :, None, None]  # padding rows' outputs are never trained

    def loss(impl):
        def f(q, k, v, sinks):
            options = AttentionOptions(impl, window=window, mesh=mesh, rules=RULES, interpret=True)
            local = None if window is None else jnp.asarray(True)
            out = attend(q, k, v, mask, options, segment_ids=seg, local=local, sinks=sinks)
            return jnp.sum(jnp.where(real, out * weights, 0.0)), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    (_, got), got_grads = loss("splash")(q, k, v, sinks)
    (_, want), want_grads = loss("reference")(q, k, v, sinks)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5)
    for name, a, w in zip(("q", "k", "v", "sinks"), got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, w, atol=2e-5, err_msg=f"d{name}")


# --- the gpt-oss expert layer on a mesh -----------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def biased_setup(cfg: MoeConfig):
    """(boxed variables, random parameters, x), jitted: op by op each parameter shape compiles
    its own programs."""
    x = jax.random.normal(jax.random.key(1), (8, 4, 16), jnp.float32)
    variables = MoeMlp(cfg).init(jax.random.key(0), x)
    params = nn.meta.unbox(variables)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(
        tree, [jax.random.normal(k, p.shape) * 0.5 for k, p in zip(keys, leaves, strict=True)]
    )
    return variables, params, x


@pytest.mark.parametrize(
    ("sizes", "dispatch"),
    [
        ((1, 1, 1, 1, 8), "all_gather"),
        ((2, 1, 1, 1, 4), "all_to_all"),
        ((2, 4, 1, 1, 1), "auto"),
    ],
)
def test_biased_clamped_experts_on_a_mesh_equal_unsharded(sizes, dispatch):
    """Router and expert biases and the clamped SwiGLU under shard_map: split over an expert
    axis (each device its experts' biases; tokens gathered or sent all-to-all) and whole on every
    device; outputs, router statistics and gradients (the biases' included) equal the
    single-device layer."""
    cfg = MoeConfig(16, 8, 8, 2, norm_topk_prob=True, router_bias=True, expert_bias=True)
    cfg = dataclasses.replace(cfg, swiglu_limit=0.3)
    variables, params, x = biased_setup(cfg)
    mask = jnp.ones((8, 4), bool).at[0, -2:].set(False)
    want = run(cfg, params, x, mask)  # unsharded, dispatch has no say: one compile for all cases
    cfg = dataclasses.replace(cfg, dispatch=dispatch)
    grads = want[0][0]["experts"]
    assert set(grads) >= {"gate_bias", "up_bias", "down_bias"}
    assert float(jnp.abs(grads["up_bias"]).max()) > 0

    mesh = expert_mesh(sizes)
    sharded = dataclasses.replace(cfg, mesh=mesh, mesh_rules=RULES)
    assert bool(expert_parallel_axes(sharded)) == (sizes[-1] > 1)
    shardings = param_shardings(nn.get_partition_spec(variables)["params"], params, mesh, RULES)
    tokens = activation_sharding(mesh, RULES)
    args = (
        jax.device_put(params, shardings),
        jax.device_put(x, tokens),
        jax.device_put(mask, NamedSharding(mesh, PartitionSpec(*tokens.spec[:2]))),
    )
    got = jax.jit(functools.partial(run, sharded))(*args)
    tol = dict(atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **tol), got, want)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_grouped_biased_clamped_experts_equal_a_per_token_reference(platform):
    """Both grouped layouts (the CPU's padded blocks; ragged_dot's rows, as TPU and GPU run
    them, here by XLA:CPU's dense ragged_dot) add each row's own expert's biases."""
    n, d, f, e, k = 37, 8, 6, 5, 2
    keys = jax.random.split(jax.random.key(0), 8)
    # Jitted: op by op, each einsum, gather and bias of both sides compiled its own program.
    sizes = dict(n=n, d=d, f=f, e=e, k=k)
    both = jax.jit(functools.partial(grouped_and_per_token, platform=platform, **sizes))
    got, want = both(keys)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def grouped_and_per_token(
    keys: jax.Array, platform: str, n: int, d: int, f: int, e: int, k: int
) -> tuple[jax.Array, jax.Array]:
    """grouped_swiglu with biases and the clamped SwiGLU, and the same per (token, choice)."""
    x = jax.random.normal(keys[0], (n, d))
    experts = jax.random.randint(keys[1], (n, k), 0, e - 1)  # expert e - 1 gets no token
    gate, up = (jax.random.normal(kk, (e, d, f)) for kk in keys[2:4])
    down = jax.random.normal(keys[4], (e, f, d))
    shapes = ((e, f), (e, f), (e, d))
    biases = tuple(jax.random.normal(kk, s) for kk, s in zip(keys[5:], shapes, strict=True))
    got = grouped_swiglu(x, experts, gate, up, down, None, platform, biases, (0.5, 1.702))
    g = jnp.einsum("nd,nkdf->nkf", x, gate[experts]) + biases[0][experts]
    u = jnp.einsum("nd,nkdf->nkf", x, up[experts]) + biases[1][experts]
    h = clamped_swiglu(g, u, 0.5, 1.702)
    want = jnp.einsum("nkf,nkfd->nkd", h, down[experts]) + biases[2][experts]
    return got, want


# --- compiling for TPU ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def v5e_devices() -> list:
    if tpu.libtpu_missing():
        pytest.skip(f"no TPU compiler: {tpu.libtpu_missing()}")
    return tpu.topology_devices("v5e:2x2")


def test_splash_with_sinks_and_biased_experts_compile_for_tpu(v5e_devices):
    """gpt-oss's two TPU kernels on their own, forward and backward, bf16, on v5e:2x2 (data=2 x
    tensor=2): splash with the sinks (the windowed kernel picked by the traced local flag, one
    kv head repeated to follow the query heads split over tensor), and the biased clamped
    experts on the grouped-matmul kernels. The whole model's compile, which takes several times
    longer, is in the slow tier."""
    mesh = tpu_mesh(v5e_devices, 2, 1, 2)
    b, n, kv, h = 4, 4, 1, 128
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    heads = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    q = jax.ShapeDtypeStruct((b, 512, n, h), jnp.bfloat16, sharding=heads)
    k = jax.ShapeDtypeStruct((b, 512, kv, h), jnp.bfloat16, sharding=rows)
    seg = jax.ShapeDtypeStruct((b, 512), jnp.int32)
    sinks = jax.ShapeDtypeStruct((n,), jnp.float32)

    def attention(q, k, v, sinks, seg):
        options = AttentionOptions("splash", window=128, mesh=mesh, rules=RULES)
        out = attend(q, k, v, None, options, segment_ids=seg, local=seg[0, 0] > 0, sinks=sinks)
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.jit(jax.grad(attention, argnums=(0, 1, 2, 3)))
    lowered = grads.lower(q, k, k, sinks, seg)
    assert SPLASH_CALL in lowered.as_text()
    assert lowered.compile().memory_analysis().temp_size_in_bytes > 0

    cfg = MoeConfig(128, 128, 4, 2, norm_topk_prob=True, router_bias=True, expert_bias=True)
    cfg = dataclasses.replace(
        cfg, swiglu_limit=7.0, dtype="bfloat16", param_dtype="bfloat16", mesh=mesh, mesh_rules=RULES
    )
    lowered = lower_layer_gradient(cfg, (b, 128, 128), mesh)
    assert "gmm" in lowered.as_text()
    lowered.compile()  # the TPU compiler takes the kernels (it raises where it cannot)


@pytest.mark.slow  # the kernels' own TPU compile above stays in the default tier
def test_gpt_oss_model_compiles_splash_with_sinks_for_tpu(v5e_devices):
    """A gpt-oss-shaped model (sinks, biases, alternating windows, YaRN, biased clamped
    experts) compiles its train step for TPU v5e:2x2 with "auto" attention: splash with the
    sinks, the experts on the grouped-matmul kernels with their per-row biases (no TPU needed:
    libtpu's compiler)."""
    yarn = RopeScaling(4.0, original_max_position_embeddings=128, rope_type="yarn")
    model = tpu_model(
        tpu_mesh(v5e_devices, 2, 1, 2),
        num_layers=2,
        attention_bias=True,
        o_proj_bias=True,
        attention_sinks=True,
        sliding_window=128,
        local_layers=(True, False),
        rope_scaling=dataclasses.replace(yarn, attention_factor=1.1),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        norm_topk_prob=True,
        router_bias=True,
        expert_bias=True,
        swiglu_limit=7.0,
    )
    compiled, hlo = compile_forward_backward(model, model.config.mesh)
    assert SPLASH_CALL in hlo and "gmm" in hlo
    assert compiled.memory_analysis().temp_size_in_bytes > 0
