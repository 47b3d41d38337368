"""Expert parallelism: the MoE layer with its experts split over a mesh `expert` axis (each
device holds E / ep experts; the token shards of an expert group are gathered, each device runs
its own experts, the outputs are reduce-scattered back) equals the unsharded layer: outputs,
router statistics and gradients, on meshes that combine expert with data, fsdp, tensor and
context, with a shared expert, padding and experts that receive no token. Then the mesh and
config plumbing of the axis, and a compile of the layer by the TPU compiler (skipped without
libtpu)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import base
from sft_jax.config import ConfigError, MeshSection
from sft_jax.model import expert_dispatch
from sft_jax.model.expert_dispatch import expert_parallel_axes
from sft_jax.model.moe import MoeConfig, MoeMlp
from sft_jax.planning import tpu
from sft_jax.training.sharding import (
    activation_sharding,
    batch_shards,
    logical_to_spec,
    make_mesh,
    param_shardings,
)

RULES = tuple(tuple(r) for r in base.get_config().mesh.rules)
D, F, FS, E, K = 16, 8, 12, 8, 2
UNUSED = (1, 6)  # experts no token picks: empty groups, devices with nothing to compute
B, T = 8, 4

# name: mesh (data, fsdp, tensor, context, expert), the mesh axes of the expert dimension
MESHES = {
    "expert_8": ((1, 1, 1, 1, 8), "expert"),
    "data_2_x_expert_4": ((2, 1, 1, 1, 4), "expert"),
    "fsdp_2_x_expert_2_x_tensor_2": ((1, 2, 2, 1, 2), "expert"),
    "expert_2_x_context_2_x_data_2": ((2, 1, 1, 2, 2), "expert"),
    "experts_over_fsdp_2_x_expert_2": ((2, 2, 1, 1, 2), ("fsdp", "expert")),
}


def config(shared: int = FS, norm: bool = False) -> MoeConfig:
    return MoeConfig(D, F, E, K, norm_topk_prob=norm, shared_expert_intermediate_size=shared)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: MoeConfig):
    """(boxed variables, x), jitted: op by op the init compiles dozens of small programs."""
    x = jnp.abs(jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32))
    return MoeMlp(cfg).init(jax.random.key(0), x), x


def setup(cfg: MoeConfig):
    """Variables (boxed, for their logical names), plain parameters, x and a padding mask.

    x is positive and the router's columns of UNUSED are negative, so no token picks those
    experts; the router is scaled up so that routing differs between tokens."""
    variables, x = _init(cfg)
    params = nn.meta.unbox(variables)["params"]
    router = params["router"]["kernel"] * 50.0
    params["router"]["kernel"] = router.at[:, UNUSED].set(-1.0)
    mask = np.ones((B, T), bool)
    mask[0, -2:] = False  # right padding
    mask[3, :1] = False  # left padding
    return variables, params, x, jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def run(cfg: MoeConfig, params: dict, x: jax.Array, mask: jax.Array):
    """(gradients w.r.t. params and x, (y, aux)) of a loss on the output and the statistics.
    Jitted (the layer op by op is far slower than its compile); the unsharded reference of
    one config compiles once for every mesh compared with it."""

    def loss(p, x):
        y, aux = MoeMlp(cfg).apply({"params": p}, x, mask)
        return jnp.sum(jnp.sin(y)) + aux.load_balancing_loss + aux.z_loss, (y, aux)

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)


def expert_mesh(sizes: tuple[int, ...]):
    data, fsdp, tensor, context, expert = sizes
    cfg = MeshSection(data, fsdp, tensor, RULES, context=context, expert=expert)
    return make_mesh(cfg, jax.devices()[: int(np.prod(sizes))])


def _equals_unsharded_cases() -> list:
    """Every mesh with both dispatches in the default tier, the shared expert alternating over
    them (so each dispatch runs with and without it, on different meshes); the other half of
    the mesh x shared x dispatch product is in the slow tier: the same layer paths again."""
    cases = []
    for i, name in enumerate(MESHES):
        for j, dispatch in enumerate(["all_gather", "all_to_all"]):
            for shared in (FS, 0):
                default = (shared == FS) == ((i + j) % 2 == 0)
                marks = () if default else (pytest.mark.slow,)
                cases.append(pytest.param(name, shared, dispatch, marks=marks))
    return cases


@pytest.mark.parametrize(("name", "shared", "dispatch"), _equals_unsharded_cases())
def test_expert_parallel_equals_unsharded(name, shared, dispatch):
    cfg = config(shared, norm=shared == 0)
    variables, params, x, mask = setup(cfg)
    want = run(cfg, params, x, mask)  # unsharded, dispatch has no say: one compile per config
    cfg = dataclasses.replace(cfg, dispatch=dispatch)
    assert all(int(want[1][1].expert_counts[e]) == 0 for e in UNUSED)
    assert int(jnp.sum(want[1][1].expert_counts > 0)) >= 4  # routing is not degenerate

    sizes, expert_axes = MESHES[name]
    mesh = expert_mesh(sizes)
    rules = (*RULES, ("expert", expert_axes))  # the last entry for a name wins
    ep = expert_axes if isinstance(expert_axes, tuple) else (expert_axes,)
    specs = nn.get_partition_spec(variables)["params"]
    shardings = param_shardings(specs, params, mesh, rules)
    gate = jax.device_put(params["experts"]["gate_proj"], shardings["experts"]["gate_proj"])
    assert shardings["experts"]["gate_proj"].spec[0] == expert_axes
    per_device = E // int(np.prod([mesh.shape[a] for a in ep]))
    assert {s.data.shape[0] for s in gate.addressable_shards} == {per_device}
    tokens = activation_sharding(mesh, rules)
    assert "expert" in tokens.spec[0]  # the expert axis splits the batch too
    sharded = dataclasses.replace(cfg, mesh=mesh, mesh_rules=rules)
    assert expert_parallel_axes(sharded) == ep
    args = (
        jax.device_put(params, shardings),
        jax.device_put(x, tokens),
        jax.device_put(mask, NamedSharding(mesh, PartitionSpec(*tokens.spec[:2]))),
    )
    step = jax.jit(functools.partial(run, sharded))
    jaxpr = str(jax.make_jaxpr(step)(*args))
    # The gather's outputs are reduce-scattered; the all-to-all sends them back (emulated on
    # the CPU by all-gathers: no reduce-scatter).
    assert "all_gather" in jaxpr and ("reduce_scatter" in jaxpr) == (dispatch == "all_gather")
    got = step(*args)
    assert got[0][0]["experts"]["gate_proj"].sharding.spec[0] == expert_axes
    tol = dict(atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **tol), got, want)


def test_tokens_that_do_not_split_over_the_expert_axis_are_summed_not_scattered():
    """A batch the batch axes do not divide stays whole on every device: each device runs its
    experts on all tokens and the outputs are summed over the expert axis."""
    cfg = config()
    variables, params, x, mask = setup(cfg)
    x, mask = x[:3], mask[:3]
    want = run(cfg, params, x, mask)
    mesh = expert_mesh((1, 1, 1, 1, 4))
    assert tuple(logical_to_spec(("batch", "seq"), (3, T), mesh, RULES)) == (None, None)
    shardings = param_shardings(nn.get_partition_spec(variables)["params"], params, mesh, RULES)
    sharded = dataclasses.replace(cfg, mesh=mesh, mesh_rules=RULES)
    step = jax.jit(functools.partial(run, sharded))
    args = (jax.device_put(params, shardings), x, mask)
    assert "psum" in str(jax.make_jaxpr(step)(*args))
    got = step(*args)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5), got, want)


def test_tokens_whole_over_the_expert_axis_are_gathered_even_when_all_to_all_is_asked():
    """A batch the expert axis does not divide (the init trace, one prompt) can only be gathered;
    the config refuses all_to_all with rules that never split the batch over the axis."""
    from sft_jax import config as config_lib

    cfg = dataclasses.replace(config(), dispatch="all_to_all")
    mesh = expert_mesh((1, 1, 1, 1, 4))
    sharded = dataclasses.replace(cfg, mesh=mesh, mesh_rules=RULES)
    ep = ("expert",)
    assert expert_dispatch.choose_dispatch("all_to_all", ep, (), sharded, "tpu") == "all_gather"
    _, params, x, mask = setup(cfg)
    want = run(cfg, params, x[:3], mask[:3])
    got = run(sharded, params, x[:3], mask[:3])
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5), got, want)

    raw = base.get_config()
    raw.data.train_files = "train.jsonl"
    raw.mesh.expert, raw.model.moe_dispatch = 2, "all_to_all"
    raw.mesh.rules = [("batch", ("data", "fsdp")), *[r for r in raw.mesh.rules if r[0] != "batch"]]
    with pytest.raises(ConfigError, match=r"all_to_all' needs the batch split over the expert"):
        config_lib.parse(raw)


@pytest.mark.parametrize(
    ("group", "k", "platform", "chosen"),
    [
        (8, 8, "tpu", "all_gather"),  # Qwen3-MoE: K = 8, the gather moves less up to 8 devices
        (16, 8, "tpu", "all_to_all"),
        (4, 2, "gpu", "all_to_all"),  # Mixtral
        (4, 2, "cpu", "all_gather"),  # the CPU only emulates the all-to-all
    ],
)
def test_auto_dispatch_picks_the_exchange_that_moves_fewer_rows(group, k, platform, chosen):
    mesh = expert_mesh((1, 1, 1, 1, min(group, 8)))
    cfg = dataclasses.replace(config(0), num_experts=16, num_experts_per_tok=k)
    cfg = dataclasses.replace(cfg, mesh=mesh, mesh_rules=RULES)
    if group > 8:  # more devices than this host fakes: the choice reads only the axis sizes
        cfg = dataclasses.replace(cfg, mesh=type("M", (), {"shape": {"expert": group}})())
    ep, tokens = ("expert",), ("expert",)
    assert expert_dispatch.choose_dispatch("auto", ep, tokens, cfg, platform) == chosen
    assert expert_dispatch.choose_dispatch("auto", ep, (), cfg, platform) == "all_gather"


def test_emulated_ragged_all_to_all_follows_the_collectives_definition():
    """Device i sends rows [input_offsets[i][j], + send_sizes[i][j]) of its operand to device j,
    where they land at output_offsets[i][j]; other output rows keep the given output."""
    g, rows, cap = 4, 6, 12
    rng = np.random.default_rng(0)
    sizes = np.zeros((g, g), np.int32)
    for i in range(g):  # each device sends all its rows, split at random over the devices
        cuts = np.sort(rng.integers(0, rows + 1, g - 1))
        sizes[i] = np.diff(np.concatenate([[0], cuts, [rows]]))
    starts = np.cumsum(sizes, axis=1) - sizes
    lands = np.cumsum(sizes, axis=0) - sizes
    operand = np.arange(g * rows, dtype=np.float32).reshape(g * rows, 1) + 1
    want = np.full((g, cap, 1), -1.0, np.float32)
    for i in range(g):
        for j in range(g):
            chunk = operand[i * rows + starts[i, j] : i * rows + starts[i, j] + sizes[i, j]]
            want[j, lands[i, j] : lands[i, j] + sizes[i, j]] = chunk
    mesh = Mesh(np.asarray(jax.devices()[:g]), ("expert",))

    def per_device(operand, start, size, land):
        out = jnp.full((cap, 1), -1.0)
        return expert_dispatch._emulated_ragged_all_to_all(
            operand, out, start[0], size[0], land[0], ("expert",)
        )

    split = PartitionSpec("expert")
    exchange = jax.shard_map(per_device, mesh=mesh, in_specs=(split,) * 4, out_specs=split)
    got = jax.jit(exchange)(operand, starts, sizes, lands)
    np.testing.assert_array_equal(np.asarray(got).reshape(g, cap, 1), want)


def test_experts_that_do_not_divide_by_the_axis_stay_whole():
    """6 experts on expert=4: replicated, the layer takes the whole-experts path."""
    mesh = expert_mesh((1, 1, 1, 1, 4))
    cfg = dataclasses.replace(config(0), num_experts=6, mesh=mesh, mesh_rules=RULES)
    assert expert_parallel_axes(cfg) == ()
    assert expert_parallel_axes(dataclasses.replace(cfg, num_experts=8)) == ("expert",)


# --------------------------------------------------------------------------------------------
# The mesh axis and its config key.


def test_the_expert_axis_is_in_the_mesh_only_when_set():
    dense = make_mesh(MeshSection(-1, 2, 1, RULES))
    assert tuple(dense.shape) == ("data", "fsdp", "context", "tensor")
    mesh = make_mesh(MeshSection(-1, 1, 2, RULES, expert=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 1, "expert": 2, "tensor": 2}
    assert batch_shards(mesh, RULES) == 4  # data-parallel for everything but the experts
    # Dense weights shard their embed dimension over expert as over fsdp; an expert weight's
    # embed skips it (its expert dimension took it).
    spec = logical_to_spec(("vocab", "embed"), (64, 32), mesh, RULES)
    assert tuple(spec) == ("tensor", ("fsdp", "context", "expert"))  # fsdp, context are 1
    spec = logical_to_spec(("expert", "embed", "mlp"), (8, 32, 16), mesh, RULES)
    assert tuple(spec) == ("expert", None, "tensor")


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((1, 1, 1, 1, 3), r"x expert 3 needs 3 devices, but 8 are present"),
        ((-1, 1, 1, 2, 3), r"x expert 3 does not fit 8 devices"),
    ],
)
def test_a_mesh_the_expert_size_does_not_fit_fails_clearly(sizes, message):
    data, fsdp, tensor, context, expert = sizes
    with pytest.raises(ConfigError, match=message):
        make_mesh(MeshSection(data, fsdp, tensor, RULES, context=context, expert=expert))


@pytest.mark.parametrize("expert", [0, -1])
def test_config_refuses_an_expert_size_below_one(expert):
    from sft_jax import config as config_lib

    raw = base.get_config()
    raw.data.train_files = "train.jsonl"
    raw.mesh.expert = expert
    with pytest.raises(ConfigError, match=r"'mesh.expert' is -?\d+; it must be >= 1"):
        config_lib.parse(raw)


# --------------------------------------------------------------------------------------------
# The TPU compiler.


def lower_layer_gradient(cfg, shape, mesh):
    """The mixture layer's gradient (parameters and input) lowered for abstract bf16 inputs of
    `shape`, parameters and input placed on `mesh` by RULES."""
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    variables = jax.eval_shape(lambda x: MoeMlp(cfg).init(jax.random.key(0), x), x)
    params = nn.meta.unbox(variables)["params"]
    shardings = param_shardings(nn.get_partition_spec(variables)["params"], params, mesh, RULES)
    params = jax.tree.map(lambda a, s: a.update(sharding=s), params, shardings)
    x = x.update(sharding=activation_sharding(mesh, RULES))

    def loss(p, x):
        y, aux = MoeMlp(cfg).apply({"params": p}, x)
        return jnp.sum(y.astype(jnp.float32)) + aux.load_balancing_loss

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x)


# The gather's collectives are XLA's own, on the CPU in every mesh case above; the ragged
# all-to-all is the TPU's own collective, so its compile is the one kept in the default tier.
@pytest.mark.parametrize(
    "dispatch", [pytest.param("all_gather", marks=pytest.mark.slow), "all_to_all"]
)
def test_expert_parallel_layer_compiles_for_tpu(dispatch):
    """Forward and backward of the expert-parallel layer (bf16, fsdp=2 x expert=2 on v5p:2x2x1)
    compiled by the TPU compiler: ragged_dot lowers to its grouped matmul (the ragged-dot
    custom calls), the token gathers and reduce-scatters, or the ragged all-to-alls (both ways,
    in the forward and the backward), to collectives."""
    if tpu.libtpu_missing():
        pytest.skip(f"no TPU compiler: {tpu.libtpu_missing()}")
    devices = tpu.topology_devices("v5p:2x2x1")
    mesh = make_mesh(MeshSection(1, 2, 1, RULES, expert=2), devices)
    cfg = dataclasses.replace(
        config(), dtype="bfloat16", param_dtype="bfloat16", mesh=mesh, mesh_rules=RULES
    )
    cfg = dataclasses.replace(cfg, dispatch=dispatch)
    compiled = lower_layer_gradient(cfg, (4, 128, D), mesh).compile()
    text = compiled.as_text()
    assert "ragged-dot" in text
    if dispatch == "all_gather":
        assert "all-gather" in text and "reduce-scatter" in text
    else:
        assert text.count("ragged-all-to-all(") >= 4, text.count("ragged-all-to-all(")
        assert "reduce-scatter" not in text


def test_two_slices_keep_each_expert_group_inside_a_slice():
    """On a multi-slice hybrid mesh only data spans the slices: the expert axis' every-layer
    collectives stay on the slice's interconnect."""
    if tpu.libtpu_missing():
        pytest.skip(f"no TPU compiler: {tpu.libtpu_missing()}")
    devices = tpu.topology_devices("v5p:2x2x1", num_slices=2)
    mesh = make_mesh(MeshSection(2, -1, 1, RULES, expert=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "expert": 2, "tensor": 1}
    grid = mesh.devices  # [data, fsdp, context, expert, tensor]
    assert {d.slice_index for d in grid.flat} == {0, 1}
    for index in range(2):
        assert len({d.slice_index for d in grid[index].flat}) == 1
