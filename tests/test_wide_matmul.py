"""The output-major weight gradient (sft_jax/wide_matmul.py) changes no value and no gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import model as model_module
from sft_jax.model import Transformer
from sft_jax.wide_matmul import wide_matmul, widens
from tests.helpers import tiny_model_config


def test_widens_only_two_dimensional_growing_kernels():
    assert widens((32, 64)) and not widens((64, 32)) and not widens((32, 32))
    assert not widens((32, 4, 16))  # q_proj-style [D, N, H]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_wide_matmul_equals_the_plain_einsum_with_its_gradients(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), dtype)
    w = jnp.asarray(rng.normal(size=(8, 24)), dtype)
    cotangent = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32)

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1)))

    plain = loss(lambda x, w: jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32))
    value, grads = loss(lambda x, w: wide_matmul(x, w, jnp.float32))(x, w)
    want_value, want_grads = plain(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(value, want_value, rtol=tol)
    for got, want, arg in zip(grads, want_grads, (x, w), strict=True):
        assert got.dtype == arg.dtype and got.shape == arg.shape
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32),
                                   atol=tol * scale)  # fmt: skip


def test_model_gradients_are_the_same_with_and_without_it(monkeypatch):
    """Untied LM head and gate/up widen at these shapes: the train-path gradients must not move."""
    config = tiny_model_config(num_layers=1)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 8)), jnp.int32)
    positions = jnp.tile(jnp.arange(8), (2, 1))
    segments = jnp.ones((2, 8), jnp.int32)
    params = Transformer(config).init(jax.random.key(0), tokens, positions, segments)["params"]

    def loss(p):
        logits = Transformer(config).apply({"params": p}, tokens, positions, segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    def grads():  # a fresh trace each call, so the monkeypatch below takes effect
        return jax.jit(jax.grad(lambda p: loss(p)))(params)

    wide = grads()
    # The CPU without remat really takes the wide path (the LM head and gate/up widen here).
    assert "custom_vjp_call" in str(jax.make_jaxpr(jax.grad(loss))(params))
    monkeypatch.setattr(model_module, "_wide_grad", lambda c: False)
    plain = grads()
    for a, b in zip(jax.tree.leaves(wide), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6 * max(1.0, float(np.abs(b).max())))
