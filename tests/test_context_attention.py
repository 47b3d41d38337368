"""Ring attention over a context mesh axis equals dense attention, forward and gradients.

The reference is `attention.grouped_attention` with the dense mask `attention.attention_mask`
(and `window_mask`) over the whole, unsharded sequence: what the model computes today. The ring
runs on the 8 fake CPU devices with the sequence split over `context`, alone or with batch and
heads split too, on packed rows (several segments, some padding), with and without the
load-balancing reorder. A last test compiles the forward and backward with the TPU compiler for
v5e:2x4 (libtpu, no TPU needed) and reads its memory analysis.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sft_jax.model.attention import attention_mask, grouped_attention, window_mask
from sft_jax.model.context_attention import context_attention, reorder_for_context, restore_order
from sft_jax.planning import tpu

AXES = ("data", "tensor", "context")
TOL = 1e-5


def make_mesh(data: int, tensor: int, context: int, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    grid = np.asarray(devices[: data * tensor * context]).reshape(data, tensor, context)
    return Mesh(grid, AXES)


def packed_segments(rows: int, length: int, seed: int) -> np.ndarray:
    """Each row: four examples of random lengths; even rows end in padding (segment 0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, length), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(4, length - 2), size=4, replace=False))
        end = length if r % 2 else cuts[-1]
        for i, (a, b) in enumerate(zip([0, *cuts[:-1]], [*cuts[:-1], end], strict=True)):
            seg[r, a:b] = i + 1
    return seg


def dense(q, k, v, seg, *, window=None, softcap=None):
    mask = attention_mask(seg)
    if window is not None:
        mask = window_mask(mask, jnp.arange(seg.shape[1]), window)
    return grouped_attention(q, k, v, mask, softcap=softcap)


def ring(q, k, v, seg, *, mesh, balance, window=None, softcap=None, block=512):
    """The ring on (optionally) reordered inputs, its output restored to the original order."""
    b, t = seg.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    n = mesh.shape["context"]
    order = (lambda x: reorder_for_context(x, n)) if balance else (lambda x: x)
    out = context_attention(
        *(order(x) for x in (q, k, v, seg, pos)), mesh=mesh, window=window, softcap=softcap,
        block=block,
    )  # fmt: skip
    return restore_order(out, n) if balance else out


# name: mesh (data, tensor, context), rows, T, query heads, kv heads, window, softcap, balance,
# block
CASES = {
    "packed_causal": ((1, 1, 8), 2, 128, 4, 4, None, None, False, 512),
    "packed_causal_balanced": ((1, 1, 8), 2, 128, 4, 4, None, None, True, 512),
    "balanced_small_tiles": ((1, 1, 4), 2, 128, 2, 2, None, None, True, 8),
    "sliding_window": ((1, 1, 8), 2, 128, 4, 2, 12, None, True, 512),
    "window_small_tiles": ((1, 1, 4), 1, 128, 2, 1, 10, None, False, 8),
    "gqa": ((1, 1, 8), 2, 128, 8, 2, None, None, True, 512),
    "softcap": ((1, 1, 8), 2, 128, 4, 2, None, 5.0, True, 512),
    "data_x_context": ((2, 1, 4), 4, 64, 4, 2, None, None, True, 512),
    "tensor_x_context": ((1, 2, 4), 2, 64, 4, 2, None, None, True, 8),
    "data_x_tensor_x_context": ((2, 2, 2), 2, 64, 4, 2, 16, 3.0, True, 512),
}


# The default tier keeps four cases that together take every option: the unbalanced order with
# whole-row tiles (packed_causal) and with small tiles and a window (window_small_tiles), the
# balanced order with small tiles over tensor x context, and with window, soft-cap and GQA over
# data x tensor x context. The other cases repeat those code paths on other shapes in the slow
# tier.
DEFAULT_CASES = (
    "packed_causal",
    "window_small_tiles",
    "tensor_x_context",
    "data_x_tensor_x_context",
)


@pytest.mark.parametrize(
    "case", [c if c in DEFAULT_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
)
def test_ring_attention_equals_dense_forward_and_gradients(case):
    (data, tensor, context), b, t, n, kv, window, softcap, balance, block = CASES[case]
    mesh = make_mesh(data, tensor, context)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, 16)), jnp.float32) for h in (n, kv, kv))
    seg = jnp.asarray(packed_segments(b, t, seed=1))
    weights = jnp.asarray(rng.normal(size=(b, t, n, 16)), jnp.float32)
    opts = dict(window=window, softcap=softcap)

    def grads(attend):
        f = lambda q, k, v: (jnp.sum(attend(q, k, v) * weights), attend(q, k, v))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, got), got_grads = grads(
        lambda q, k, v: ring(q, k, v, seg, mesh=mesh, balance=balance, block=block, **opts)
    )
    (_, want), want_grads = grads(lambda q, k, v: dense(q, k, v, seg, **opts))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    for name, a, w in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, w, atol=TOL, rtol=TOL, err_msg=f"d{name}")


def test_reorder_gives_device_i_chunks_i_and_2n_minus_1_minus_i():
    x = jnp.arange(16)[None]
    got = reorder_for_context(x, 4)
    assert got.tolist() == [[0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]]
    np.testing.assert_array_equal(restore_order(got, 4), x)
    with pytest.raises(ValueError, match="not a multiple of 2 x 4"):
        reorder_for_context(jnp.arange(12)[None], 4)


def test_balanced_order_skips_masked_tiles_alike_on_every_device():
    """With the reorder, each device holds one early and one late chunk, so the causal tiles
    left after skipping are spread evenly; without it the last device does the most."""
    from sft_jax.model.context_attention import _tile_visible

    def visible_tiles(order, n=4, t=64, block=8):
        pos = order(jnp.arange(t)[None], n).reshape(n, t // n)
        seg = jnp.ones((1, block), jnp.int32)
        counts = []
        for i in range(n):  # device i's query tiles against every key tile
            qt, kt = pos[i].reshape(-1, block), pos.reshape(-1, block)
            counts.append(
                sum(bool(_tile_visible(seg, a[None], seg, c[None], None)) for a in qt for c in kt)
            )
        return counts

    unbalanced = visible_tiles(lambda x, n: x)
    balanced = visible_tiles(reorder_for_context)
    assert unbalanced == sorted(unbalanced) and unbalanced[-1] > unbalanced[0]
    assert len(set(balanced)) == 1 and sum(balanced) == sum(unbalanced)


def test_shapes_that_do_not_split_say_why():
    mesh = make_mesh(1, 2, 4)
    x = jnp.zeros((1, 64, 4, 8))
    rows = jnp.zeros((1, 64), jnp.int32)
    with pytest.raises(ValueError, match="kv heads must divide"):
        context_attention(x, x[:, :, :1], x[:, :, :1], rows, rows, mesh=mesh)
    with pytest.raises(ValueError, match="does not split over 4"):
        context_attention(x[:, :62], x[:, :62], x[:, :62], rows[:, :62], rows[:, :62], mesh=mesh)
    with pytest.raises(ValueError, match="no context axis"):
        context_attention(x, x, x, rows, rows, mesh=make_mesh(1, 2, 4), context_axis="seq")


# --------------------------------------------------------------------------------------------
# Compilation for TPU v5e:2x4 (no TPU needed: libtpu's compiler on abstract devices).


def compile_for_tpu(mesh: Mesh, t: int):
    """jit(grad) of a bf16 ring layer at sequence length t, compiled for `mesh` -> compiled."""
    b, n, kv, h = 2, 8, 4, 128
    tokens = NamedSharding(mesh, P(("data",), "context", "tensor", None))
    rows = NamedSharding(mesh, P(("data",), "context"))
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=tokens)
    k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16, sharding=tokens)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows)

    def loss(q, k, v, seg, pos):
        out = context_attention(q, k, v, seg, pos, mesh=mesh, window=4096, softcap=50.0)
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, seg, seg).compile()


def test_ring_attention_compiles_for_tpu_v5e_2x4_with_memory_linear_in_t():
    if tpu.libtpu_missing():
        pytest.skip(f"no TPU compiler: {tpu.libtpu_missing()}")
    mesh = make_mesh(1, 2, 4, tpu.topology_devices("v5e:2x4"))
    start = time.perf_counter()
    temps = {}
    for t in (8192, 16384):
        compiled = compile_for_tpu(mesh, t)
        temps[t] = compiled.memory_analysis().temp_size_in_bytes
        assert "collective-permute" in compiled.as_text()
    # One device's share of dense [T, T] float32 scores at T = 8192 (2 rows x 4 local heads x
    # 2048 queries x 8192 keys) is 512 MiB; the ring's temporaries are a small fraction of it,
    # and doubling T at most doubles them (plus the fixed tiles).
    assert 0 < temps[8192] < 64 * 2**20, temps
    assert temps[16384] < 2.2 * temps[8192], temps
    print(f"v5e:2x4 ring fwd+bwd temp bytes {temps}, {time.perf_counter() - start:.1f} s")
