"""Context parallelism end to end: a model whose rows are split over the mesh's context axis
(ring attention, rows permuted for load balancing) computes what the unsharded model computes.

Logits (every slot, padding included), loss and gradients equal the single-device reference
model on packed rows with padding and a continuation piece (positions not starting at 0), for a
Gemma-like model (sliding-window layers with their own RoPE base, logit soft-cap, grouped-query
heads), on meshes that combine context with data, fsdp and tensor. The train step and a short
run of the demo give the unsharded run's losses.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import base
from sft_jax.config import ConfigError, MeshSection, OptimSection
from sft_jax.model.context_attention import restore_order
from sft_jax.model.decoder import Transformer, attention_options
from sft_jax.training import sharding, step
from sft_jax.training.optim import make_optimizer, make_schedule
from sft_jax.training.state import StateSpec, create_train_state, param_shardings
from tests.helpers import model_only_state, tiny_model_config

RULES = tuple(tuple(r) for r in base.get_config().mesh.rules)
T = 32  # 2 x 8 chunks: every mesh below splits it
TOL = 1e-5
# Gemma-like: layer 0 slides a 5-token window with its own RoPE base, scores soft-capped.
MODEL = tiny_model_config(
    sliding_window=5, local_layers=(True, False), local_rope_theta=100.0, attn_softcap=20.0
)
# (data, fsdp, tensor, context). fsdp x tensor x context runs in the default tier; data x
# context (whose losses and gradient norms the train step test below compares, and whose logits
# test_rows_in_slot_order_need_no_permutation does) and context alone run in the slow one.
MESHES = [
    pytest.param((2, 1, 1, 4), marks=pytest.mark.slow),
    (1, 2, 2, 2),
    pytest.param((1, 1, 1, 8), marks=pytest.mark.slow),
]


def packed_batch(rows: int = 4, seed: int = 0) -> dict[str, jax.Array]:
    """Rows of 2-3 segments with a random loss mask, padding at the end of every row, and in
    row 0 a continuation piece (a split example: positions start at 7, its own segment id).
    Padding slots carry random tokens: with identical ones (the packer's zeros) every padding
    key and value is the same, and a mask that let padding see later padding (per-example
    positions, all 0 there, instead of slots) would go unnoticed."""
    rng = np.random.default_rng(seed)
    keys = ("inputs", "targets", "segment_ids", "positions")
    batch = {k: np.zeros((rows, T), np.int32) for k in keys}
    batch["loss_mask"] = np.zeros((rows, T), bool)
    for r in range(rows):
        start = 0
        for seg in range(1, int(rng.integers(2, 4)) + 1):
            n = int(rng.integers(3, 12))
            if start + n > T - 2:  # at least two padding slots
                break
            batch["inputs"][r, start : start + n] = rng.integers(1, 64, n)
            batch["targets"][r, start : start + n] = rng.integers(1, 64, n)
            batch["segment_ids"][r, start : start + n] = seg
            first = 7 if (r, seg) == (0, 1) else 0
            batch["positions"][r, start : start + n] = np.arange(first, first + n)
            batch["loss_mask"][r, start : start + n] = rng.random(n) < 0.7
            start += n
    padding = batch["segment_ids"] == 0
    batch["inputs"] = np.where(padding, rng.integers(1, 64, (rows, T)), batch["inputs"])
    return {k: jnp.asarray(v, jnp.int32 if k != "loss_mask" else bool) for k, v in batch.items()}


@pytest.fixture(scope="module")
def reference():
    """(params, batch, logits, loss sum, loss tokens, grads) of the unsharded model."""
    model = Transformer(dataclasses.replace(MODEL, attention="reference"))
    batch = packed_batch()
    params = model.init(jax.random.PRNGKey(0), *_inputs(batch))["params"]
    logits = jax.jit(model.apply)({"params": params}, *_inputs(batch))
    (loss, parts), grads = _loss_and_grads(model, params, batch, 1)
    return params, batch, logits, loss, parts.tokens, grads


def _inputs(batch):
    return batch["inputs"], batch["positions"], batch["segment_ids"]


def _loss_and_grads(model, params, batch, context):
    """The train step's loss_fn and its gradient, rows permuted as train_step permutes them."""
    options = step.StepOptions(context=context)

    def objective(p, b):
        b = step.context_order(b, context)
        return step.loss_fn(p, model_only_state(model.apply), b, jax.random.PRNGKey(1), options)

    return jax.jit(jax.value_and_grad(objective, has_aux=True))(params, batch)


def context_mesh(data: int, fsdp: int, tensor: int, context: int):
    cfg = MeshSection(data, fsdp, tensor, RULES, context=context)
    return sharding.make_mesh(cfg, jax.devices()[: data * fsdp * tensor * context])


def context_model(mesh) -> Transformer:
    return Transformer(sharding.pin_model_activations(MODEL, mesh, RULES))


@pytest.mark.parametrize(
    "sizes", MESHES, ids=lambda s: "data{}-fsdp{}-tensor{}-context{}".format(*s)
)
def test_logits_loss_and_grads_equal_unsharded(reference, sizes):
    params, batch, ref_logits, ref_loss, ref_count, ref_grads = reference
    mesh = context_mesh(*sizes)
    context = sizes[-1]
    model = context_model(mesh)
    assert attention_options(model.config, T).implementation == "ring"
    assert sharding.activation_sharding(mesh, RULES).spec == PartitionSpec(
        ("data", "fsdp"), ("context",), None
    )
    params = jax.device_put(params, param_shardings(model, mesh, RULES)[1])
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, RULES))

    def logits_fn(p, b):
        b = step.context_order(b, context)
        slots = step.context_slots(T, context)
        return restore_order(model.apply({"params": p}, *_inputs(b), slots=slots), context)

    logits = jax.jit(logits_fn)(params, batch)
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=TOL)  # padding slots too
    (loss, parts), grads = _loss_and_grads(model, params, batch, context)
    assert float(parts.tokens) == float(ref_count) > 0
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=TOL)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)


def test_rows_in_slot_order_need_no_permutation(reference):
    """The ring masks by the slots it is given, so unpermuted rows (no slots) attend exactly as
    well: load balancing is an optimisation, never a condition of correctness."""
    params, batch, ref_logits = reference[:3]
    model = context_model(context_mesh(2, 1, 1, 4))
    logits = jax.jit(model.apply)({"params": params}, *_inputs(batch))
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=TOL)


def test_a_permuted_row_needs_ring_attention(reference):
    params, batch = reference[:2]
    model = Transformer(dataclasses.replace(MODEL, attention="reference"))
    with pytest.raises(ValueError, match="slot order"):
        model.apply({"params": params}, *_inputs(batch), slots=step.context_slots(T, 2))


# ----------------------------------------------------------------------------- the train step


def run_steps(sizes, micro_batches: int = 1, loss_chunk: int = 0, steps: int = 3):
    """Losses and gradient norms of `steps` train steps on a (data, fsdp, tensor, context) mesh."""
    mesh = context_mesh(*sizes)
    optim = OptimSection(**{**base.get_config().optim.to_dict(), "learning_rate": 1e-2})
    spec = StateSpec(MODEL, mesh, RULES, make_optimizer(optim, total_steps=10))
    state, shardings = create_train_state(spec)
    batch_sharding = sharding.batch_sharding(mesh, RULES)
    options = step.StepOptions(micro_batches=micro_batches, loss_chunk=loss_chunk)
    step_fn = step.make_train_step(
        shardings, batch_sharding, options=options, schedule=make_schedule(optim, 10)
    )
    losses, norms = [], []
    for i in range(steps):
        batch = jax.device_put(packed_batch(seed=i), batch_sharding)
        state, metrics = step_fn(state, batch, np.float32(1.0))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms, step_fn


def test_train_step_equals_single_device():
    """Loss (normalised by the global loss-token count) and gradient norm of each step, which
    depend on every earlier update, equal the one-device run; with micro-batches and the
    chunked loss (pieces of the permuted sequence) too."""
    ref_losses, ref_norms, _ = run_steps((1, 1, 1, 1))
    losses, norms, step_fn = run_steps((2, 1, 1, 4), micro_batches=2, loss_chunk=8)
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL)
    np.testing.assert_allclose(norms, ref_norms, rtol=TOL)
    assert step_fn._cache_size() == 1


# ----------------------------------------------------------------------------- configuration


def _config(**overrides):
    from sft_jax.config import parse

    raw = base.get_config()
    raw.data.train_files = "train.jsonl"
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return parse(raw)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"mesh.context": 4, "data.seq_len": 100}, r"multiple of 2 x mesh.context = 8"),
        ({"mesh.context": 2, "model.attention": "blocked"}, r"'blocked' cannot run under mesh"),
        ({"mesh.context": 0}, r"'mesh.context' is 0"),
    ],
)
def test_config_refuses_what_context_parallelism_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)


def test_mesh_counts_the_context_axis():
    mesh = sharding.make_mesh(MeshSection(-1, 1, 2, RULES, context=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 2, "tensor": 2}
    assert sharding.context_shards(mesh) == 2
    with pytest.raises(ConfigError, match="x context 3"):
        sharding.make_mesh(MeshSection(-1, 1, 1, RULES, context=3))


# ----------------------------------------------------------------------------- a whole run


def demo_losses(tmp_path, name: str, **mesh) -> tuple[list[float], dict]:
    """Per-step losses and the summary of 3 steps of the demo (real stories260K weights and
    data) with evaluation and a little generation, on the mesh `mesh` overrides."""
    import pathlib

    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.train import train_and_evaluate
    from sft_jax.training.metrics import read_metrics

    raw = load_config_file(str(pathlib.Path(__file__).parents[1] / "configs" / "demo.py"))
    raw["train"].update(max_steps=3, log_every=1, progress_bar=False)
    raw["eval"].update(every_steps=0, generate_examples=2, max_new_tokens=2, samples=0)
    raw["checkpoint"].update(every_steps=0)
    raw["mesh"].update(mesh)
    workdir = str(tmp_path / name)
    summary = train_and_evaluate(parse(raw), workdir)
    return [r["loss"] for r in read_metrics(workdir) if "loss" in r], summary


@pytest.mark.slow
def test_demo_run_equals_the_unsharded_run(tmp_path):
    """`train_and_evaluate` with mesh.context=4 (x data 2): the same losses as data parallelism
    alone, and evaluation (permuted rows) and generation (a KV cache, no ring) still run."""
    ref_losses, ref_summary = demo_losses(tmp_path, "data", data=-1, context=1)
    losses, summary = demo_losses(tmp_path, "context", data=2, context=4)
    assert len(losses) == 3
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    rows = {row["metric"]: row for row in summary["comparison"]}
    ref_rows = {row["metric"]: row for row in ref_summary["comparison"]}
    np.testing.assert_allclose(rows["eval_loss"]["after"], ref_rows["eval_loss"]["after"], 1e-5)
    assert summary["accuracy_after"] == ref_summary["accuracy_after"]


# ----------------------------------------------------------------------------- the memory plan


def test_plan_counts_activations_per_context_shard():
    """A row split over c context devices leaves each device the activations of T / c tokens:
    the estimate for (T, context c) is the one for (T / c, no context), and the plan of a
    config with mesh.context=4 reports ring attention and a quarter of the tokens."""
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.plan import activation_bytes, plan

    for remat in ("none", "full"):
        split = activation_bytes(MODEL, 1, 4096, remat, 1, "ring", 0, context=4)
        assert split == activation_bytes(MODEL, 1, 1024, remat, 1, "ring", 0)
    raw = load_config_file("configs/tiny.py")
    raw.data.seq_len, raw.train.global_batch_size, raw.mesh.data = 4096, 2, 2
    plans = {}
    for context in (1, 4):
        raw.mesh.context = context
        plans[context] = plan(parse(raw), devices=2 * context, device_memory_gib=1.0)
    assert plans[4]["attention"] == "ring" and plans[4]["mesh"]["context"] == 4
    assert plans[4]["tokens_per_device_per_micro_batch"] == 1024
    assert plans[1]["tokens_per_device_per_micro_batch"] == 4096
    # Not a quarter: the ring's fixed [512, 512] score tiles weigh on a model this small.
    ratio = plans[4]["activation_bytes_estimate"] / plans[1]["activation_bytes_estimate"]
    assert 0.25 < ratio < 0.5, ratio


def test_plan_matches_the_compiled_context_parallel_step():
    """The plan's total for a data x context mesh against XLA's memory analysis of the real
    compiled step on the 8 local devices (tiny model, where the ring's fixed tiles count)."""
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.plan import plan
    from sft_jax.planning.plan_check import compare

    raw = load_config_file("configs/tiny.py")
    raw.data.seq_len, raw.train.global_batch_size = 1024, 2
    raw.mesh.data, raw.mesh.context = 2, 4
    config = parse(raw)
    ratio = compare(config, plan(config, devices=8, device_memory_gib=1.0))["ratio"]
    assert 0.8 < ratio < 1.25, ratio
