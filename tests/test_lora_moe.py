"""LoRA on a mixture-of-experts layer's experts: per-expert adapters inside the grouped matmuls
equal a per-expert loop (outputs and adapter gradients), on the whole-experts and the
expert-parallel path; the target syntax; PEFT's `target_parameters` layout both ways against
peft itself (ours -> peft, peft -> ours), a merged export, and the QLoRA base of the experts."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from transformers import AutoModelForCausalLM

from configs import base
from sft_jax import lora
from sft_jax.config import MeshSection
from sft_jax.export import export_hf
from sft_jax.model.decoder import Transformer
from sft_jax.model.expert_lora import ExpertLora
from sft_jax.model.moe import MoeConfig, MoeMlp, grouped_swiglu
from sft_jax.training.sharding import activation_sharding, make_mesh, param_shardings
from tests.test_hf_moe import MODEL_TOL, _hf_logits, _load, _save_tiny

RULES = tuple(tuple(r) for r in base.get_config().mesh.rules)
D, F, FS, E, K, R = 16, 8, 12, 8, 2, 3
SCALE = 1.5


def moe_config(**overrides) -> MoeConfig:
    fields = dict(norm_topk_prob=True, lora_scale=SCALE) | overrides
    return MoeConfig(D, F, E, K, **fields)


def setup(cfg: MoeConfig, b: int = 4, t: int = 4):
    """(boxed variables, params, x): a router scaled up so that tokens pick different experts."""
    x = jax.random.normal(jax.random.key(1), (b, t, D), jnp.float32)
    variables = jax.jit(MoeMlp(cfg).init)(jax.random.key(0), x)
    params = nn.meta.unbox(variables)["params"]
    params["router"]["kernel"] = params["router"]["kernel"] * 50.0
    return variables, params, x


@functools.partial(jax.jit, static_argnums=(1, 2))
def random_adapters(params: dict, targets: tuple[str, ...], seed: int = 3) -> dict:
    """Adapters as `lora.init_adapters` makes them, with B random (so they change the output).
    Jitted: op by op, every leaf's shape compiles its own few programs."""
    adapters = lora.init_adapters(params, targets, R, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noise = [
        0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(tree, [x + n for x, n in zip(leaves, noise, strict=True)])


def layer_adapters(params: dict, targets: tuple[str, ...]) -> dict:
    """Adapters for one MoE layer's params (no L axis): made on a 1-layer stack, then unstacked."""
    stacked = {"layers": {"mlp": jax.tree.map(lambda p: p[None], params)}}
    adapters = random_adapters(stacked, targets)
    return jax.tree.map(lambda a: a[0], adapters["layers"]["mlp"])


def reference(cfg: MoeConfig, params: dict, adapters: dict, x: jax.Array) -> jax.Array:
    """Every expert on every token with its own adapters, kept where the token chose it."""
    flat = x.reshape(-1, D)
    probs = jax.nn.softmax(flat @ params["router"]["kernel"], axis=-1)
    top, idx = jax.lax.top_k(probs, K)
    top = top / top.sum(-1, keepdims=True)
    ex, ad = params["experts"], adapters["experts"]
    out = jnp.zeros_like(flat)
    for e in range(E):
        weight = jnp.sum(jnp.where(idx == e, top, 0.0), axis=-1)
        gate_up = SCALE * (flat @ ad["gate_up_proj"]["a"][e]) @ ad["gate_up_proj"]["b"][e]
        gate = flat @ ex["gate_proj"][e] + gate_up[:, :F]
        up = flat @ ex["up_proj"][e] + gate_up[:, F:]
        h = jax.nn.silu(gate) * up
        y = h @ ex["down_proj"][e] + SCALE * (h @ ad["down_proj"]["a"][e]) @ ad["down_proj"]["b"][e]
        out = out + weight[:, None] * y
    return out.reshape(x.shape)


def test_target_syntax_names_experts_only_explicitly():
    """Module globs ("*_proj", the default) leave the experts alone; "experts", PEFT's
    parameter names and "gate_up_proj" name them; a Qwen2-MoE shared expert is a module."""
    _, params, _ = setup(moe_config(shared_expert_intermediate_size=FS))
    stacked = {"layers": {"mlp": jax.tree.map(lambda p: p[None], params)}}
    paths = lambda *targets: {"/".join(p[2:]) for p in lora.target_paths(stacked, targets)}
    shared = {f"shared_expert/{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    both = {"experts/gate_up_proj", "experts/down_proj"}
    assert paths("*_proj") == shared
    assert paths("down_proj") == {"shared_expert/down_proj"}
    assert paths("experts") == both
    assert paths("mlp.experts.gate_up_proj", "experts.down_proj") == both
    assert paths("gate_up_proj") == {"experts/gate_up_proj"}
    assert paths("experts.*", "*_proj") == both | shared
    with pytest.raises(ValueError, match="match no layer kernel"):
        paths("router")
    adapters = lora.init_adapters(stacked, ("experts",), R, jax.random.key(0))
    ad = jax.tree.map(lambda a: a.shape, adapters["layers"]["mlp"]["experts"])
    assert ad == {
        "gate_up_proj": {"a": (1, E, D, R), "b": (1, E, R, 2 * F)},
        "down_proj": {"a": (1, E, F, R), "b": (1, E, R, D)},
    }
    ad = adapters["layers"]["mlp"]["experts"]
    assert not np.any(ad["gate_up_proj"]["b"]) and np.abs(ad["down_proj"]["a"]).max() > 0
    cfg = lora_section(targets=("experts",), dora=True)
    with pytest.raises(ValueError, match="DoRA on experts"):
        lora.make_adapters(stacked, cfg, jax.random.key(0))


def lora_section(**fields):
    defaults = dict(targets=("*_proj",), rank=R, alpha=2.0, rslora=False, dora=False)
    defaults["modules_to_save"] = ()
    return type("LoraCfg", (), defaults | fields)


def test_expert_adapters_equal_per_expert_loop():
    """Outputs, adapter gradients and input gradients of the grouped layer with adapters on
    both expert parameters and the shared expert's projections equal the per-expert loop;
    B = 0 adapters leave the layer unchanged."""
    shared = FS
    cfg = moe_config(shared_expert_intermediate_size=shared)
    _, params, x = setup(cfg)
    targets = ("experts", "*_proj")
    adapters = layer_adapters(params, targets)
    assert "shared_expert" in adapters
    cot = jax.random.normal(jax.random.key(7), x.shape)

    def ours(ad, x):
        return jnp.sum(MoeMlp(cfg).apply({"params": params, "lora": ad}, x)[0] * cot)

    def ref(ad, x):
        y = reference(cfg, params, ad, x)
        sh, sa = params["shared_expert"], ad["shared_expert"]
        proj = lambda n, h: h @ sh[n]["kernel"] + SCALE * (h @ sa[n]["a"]) @ sa[n]["b"]
        h = jax.nn.silu(proj("gate_proj", x)) * proj("up_proj", x)
        gate = jax.nn.sigmoid(x @ params["shared_expert_gate"]["kernel"])
        y = y + gate * proj("down_proj", h)
        return jnp.sum(y * cot)

    # One program each for the value and the gradients (the per-expert loop is slow to compile).
    value, got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(adapters, x)
    ref_value, want = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(adapters, x)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5), got, want)
    assert np.abs(got[0]["experts"]["gate_up_proj"]["a"]).max() > 1e-3
    fresh = lora.init_adapters(
        {"layers": {"mlp": jax.tree.map(lambda p: p[None], params)}},
        ("experts",),
        R,
        jax.random.key(0),
    )
    fresh = jax.tree.map(lambda a: a[0], fresh["layers"]["mlp"])
    apply = jax.jit(lambda variables: MoeMlp(cfg).apply(variables, x)[0])
    plain = apply({"params": params})
    np.testing.assert_array_equal(apply({"params": params, "lora": fresh}), plain)


def per_assignment(tree: dict, chosen: jax.Array) -> dict:
    """Each leaf [E, ...] gathered per (token, choice): [N, K, ...], numpy."""
    return jax.tree.map(lambda v: np.asarray(v)[np.asarray(chosen)], tree)


def _low_rank(adapters: dict, h: np.ndarray, name: str) -> np.ndarray:
    """SCALE * (h @ a) @ b per assignment, h [N, K, in]."""
    ad = adapters[name]
    return SCALE * np.einsum("nkr,nkro->nko", np.einsum("nki,nkir->nkr", h, ad["a"]), ad["b"])


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_grouped_layouts_agree_with_adapters(platform):
    """The CPU's padded block layout and ragged_dot's (what TPU and GPU run; dense but exact on
    the CPU) give the same adapted outputs, including an adapter on down_proj alone."""
    cfg = moe_config()
    _, params, x = setup(cfg)
    ex = params["experts"]
    adapters = layer_adapters(params, ("experts",))["experts"]
    flat, chosen = x.reshape(-1, D), jax.random.randint(jax.random.key(5), (16, K), 0, E)
    w, x = per_assignment(ex, chosen), np.asarray(flat)  # each (token, choice)'s expert's
    for names in (("gate_up_proj", "down_proj"), ("down_proj",)):
        adapted = ExpertLora({n: adapters[n] for n in names}, SCALE)
        run = jax.jit(functools.partial(grouped_swiglu, platform=platform, lora=adapted))
        ys = run(flat, chosen, ex["gate_proj"], ex["up_proj"], ex["down_proj"])
        low = functools.partial(_low_rank, per_assignment(adapters, chosen))
        gate_up = low(np.broadcast_to(x[:, None], (16, K, D)), "gate_up_proj")
        if "gate_up_proj" not in names:
            gate_up = np.zeros_like(gate_up)
        gate = np.einsum("nd,nkdf->nkf", x, w["gate_proj"]) + gate_up[..., :F]
        up = np.einsum("nd,nkdf->nkf", x, w["up_proj"]) + gate_up[..., F:]
        h = gate / (1 + np.exp(-gate)) * up
        want = np.einsum("nkf,nkfd->nkd", h, w["down_proj"]) + low(h, "down_proj")
        np.testing.assert_allclose(ys, want, atol=1e-5, rtol=1e-5)


def test_lora_dropout_acts_only_in_training():
    """With a dropout rng the adapters' inputs are dropped (a different output, the same
    with the same rng); without one the layer is deterministic and equals dropout 0."""
    cfg = moe_config(lora_dropout=0.5)
    _, params, x = setup(cfg)
    adapters = layer_adapters(params, ("experts",))
    variables = {"params": params, "lora": adapters}

    @functools.partial(jax.jit, static_argnums=0)
    def apply(c, rngs=None):
        return MoeMlp(c).apply(variables, x, rngs=rngs)[0]

    clean = apply(moe_config())
    np.testing.assert_array_equal(apply(cfg), clean)
    dropped = apply(cfg, rngs={"dropout": jax.random.key(0)})
    assert np.abs(dropped - clean).max() > 1e-3
    np.testing.assert_array_equal(dropped, apply(cfg, rngs={"dropout": jax.random.key(0)}))


@pytest.mark.parametrize("dispatch", ["all_gather", "all_to_all"])
def test_expert_parallel_with_adapters_equals_unsharded(dispatch):
    """Mesh expert=4 x data=2: adapters sharded over the expert axis like the kernels; outputs
    and adapter gradients equal the unsharded layer's, whichever way the tokens travel."""
    cfg = moe_config(shared_expert_intermediate_size=FS, dispatch=dispatch)
    variables, params, x = setup(cfg, b=8)
    adapters = layer_adapters(params, ("experts", "*_proj"))

    def run(c, ad, x):
        def loss(ad, x):
            y, aux = MoeMlp(c).apply({"params": params_on(c), "lora": ad}, x)
            return jnp.sum(jnp.sin(y)) + aux.load_balancing_loss, y

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(ad, x)

    mesh = make_mesh(MeshSection(2, 1, 1, RULES, context=1, expert=4), jax.devices())
    sharded = dataclasses.replace(cfg, mesh=mesh, mesh_rules=RULES)
    shardings = param_shardings(nn.get_partition_spec(variables)["params"], params, mesh, RULES)
    placed = jax.device_put(params, shardings)
    params_on = lambda c: placed if c.mesh is not None else params
    kernel_spec = shardings["experts"]["gate_proj"].spec
    assert kernel_spec[0] == "expert"
    ad_specs = {
        "experts": {
            n: {k: NamedSharding(mesh, PartitionSpec(kernel_spec[0])) for k in ("a", "b")}
            for n in adapters["experts"]
        },
        "shared_expert": jax.tree.map(
            lambda _: NamedSharding(mesh, PartitionSpec()), adapters["shared_expert"]
        ),
    }
    want = jax.jit(functools.partial(run, cfg))(adapters, x)
    step = jax.jit(functools.partial(run, sharded))
    args = (jax.device_put(adapters, ad_specs), jax.device_put(x, activation_sharding(mesh, RULES)))
    assert "all_gather" in str(jax.make_jaxpr(step)(*args))  # the expert-parallel path
    got = step(*args)
    grads = got[0][0]["experts"]["down_proj"]["b"]
    assert {s.data.shape[0] for s in grads.addressable_shards} == {E // 4}
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5), got, want)


# --------------------------------------------------------------------------------------------
# Whole Hugging Face models: PEFT both ways, merged export, QLoRA.

ALPHA = 4.0


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """family -> (directory, transformers model), each tiny random model saved once."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[family] = (path, _save_tiny(family, path))
        return cache[family]

    return get


def _tokens():
    tokens = np.random.default_rng(0).integers(1, 128, size=(2, 12))
    return tokens, np.broadcast_to(np.arange(12), tokens.shape)


def _ours(config, params, adapters, tokens, positions, scale=ALPHA / R):
    """Our logits with the adapters applied (un-merged), float32."""
    config = dataclasses.replace(config, lora_scale=scale)
    variables = {"params": params, "lora": adapters}
    logits = jax.jit(Transformer(config).apply)(variables, tokens, positions, np.ones_like(tokens))
    return np.asarray(logits)


def _peft_logits(path, adapter_dir, tokens):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return _hf_logits(peft.PeftModel.from_pretrained(model, adapter_dir).eval(), tokens)


@pytest.mark.parametrize(
    "family,targets",
    [("qwen3_moe", ("experts",)), ("qwen2_moe", ("*_proj", "experts"))],
)
def test_peft_export_import_and_merged_export(family, targets, saved_models, tmp_path, stories_dir):
    """Our adapters on the experts (Qwen3-MoE: only there, so no target_modules at all;
    Qwen2-MoE: also on attention and the shared expert, named mlp.shared_expert.*) written for
    PEFT give peft's logits equal to ours; reading them back gives the same adapters; the
    merged HF export gives the adapted model's logits."""
    path, model = saved_models(family)
    config, params = _load(path)
    adapters = random_adapters(params, targets)
    tokens, positions = _tokens()
    ours = _ours(config, params, adapters, tokens, positions)
    assert np.abs(ours - _hf_logits(model, tokens)).max() > 1e-2  # the adapters matter

    out = tmp_path / "adapter"
    cfg = lora.peft_config(adapters, rank=R, alpha=ALPHA, rslora=False, dropout=0.1, base=str(path))
    lora.write_peft_adapter(str(out), adapters, cfg)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert written["lora_dropout"] == 0.0  # PEFT refuses dropout on parameters
    if family == "qwen2_moe":
        from safetensors.numpy import load_file

        keys = load_file(str(out / "adapter_model.safetensors"))
        assert "base_model.model.model.layers.1.mlp.shared_expert.gate_proj.lora_A.weight" in keys
    np.testing.assert_allclose(_peft_logits(path, out, tokens), ours, atol=MODEL_TOL)

    back = lora.read_peft_adapter(str(out), params)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)

    merged = lora.merge(params, adapters, ALPHA / R)
    export_hf(
        merged,
        config,
        str(tmp_path / "merged"),
        tokenizer_dir=str(stories_dir),
        source_model_dir=str(path),
    )
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager"
    )
    np.testing.assert_allclose(_hf_logits(reloaded.eval(), tokens), ours, atol=MODEL_TOL)


@pytest.mark.parametrize(
    "parameters",
    [("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), ("experts.down_proj",)],
)
def test_adapter_made_by_peft_imports(parameters, saved_models, tmp_path):
    """An adapter peft itself makes on the fused expert parameters (random A and B; nested
    wrappers when both are targeted) reads into ours with peft's logits."""
    path, base_model = saved_models("olmoe")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_cfg = peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=["k_proj"],
        target_parameters=list(parameters),
        init_lora_weights=False,
    )
    peft.get_peft_model(model, peft_cfg).save_pretrained(tmp_path)
    tokens, positions = _tokens()
    theirs = _peft_logits(path, tmp_path, tokens)
    assert np.abs(theirs - _hf_logits(base_model, tokens)).max() > 1e-2  # B is not zero
    config, params = _load(path)
    adapters = lora.read_peft_adapter(str(tmp_path), params)
    assert set(adapters["layers"]["mlp"]["experts"]) == {p.split(".")[-1] for p in parameters}
    ours = _ours(config, params, adapters, tokens, positions)
    np.testing.assert_allclose(ours, theirs, atol=MODEL_TOL)


def test_qlora_experts_are_quantized_and_train_only_adapters(saved_models):
    """NF4 base: the stacked expert kernels are stored as codes (the experts shrink more than
    6x from float32), each scanned layer dequantises its own, and the loss equals that of the
    dequantised dense base; in the layer, adapter gradients equal the dense base's too."""
    path, _ = saved_models("qwen3_moe")
    config, params = _load(path)
    config = dataclasses.replace(config, lora_scale=ALPHA / R)
    # Jitted, as the trainer runs it: op by op, every kernel shape compiles its own programs.
    frozen = jax.jit(lambda p: lora.quantize_kernels(p, "nf4", jnp.float32))(params)
    dequantize = jax.jit(lora.dequantize)
    experts = frozen["layers"]["mlp"]["experts"]
    assert all(isinstance(q, lora.Quantized) for q in experts.values()) and len(experts) == 3
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    assert nbytes(experts) * 6 < nbytes(params["layers"]["mlp"]["experts"])
    adapters = random_adapters(params, ("experts", "q_proj"))
    tokens, positions = _tokens()

    @jax.jit
    def loss(adapters, base):
        variables = {"params": base, "lora": adapters}
        logits = Transformer(config).apply(variables, tokens, positions, np.ones_like(tokens))
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    quantized = loss(adapters, frozen)
    np.testing.assert_allclose(quantized, loss(adapters, dequantize(frozen)), rtol=1e-6)
    assert abs(float(quantized) - float(loss(adapters, params))) > 1e-6  # NF4 is not exact

    cfg = moe_config()
    _, layer, x = setup(cfg)
    layer_frozen = {
        **layer,
        "experts": jax.jit(lambda ex: {n: lora.quantize(v, "nf4") for n, v in ex.items()})(
            layer["experts"]
        ),
    }
    layer_adapted = layer_adapters(layer, ("experts",))
    apply = lambda ad, p: jnp.sum(jnp.sin(MoeMlp(cfg).apply({"params": p, "lora": ad}, x)[0]))
    grad = jax.jit(jax.grad(apply))  # the base is a constant: gradients go to the adapters only
    got, want = (
        grad(layer_adapted, layer_frozen),
        grad(layer_adapted, dequantize(layer_frozen)),
    )
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5), got, want)
    assert np.abs(got["experts"]["gate_up_proj"]["a"]).max() > 1e-4


@pytest.mark.slow  # a whole run and both exports; the adapters' math is checked above
def test_lora_run_on_experts_trains_and_exports_for_peft(tmp_path, stories_dir):
    """A Qwen3-MoE checkpoint trained with adapters on the experts and q_proj (expert-parallel
    mesh, adapter dropout, NF4 base): the loss falls; the exported PEFT adapter applied by peft
    to the original base, and the merged HF export, give the logits of our merged model."""
    from sft_jax import export
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.train import train_and_evaluate
    from sft_jax.training.metrics import read_metrics
    from tests.test_hf_moe import _hf_config

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    config = _hf_config("qwen3_moe", vocab_size=512, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    c = load_config_file("configs/tiny.py")
    c.model.path = str(base_dir)
    c.mesh.expert = 2
    c.lora.update(
        enabled=True,
        rank=4,
        base_dtype="float32",
        base_quant="nf4",
        targets=("q_proj", "experts"),
        dropout=0.1,
    )
    c.optim.learning_rate = 3e-2
    c.train.update(max_steps=6, log_every=1)
    c.eval.generate_examples = 0
    c.checkpoint.every_steps = 0
    workdir = tmp_path / "run"
    train_and_evaluate(parse(c), str(workdir))
    records = [r for r in read_metrics(str(workdir)) if "loss" in r and "kind" not in r]
    assert records[-1]["loss"] < records[0]["loss"] - 0.1, [r["loss"] for r in records]

    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "ad"), "--peft"]) == 0
    run = export.load_workdir(str(workdir))
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 12))
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    ours = jax.jit(Transformer(run.model_config).apply)(
        {"params": run.params}, tokens, positions, np.ones_like(tokens)
    )
    np.testing.assert_allclose(
        _peft_logits(base_dir, tmp_path / "ad", tokens), np.asarray(ours), atol=MODEL_TOL
    )
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    np.testing.assert_allclose(_hf_logits(merged.eval(), tokens), np.asarray(ours), atol=MODEL_TOL)
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    assert np.abs(_hf_logits(base, tokens) - np.asarray(ours)).max() > 1e-2  # trained adapters
