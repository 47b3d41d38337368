"""QLoRA storage and forward: the quantised base is sharded like the bf16 base (8 fake devices),
the model dequantises one scanned layer at a time (same loss as the dequantised tree), and the
compiled step's temporary memory holds about one layer of dequantised weights, not the base."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_lora_model import RULES, batch, lora_cfg, optim_cfg

from sft_jax import lora
from sft_jax.config import MeshSection
from sft_jax.model.decoder import Transformer
from sft_jax.training.optim import make_optimizer
from sft_jax.training.sharding import make_mesh
from sft_jax.training.state import (
    StateSpec,
    create_train_state,
    lora_model_config,
    state_layout,
)
from tests.helpers import tiny_model_config

# Last dims of 256 / 512 give 4 / 8 blocks of 64, divisible by fsdp=4 and tensor=2.
MODEL = tiny_model_config(hidden_size=256, intermediate_size=512, vocab_size=128)


def state_spec(quant: str, mesh_shape=(1, 4, 2), model=MODEL) -> StateSpec:
    mesh = make_mesh(MeshSection(*mesh_shape, rules=RULES), jax.devices()[: np.prod(mesh_shape)])
    cfg = lora_cfg(base_quant=quant)
    cfg = dataclasses.replace(cfg, base_dtype="bfloat16")
    tx = make_optimizer(optim_cfg(), 10, cfg)
    return StateSpec(model, mesh, RULES, tx, lora=cfg)


def build(quant: str, mesh_shape=(1, 4, 2)):
    return create_train_state(state_spec(quant, mesh_shape))


def kernels(frozen):
    flat = jax.tree_util.tree_flatten_with_path(frozen, is_leaf=lambda x: hasattr(x, "codes"))[0]
    return {
        jax.tree_util.keystr(p): leaf
        for p, leaf in flat
        if "kernel" in str(p) and "layers" in str(p)
    }


def per_layer_loss(state, b):
    """The forward with the quantised kernels passed as they are stored (dequantised per layer
    inside Einsum), or, with `whole=True`, the whole tree dequantised first."""

    def loss(adapters, frozen, whole):
        params = lora.dequantize(frozen) if whole else frozen
        variables = {"params": params, "lora": adapters}
        logits = state.apply_fn(variables, b["inputs"], b["positions"], b["segment_ids"])
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        return jnp.mean(nll)

    return loss


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantised_base_sharded_like_bf16_base(quant):
    """Codes and scales keep each kernel's mesh axes (the last axis's on the block axis): each
    of 8 devices holds a fraction, as for the bf16 base, instead of a replicated copy."""
    plain = state_layout(state_spec("none"))  # the bf16 base's placement, nothing allocated
    state, shardings = build(quant)
    for name, q in kernels(state.frozen).items():
        spec = tuple(kernels(plain.frozen)[name].sharding.spec)
        spec = spec + (None,) * (4 - len(spec))
        assert isinstance(q, lora.Quantized), name
        ndim = len(q.shape)
        assert tuple(q.scales.sharding.spec) == spec[:ndim], name
        assert tuple(q.codes.sharding.spec)[:ndim] == spec[:ndim], name
        shard = q.codes.addressable_shards[0].data
        assert shard.size * 8 == q.codes.size, (name, shard.shape, q.codes.shape)
    # The state's own sharding tree says the same (it is what the jitted step is given).
    q_spec = kernels(shardings.frozen)["['layers']['attn']['q_proj']['kernel']"].codes.spec
    assert tuple(q_spec)[:3] == (None, ("fsdp", "context"), "tensor")


def test_per_layer_dequantisation_equals_whole_tree():
    """Loss and adapter gradients are the same whether the model dequantises each layer's
    kernels itself or is given the dequantised tree (what step.py does today)."""
    state, _ = build("nf4")
    # B != 0: A gets gradients too (jitted: one program, not one per leaf shape).
    adapters = jax.jit(lambda t: jax.tree.map(lambda x: x + 0.01, t))(state.params)
    b = batch(rows=8, length=16)
    loss = per_layer_loss(state, b)
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    (l1, g1), (l2, g2) = grad(adapters, state.frozen, False), grad(adapters, state.frozen, True)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-3, atol=1e-6)


def test_peak_memory_one_layer_of_dequantised_weights():
    """Temporary bytes of the compiled loss+grad (one device, 8 layers): dequantising the whole
    bf16 base up front costs more than the whole base; per layer saves at least 3/4 of it."""
    model = tiny_model_config(
        hidden_size=256, intermediate_size=1024, num_layers=8, vocab_size=128, dtype="bfloat16"
    )
    spec = state_spec("nf4", (1, 1, 1), model)
    state = state_layout(spec)  # compiled, never run: shapes and shardings are enough
    b = batch(rows=1, length=16)
    apply = Transformer(lora_model_config(model, spec.lora)).apply
    kernel_bytes = sum(
        int(np.prod(q.shape)) * 2 for q in kernels(state.frozen).values()
    )  # the bf16 layer kernels

    def temp_bytes(whole: bool) -> int:
        def loss(adapters, frozen):
            params = lora.dequantize(frozen) if whole else frozen
            out = apply(
                {"params": params, "lora": adapters},
                *(b[k] for k in ("inputs", "positions", "segment_ids")),
            )
            return jnp.mean(out)

        compiled = jax.jit(jax.grad(loss)).lower(state.params, state.frozen).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, per_layer = temp_bytes(True), temp_bytes(False)
    # Measured (jax 0.10 CPU): whole 34.1 MB, per layer 8.1 MB for 13.0 MB of bf16 kernels. The
    # per-layer figure is one layer's dequantised temporaries plus the NF4 codes the scan keeps
    # for the backward pass (a quarter of the bf16 size), not a bf16 copy of the base.
    assert whole > 0.9 * kernel_bytes, (whole, kernel_bytes)
    assert whole - per_layer > 0.75 * kernel_bytes, (whole, per_layer, kernel_bytes)
    assert per_layer < 0.5 * whole, (whole, per_layer)
