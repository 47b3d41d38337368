"""LoRA inside the model and the train step: unchanged at init, merged equals unmerged, only the
adapters train, no weight gradient for the frozen base, LoRA+ and dropout behave as configured."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sft_jax import lora
from sft_jax.config import LoraSection, MeshSection, OptimSection
from sft_jax.model.decoder import Transformer, lora_equations
from sft_jax.training.optim import make_optimizer
from sft_jax.training.sharding import make_mesh
from sft_jax.training.state import StateSpec, create_train_state, lora_model_config
from sft_jax.training.step import StepOptions, loss_fn, make_train_step, model_variables
from tests.helpers import model_only_state, tiny_model_config

RULES = tuple(tuple(r) for r in base.get_config().mesh.rules)
MODEL = tiny_model_config(attention_bias=True)
TOL = 1e-4


def lora_cfg(**kw) -> LoraSection:
    values = base.get_config().lora.to_dict()
    values.update(enabled=True, rank=4, alpha=8.0, base_dtype="float32", **kw)
    values["targets"] = tuple(values["targets"])
    return LoraSection(**values)


def optim_cfg(**kw) -> OptimSection:
    values = base.get_config().optim.to_dict()
    values.update(learning_rate=1e-2, warmup_steps=0, clip_norm=0.0, **kw)
    return OptimSection(**values)


def build(cfg: LoraSection, devices=None, **optim_kw):
    mesh = make_mesh(MeshSection(-1, 1, 1, rules=RULES), devices or jax.devices()[:1])
    tx = make_optimizer(optim_cfg(**optim_kw), 10, cfg)
    return create_train_state(StateSpec(MODEL, mesh, RULES, tx, lora=cfg))


def batch(rows=4, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 64, (rows, length)).astype(np.int32)
    return {
        "inputs": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": np.ones((rows, length), bool),
        "segment_ids": np.ones((rows, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
    }


def logits(apply_fn, variables, b):
    return jax.jit(apply_fn)(variables, b["inputs"], b["positions"], b["segment_ids"])


@pytest.fixture(scope="module")
def built():
    """One LoRA train state (and shardings) shared by the tests that only read it."""
    return build(lora_cfg())


def randomised(tree, seed=1, scale=0.1):
    """`tree` plus numpy noise (jax's would compile a program for each leaf shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32), tree
    )


def test_lora_equations():
    assert lora_equations("BTD,DNH->BTNH") == ("BTD,DR->BTR", "BTR,RNH->BTNH")
    assert lora_equations("BTNH,NHD->BTD") == ("BTNH,NHR->BTR", "BTR,RD->BTD")


@pytest.mark.parametrize("variant", ["lora", "dora_nf4"])
def test_unchanged_at_init_and_merged_equals_unmerged(variant, built):
    """At init the adapted model equals its base; merging gives the unmerged logits. The second
    variant is DoRA over an NF4-quantised base (QLoRA), whose base is the dequantised tree."""
    dora = variant == "dora_nf4"
    state, _ = build(lora_cfg(dora=True, base_quant="nf4")) if dora else built
    base_params = jax.jit(lora.dequantize)(state.frozen)  # one program, not op by op
    if dora:
        assert isinstance(state.frozen["layers"]["attn"]["q_proj"]["kernel"], lora.Quantized)
    b = batch()
    plain = Transformer(MODEL).apply
    base_logits = logits(plain, {"params": base_params}, b)
    at_init = logits(state.apply_fn, model_variables(state.params, state.frozen), b)
    if dora:  # m / ||W|| is 1 up to float rounding: the two norms reduce in different orders
        np.testing.assert_allclose(at_init, base_logits, atol=1e-5, rtol=1e-5)
    else:  # B = 0 adds exact zeros
        np.testing.assert_array_equal(at_init, base_logits)
    adapters = randomised(state.params)
    unmerged = logits(state.apply_fn, model_variables(adapters, state.frozen), b)
    scale = lora.lora_scale(8.0, 4, False)
    merged = jax.jit(lora.merge, static_argnums=2)(base_params, adapters, scale)
    merged = logits(plain, {"params": merged}, b)
    np.testing.assert_allclose(merged, unmerged, atol=TOL, rtol=TOL)
    assert np.max(np.abs(unmerged - base_logits)) > 1e-3  # the adapters do act


def test_only_adapters_change_and_checkpointable_state():
    state, shardings = build(lora_cfg(), weight_decay=0.1)  # donated by the step: its own
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    adapters_before = jax.tree.map(np.asarray, state.params)
    mesh = make_mesh(MeshSection(-1, 1, 1, rules=RULES), jax.devices()[:1])
    from sft_jax.training.sharding import batch_sharding

    step = make_train_step(
        shardings, batch_sharding(mesh, RULES), options=StepOptions(), schedule=lambda s: 1e-2
    )
    for i in range(2):
        state, metrics = step(state, batch(seed=i), np.float32(1.0))
    assert np.isfinite(float(metrics["loss"]))
    for before, after in zip(
        jax.tree.leaves(frozen_before), jax.tree.leaves(state.frozen), strict=True
    ):
        np.testing.assert_array_equal(before, after)  # bitwise unchanged
    changed = jax.tree.map(
        lambda x, y: bool(np.any(x != np.asarray(y))), adapters_before, state.params
    )
    assert all(jax.tree.leaves(changed)), changed
    # Optimizer state exists only for the adapters.
    assert lora.count(state.params) * 2 == sum(
        x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0
    )


def _dot_result_shapes(fn, *args) -> set[tuple[int, ...]]:
    """Sorted result shapes of every dot_general in the lowered program of fn."""
    text = jax.jit(fn).lower(*args).as_text()
    shapes = re.findall(r"stablehlo\.dot_general.*-> tensor<([0-9x]+)x[a-z0-9]+>", text)
    return {tuple(sorted(int(d) for d in s.split("x"))) for s in shapes}


def flat_kernel_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The weight gradient's result shape: on the CPU (no remat) every projection takes it
    as one [in, out] matmul (sft_jax/model/cpu_linear.py); o_proj [N, H, D] has two input dims."""
    n_in = 2 if name == "o_proj" else 1
    return (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))


def test_no_weight_gradient_for_frozen_base(built):
    """The LoRA gradient contains no matmul producing a base-kernel-shaped result (a weight
    gradient), while the full fine-tuning gradient has one per kernel."""
    state, _ = built
    # 3 x 16 = 48 positions: no [positions, dim] activation can be mistaken for a kernel shape.
    b = {k: jnp.asarray(v) for k, v in batch(rows=3).items()}
    full = Transformer(MODEL).apply
    rng = jax.random.PRNGKey(0)
    full_grad = jax.grad(lambda p: loss_fn(p, model_only_state(full), b, rng, StepOptions())[0])
    lora_loss = lambda a, f: loss_fn(a, model_only_state(state.apply_fn, f), b, rng, StepOptions())
    lora_grad = jax.grad(lambda a, f: lora_loss(a, f)[0])
    kernels = {  # each kernel's shape, as its flattened 2-D [in, out] on the CPU's path
        tuple(
            sorted(
                flat_kernel_shape(path[-2].key, x.shape[1:] if path[0].key == "layers" else x.shape)
            )
        )
        for path, x in jax.tree_util.tree_flatten_with_path(state.frozen)[0]
        if path[-1].key == "kernel"
    }
    assert kernels <= _dot_result_shapes(full_grad, state.frozen)  # the check can see them
    assert not kernels & _dot_result_shapes(lora_grad, state.params, state.frozen)


def test_lora_plus_b_learning_rate(built):
    """With lr_ratio_b = r, B's first update is exactly r times what it is with ratio 1."""
    cfg1, cfg4 = lora_cfg(), lora_cfg(lr_ratio_b=4.0)
    adapters = randomised(built[0].params)
    grads = randomised(jax.tree.map(np.zeros_like, adapters), seed=3)
    updates = {}
    for name, cfg in (("1", cfg1), ("4", cfg4)):
        tx = make_optimizer(optim_cfg(weight_decay=0.1), 10, cfg)
        update = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0])  # not op by op
        updates[name] = update(grads, adapters)
    flat1 = jax.tree_util.tree_flatten_with_path(updates["1"])[0]
    flat4 = jax.tree.leaves(updates["4"])
    for (path, u1), u4 in zip(flat1, flat4, strict=True):
        factor = 4.0 if path[-1].key == "b" else 1.0
        np.testing.assert_allclose(u4, factor * u1, rtol=1e-6, atol=1e-8)


def test_dropout_only_with_rng(built):
    state, _ = built
    apply_fn = Transformer(lora_model_config(MODEL, lora_cfg(dropout=0.5))).apply
    state = state.replace(apply_fn=apply_fn)
    adapters = randomised(state.params)
    b = batch()
    variables = model_variables(adapters, state.frozen)
    eval_a = logits(state.apply_fn, variables, b)
    eval_b = logits(state.apply_fn, variables, b)
    np.testing.assert_array_equal(eval_a, eval_b)
    rngs = {"dropout": jax.random.key(0)}
    args = (b["inputs"], b["positions"], b["segment_ids"])
    train = jax.jit(apply_fn)(variables, *args, rngs=rngs)
    assert np.max(np.abs(train - eval_a)) > 1e-4
    no_dropout = Transformer(lora_model_config(MODEL, lora_cfg())).apply
    same = jax.jit(no_dropout)(variables, *args, rngs=rngs)
    np.testing.assert_allclose(same, eval_a, atol=1e-6)
