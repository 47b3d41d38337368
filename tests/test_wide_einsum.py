"""The widening einsum (sft_jax/model/wide_einsum.py): the forward of the plain einsum, a backward
whose matmuls take operands in the inputs' dtype, and gradients within that dtype's rounding."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.model import decoder as model_module
from sft_jax.model import sublayers
from sft_jax.model.decoder import Transformer
from sft_jax.model.wide_einsum import wide_einsum
from tests.helpers import tiny_model_config


def head_inputs(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 16)), dtype)
    w = jnp.asarray(rng.normal(size=(40, 16)) * 0.2, dtype)
    targets = jnp.asarray(rng.integers(0, 40, size=(2, 6)))
    return x, w, targets


def cross_entropy(einsum):
    def loss(x, w, targets):
        logits = einsum("BTD,VD->BTV", x, w)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    return jax.grad(loss, (0, 1))


def dot_operand_dtypes(jaxpr, size: int | None = None) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot_general in a jaxpr, its sub-jaxprs included (only those
    with an operand dim of `size`, if given)."""
    found = []
    for eqn in jaxpr.eqns:
        shapes = [v.aval.shape for v in eqn.invars]
        if eqn.primitive.name == "dot_general" and (size is None or any(size in s for s in shapes)):
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += dot_operand_dtypes(sub, size)
    return found


def test_forward_is_the_plain_widening_einsum():
    x, w, _ = head_inputs(jnp.bfloat16)
    plain = jnp.einsum("BTD,VD->BTV", x, w, preferred_element_type=jnp.float32)
    wide = wide_einsum("BTD,VD->BTV", x, w, jnp.float32)
    assert wide.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(wide), np.asarray(plain))


def test_float32_inputs_take_the_plain_einsum_and_its_exact_gradients():
    x, w, targets = head_inputs(jnp.float32)
    wide = cross_entropy(lambda eq, a, b: wide_einsum(eq, a, b, jnp.float32))(x, w, targets)
    plain = cross_entropy(
        lambda eq, a, b: jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)
    )(x, w, targets)
    for got, want in zip(wide, plain, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bfloat16_backward_matmuls_are_bfloat16_and_close_to_float32():
    x, w, targets = head_inputs(jnp.bfloat16)
    grad = cross_entropy(lambda eq, a, b: wide_einsum(eq, a, b, jnp.float32))
    plain = cross_entropy(lambda eq, a, b: jnp.einsum(eq, a, b, preferred_element_type="float32"))
    # The plain einsum's backward multiplies the float32 cotangent with a bfloat16 operand,
    # which XLA widens: a float32 matmul.
    plain_dtypes = dot_operand_dtypes(jax.make_jaxpr(plain)(x, w, targets).jaxpr)
    assert ("float32", "bfloat16") in plain_dtypes
    dtypes = dot_operand_dtypes(jax.make_jaxpr(grad)(x, w, targets).jaxpr)
    assert dtypes and all(pair == ("bfloat16", "bfloat16") for pair in dtypes), dtypes
    exact = cross_entropy(lambda eq, a, b: jnp.einsum(eq, a, b))(
        x.astype(jnp.float32), w.astype(jnp.float32), targets
    )
    for got, want in zip(grad(x, w, targets), exact, strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want)
        # bfloat16 rounding of the cotangent and of the result (8 bits of mantissa)
        assert np.max(np.abs(got - want)) <= 2**-7 * np.max(np.abs(want))


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_a_bfloat16_models_lm_head_gradient_multiplies_bfloat16(monkeypatch, tie_embeddings):
    """As on an accelerator (the CPU projection path off): the LM head's backward multiplies
    bfloat16 operands like every other projection's."""
    monkeypatch.setattr(model_module, "cpu_grad", lambda c, in_layers=True: False)
    monkeypatch.setattr(sublayers, "cpu_grad", lambda c, in_layers=True: False)
    vocab = 96  # no other dim of the tiny model has this size
    config = tiny_model_config(dtype="bfloat16", tie_embeddings=tie_embeddings, vocab_size=vocab)
    model = Transformer(config)
    tokens = jnp.ones((2, 8), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    segments = jnp.ones((2, 8), jnp.int32)
    params = model.init(jax.random.key(0), tokens, positions, segments)["params"]

    def loss(params):
        logits = model.apply({"params": params}, tokens, positions, segments)
        assert logits.dtype == jnp.float32
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

    dtypes = dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, size=vocab)
    assert len(dtypes) >= 3 and all(pair == ("bfloat16", "bfloat16") for pair in dtypes), dtypes
