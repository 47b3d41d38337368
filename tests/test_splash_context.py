"""Splash attention under context parallelism (sft_jax/model/splash_context.py).

In Pallas' interpreter on the 8 fake CPU devices: queries split along the sequence over a
`context` axis (rows in the causally balanced order the train step gives them), keys and
values gathered, equal to the reference attention on the unpermuted rows, forward and gradient,
with packing and padding, GQA, a sliding window and soft-capping. Then compiled by the TPU
compiler for v5e:2x4 (skipped without libtpu).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import base
from sft_jax.model.attention import attention_mask, grouped_attention, window_mask
from sft_jax.model.context_attention import reorder_for_context, restore_order
from sft_jax.model.splash_context import splash_context_attention
from sft_jax.planning import tpu

RULES = tuple(tuple(r) for r in base.get_config().mesh.rules)
AXES = ("data", "fsdp", "tensor", "context")
H = 16
TOL = 2e-5


def packed_segments(rows: int, t: int, seed: int) -> np.ndarray:
    """A few examples of random lengths per row, padding (segment 0) ending the even rows."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, t), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(16, t), size=4, replace=False))
        end = t if r % 2 else cuts[-1]
        for i, (a, b) in enumerate(zip([0, *cuts[:-1]], [*cuts[:-1], end], strict=True)):
            seg[r, a:b] = i + 1
    return seg


# name: mesh (data, fsdp, tensor, context), rows, query heads, kv heads, window, softcap
CASES = {
    "context_8": ((1, 1, 1, 8), 1, 4, 2, None, None),
    "data_x_context_gqa": ((2, 1, 1, 4), 2, 4, 1, None, None),
    "tensor_x_context_window": ((1, 1, 2, 4), 2, 4, 2, 200, None),
    "fsdp_x_context_softcap": ((1, 2, 1, 4), 2, 2, 2, None, 5.0),
}


# Pallas' interpreter runs every context shard's kernel on the host: the two costliest cases
# (8 shards; a window over tensor x context) run in the slow step.
SLOW_CASES = ("context_8", "tensor_x_context_window")


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES]
)
def test_context_split_splash_equals_reference_forward_and_gradient(case):
    shape, b, n, kv, window, softcap = CASES[case]
    mesh = Mesh(np.asarray(jax.devices()[: np.prod(shape)]).reshape(shape), AXES)
    ring = shape[3]
    t = 2 * ring * 128  # each device: two balanced chunks of one splash block
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, H)), jnp.float32) for h in (n, kv, kv))
    seg = jnp.asarray(packed_segments(b, t, seed=1))
    mask = attention_mask(seg)
    if window is not None:
        mask = window_mask(mask, jnp.arange(t), window)
    weights = jnp.asarray(rng.normal(size=(b, t, n, H)), jnp.float32)
    real = (seg > 0)[:, :, None, None]  # padding rows' outputs are never trained
    scale = H**-0.5

    def split(q, k, v):
        permute = lambda x: reorder_for_context(x, ring)
        out = splash_context_attention(
            permute(q), permute(k), permute(v), permute(seg), scale=scale, mesh=mesh,
            rules=RULES, softcap=softcap, local=jnp.asarray(window is not None),
            window=window, interpret=True,
        )  # fmt: skip
        return restore_order(out, ring)

    def dense(q, k, v):
        return grouped_attention(q, k, v, mask, scale=scale, softcap=softcap)

    def loss(f):
        def objective(q, k, v):
            out = f(q, k, v)
            return jnp.sum(jnp.where(real, out * weights, 0.0)), out

        return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))

    (_, got), got_grads = loss(split)(q, k, v)
    (_, want), want_grads = loss(dense)(q, k, v)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=TOL)
    for name, a, w in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, w, atol=TOL, err_msg=f"d{name}")


def test_a_length_the_split_cannot_tile_is_refused_with_the_reason():
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 1, 1, 4), AXES)
    x = jnp.zeros((1, 1536, 2, H))
    with pytest.raises(ValueError, match=r"multiple of 2 x 4 context devices x 128, got 1536"):
        splash_context_attention(x, x, x, jnp.ones((1, 1536), jnp.int32), scale=1.0, mesh=mesh)


def test_compiles_for_tpu_with_context_parallelism():
    """The TPU compiler takes the kernel under shard_map over data x tensor x context, forward
    and backward, bf16, at 16k tokens per row. Per chip it holds the local chunk and the gathered
    keys and values: far from a [T, T] score matrix (2 GiB of float32 scores per chip for these
    rows and local heads)."""
    if tpu.libtpu_missing():
        pytest.skip(f"no TPU compiler: {tpu.libtpu_missing()}")
    devices = np.asarray(tpu.topology_devices("v5e:2x4")).reshape(1, 1, 2, 4)
    mesh = Mesh(devices, AXES)
    b, t, n, kv, h = 2, 16384, 8, 4, 128
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def objective(q, k, v, seg):
        out = splash_context_attention(
            q, k, v, seg, scale=0.1, mesh=mesh, rules=RULES, softcap=50.0,
            local=jnp.asarray(True), window=4096,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(objective, argnums=(0, 1, 2))).lower(q, k, k, seg).compile()
    memory = compiled.memory_analysis()
    temporaries = memory.temp_size_in_bytes + memory.output_size_in_bytes
    assert temporaries < 64 * 2**20, temporaries


def test_auto_picks_splash_under_context_on_tpu_where_it_tiles_else_ring():
    from sft_jax.model.attention import resolve_implementation

    common = dict(platform="tpu", dtype="bfloat16", head_dim=128, softcap=None, context=4)
    assert resolve_implementation("auto", seq_len=2048, **common) == "splash"
    assert resolve_implementation("auto", seq_len=1536, **common) == "ring"  # 192-token chunks
    with pytest.raises(ValueError, match=r"multiple of 2 x 4 x 128, got 1536"):
        resolve_implementation("splash", seq_len=1536, **common)
    cpu = {**common, "platform": "cpu"}
    assert resolve_implementation("auto", seq_len=2048, **cpu) == "ring"


@pytest.mark.slow  # the kernel's own TPU compile and interpreter checks stay in default
def test_train_step_with_context_parallel_splash_compiles_for_tpu():
    """The whole train step (the tiny model, bf16, packed rows permuted for the context axis)
    compiled by the TPU compiler on v5e:2x4 with fsdp=2 x context=4: attention is splash."""
    if tpu.libtpu_missing():
        pytest.skip(f"no TPU compiler: {tpu.libtpu_missing()}")
    from sft_jax import config as config_lib
    from sft_jax.config_file import load_config_file

    raw = load_config_file("configs/tiny.py")
    raw.mesh.data, raw.mesh.fsdp, raw.mesh.tensor, raw.mesh.context = 1, 2, 1, 4
    raw.data.seq_len = raw.model.arch.max_position_embeddings = 2048
    raw.model.dtype = "bfloat16"
    result = tpu.compile_for_topology(config_lib.parse(raw), "v5e:2x4")
    assert result["attention"] == "splash" and result["fits"], result
    assert result["mesh"] == {"data": 1, "fsdp": 2, "context": 4, "tensor": 1}
