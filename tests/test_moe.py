"""The mixture-of-experts layer: the grouped (ragged_dot) computation equals a per-expert loop,
outputs match transformers' sparse MoE blocks, the router statistics match transformers'
load-balancing loss, and the layer gives the same result sharded over the 8 fake devices."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from configs import base
from sft_jax.config import MeshSection
from sft_jax.model.moe import MoeConfig, MoeMlp, load_balancing_loss, router_aux
from sft_jax.training.sharding import make_mesh, param_shardings

D, F, FS, E, K = 16, 8, 12, 6, 2


def tiny(norm: bool = True, shared: int = 0, experts: int = E) -> MoeConfig:
    return MoeConfig(D, F, experts, K, norm_topk_prob=norm, shared_expert_intermediate_size=shared)


def init(cfg: MoeConfig, x: jax.Array, seed: int = 0) -> dict:
    """Plain-array parameters, with a router scaled up so that routing differs between tokens."""
    params = nn.meta.unbox(jax.jit(MoeMlp(cfg).init)(jax.random.key(seed), x))["params"]
    params["router"]["kernel"] = params["router"]["kernel"] * 50.0
    return params


def inputs(b: int = 3, t: int = 5, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)


# --------------------------------------------------------------------------------------------
# The grouped computation against a per-expert loop.


def reference(cfg: MoeConfig, params: dict, x: jax.Array) -> jax.Array:
    """Every expert applied to every token, kept where the token chose it: the obvious MoE."""
    flat = x.reshape(-1, D)
    probs = jax.nn.softmax(flat @ params["router"]["kernel"], axis=-1)
    top, idx = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        top = top / top.sum(-1, keepdims=True)
    ex = params["experts"]
    out = jnp.zeros_like(flat)
    for e in range(cfg.num_experts):
        weight = jnp.sum(jnp.where(idx == e, top, 0.0), axis=-1)  # [N], 0 where not chosen
        h = jax.nn.silu(flat @ ex["gate_proj"][e]) * (flat @ ex["up_proj"][e])
        out = out + weight[:, None] * (h @ ex["down_proj"][e])
    if cfg.shared_expert_intermediate_size:
        sh = params["shared_expert"]
        h = jax.nn.silu(flat @ sh["gate_proj"]["kernel"]) * (flat @ sh["up_proj"]["kernel"])
        gate = jax.nn.sigmoid(flat @ params["shared_expert_gate"]["kernel"])
        out = out + gate * (h @ sh["down_proj"]["kernel"])
    return out.reshape(x.shape)


@pytest.mark.parametrize("norm,shared", [(True, 0), (False, 0), (False, FS)])
def test_grouped_equals_per_expert_loop(norm, shared):
    cfg = tiny(norm, shared)
    x = inputs()
    params = init(cfg, x)
    cot = jax.random.normal(jax.random.key(7), x.shape)

    def ours(p, x):
        y = MoeMlp(cfg).apply({"params": p}, x)[0]
        return jnp.sum(y * cot), y

    def ref(p, x):
        y = reference(cfg, p, x)
        return jnp.sum(y * cot), y

    # One program each for the outputs and the gradients (the loop op by op: dozens).
    grads = lambda f: jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(params, x)
    got, y = grads(ours)
    want, y_ref = grads(ref)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(got[0]["router"]["kernel"]).sum()) > 0  # the router learns
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4), got, want)


def test_unused_experts_give_empty_groups():
    """Routing to a subset of experts (empty groups) still gives the loop's answer."""
    cfg = tiny(True, 0, experts=8)
    x = inputs(1, 2)  # 2 tokens x 2 choices: at most 4 of 8 experts used
    params = init(cfg, x)
    y, aux = jax.jit(MoeMlp(cfg).apply)({"params": params}, x)
    assert int((aux.expert_counts == 0).sum()) >= 4
    want = jax.jit(reference, static_argnums=0)(cfg, params, x)
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Parity with transformers' sparse MoE blocks (fused expert weights: gate_up_proj [E, 2F, D],
# down_proj [E, D, F]; router weight [E, D]).


def hf_block(family: str, norm: bool):
    torch.manual_seed(0)
    common = {"hidden_size": D, "num_experts_per_tok": K, "hidden_act": "silu"}
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m

        conf = m.Qwen3MoeConfig(
            **common, moe_intermediate_size=F, num_experts=E, norm_topk_prob=norm
        )
        block = m.Qwen3MoeSparseMoeBlock(conf)
    elif family == "olmoe":
        from transformers.models.olmoe import modeling_olmoe as m

        conf = m.OlmoeConfig(**common, intermediate_size=F, num_experts=E, norm_topk_prob=norm)
        block = m.OlmoeSparseMoeBlock(conf)
    elif family == "mixtral":
        from transformers.models.mixtral import modeling_mixtral as m

        conf = m.MixtralConfig(**common, intermediate_size=F, num_local_experts=E)
        block = m.MixtralSparseMoeBlock(conf)
    else:
        from transformers.models.qwen2_moe import modeling_qwen2_moe as m

        conf = m.Qwen2MoeConfig(
            **common,
            moe_intermediate_size=F,
            num_experts=E,
            norm_topk_prob=norm,
            shared_expert_intermediate_size=FS,
        )
        block = m.Qwen2MoeSparseMoeBlock(conf)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0.0, 1.0 if name == "gate.weight" else 0.2)
    return block.eval()


def hf_to_flax(block) -> dict:
    """The layer's parameter tree from a transformers block's weights."""
    sd = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    gate_up = sd["experts.gate_up_proj"]  # [E, 2F, D]: gate rows first, then up
    f = gate_up.shape[1] // 2
    params = {
        "router": {"kernel": sd["gate.weight"].T},
        "experts": {
            "gate_proj": gate_up[:, :f].transpose(0, 2, 1),
            "up_proj": gate_up[:, f:].transpose(0, 2, 1),
            "down_proj": sd["experts.down_proj"].transpose(0, 2, 1),
        },
    }
    if "shared_expert_gate.weight" in sd:
        params["shared_expert"] = {
            n: {"kernel": sd[f"shared_expert.{n}.weight"].T}
            for n in ("gate_proj", "up_proj", "down_proj")
        }
        params["shared_expert_gate"] = {"kernel": sd["shared_expert_gate.weight"].T}
    return jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize(
    "family,norm",
    [  # every family once in the default tier, with both norm_topk_prob values among them
        ("qwen3_moe", True),
        pytest.param("qwen3_moe", False, marks=pytest.mark.slow),
        ("olmoe", False),
        ("mixtral", True),
        ("qwen2_moe", False),
        pytest.param("qwen2_moe", True, marks=pytest.mark.slow),
    ],
)
def test_matches_transformers_block(family, norm):
    block = hf_block(family, norm)
    shared = FS if family == "qwen2_moe" else 0
    cfg = tiny(norm, shared)
    x = np.random.default_rng(0).standard_normal((2, 7, D)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
    got, aux = jax.jit(MoeMlp(cfg).apply)({"params": hf_to_flax(block)}, jnp.asarray(x))
    assert int((aux.expert_counts > 0).sum()) >= E - 1  # the routing really spreads
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Router statistics.


def hf_load_balancing_loss(logits: list[np.ndarray], mask: np.ndarray | None) -> float:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gate = tuple(torch.tensor(lg) for lg in logits)
    attn = None if mask is None else torch.from_numpy(mask.astype(np.int64))
    return float(load_balancing_loss_func(gate, E, K, attn))


def masks(b: int, t: int) -> np.ndarray:
    mask = np.ones((b, t), bool)
    mask[0, -2:] = False  # right padding
    mask[1, :1] = False  # left padding
    return mask


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(masked):
    cfg = tiny()
    x = inputs(3, 5)
    params = init(cfg, x)
    mask = masks(3, 5) if masked else None
    _, aux = jax.jit(MoeMlp(cfg).apply)({"params": params}, x, mask if masked else None)
    logits = np.asarray(x.reshape(-1, D) @ params["router"]["kernel"])
    np.testing.assert_allclose(
        aux.load_balancing_loss, hf_load_balancing_loss([logits], mask), 1e-5
    )
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    keep = np.ones(15, bool) if mask is None else mask.reshape(-1)
    np.testing.assert_allclose(aux.z_loss, np.mean(lse[keep] ** 2), rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_layers_combine_as_transformers(masked):
    """Summed per-layer statistics reproduce transformers' multi-layer loss (not the mean)."""
    rng = np.random.default_rng(3)
    logits = [rng.standard_normal((12, E)).astype(np.float32) * 2 for _ in range(3)]
    mask = masks(3, 4) if masked else None
    flat = None if mask is None else jnp.asarray(mask.reshape(-1))
    auxes = []
    for lg in logits:
        probs = jax.nn.softmax(jnp.asarray(lg), axis=-1)
        experts = jax.lax.top_k(probs, K)[1]
        auxes.append(router_aux(jnp.asarray(lg), probs, experts, flat))
    total = jax.tree.map(lambda *a: sum(a), *auxes)
    got = load_balancing_loss(total.expert_counts, total.router_prob_sum, total.tokens, E)
    np.testing.assert_allclose(got, hf_load_balancing_loss(logits, mask), rtol=1e-5)


def test_counts_cover_unmasked_tokens():
    cfg = tiny(False, FS)
    x = inputs(3, 5)
    params = init(cfg, x)
    mask = masks(3, 5)
    y_all, aux_all = jax.jit(MoeMlp(cfg).apply)({"params": params}, x)
    y, aux = jax.jit(MoeMlp(cfg).apply)({"params": params}, x, jnp.asarray(mask))
    assert float(aux_all.expert_counts.sum()) == 15 * K
    assert float(aux.expert_counts.sum()) == mask.sum() * K
    assert float(aux.tokens) == mask.sum()
    assert np.all(np.asarray(aux.expert_counts) <= np.asarray(aux_all.expert_counts))
    np.testing.assert_array_equal(y, y_all)  # the mask only affects the statistics


# --------------------------------------------------------------------------------------------
# Sharded.

RULES = tuple(tuple(r) for r in base.get_config().mesh.rules)


@functools.partial(jax.jit, static_argnums=0)
def run(cfg: MoeConfig, p: dict, x: jax.Array, m: jax.Array):
    """(gradients w.r.t. p and x, (y, aux)) of a loss on the output and the balance loss;
    module-level so that the unsharded reference compiles once for every case."""

    def loss(p, x):
        y, aux = MoeMlp(cfg).apply({"params": p}, x, m)
        return jnp.sum(y * y) + aux.load_balancing_loss, (y, aux)

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(p, x)


@pytest.mark.parametrize("on_mesh", [False, True])
@pytest.mark.parametrize("expert_axes", [None, "fsdp", ("data", "fsdp")])
def test_sharded_equals_unsharded(expert_axes, on_mesh):
    """Outputs, statistics and gradients on a data=2 x fsdp=4 mesh equal one device's, with the
    experts replicated or split, and the tokens routed per device (`on_mesh`: the config carries
    the mesh) or left to XLA."""
    cfg = tiny(True, FS, experts=8)
    x = inputs(8, 4)
    mask = jnp.asarray(np.tile(masks(2, 4), (4, 1)))
    variables = jax.jit(MoeMlp(cfg).init)(jax.random.key(0), x)
    params = nn.meta.unbox(variables)["params"]
    params["router"]["kernel"] = params["router"]["kernel"] * 50.0
    want = run(cfg, params, x, mask)  # one compile for every case
    rules = (*RULES, ("expert", expert_axes))
    mesh = make_mesh(MeshSection(data=2, fsdp=4, tensor=1, rules=rules))
    specs = nn.get_partition_spec(variables)["params"]
    shardings = param_shardings(specs, params, mesh, rules)
    if expert_axes is not None:
        assert shardings["experts"]["gate_proj"].spec[0] == expert_axes
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    sharded_cfg = dataclasses.replace(cfg, mesh=mesh, mesh_rules=rules) if on_mesh else cfg
    args = (
        jax.device_put(params, shardings),
        jax.device_put(x, batch),
        jax.device_put(mask, batch),
    )
    step = functools.partial(run, sharded_cfg)
    # With the mesh in the config each device routes its own tokens (shard_map); without, XLA.
    assert ("shard_map" in str(jax.make_jaxpr(step)(*args))) == on_mesh
    got = step(*args)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4), got, want)
