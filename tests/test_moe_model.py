"""A mixture-of-experts decoder: the MoE layer in every block, its router statistics carried
through the layer scan into the train step's objective and metrics, packing and decoding."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_only_state, tiny_model_config

from sft_jax.model.decoder import ROUTER_STATS, Transformer, init_cache
from sft_jax.model.moe import combine_layers
from sft_jax.training import step

E, K, L = 4, 2, 2
MOE = dict(
    num_experts=E, num_experts_per_tok=K, moe_intermediate_size=16, norm_topk_prob=True,
    router_aux_loss_coef=0.01, num_layers=L,
)  # fmt: skip
T = 16
# Jitted once for the module: the MoE model op by op runs far slower than its compile.
loss_fn = jax.jit(step.loss_fn, static_argnums=4)
compute_grads = jax.jit(step.compute_grads, static_argnums=3)


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(tiny_model_config(**MOE))
    ids = jnp.zeros((1, T), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids, ids, ids + 1)["params"])
    # Routers off their init so that experts differ in load and the statistics are not flat.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p * 40 if "router" in jax.tree_util.keystr(path) else p, params
    )
    return model, params


def batch(seed: int = 0, rows: int = 4) -> dict[str, jax.Array]:
    """Rows of two examples each, padding at the end, a random loss mask."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((rows, T), np.int32) for k in ("inputs", "targets", "segment_ids")}
    out["positions"] = np.zeros((rows, T), np.int32)
    out["loss_mask"] = np.zeros((rows, T), bool)
    for r in range(rows):
        a, b = int(rng.integers(3, 7)), int(rng.integers(3, 7))
        out["inputs"][r] = rng.integers(1, 64, T)  # padding slots hold random tokens too
        out["targets"][r, : a + b] = rng.integers(1, 64, a + b)
        out["segment_ids"][r, :a], out["segment_ids"][r, a : a + b] = 1, 2
        out["positions"][r, :a], out["positions"][r, a : a + b] = np.arange(a), np.arange(b)
        out["loss_mask"][r, : a + b] = rng.random(a + b) < 0.8
    return {k: jnp.asarray(v) for k, v in out.items()}


@functools.partial(jax.jit, static_argnums=0)
def router_stats(model, params, b):
    inputs = (b["inputs"], b["positions"], b["segment_ids"])
    logits, sown = model.apply({"params": params}, *inputs, mutable=["intermediates"])
    return logits, sown["intermediates"][ROUTER_STATS][0]


def test_every_layer_holds_the_experts_instead_of_the_dense_mlp(model_and_params):
    _, params = model_and_params
    mlp = params["layers"]["mlp"]
    assert mlp["router"]["kernel"].shape == (L, 32, E)
    assert mlp["experts"]["gate_proj"].shape == (L, E, 32, 16)
    assert mlp["experts"]["down_proj"].shape == (L, E, 16, 32)
    assert "gate_proj" not in mlp


def test_router_statistics_count_real_tokens_only(model_and_params):
    """Per layer: every real token makes K assignments; padding tokens are routed (static
    shapes) but change no statistic, whatever they hold."""
    model, params = model_and_params
    b = batch()
    _, stats = router_stats(model, params, b)
    real = float(jnp.sum(b["segment_ids"] > 0))
    np.testing.assert_array_equal(stats.tokens, [real] * L)
    np.testing.assert_allclose(jnp.sum(stats.expert_counts, axis=-1), [real * K] * L)
    assert stats.expert_counts.shape == (L, E)
    assert float(jnp.min(stats.expert_counts)) < float(jnp.max(stats.expert_counts))
    other = dict(b, inputs=jnp.where(b["segment_ids"] > 0, b["inputs"], 7))
    _, again = router_stats(model, params, other)
    for x, y in zip(jax.tree.leaves(stats), jax.tree.leaves(again), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_packed_row_gives_each_example_its_own_logits(model_and_params):
    """Routing is per token, so packing changes nothing: each example alone gives the logits
    it has in the packed row."""
    model, params = model_and_params
    apply = jax.jit(model.apply)
    b = {k: np.asarray(v) for k, v in batch(rows=1).items()}  # sliced on the host, not op by op
    packed = apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"])
    seg = np.asarray(b["segment_ids"][0])
    for s in (1, 2):
        idx = np.flatnonzero(seg == s)
        alone = apply(
            {"params": params},
            b["inputs"][:, idx],
            b["positions"][:, idx],
            jnp.ones((1, len(idx)), jnp.int32),
        )
        np.testing.assert_allclose(packed[:, idx], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_chunk", [0, 4])
def test_objective_adds_the_weighted_router_losses(model_and_params, loss_chunk):
    """objective = cross-entropy sum + loss tokens x (aux coef x balance + z coef x z), with the
    balance loss over all layers together (transformers' load_balancing_loss_func)."""
    model, params = model_and_params
    b, state = batch(), model_only_state(model.apply)
    rng = jax.random.PRNGKey(0)
    base = step.StepOptions(loss_chunk=loss_chunk, router_stats=True)
    weighted = dataclasses.replace(base, router_aux_coef=0.01, router_z_coef=0.001)
    plain, parts = loss_fn(params, state, b, rng, base)
    objective, _ = loss_fn(params, state, b, rng, weighted)
    _, stats = router_stats(model, params, b)
    balance, z = combine_layers(stats)
    count = float(parts.tokens)
    np.testing.assert_allclose(float(plain), float(parts.cross_entropy), rtol=1e-6)
    expected = float(plain) + count * (0.01 * float(balance) + 0.001 * float(z))
    np.testing.assert_allclose(float(objective), expected, rtol=1e-5)
    np.testing.assert_allclose(float(parts.router.balance), count * float(balance), rtol=1e-5)
    # transformers' value: E * sum_e f_e P_e over every layer's tokens at once
    counts, probs = jnp.sum(stats.expert_counts, 0), jnp.sum(stats.router_prob_sum, 0)
    tokens = float(jnp.sum(stats.tokens))
    np.testing.assert_allclose(
        float(balance), E * float(jnp.sum(counts / tokens * probs / tokens)), rtol=1e-5
    )


def test_router_loss_gradient_reaches_the_router(model_and_params):
    model, params = model_and_params
    b, state = batch(), model_only_state(model.apply).replace(params=params)
    options = step.StepOptions(router_stats=True)  # the plain program is the micro-batch test's
    grad = lambda o: compute_grads(state, b, jax.random.PRNGKey(0), o)[0]
    plain = grad(options)["layers"]["mlp"]["router"]["kernel"]
    options = dataclasses.replace(options, router_aux_coef=1.0)
    weighted = grad(options)["layers"]["mlp"]["router"]["kernel"]
    assert float(jnp.max(jnp.abs(weighted - plain))) > 1e-4


def test_micro_batches_sum_the_statistics(model_and_params):
    """Two micro-batches: the same cross-entropy, loss tokens and per-layer expert counts as
    one batch (the balance loss itself is a per-micro-batch statistic, as in transformers
    with gradient accumulation, so it is only token-weighted, not equal)."""
    model, params = model_and_params
    b, state = batch(rows=4), model_only_state(model.apply)
    state = state.replace(params=params)
    rng = jax.random.PRNGKey(0)
    _, one = compute_grads(state, b, rng, step.StepOptions(router_stats=True))
    options = step.StepOptions(micro_batches=2, router_stats=True)
    _, two = compute_grads(state, b, rng, options)
    np.testing.assert_allclose(float(one.cross_entropy), float(two.cross_entropy), rtol=1e-5)
    assert float(one.tokens) == float(two.tokens)
    np.testing.assert_allclose(one.router.expert_counts, two.router.expert_counts)


def test_router_metrics_show_the_load_per_expert(model_and_params):
    model, params = model_and_params
    b, state = batch(), model_only_state(model.apply)
    _, parts = loss_fn(params, state, b, jax.random.PRNGKey(0), step.StepOptions(router_stats=True))
    metrics = step.router_metrics(parts.router, parts.tokens)
    load = np.asarray(metrics["expert_load"])
    assert load.shape == (E,)
    np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)
    counts = np.asarray(parts.router.expert_counts)
    expected_max = (counts / counts.mean(axis=-1, keepdims=True)).max()
    np.testing.assert_allclose(float(metrics["expert_load_max"]), expected_max, rtol=1e-6)
    assert float(metrics["expert_load_min"]) < 1.0 < float(metrics["expert_load_max"])
    assert float(metrics["router_balance_loss"]) > 0


@pytest.mark.slow  # tests/test_hf_moe.py's greedy generation decodes MoE models by default
def test_decoding_over_a_cache_gives_the_full_forward_logits(model_and_params):
    """Prefill then one token at a time through the MoE layers equals the full forward."""
    model, params = model_and_params
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 1, 64)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    full = model.apply({"params": params}, ids, positions, jnp.ones_like(ids))
    cache = init_cache(model.config, 2, 8)
    starts = jnp.zeros((2,), jnp.int32)
    hidden, cache = model.apply(
        {"params": params}, ids[:, :5], positions[:, :5], starts, cache, 0, method="decode"
    )
    steps = [model.apply({"params": params}, hidden, method="logits")]
    for i in range(5, 8):
        hidden, cache = model.apply(
            {"params": params},
            ids[:, i : i + 1],
            positions[:, i : i + 1],
            starts,
            cache,
            i,
            method="decode",
        )
        steps.append(model.apply({"params": params}, hidden, method="logits"))
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)


def test_a_run_trains_a_moe_model_on_a_mesh_and_logs_the_router(tmp_path, small_train):
    """The tiny config with experts in every layer, on 8 devices (each routes its own tokens):
    the loss falls, and every training record carries the router losses and the load of each
    expert (a list in metrics.jsonl)."""
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.train import train_and_evaluate
    from sft_jax.training.metrics import read_metrics

    raw = load_config_file("configs/tiny.py")
    raw["model"]["arch"].update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    raw["data"].update(train_files=small_train, max_eval_examples=8)  # quick to tokenise
    raw["train"].update(max_steps=6, log_every=2, router_aux_loss_coef=0.01)
    raw["eval"].update(generate_examples=0)
    raw["checkpoint"].update(every_steps=0)
    train_and_evaluate(parse(raw), str(tmp_path))
    records = [r for r in read_metrics(str(tmp_path)) if "loss" in r and "kind" not in r]
    assert len(records) == 3 and records[-1]["loss"] < records[0]["loss"]
    for r in records:
        assert len(r["expert_load"]) == 4 and abs(sum(r["expert_load"]) - 1) < 1e-5
        assert r["router_balance_loss"] > 0 and r["expert_load_max"] >= 1 >= r["expert_load_min"]
