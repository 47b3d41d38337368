"""NEFTune noise and the KL-to-base penalty as pure functions."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from sft_jax.model.regularize import kl_to_base, neftune_noise, segment_lengths


def test_segment_lengths_per_packed_segment():
    ids = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    got = np.asarray(segment_lengths(ids))
    np.testing.assert_array_equal(got, [[3, 3, 3, 2, 2, 1], [6, 6, 6, 6, 6, 6]])


def test_neftune_noise_bound_scale_and_padding():
    rng = jax.random.key(0)
    ids = jnp.array([[1] * 4 + [2] * 12 + [0] * 4], jnp.int32)  # segments of 4 and 12, padding
    x = jnp.zeros((1, 20, 64), jnp.float32)
    alpha = 5.0
    noisy = np.asarray(neftune_noise(x, ids, alpha, rng))
    bound_a, bound_b = alpha / np.sqrt(4 * 64), alpha / np.sqrt(12 * 64)
    first, second, pad = noisy[0, :4], noisy[0, 4:16], noisy[0, 16:]
    assert np.abs(first).max() <= bound_a and np.abs(first).max() > 0.9 * bound_a
    assert np.abs(second).max() <= bound_b and np.abs(second).max() > 0.9 * bound_b
    np.testing.assert_array_equal(pad, 0.0)
    # Uniform(-1, 1) * s has standard deviation s / sqrt(3).
    np.testing.assert_allclose(second.std(), bound_b / np.sqrt(3), rtol=0.1)


def test_neftune_noise_keeps_dtype_and_depends_on_rng():
    ids = jnp.ones((2, 8), jnp.int32)
    x = jnp.ones((2, 8, 16), jnp.bfloat16)
    a = neftune_noise(x, ids, 5.0, jax.random.key(0))
    b = neftune_noise(x, ids, 5.0, jax.random.key(1))
    assert a.dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_kl_to_base_matches_direct_formula_and_is_zero_at_base():
    key1, key2 = jax.random.split(jax.random.key(0))
    logits = jax.random.normal(key1, (2, 5, 11))
    base = jax.random.normal(key2, (2, 5, 11))
    mask = jnp.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], jnp.float32)
    p = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    q = np.asarray(jax.nn.softmax(base, -1), np.float64)
    expected = float(np.sum(np.sum(p * (np.log(p) - np.log(q)), -1) * np.asarray(mask)))
    np.testing.assert_allclose(float(kl_to_base(logits, base, mask)), expected, rtol=1e-5)
    assert abs(float(kl_to_base(base, base, mask))) < 1e-6


def test_kl_to_base_gradient_only_through_model_logits():
    key1, key2 = jax.random.split(jax.random.key(1))
    logits = jax.random.normal(key1, (1, 3, 7))
    base = jax.random.normal(key2, (1, 3, 7))
    mask = jnp.ones((1, 3))
    grad_base = jax.grad(lambda b: kl_to_base(logits, b, mask))(base)
    np.testing.assert_array_equal(np.asarray(grad_base), 0.0)
    grad_model = jax.grad(lambda x: kl_to_base(x, base, mask))(logits)
    assert float(jnp.abs(grad_model).sum()) > 0
    # At the base distribution the KL is at its minimum: zero gradient.
    at_min = jax.grad(lambda x: kl_to_base(x, base, mask))(base)
    np.testing.assert_allclose(np.asarray(at_min), 0.0, atol=1e-6)


# --------------------------------------------------------------------------- in the train step


def _step_setup(model_config, keep_reference=False, mesh_sizes=(1, 1, 1)):
    from sft_jax.config import MeshSection
    from sft_jax.training.optim import make_optimizer, make_schedule
    from sft_jax.training.sharding import batch_sharding, make_mesh
    from sft_jax.training.state import StateSpec, create_train_state
    from tests.test_step import RULES, optim_cfg

    mesh = make_mesh(MeshSection(*mesh_sizes, rules=RULES), jax.devices()[:1])
    cfg = optim_cfg()
    tx = make_optimizer(cfg, total_steps=10)
    spec = StateSpec(model_config, mesh, RULES, tx, keep_reference=keep_reference)
    state, shardings = create_train_state(spec)
    return state, shardings, batch_sharding(mesh, RULES), make_schedule(cfg, 10)


def test_neftune_noise_only_in_training():
    from sft_jax.training.step import StepOptions, make_train_step
    from tests.helpers import tiny_model_config
    from tests.test_step import packed_batch

    batch = {k: jnp.asarray(v) for k, v in packed_batch().items()}
    losses, logits = {}, {}
    for alpha in (0.0, 5.0):
        state, shardings, bs, schedule = _step_setup(tiny_model_config(neftune_alpha=alpha))
        inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
        logits[alpha] = np.asarray(jax.jit(state.apply_fn)({"params": state.params}, *inputs))
        step = make_train_step(shardings, bs, options=StepOptions(), schedule=schedule)
        _, metrics = step(state, batch, np.float32(1.0))  # the state is donated here
        losses[alpha] = float(metrics["loss"])
    # Evaluation (no "neftune" rng) sees the clean embeddings: the same params and logits.
    np.testing.assert_array_equal(logits[5.0], logits[0.0])
    assert losses[0.0] != losses[5.0] and abs(losses[0.0] - losses[5.0]) < 0.5, losses


def test_kl_to_base_full_fine_tuning_holds_params_near_base():
    from sft_jax.training.step import StepOptions, make_train_step
    from tests.helpers import tiny_model_config
    from tests.test_step import packed_batch

    batch = {k: jnp.asarray(v) for k, v in packed_batch().items()}
    drift, kls = {}, {}
    for coef in (0.0, 10.0):
        state, shardings, bs, schedule = _step_setup(tiny_model_config(), keep_reference=coef > 0)
        initial = jax.tree.map(np.asarray, state.params)
        options = StepOptions(kl_coef=coef)
        step = make_train_step(shardings, bs, options=options, schedule=schedule)
        history = []
        for _ in range(6):
            state, metrics = step(state, batch, np.float32(1.0))
            history.append(float(metrics.get("kl_to_base", np.nan)))
        kls[coef] = history
        diffs = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).sum(), state.params, initial)
        drift[coef] = sum(jax.tree.leaves(diffs))
        if coef:  # the reference is the initial model and never moves
            for a, b in zip(
                jax.tree.leaves(state.reference), jax.tree.leaves(initial), strict=True
            ):
                np.testing.assert_array_equal(np.asarray(a), b)
    assert abs(kls[10.0][0]) < 1e-6  # step 1: the model is the base
    assert kls[10.0][-1] > 0
    assert drift[10.0] < drift[0.0], drift


def test_kl_to_base_under_lora_uses_the_frozen_base():
    from sft_jax.config import LoraSection, MeshSection
    from sft_jax.training.optim import make_optimizer, make_schedule
    from sft_jax.training.sharding import batch_sharding, make_mesh
    from sft_jax.training.state import StateSpec, create_train_state
    from sft_jax.training.step import StepOptions, make_train_step
    from tests.helpers import tiny_model_config
    from tests.test_step import RULES, optim_cfg, packed_batch

    values = base.get_config().lora.to_dict()
    values.update(enabled=True, rank=4, alpha=8.0, base_dtype="float32")
    values["targets"] = tuple(values["targets"])
    values["modules_to_save"] = tuple(values["modules_to_save"])
    lora_cfg = LoraSection(**values)
    mesh = make_mesh(MeshSection(1, 1, 1, rules=RULES), jax.devices()[:1])
    cfg = optim_cfg()
    tx = make_optimizer(cfg, 10, lora_cfg)
    spec = StateSpec(tiny_model_config(), mesh, RULES, tx, lora=lora_cfg, keep_reference=True)
    state, shardings = create_train_state(spec)
    assert state.reference is None  # the frozen base is the reference: no copy
    step = make_train_step(
        shardings,
        batch_sharding(mesh, RULES),
        options=StepOptions(kl_coef=1.0),
        schedule=make_schedule(cfg, 10),
    )
    batch = {k: jnp.asarray(v) for k, v in packed_batch().items()}
    kls = []
    for _ in range(4):
        state, metrics = step(state, batch, np.float32(1.0))
        kls.append(float(metrics["kl_to_base"]))
    assert abs(kls[0]) < 1e-6 and kls[-1] > 1e-6, kls
