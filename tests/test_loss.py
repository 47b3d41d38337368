"""Masked cross-entropy against a hand-computed example; the chunked loss equals the plain one
(loss and gradients, untied and tied heads, LoRA on the head) without building [B, T, V]."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sft_jax.config import LoraSection, MeshSection, OptimSection
from sft_jax.data.pack import PACKED_KEYS
from sft_jax.model.decoder import Transformer
from sft_jax.training import step
from sft_jax.training.loss import masked_cross_entropy
from sft_jax.training.optim import make_optimizer
from sft_jax.training.sharding import make_mesh
from sft_jax.training.state import StateSpec, create_train_state
from tests.helpers import model_only_state, tiny_model_config


def base_optim() -> OptimSection:
    return OptimSection(**base.get_config().optim.to_dict())


def test_hand_computed_example():
    # One row, three positions, vocab 3. Position 1 is masked out.
    logits = jnp.array([[[0.0, 0.0, 0.0], [5.0, -1.0, 2.0], [1.0, 2.0, 3.0]]])
    targets = jnp.array([[2, 0, 0]])
    mask = jnp.array([[True, False, True]])
    loss_sum, count = masked_cross_entropy(logits, targets, mask)
    # -log softmax: uniform -> log 3; third: logsumexp(1,2,3) - 1
    expected = math.log(3.0) + (math.log(math.e**1 + math.e**2 + math.e**3) - 1.0)
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-6)
    assert float(count) == 2.0
    assert loss_sum.dtype == jnp.float32 and count.dtype == jnp.float32


def test_bfloat16_logits_computed_in_float32():
    logits = jnp.array([[[10.0, 0.0, -10.0, 3.0]]])
    targets = jnp.array([[3]])
    mask = jnp.ones((1, 1), bool)
    full, _ = masked_cross_entropy(logits, targets, mask)
    half, _ = masked_cross_entropy(logits.astype(jnp.bfloat16), targets, mask)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(float(half), float(full), rtol=1e-2)


def test_mask_is_data_not_token_value():
    # A target equal to a "pad" id (0) is still trained when the mask says so.
    logits = jnp.zeros((1, 2, 4))
    targets = jnp.array([[0, 0]])
    loss_sum, count = masked_cross_entropy(logits, targets, jnp.array([[True, True]]))
    assert float(count) == 2.0
    np.testing.assert_allclose(float(loss_sum), 2 * math.log(4.0), rtol=1e-6)


def test_empty_mask_gives_zero_sum_and_count():
    loss_sum, count = masked_cross_entropy(
        jnp.ones((2, 3, 5)), jnp.zeros((2, 3), int), jnp.zeros((2, 3))
    )
    assert float(loss_sum) == 0.0 and float(count) == 0.0


# ----------------------------------------------------------------------------- chunked


def _packed_batch(rows: int = 3, length: int = 20, vocab: int = 64) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(0)
    seg = np.ones((rows, length), np.int32)
    seg[:, length // 2 :] = 2
    seg[0, -3:] = 0  # padding
    pos = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(rows, 0).astype(np.int32)
    return {
        "inputs": jnp.asarray(rng.integers(1, vocab, (rows, length)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32),
        "loss_mask": jnp.asarray((rng.random((rows, length)) < 0.6) & (seg > 0)),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(pos),
    }


def _loss_and_grads(params, apply_fn, batch, chunks, frozen=None):
    """(loss sum, loss tokens, grads) for each loss chunk setting in `chunks`, all from one
    jitted program: one compile instead of one per setting."""
    state = model_only_state(apply_fn, frozen)

    def one(p, chunk):
        options = step.StepOptions(loss_chunk=chunk)
        fn = lambda p: step.loss_fn(p, state, batch, jax.random.PRNGKey(0), options)
        (loss_sum, parts), grads = jax.value_and_grad(fn, has_aux=True)(p)
        return loss_sum, parts.tokens, grads

    return jax.jit(lambda p: [one(p, chunk) for chunk in chunks])(params)


def _assert_same(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    assert float(a[1]) == float(b[1])
    for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2]), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("tied", [pytest.param(False, marks=pytest.mark.slow), True])
def test_chunked_loss_and_grads_equal_unchunked(tied):
    """Chunks of 8 and of 7 positions (the last piece padded) over T = 20, with an untied LM
    head and with the tied embedding (whose gradient then sums lookup and head parts)."""
    config = tiny_model_config(tie_embeddings=tied)
    model = Transformer(config)
    batch = _packed_batch()
    params = jax.jit(model.init)(jax.random.PRNGKey(1), *[batch[k] for k in PACKED_KEYS[:1]],
                        batch["positions"], batch["segment_ids"])["params"]  # fmt: skip
    want, *chunked = _loss_and_grads(params, model.apply, batch, (0, 8, 7, 64))
    for got in chunked:
        _assert_same(got, want)


def test_chunked_loss_with_lora():
    """LoRA adapters on every projection (the head reads the frozen base): adapter gradients
    match too."""
    rules = tuple(tuple(r) for r in base.get_config().mesh.rules)
    values = base.get_config().lora.to_dict()
    values.update(enabled=True, rank=4, alpha=8.0, base_dtype="float32")
    values["targets"] = ("*_proj",)
    cfg = LoraSection(**values)
    mesh = make_mesh(MeshSection(1, 1, 1, rules=rules), jax.devices()[:1])
    tx = make_optimizer(base_optim(), 10, cfg)
    state, _ = create_train_state(StateSpec(tiny_model_config(), mesh, rules, tx, lora=cfg))
    # B starts at zero; move it so the adapters actually change the logits.
    params = jax.tree.map(lambda x: x + 0.05, state.params)
    batch = _packed_batch()
    want, got = _loss_and_grads(params, state.apply_fn, batch, (0, 8), state.frozen)
    _assert_same(got, want)


def test_chunked_never_builds_full_logits():
    """The compiled chunked loss holds no [B, T, V] array (only [B, chunk, V] pieces)."""
    config = tiny_model_config(vocab_size=512)
    model = Transformer(config)
    batch = _packed_batch(rows=2, length=64, vocab=512)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), batch["inputs"], batch["positions"],
                        batch["segment_ids"])["params"]  # fmt: skip
    state = model_only_state(model.apply)
    grad = lambda c: jax.jit(jax.grad(lambda p: step.loss_fn(
        p, state, batch, jax.random.PRNGKey(0), step.StepOptions(loss_chunk=c))[0]))  # fmt: skip
    full = grad(0).lower(params).compile().as_text()
    chunked = grad(16).lower(params).compile().as_text()
    assert "f32[2,64,512]" in full
    assert "f32[2,64,512]" not in chunked and "f32[2,16,512]" in chunked


def test_automatic_loss_chunk_keeps_small_logits_whole_and_cuts_large_ones():
    from sft_jax.training.loss import (
        AUTO_CHUNK,
        MIN_AUTO_CHUNK,
        PIECE_BYTES,
        WHOLE_LOGITS_LIMIT,
        resolve_loss_chunk,
    )

    resolve = lambda setting, rows, t, v, kl=False: resolve_loss_chunk(
        setting, rows=rows, seq_len=t, vocab_size=v, kl_to_base=kl
    )
    assert resolve(0, 64, 131072, 262144) == 0  # explicit settings are used as given
    assert resolve(96, 1, 512, 512) == 96
    assert resolve(AUTO_CHUNK, 8, 512, 8192) == 0  # 128 MiB of logits: whole
    limit_t = WHOLE_LOGITS_LIMIT // (4 * 8192)  # exactly at the limit: still whole
    assert resolve(AUTO_CHUNK, 1, limit_t, 8192) == 0
    chunk = resolve(AUTO_CHUNK, 1, 2 * limit_t, 8192)
    assert chunk == PIECE_BYTES // (4 * 8192)  # a power of two that fills one piece
    for rows, t, v in [(1, 32768, 128256), (4, 8192, 151936), (2, 4096, 262144), (3, 65536, 50000)]:
        chunk = resolve(AUTO_CHUNK, rows, t, v)
        assert chunk > 0 and chunk & (chunk - 1) == 0 and chunk <= t
        assert rows * chunk * v * 4 <= PIECE_BYTES or chunk == MIN_AUTO_CHUNK
    assert resolve(AUTO_CHUNK, 64, 200, 262144) == MIN_AUTO_CHUNK  # the floor: a short scan
    assert resolve(AUTO_CHUNK, 640, 100, 262144) == 100  # a piece never exceeds the sequence
    assert resolve(AUTO_CHUNK, 1, 32768, 128256, kl=True) == 0  # the KL reads whole logits


@pytest.mark.parametrize("shards,chunk", [(2, 4), (4, 3), (4, 16)])
def test_chunked_loss_inside_context_parts_equals_the_plain_loss(shards, chunk):
    """Pieces cut inside each of `shards` parts of the sequence (context parallelism), the last
    piece of every part padded where `chunk` does not divide it: same sum, count and gradients
    as the whole logits."""
    from sft_jax.training.loss import chunked_cross_entropy

    rng = np.random.default_rng(3)
    b, t, d, v = 2, 24, 8, 32
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) < 0.7)

    def plain(hidden, head):
        return masked_cross_entropy(hidden @ head, targets, mask)

    def chunked(hidden, head):
        return chunked_cross_entropy(lambda h: h @ head, hidden, targets, mask, chunk, shards)

    grad = lambda f: jax.grad(lambda h, w: f(h, w)[0], (0, 1))(hidden, head)
    # Both losses and both gradients from one jitted program: one compile, not op by op.
    both = jax.jit(lambda: (plain(hidden, head), chunked(hidden, head), grad(plain), grad(chunked)))
    (want, want_count), (got, got_count), want_grads, got_grads = both()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(got_count) == float(want_count)
    for a, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, w, atol=1e-5)
