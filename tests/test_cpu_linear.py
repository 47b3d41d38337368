"""The CPU projection (sft_jax/model/cpu_linear.py) changes no value and no gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sft_jax.config import LoraSection, MeshSection, OptimSection
from sft_jax.model import decoder as model_module
from sft_jax.model import layers, sublayers
from sft_jax.model.cpu_linear import cpu_linear, input_rank
from sft_jax.model.decoder import Transformer
from sft_jax.training.optim import make_optimizer
from sft_jax.training.sharding import make_mesh
from sft_jax.training.state import StateSpec, create_train_state
from sft_jax.training.step import model_variables
from tests.helpers import tiny_model_config


def test_input_rank_finds_the_model_projections_only():
    assert input_rank("BTD,DNH->BTNH") == 1  # q/k/v
    assert input_rank("BTNH,NHD->BTD") == 2  # o_proj
    assert input_rank("BTD,DF->BTF") == input_rank("BTD,DV->BTV") == 1  # mlp, LM head
    assert input_rank("BTD,VD->BTV") is None  # kernel stored [out, in]
    assert input_rank("BKQH,BKSH->BKQS") is None  # attention scores: not a projection
    assert input_rank("BTD,DNH->BTHN") is None  # output dims reordered


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_linear_equals_the_plain_einsum_with_its_gradients(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), dtype)  # o_proj-like: two input dims
    w = jnp.asarray(rng.normal(size=(3, 4, 24)), dtype)
    cotangent = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32)

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1)))

    plain = loss(lambda x, w: jnp.einsum("btnh,nhd->btd", x, w, preferred_element_type=jnp.float32))
    value, grads = loss(lambda x, w: cpu_linear(x, w, 2, jnp.float32))(x, w)
    want_value, want_grads = plain(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(value, want_value, rtol=tol)
    for got, want, arg in zip(grads, want_grads, (x, w), strict=True):
        assert got.dtype == arg.dtype and got.shape == arg.shape
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32),
                                   atol=tol * scale)  # fmt: skip


CONFIG = tiny_model_config(num_layers=1, scan_layers=False)  # unrolled: one trace per layer
_rng = np.random.default_rng(1)
TOKENS = jnp.asarray(_rng.integers(0, CONFIG.vocab_size, size=(2, 8)), jnp.int32)
POSITIONS = jnp.tile(jnp.arange(8), (2, 1))
SEGMENTS = jnp.ones((2, 8), jnp.int32)


def matrix_shapes(tree, names):
    """The per-layer shapes of the leaves of `tree` whose key is in `names` (the stacked layers'
    leading layer axis dropped)."""
    shapes = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        keys = keys[:-1] if keys[-1] == "value" else keys  # an nn.Partitioned box
        if keys[-1] in names:
            shapes.add(leaf.shape[1:] if "layers" in keys else leaf.shape)
    return shapes


def assert_same_grads_with_path_off(monkeypatch, loss, params, shapes):
    """`shapes`: the weight shapes whose matmuls must take the path (a Flax module body may be
    traced more than once, so shapes are compared as a set)."""

    def grads():  # a fresh trace each call, so the monkeypatches below take effect
        return jax.jit(jax.grad(lambda p: loss(p)))(params)

    wide = grads()
    traced = []

    def counted(*args, **kwargs):
        traced.append(args[1].shape)
        return cpu_linear(*args, **kwargs)

    monkeypatch.setattr(layers, "cpu_linear", counted)
    jax.make_jaxpr(loss)(params)
    assert set(traced) == shapes, traced  # the CPU without remat really takes the path
    for module in (model_module, sublayers):  # the decoder and its sub-layers each ask
        monkeypatch.setattr(module, "cpu_grad", lambda c, in_layers=True: False)
    traced.clear()
    plain = grads()
    assert not traced
    for a, b in zip(jax.tree.leaves(wide), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6 * max(1.0, float(np.abs(b).max())))


def model_loss(config):
    def loss(p):
        logits = Transformer(config).apply({"params": p}, TOKENS, POSITIONS, SEGMENTS)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    return loss


# Full remat saves nothing inside a layer, so the custom VJP's opacity to remat policies costs
# nothing there: the scanned, fully rematerialised layers take the path too.
@pytest.mark.parametrize(
    "config", [CONFIG, dataclasses.replace(CONFIG, remat="full", scan_layers=True)],
    ids=["unrolled", "scan_remat_full"],
)  # fmt: skip
def test_model_gradients_are_the_same_with_and_without_it(monkeypatch, config):
    """Every projection and the untied LM head take the path: the gradients must not move."""
    init = jax.jit(Transformer(config).init)  # one program, not op by op
    params = init(jax.random.key(0), TOKENS, POSITIONS, SEGMENTS)["params"]
    shapes = matrix_shapes(params, {"kernel"})  # q, k, v, o, gate, up, down; LM head
    assert len(shapes) >= 5
    assert_same_grads_with_path_off(monkeypatch, model_loss(config), params, shapes)


def test_remat_policies_that_save_projections_keep_the_plain_einsum(monkeypatch):
    """Under dots / dots_saveable a custom VJP would hide the projection from the policy (it
    would be recomputed, not saved): no layer projection may take the path; the LM head, outside
    the rematerialised layers, still does."""
    traced = []

    def counted(*args, **kwargs):
        traced.append(args[1].shape)
        return cpu_linear(*args, **kwargs)

    monkeypatch.setattr(layers, "cpu_linear", counted)
    for remat in ("dots", "dots_saveable"):
        config = dataclasses.replace(CONFIG, remat=remat, scan_layers=True)
        # Shapes are enough to trace (no compile).
        params = jax.eval_shape(Transformer(config).init, jax.random.key(0), TOKENS, POSITIONS,
                                SEGMENTS)  # fmt: skip
        traced.clear()
        jax.make_jaxpr(jax.grad(model_loss(config)))(params["params"])
        assert set(traced) == {(CONFIG.hidden_size, CONFIG.vocab_size)}, (remat, traced)


def test_lora_adapter_gradients_are_the_same_with_and_without_it(monkeypatch):
    """Under LoRA the frozen base's projections still take the path (their input gradient
    reaches the adapters of the layers below): the adapters' gradients must not move either."""
    values = base.get_config().lora.to_dict()
    values.update(enabled=True, rank=4, alpha=8.0, base_dtype="float32")
    lora_cfg = LoraSection(**{**values, "targets": tuple(values["targets"])})
    rules = tuple(tuple(r) for r in base.get_config().mesh.rules)
    mesh = make_mesh(MeshSection(-1, 1, 1, rules=rules), jax.devices()[:1])
    optim = OptimSection(**base.get_config().optim.to_dict())
    tx = make_optimizer(optim, 10, lora_cfg)
    state, _ = create_train_state(StateSpec(CONFIG, mesh, rules, tx, lora=lora_cfg))
    rng = np.random.default_rng(2)  # B = 0 at init: give it values (numpy: no compile per shape)
    adapters = jax.tree.map(
        lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32), state.params
    )

    def loss(p):
        variables = model_variables(p, state.frozen)
        logits = state.apply_fn(variables, TOKENS, POSITIONS, SEGMENTS)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    # The frozen base's projections, and each adapter's two low-rank matmuls x @ a, (x a) @ b.
    shapes = matrix_shapes(state.frozen, {"kernel"}) | matrix_shapes(adapters, {"a", "b"})
    assert len(matrix_shapes(adapters, {"a", "b"})) >= 6
    assert_same_grads_with_path_off(monkeypatch, loss, adapters, shapes)
