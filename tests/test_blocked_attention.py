"""The blocked kernel's looped path (long sequences) equals dense masked attention, forward and
gradients, and its compiled memory grows linearly with the sequence.

The reference is `attention.grouped_attention` fed the dense mask (`attention_mask`, and
`window_mask` on local layers) of the same segment ids: packed rows with leading and trailing
padding and a one-token example, grouped-query heads (4 query heads on 2 kv heads), the window
as the traced per-layer bound the model passes, and sequences that are not a multiple of the
tile. `loop_from=0` sends these short sequences down the looped path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sft_jax.model.attention import attention_mask, grouped_attention, window_mask
from sft_jax.model.blocked_attention import blocked_attention

B, N, K, H = 2, 4, 2, 16
WINDOW = 24
TOL = 1e-5


def packed(length: int) -> np.ndarray:
    """Row 0: three examples (one of a single token), then padding; row 1: leading padding, then
    two examples. Segment ids as the packer writes them, padding 0."""
    seg = np.zeros((B, length), np.int32)
    seg[0, :30], seg[0, 30:31], seg[0, 31 : length - 20] = 1, 2, 3
    seg[1, 8:70], seg[1, 70:] = 1, 2
    return seg


def inputs(length: int, seed: int = 0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    qkv = tuple(rng.normal(size=(B, length, n, H)) for n in (N, K, K))
    weights = jnp.asarray(rng.normal(size=(B, length, N, H)), jnp.float32)
    return tuple(jnp.asarray(x, dtype) for x in qkv), weights


def dense_mask(seg: jax.Array, window: int | None) -> jax.Array:
    mask = attention_mask(seg)
    if window is not None:
        mask = window_mask(mask, jnp.arange(seg.shape[1]), window)
    return mask


def assert_matches_reference(seg, window, tile, seed=0):
    """Outputs of every row (padding included) and dq, dk, dv against the dense reference."""
    length = seg.shape[1]
    (q, k, v), weights = inputs(length, seed)

    def looped(q, k, v, local):
        bound = None if window is None else jnp.where(local, window, length)
        return blocked_attention(q, k, v, seg, scale=H**-0.5, window=bound, tile=tile, loop_from=0)

    got_fn = lambda q, k, v: looped(q, k, v, jnp.asarray(True))
    want_fn = lambda q, k, v: grouped_attention(q, k, v, dense_mask(seg, window), scale=H**-0.5)

    def value_and_grads(fn):  # one jitted program: the output (aux) and dq, dk, dv
        loss = lambda q, k, v: (jnp.sum(fn(q, k, v) * weights), fn(q, k, v))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, got_out), got = value_and_grads(got_fn)
    (_, want_out), want = value_and_grads(want_fn)
    np.testing.assert_allclose(got_out, want_out, atol=TOL)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL)
    return looped, (q, k, v)


# Each of whole tiles, a ragged sequence and one tile runs in the default tier, two with the
# window and one without; their other window setting runs in the slow tier.
@pytest.mark.parametrize(
    ("length", "tile", "window"),
    [
        (128, 32, None),
        (100, 32, WINDOW),
        (100, 256, WINDOW),
        pytest.param(128, 32, WINDOW, marks=pytest.mark.slow),
        pytest.param(100, 32, None, marks=pytest.mark.slow),
        pytest.param(100, 256, None, marks=pytest.mark.slow),
    ],
)
def test_looped_equals_dense_reference_on_packed_rows(window, length, tile):
    """Whole tiles, a ragged sequence (100 = 3 x 32 + 4: padded to 128 inside, cut after) and a
    tile longer than the sequence (one tile)."""
    seg = jnp.asarray(packed(length))
    looped, (q, k, v) = assert_matches_reference(seg, window, tile)
    if window is not None:  # a global layer's bound (local False) drops the window
        want = grouped_attention(q, k, v, attention_mask(seg), scale=H**-0.5)
        got = jax.jit(looped)(q, k, v, jnp.asarray(False))
        np.testing.assert_allclose(got, want, atol=TOL)


def interleaved() -> np.ndarray:
    """Examples not in contiguous runs (as after a permutation of the slots), padding between."""
    seg = np.repeat(np.array([1, 2, 1, 3, 2, 3, 1, 0]), 12)
    return np.stack([seg, seg[::-1]]).astype(np.int32)


def runs() -> np.ndarray:
    """No padding, examples of 20 to 40 slots: most tiles meet no segment of a far tile."""
    row0 = np.repeat(np.arange(1, 5), [40, 20, 16, 20])
    row1 = np.repeat(np.arange(1, 5), [20, 36, 20, 20])
    return np.stack([row0, row1]).astype(np.int32)


# Each layout once in the default tier (interleaved with the window, runs without), the other
# window setting of each in the slow tier.
@pytest.mark.parametrize(
    ("layout", "window"),
    [
        (interleaved, WINDOW),
        (runs, None),
        pytest.param(interleaved, None, marks=pytest.mark.slow),
        pytest.param(runs, WINDOW, marks=pytest.mark.slow),
    ],
)
def test_looped_skips_only_tiles_without_a_visible_pair(window, layout):
    """The segment test that skips tiles (and starts the loop at the first tile that meets)
    keeps every tile with a visible pair, whether examples are contiguous runs or not."""
    assert_matches_reference(jnp.asarray(layout()), window, tile=16, seed=1)


def test_long_sequences_take_the_looped_path_with_the_same_result():
    """At and above `loop_from` the looped path runs, and gives the unrolled kernel's result."""
    seg = jnp.asarray(packed(128))
    (q, k, v), _ = inputs(128, seed=2)
    attend = lambda loop_from: blocked_attention(
        q, k, v, seg, scale=H**-0.5, window=jnp.asarray(WINDOW), tile=32, loop_from=loop_from
    )
    assert "while" in str(jax.make_jaxpr(lambda: attend(128))())
    assert "while" not in str(jax.make_jaxpr(lambda: attend(129))())
    np.testing.assert_allclose(
        jax.jit(lambda: attend(128))(), jax.jit(lambda: attend(129))(), atol=TOL
    )


def test_looped_in_bfloat16_stays_close():
    seg = jnp.asarray(packed(100))
    (q, k, v), weights = inputs(100, seed=3, dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]  # the same bf16 values, in float32
    mask = attention_mask(seg)
    looped = lambda q, k, v: blocked_attention(q, k, v, seg, scale=H**-0.5, tile=32, loop_from=0)
    got = jax.jit(looped)(q, k, v)
    assert got.dtype == jnp.bfloat16
    want = grouped_attention(*f32, mask, scale=H**-0.5)
    np.testing.assert_allclose(np.float32(got), want, atol=3e-2)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)
    got_grads = jax.jit(jax.grad(loss(looped), argnums=(0, 1, 2)))(q, k, v)
    reference = lambda q, k, v: grouped_attention(q, k, v, mask, scale=H**-0.5)
    want_grads = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(*f32)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(np.float32(a), b, atol=2e-2 * scale)


def test_looped_memory_grows_linearly_with_the_sequence():
    """Compiled temporaries of one attention's forward and backward (abstract inputs, nothing
    run) at T and 4T: about 4x, not the 16x of a [T, T] score tensor."""

    def temporaries(length: int) -> int:
        q = jax.ShapeDtypeStruct((1, length, 8, 32), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
        seg = jax.ShapeDtypeStruct((1, length), jnp.int32)
        attend = lambda q, k, v, s: blocked_attention(q, k, v, s, scale=0.2, tile=128, loop_from=0)
        grad = jax.grad(lambda *a: jnp.sum(attend(*a) ** 2), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes

    short, long = temporaries(1024), temporaries(4096)
    assert long <= 4.5 * short, (short, long)


def test_looped_under_a_sharded_jit_equals_the_unsharded_result():
    """Rows split over a data axis and heads over a tensor axis (GSPMD partitions the loops),
    as the multi-device CPU step runs it: the same outputs and gradients as on one device."""
    seg = jnp.asarray(packed(100))
    (q, k, v), weights = inputs(100, seed=4)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    heads, rows = NamedSharding(mesh, P("data", None, "tensor")), NamedSharding(mesh, P("data"))
    attend = lambda q, k, v, s: blocked_attention(
        q, k, v, s, scale=H**-0.5, window=WINDOW, tile=32, loop_from=0
    )
    loss = lambda q, k, v, s: jnp.sum(attend(q, k, v, s) * weights)
    both = lambda q, k, v, s: (attend(q, k, v, s), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, s))
    want = jax.jit(both)(q, k, v, seg)
    placed = [jax.device_put(x, heads) for x in (q, k, v)] + [jax.device_put(seg, rows)]
    got = jax.jit(both)(*placed)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=TOL)
