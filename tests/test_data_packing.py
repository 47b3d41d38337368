"""Packed rows compute what the examples compute alone: loss and gradients agree to 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.data import TokenizedExample, pack_examples, packing_stats
from sft_jax.loss import masked_cross_entropy
from sft_jax.model import Transformer
from tests.helpers import tiny_model_config

MODEL = tiny_model_config()


def examples(n=7, seed=0) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        length = int(rng.integers(4, 20))
        mask = rng.random(length) < 0.6
        mask[-1] = True
        out.append(TokenizedExample(rng.integers(1, 64, length).astype(np.int32), mask, f"e:{k}"))
    return out


def alone(ex: TokenizedExample, seq_len: int) -> dict[str, np.ndarray]:
    """One example in its own row (segment 1, positions from 0, right padding)."""
    n = len(ex.tokens) - 1
    row = {
        k: np.zeros((1, seq_len), np.int32)
        for k in ("inputs", "targets", "segment_ids", "positions")
    }
    row["loss_mask"] = np.zeros((1, seq_len), bool)
    row["inputs"][0, :n], row["targets"][0, :n] = ex.tokens[:-1], ex.tokens[1:]
    row["loss_mask"][0, :n], row["segment_ids"][0, :n] = ex.loss_mask[1:], 1
    row["positions"][0, :n] = np.arange(n)
    return row


def loss_sum(params, batch):
    logits = Transformer(MODEL).apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]


def test_packed_loss_and_grads_equal_unpacked():
    seq_len = 32
    exs = examples()
    packed = pack_examples(exs, seq_len=seq_len, window=16, seed=0)
    assert packed["inputs"].shape[0] < len(exs)  # really packed: several examples per row
    assert (packed["segment_ids"].max(axis=1) >= 2).any()
    stats = packing_stats(packed)
    assert stats["loss_tokens"] == sum(int(e.loss_mask[1:].sum()) for e in exs)
    tokens = jnp.asarray(packed["inputs"])
    params = jax.jit(Transformer(MODEL).init)(jax.random.key(0), tokens, tokens, tokens)["params"]
    grad_fn = jax.jit(jax.value_and_grad(loss_sum))  # one compile: both batches are [7, 32]
    pad = len(exs) - len(tokens)
    padded = {k: np.concatenate([v, np.zeros((pad, seq_len), v.dtype)]) for k, v in packed.items()}
    packed_loss, packed_grads = grad_fn(params, padded)
    # Every example in a row of its own; rows never interact, so one batch of them is the sum of
    # the examples computed one by one.
    rows = [alone(ex, seq_len) for ex in exs]
    unpacked = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    total, grads = grad_fn(params, unpacked)
    np.testing.assert_allclose(packed_loss, total, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
