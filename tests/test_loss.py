"""Masked cross-entropy against a hand-computed example."""

import math

import jax.numpy as jnp
import numpy as np

from sft_jax.loss import masked_cross_entropy


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
