"""Every attention implementation that runs on CPU equals a plain masked softmax attention, in
forward and gradient, on packed rows (segments and padding), causally, with a sliding window and
grouped-query heads; and the dispatch picks or refuses implementations per platform clearly.

cuDNN cannot run here: its numerical check against the reference is benchmarks/gpu_checks.py,
run by benchmarks/gpu_all.sh on a GPU. Splash (a TPU Pallas kernel) runs here in Pallas'
interpreter, so the same kernel code and masks are checked on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.model.attention import (
    DENSE_MASK_IMPLEMENTATIONS,
    AttentionOptions,
    attend,
    attention_mask,
    grouped_attention,
    resolve_implementation,
    window_mask,
)
from sft_jax.model.blocked_attention import _block_mask, _block_mask_t, blocked_attention

B, T, N, K, H = 2, 128, 4, 2, 16  # GQA: two query heads per kv head; T = one splash block
WINDOW = 24
TOL = 1e-5


def packed_segments() -> np.ndarray:
    """Row 0: three examples and trailing padding; row 1: one example filling the row."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :40], seg[0, 40:90], seg[0, 90:120] = 1, 2, 3
    seg[1, :] = 1
    return seg


def naive_attention(q, k, v, segment_ids, window=None):
    """Independent reference: repeat kv heads, dense scores, explicit causal/segment/window mask,
    float32 softmax (what HF's eager attention computes on one packed row)."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
    slots = jnp.arange(q.shape[1])
    allowed = (slots[:, None] >= slots[None, :]) & (
        segment_ids[:, :, None] == segment_ids[:, None, :]
    )[:, None]
    if window is not None:
        allowed = allowed & (slots[:, None] - slots[None, :] < window)
    scores = jnp.where(allowed, scores, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = lambda heads: (B, T, heads, H)
    return tuple(jnp.asarray(rng.normal(size=shape(n)), jnp.float32) for n in (N, K, K))


def run(impl: str, q, k, v, segment_ids, window):
    """attend() with the mask the model would build: the dense one only for the implementations
    that read it (blocked and splash get None and build theirs from the segment ids)."""
    mask = attention_mask(segment_ids)
    local = None
    if window is not None:
        mask, local = window_mask(mask, jnp.arange(T), window), jnp.asarray(True)
    if impl not in DENSE_MASK_IMPLEMENTATIONS:
        mask = None
    options = AttentionOptions(impl, window=window, interpret=True)
    return attend(q, k, v, mask, options, segment_ids=segment_ids, local=local)


def value_and_grads(fn, real, weights):
    """One jitted program: the weighted loss over real (non-padding) rows, with `fn`'s output as
    aux, and its gradients in q, k, v (one compile instead of op-by-op dispatch)."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(jnp.where(real, out * weights, 0.0)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("impl", ["reference", "xla", "splash", "blocked"])
@pytest.mark.parametrize("window", [None, WINDOW])
def test_implementation_equals_naive_attention_forward_and_gradient(impl, window):
    q, k, v = inputs()
    seg = jnp.asarray(packed_segments())
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.float32)
    real = (seg > 0)[:, :, None, None]  # padding rows' outputs are not compared (never trained)

    (_, got), got_grads = value_and_grads(
        lambda q, k, v: run(impl, q, k, v, seg, window), real, weights
    )(q, k, v)
    (_, want), want_grads = value_and_grads(
        lambda q, k, v: naive_attention(q, k, v, seg, window), real, weights
    )(q, k, v)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=TOL)
    for a, b in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL)


def test_splash_local_flag_selects_the_window_per_layer():
    """On models with local layers the (traced) per-layer flag picks the windowed kernel."""
    q, k, v = inputs(2)
    seg = jnp.asarray(packed_segments())
    mask = attention_mask(seg)
    options = AttentionOptions("splash", window=WINDOW, interpret=True)
    # One program for both layers, the flag a traced argument as under the layer scan.
    attend_fn = jax.jit(lambda f: attend(q, k, v, mask, options, segment_ids=seg, local=f))
    naive = jax.jit(naive_attention, static_argnums=4)
    for flag, window in ((False, None), (True, WINDOW)):
        got = attend_fn(jnp.asarray(flag))
        want = naive(q, k, v, seg, window)
        np.testing.assert_allclose(got[0, :120], want[0, :120], atol=TOL)
        np.testing.assert_allclose(got[1], want[1], atol=TOL)


# A ragged last block with a window, and whole blocks without one, stay in the default tier;
# the other two combinations run the same mask code in the slow one.
@pytest.mark.parametrize(
    "block, window",
    [
        (48, WINDOW),
        (64, None),
        pytest.param(48, None, marks=pytest.mark.slow),
        pytest.param(64, WINDOW, marks=pytest.mark.slow),
    ],
)
def test_blocked_masks_from_segments_equal_the_dense_mask_reference(window, block):
    """The blocked kernel, building each block's mask from segment ids and slots, equals the
    reference fed the dense mask (`attention_mask`, `window_mask`) on packed rows with padding,
    GQA heads, and a window passed as the traced per-layer bound the model uses: every block's
    mask (forward, and the backward's transposed one) is exactly the dense mask's block, and the
    outputs of every row (padding rows included: they attend to earlier padding, never a fully
    masked row) and the gradients match the reference to float32 rounding."""
    q, k, v = inputs(5)
    seg = np.zeros((B, T), np.int32)
    seg[0, :30], seg[0, 30:31], seg[0, 31:100] = 1, 2, 3  # a one-token example, then padding
    seg[1, 8:70], seg[1, 70:128] = 1, 2  # leading padding
    seg = jnp.asarray(seg)
    mask = attention_mask(seg)
    if window is not None:
        mask = window_mask(mask, jnp.arange(T), window)
    weights = jnp.asarray(np.random.default_rng(6).normal(size=(B, T, N, H)), jnp.float32)
    bound = jnp.asarray(T if window is None else window, jnp.int32)
    block_mask = jax.jit(_block_mask, static_argnums=(2, 3))
    block_mask_t = jax.jit(_block_mask_t, static_argnums=(2, 3))
    for start in range(0, T, block):
        end = min(start + block, T)
        dense = np.asarray(mask)[:, start:end, :end]
        np.testing.assert_array_equal(block_mask(seg, bound, start, end), dense)
        transposed = block_mask_t(seg, bound, start, end)[:, 0, :, 0]
        np.testing.assert_array_equal(transposed, dense.transpose(0, 2, 1))

    def blocked(q, k, v, local):
        bound = None if window is None else jnp.where(local, window, T)
        return blocked_attention(q, k, v, seg, scale=H**-0.5, window=bound, block=block)

    want_fn = lambda q, k, v: grouped_attention(q, k, v, mask, scale=H**-0.5)
    got_fn = jax.jit(lambda q, k, v: blocked(q, k, v, jnp.asarray(True)))
    np.testing.assert_allclose(got_fn(q, k, v), jax.jit(want_fn)(q, k, v), atol=TOL)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
    got = jax.jit(jax.grad(loss(got_fn), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(want_fn), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL)
    if window is not None:  # a global layer's bound (local False) drops the window
        dense_global = lambda q, k, v: grouped_attention(
            q, k, v, attention_mask(seg), scale=H**-0.5
        )
        unwindowed = jax.jit(dense_global)(q, k, v)
        got_global = jax.jit(blocked)(q, k, v, jnp.asarray(False))
        np.testing.assert_allclose(got_global, unwindowed, atol=TOL)


def resolve(requested, platform, dtype="bfloat16", head_dim=64, softcap=None):
    return resolve_implementation(
        requested, platform=platform, dtype=dtype, head_dim=head_dim, softcap=softcap
    )


def test_auto_picks_per_platform_and_falls_back():
    assert resolve("auto", "gpu") == "cudnn"
    assert resolve("auto", "tpu") == "splash"
    assert resolve("auto", "cpu") == "blocked"
    assert resolve("auto", "cpu", softcap=50.0) == "reference"
    assert resolve("auto", "gpu", dtype="float32") == "xla"  # cuDNN flash needs 16-bit
    assert resolve("auto", "gpu", head_dim=256) == "xla"
    assert resolve("auto", "gpu", softcap=50.0) == "reference"  # only reference/splash softcap
    assert resolve("auto", "tpu", softcap=50.0) == "splash"


def test_explicit_requests_that_cannot_run_say_why():
    with pytest.raises(ValueError, match=r"cuDNN attention needs an NVIDIA GPU.*cpu"):
        resolve("cudnn", "cpu")
    with pytest.raises(ValueError, match=r"bfloat16 compute.*float32"):
        resolve("cudnn", "gpu", dtype="float32")
    with pytest.raises(ValueError, match=r"splash attention is a TPU.*gpu"):
        resolve("splash", "gpu")
    with pytest.raises(ValueError, match="soft-capping"):
        resolve("xla", "cpu", softcap=30.0)
    with pytest.raises(ValueError, match="soft-capping"):
        resolve("blocked", "cpu", softcap=30.0)
    with pytest.raises(ValueError, match="choose one of"):
        resolve("flash", "cpu")
    assert resolve("xla", "cpu") == "xla" and resolve("reference", "tpu") == "reference"


@pytest.mark.parametrize("block", [48, 128, 1000])
def test_blocked_attention_any_block_size_forward_and_gradient(block):
    """Ragged last blocks (48 of T=128), one block, and a block longer than the sequence all give
    the naive attention's outputs and gradients on packed rows with padding."""
    q, k, v = inputs()
    seg = jnp.asarray(packed_segments())
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, N, H)), jnp.float32)
    real = (seg > 0)[:, :, None, None]
    got_fn = lambda q, k, v: blocked_attention(q, k, v, seg, scale=H**-0.5, block=block)
    want_fn = lambda q, k, v: naive_attention(q, k, v, seg, None)
    (_, got_out), got = value_and_grads(got_fn, real, weights)(q, k, v)
    (_, want_out), want = value_and_grads(want_fn, real, weights)(q, k, v)
    np.testing.assert_allclose(np.where(real, got_out, 0), np.where(real, want_out, 0), atol=TOL)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL)


def test_blocked_attention_in_bfloat16_stays_close_and_refuses_a_cache():
    q, k, v = (x.astype(jnp.bfloat16) for x in inputs())
    seg = jnp.asarray(packed_segments())
    mask = attention_mask(seg)
    got = jax.jit(lambda q, k, v: blocked_attention(q, k, v, seg, scale=H**-0.5))(q, k, v)
    want = grouped_attention(q, k, v, mask, scale=H**-0.5)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=3e-2)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, N, H)), jnp.float32)
    real = (seg > 0)[:, :, None, None]

    def grads(fn, masking, *qkv):
        out = lambda q, k, v: fn(q, k, v, masking, scale=0.25)
        loss = lambda q, k, v: jnp.sum(jnp.where(real, out(q, k, v) * weights, 0))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*qkv)

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]  # the same bf16 values, in float32
    blocked_grads = grads(blocked_attention, seg, q, k, v)
    pairs = zip(blocked_grads, grads(grouped_attention, mask, *f32), strict=True)
    for got, want in pairs:
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(np.float32(got), np.float32(want), atol=2e-2 * scale)
    with pytest.raises(ValueError, match="S == T"):
        blocked_attention(q[:, :1], k, v, seg[:, :1], scale=0.25)
