"""The CPU's blocked grouped matmul against `jax.lax.ragged_dot` (values and gradients): groups
of every size, empty groups, rows past the groups' total, blocks smaller and larger than groups."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.model.grouped_matmul import BLOCK_ROWS, grouped_matmul, tpu_grouped_matmul


@pytest.mark.parametrize(
    "sizes, block",
    [
        ([5, 0, 17, 3, 0, 11], 4),  # empty groups, groups spanning several blocks
        ([40, 0, 0, 0], 8),  # everything in one group
        ([0, 0, 0, 0], 8),  # no row in any group
        ([3, 1, 2], 64),  # block wider than every group and than the rows
        ([7, 9, 2, 6], 5),  # sizes not multiples of the block; 4 rows past the total
    ],
)
def test_equals_ragged_dot_with_gradients(sizes, block):
    rows = max(sum(sizes), 1) + (4 if sizes == [7, 9, 2, 6] else 0)
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(sum(sizes) + block), 3)
    x = jax.random.normal(kx, (rows, 6))
    w = jax.random.normal(kw, (len(sizes), 6, 5))
    g = jnp.asarray(sizes, jnp.int32)
    cotangent = jax.random.normal(kg, (rows, 5))
    ours = with_gradients(lambda x, w: grouped_matmul(x, w, g, "cpu", block), cotangent)
    ref = with_gradients(lambda x, w: jax.lax.ragged_dot(x, w, g), cotangent)
    (grads, out), (ref_grads, ref_out) = ours(x, w), ref(x, w)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def with_gradients(matmul, cotangent: jax.Array):
    """(gradients w.r.t. x and w of sum(matmul(x, w) * cotangent), matmul(x, w)), jitted: one
    program for both (the blocked loop and the interpreted kernels op by op run far slower
    than their compile)."""

    def loss(x, w):
        out = matmul(x, w)
        return jnp.sum(out * cotangent), out

    return jax.jit(jax.grad(loss, (0, 1), has_aux=True))


def test_cpu_path_holds_no_row_by_group_temporary():
    """XLA:CPU's ragged_dot multiplies every row by every group's matrix and keeps the
    [rows, groups, F] products; the blocked path's temporaries stay a few row-sized buffers
    however many groups there are. (Flop counts cannot tell: XLA counts a loop body once.)"""
    rows, d, f, groups = 8192, 64, 128, 16
    args = (
        jax.ShapeDtypeStruct((rows, d), jnp.float32),
        jax.ShapeDtypeStruct((groups, d, f), jnp.float32),
        jax.ShapeDtypeStruct((groups,), jnp.int32),
    )
    temp = lambda fn: jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
    blocked = temp(lambda x, w, g: grouped_matmul(x, w, g, "cpu"))
    dense = temp(jax.lax.ragged_dot)
    padded_rows = rows + groups * BLOCK_ROWS  # the blocked path's buffers, input and output
    assert blocked <= padded_rows * (d + f) * 4 < rows * groups * f * 4 / 2 < dense


@pytest.mark.parametrize("sizes", [[24, 0, 40, 0], [64, 0, 0, 0], [8, 8, 8, 40]])
def test_tpu_kernels_equal_ragged_dot_in_the_interpreter(sizes):
    """The megablox kernels (gmm; tgmm for the weight gradient), run by Pallas' interpreter."""
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(len(sizes) + sizes[0]), 3)
    x = jax.random.normal(kx, (64, 32))
    w = jax.random.normal(kw, (4, 32, 48))
    g = jnp.asarray(sizes, jnp.int32)
    cotangent = jax.random.normal(kg, (64, 48))
    ours = with_gradients(lambda x, w: tpu_grouped_matmul(x, w, g, interpret=True), cotangent)
    ref = with_gradients(lambda x, w: jax.lax.ragged_dot(x, w, g), cotangent)
    (grads, out), (ref_grads, ref_out) = ours(x, w), ref(x, w)
    np.testing.assert_allclose(out, ref_out, atol=1e-4)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-4)


def test_tpu_weight_gradient_is_not_dense_over_groups():
    """Compiled for a TPU: ragged_dot's weight gradient costs every row x every group (its flops
    are groups x the useful ones); the kernels' are the rows' own work (the Pallas kernels
    report their cost to the compiler's analysis)."""
    import os

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    except Exception as e:  # libtpu absent: the TPU extra is not installed
        pytest.skip(f"no TPU compiler: {e}")
    replicated = NamedSharding(Mesh(np.array(topology.devices[:1]), ("x",)), PartitionSpec())
    rows, d, f, groups = 4096, 256, 256, 32
    args = (
        jax.ShapeDtypeStruct((rows, d), jnp.bfloat16, sharding=replicated),
        jax.ShapeDtypeStruct((groups, d, f), jnp.bfloat16, sharding=replicated),
        jax.ShapeDtypeStruct((groups,), jnp.int32, sharding=replicated),
    )

    def weight_grad(matmul):
        loss = lambda x, w, g: jnp.sum(matmul(x, w, g).astype(jnp.float32))
        compiled = jax.jit(jax.grad(loss, 1)).lower(*args).compile()
        return compiled.cost_analysis()["flops"], compiled.as_text()

    useful = 2 * rows * d * f
    dense_flops, _ = weight_grad(jax.lax.ragged_dot)
    flops, text = weight_grad(lambda x, w, g: grouped_matmul(x, w, g, "tpu"))
    assert dense_flops > groups / 2 * useful
    assert flops < 1.5 * useful and "tpu_custom_call" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    "sizes", [dict(data=2, fsdp=2, tensor=2), dict(data=2, fsdp=1, tensor=1, expert=4)]
)
def test_moe_layer_on_the_tpu_kernels_equals_the_unsharded_layer(monkeypatch, sizes):
    """The MoE layer as it runs on TPU (megablox kernels, here interpreted, inside shard_map
    without varying-axes checks) on token-sharded and expert-parallel meshes: the unsharded
    layer's value and gradients (params and x)."""
    from configs import base
    from sft_jax.config import MeshSection
    from sft_jax.model import grouped_matmul, moe
    from sft_jax.training import sharding

    rules = tuple(tuple(r) for r in base.get_config().mesh.rules)
    kernel, calls = grouped_matmul.tpu_grouped_matmul, []

    def interpreted(*args):
        calls.append(args[0].shape)
        return kernel(*args, interpret=True)

    monkeypatch.setattr(grouped_matmul, "tpu_grouped_matmul", interpreted)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 128))  # D, F: whole kernel tiles
    params = nn.unbox(moe.MoeMlp(moe.MoeConfig(128, 128, 8, 2)).init(jax.random.PRNGKey(1), x))
    params = jax.tree.map(lambda p: p * 5 if p.ndim == 2 else p, params)  # router off its init

    def value_and_grads(mesh, platform):
        monkeypatch.setattr(moe.MoeConfig, "platform", property(lambda self: platform))
        config = moe.MoeConfig(128, 128, 8, 2, norm_topk_prob=True, mesh=mesh, mesh_rules=rules)
        loss = lambda p, x: jnp.sum(moe.MoeMlp(config).apply(p, x)[0] ** 2)
        return jax.jit(jax.value_and_grad(loss, (0, 1)))(params, x)

    expert = sizes.pop("expert", 1)
    mesh = sharding.make_mesh(MeshSection(**sizes, rules=rules, expert=expert))
    ours, ref = value_and_grads(mesh, "tpu"), value_and_grads(None, "cpu")
    assert len(calls) == 3  # the experts' gate, up and down projections went through the kernels
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
