"""Gemma 4 (text) from and to Hugging Face on tiny random models built with transformers: the
config read as transformers reads it; logits, packed rows and KV-cache greedy generation equal
transformers' with per-layer inputs, K/V sharing, double-wide MLPs, sliding and full layers of
different head shapes; exports (Gemma4ForCausalLM, and Gemma4ForConditionalGeneration with its
towers copied through) load back in transformers; LoRA round-trips through PEFT; the
mixture-of-experts block (its router's own scales, experts beside the dense MLP) from and to
transformers; what we do not compute is refused naming the file and the field."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma4Config, Gemma4TextConfig
from transformers.models.gemma4 import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

from sft_jax import hf, lora
from sft_jax.export import export_hf
from sft_jax.model.decode import greedy_generate
from sft_jax.model.decoder import Transformer, count_params

MODEL_TOL = 1e-4
SLIDING, FULL = "sliding_attention", "full_attention"
TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=4,  # layers 2 and 3 reuse the K/V of layers 0 (sliding) and 1 (full)
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    global_head_dim=16,  # full layers: their own head dim, RoPE on a quarter of its pairs
    layer_types=[SLIDING, FULL, SLIDING, FULL],
    sliding_window=5,
    num_kv_shared_layers=2,
    use_double_wide_mlp=True,
    hidden_size_per_layer_input=4,
    vocab_size_per_layer_input=96,
    final_logit_softcapping=20.0,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)

# The mixture-of-experts block (enable_moe_block): 4 experts, 2 per token, beside the dense MLP.
MOE = dict(TINY, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=12)
MOE_SCALES = ("layernorm_1.weight", "layernorm_2.weight", "router.scale", "per_expert_scale")


def _randomise(model, seed=0):
    """Weights off init: norm scales around 1 (applied as w), layer scalars not 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, value in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("layer_scalar"):
                value.copy_(0.5 + torch.rand_like(value))
            elif name.endswith(("norm.weight", *MOE_SCALES)):
                value.copy_(1.0 + 0.3 * torch.randn_like(value))
            elif value.is_floating_point() and "inv_freq" not in name and "embed_scale" not in name:
                value.copy_(0.15 * torch.randn_like(value))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma4")
    model = _randomise(Gemma4ForCausalLM(Gemma4TextConfig(**TINY)))
    model.save_pretrained(path)
    return path, model


def _load(path):
    config = hf.load_model_config(str(path), dtype="float32", param_dtype="float32", remat="none")
    return config, hf.load_params(str(path), config)


@pytest.fixture(scope="module")
def loaded(saved):
    return _load(saved[0])


@functools.partial(jax.jit, static_argnums=0)
def _jitted(config, variables, tokens, positions, segment_ids):
    return Transformer(config).apply(variables, tokens, positions, segment_ids)


def _apply(config, params, tokens, positions, segment_ids, adapters=None):
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    return np.asarray(_jitted(config, variables, tokens, positions, segment_ids))


def _hf_logits(model, tokens, positions=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.asarray(tokens)),
            position_ids=None if positions is None else torch.from_numpy(np.asarray(positions)),
        )
    return out.logits.float().numpy()


def _tokens(batch=2, length=14, seed=0):
    return np.random.default_rng(seed).integers(1, TINY["vocab_size"], size=(batch, length))


def test_config_read_as_transformers_reads_it(saved, loaded):
    path, model = saved
    config, params = loaded
    hf.check_checkpoint(str(path), config)  # preflight: every tensor and shape as expected
    reference = model.config
    g = config.gemma4
    assert config.local_layers == tuple(t == SLIDING for t in reference.layer_types)
    assert config.period == tuple(reference.layer_types)
    for i in range(config.num_layers):  # per-layer head dims as transformers resolves them
        attention = model.model.layers[i].self_attn
        assert (g.global_head_dim if reference.layer_types[i] == FULL else config.head_dim) == (
            attention.head_dim
        )
    assert g.kv_shared_layers == 2 and g.double_wide_mlp and g.per_layer_input_size == 4
    assert g.global_rotary_factor == 0.25 and config.rope_theta == 1e6
    assert config.local_rope_theta == 1e4 and config.final_softcap == 20.0
    assert config.tie_embeddings and config.query_scale == 1.0 and not config.norm_offset
    # layer_scalar is a buffer in transformers, a (trainable) parameter here: one per layer.
    assert count_params(params) == model.num_parameters() + config.num_layers
    assert "k_proj" not in params["layers"]["layer_2"]["attn"]
    assert params["layers"]["layer_3"]["mlp"]["up_proj"]["kernel"].shape == (1, 32, 80)


def test_config_without_per_layer_config_derives_the_full_layers_shape(tmp_path):
    """A file without `per_layer_config` (transformers derives it from global_head_dim and,
    with attention_k_eq_v, num_global_key_value_heads); defaults for omitted fields."""
    raw = {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "num_hidden_layers": 7,
        "hidden_size": 64,
        "attention_k_eq_v": True,
        "num_global_key_value_heads": 1,
        "global_head_dim": 32,
        "use_bidirectional_attention": "vision",  # only image tokens: text stays causal
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = hf.load_model_config(
        str(tmp_path), dtype="float32", param_dtype="float32", remat="none"
    )
    fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
    reference = Gemma4TextConfig(**fields)
    assert config.period == tuple(reference.layer_types)  # every 6th layer full, the last too
    assert config.period[-1] == FULL and config.period[5] == FULL
    full = reference.per_layer_config[5]
    assert (config.gemma4.global_head_dim, config.gemma4.global_kv_heads) == (
        full.head_dim,
        full.num_key_value_heads,
    )
    assert config.gemma4.k_eq_v and config.head_dim == reference.per_layer_config[0].head_dim
    assert config.sliding_window == reference.sliding_window
    assert config.gemma4.per_layer_input_size == reference.hidden_size_per_layer_input
    assert config.vocab_size == reference.vocab_size


def test_logits_and_packing_match_transformers(saved, loaded):
    """Logits (row 1 at offset positions); a packed row gives each example transformers'
    logits for it alone, through the sliding window, the K/V-sharing layers and the per-layer
    inputs."""
    _, model = saved
    config, params = loaded
    tokens = _tokens()
    positions = np.stack([np.arange(14), np.arange(14) + 9])
    ours = _apply(config, params, tokens, positions, np.ones_like(tokens))
    expected = _hf_logits(model, tokens, positions)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(ours, expected, atol=MODEL_TOL)

    a, b, c = tokens[0, :8], tokens[1, :3], tokens[1, 4:13]
    packed = np.concatenate([a, b, c, [0, 0]])[None]
    packed_pos = np.concatenate([np.arange(8), np.arange(3), np.arange(9), [0, 0]])[None]
    segments = np.asarray([[1] * 8 + [2] * 3 + [3] * 9 + [0] * 2])
    logits = _apply(config, params, packed, packed_pos, segments)
    np.testing.assert_allclose(logits[:, :8], _hf_logits(model, a[None]), atol=MODEL_TOL)
    np.testing.assert_allclose(logits[:, 8:11], _hf_logits(model, b[None]), atol=MODEL_TOL)
    np.testing.assert_allclose(logits[:, 11:20], _hf_logits(model, c[None]), atol=MODEL_TOL)


@pytest.mark.slow  # compiles prefill and decode steps
def test_greedy_generation_matches_transformers(saved, loaded):
    """The KV cache holds only the non-sharing layers' K/V, each with its own head shape;
    prompts longer than the window and shorter share a batch."""
    _, model = saved
    config, params = loaded
    prompts = [[5, 17, 90, 3, 42, 11, 2, 80, 64, 33, 1], [7, 8]]
    ours = greedy_generate(Transformer(config), params, prompts, max_new_tokens=8, stop_ids=[])
    for prompt, generated in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8
            )
        assert generated == out[0, len(prompt) :].tolist()


def test_export_loads_back_in_transformers(saved, loaded, tmp_path, stories_dir):
    path, model = saved
    config, params = loaded
    out = tmp_path / "out"
    export_hf(params, config, str(out), tokenizer_dir=str(stories_dir), source_model_dir=str(path))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded, Gemma4ForCausalLM)
    for (name, x), y in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name
    tokens = _tokens(seed=1)
    np.testing.assert_allclose(
        _hf_logits(reloaded, tokens),
        _apply(config, params, tokens, np.tile(np.arange(14), (2, 1)), np.ones_like(tokens)),
        atol=MODEL_TOL,
    )


def test_k_eq_v_full_layers_without_per_layer_inputs(tmp_path):
    """attention_k_eq_v: full layers have their own kv heads and no v_proj (their values are
    the key projection); no per-layer inputs, no K/V sharing, no softcap."""
    fields = dict(
        TINY,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        final_logit_softcapping=None,
    )
    model = _randomise(Gemma4ForCausalLM(Gemma4TextConfig(**fields)), seed=2)
    model.save_pretrained(tmp_path)
    config, params = _load(tmp_path)
    assert config.gemma4.k_eq_v and config.gemma4.global_kv_heads == 1
    assert "v_proj" not in params["layers"]["layer_1"]["attn"]
    assert "per_layer_inputs" not in params
    tokens = _tokens(seed=2)
    ours = _apply(config, params, tokens, np.tile(np.arange(14), (2, 1)), np.ones_like(tokens))
    np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=MODEL_TOL)


@pytest.mark.slow  # compiles two backward passes
def test_per_layer_remat_gives_the_same_gradients(loaded):
    """remat checkpoints each Gemma 4 layer (not the one scan step that holds them all); the
    loss and gradients are those without it."""
    config, params = loaded
    tokens = _tokens(seed=5)
    positions = np.tile(np.arange(14), (2, 1))

    def grads(remat):
        c = dataclasses.replace(config, remat=remat)

        def loss(p):
            logits = Transformer(c).apply({"params": p}, tokens, positions, np.ones_like(tokens))
            return jax.nn.logsumexp(logits, axis=-1).mean()

        return jax.jit(jax.value_and_grad(loss))(params)

    reference = grads("none")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        grads("full"),
        reference,
    )


def _random_adapters(params, seed=0, targets=lora.ALL_LINEAR):
    adapters = lora.init_adapters(params, targets, 4, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, noisy)


@pytest.mark.slow  # compiles the forward with adapters; loads PEFT
def test_lora_peft_names_logits_and_round_trip(saved, loaded, tmp_path):
    """LoRA on every projection: PEFT's names per HF layer (the K/V-sharing layers have no
    k_proj/v_proj adapters), our logits equal PEFT's on the transformers model, and the
    adapter reads back identically."""
    import peft

    path, _ = saved
    config, params = loaded
    adapters = _random_adapters(params)
    peft_config = lora.peft_config(
        adapters, rank=4, alpha=8.0, rslora=False, dropout=0.0, base=str(path)
    )
    assert set(peft_config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    out = str(tmp_path / "adapter")
    period = len(config.period)
    lora.write_peft_adapter(out, adapters, peft_config, period=period)
    names = set(lora.to_peft_tensors(adapters, period=period))
    prefix = "base_model.model.model.layers"
    assert f"{prefix}.3.self_attn.q_proj.lora_A.weight" in names
    assert f"{prefix}.1.self_attn.v_proj.lora_B.weight" in names
    assert not any(f"{prefix}.2.self_attn.k_proj" in n for n in names)

    tokens = _tokens(seed=4)
    lora_config = dataclasses.replace(config, lora_scale=8.0 / 4)
    positions = np.tile(np.arange(14), (2, 1))
    ours = _apply(lora_config, params, tokens, positions, np.ones_like(tokens), adapters)
    assert (
        np.abs(ours - _apply(config, params, tokens, positions, np.ones_like(tokens))).max() > 1e-2
    )
    base = AutoModelForCausalLM.from_pretrained(path)
    with_peft = peft.PeftModel.from_pretrained(base, out).eval()
    np.testing.assert_allclose(_hf_logits(with_peft, tokens), ours, atol=MODEL_TOL)
    back = lora.read_peft_adapter(out, params)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [TINY, MOE], ids=["dense", "moe"])
def test_multimodal_checkpoint_loads_language_model_and_exports_as_itself(
    fields, tmp_path, stories_dir
):
    """Gemma4ForConditionalGeneration (how the Hub ships Gemma 4, the 26B-A4B with its
    mixture-of-experts block too): its language model loads with the wrapper's text logits;
    the export is the same class, the vision and audio towers and their embedders copied byte
    for byte, and loads back with equal logits; PEFT adapters name the language model's modules
    only (and parameters: its experts')."""
    from transformers import Gemma4AudioConfig, Gemma4VisionConfig

    text = {k: v for k, v in fields.items() if k not in ("bos_token_id", "eos_token_id")}
    vision = Gemma4VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64,
    )  # fmt: skip
    audio = Gemma4AudioConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        subsampling_conv_channels=[4, 4], output_proj_dims=16,
    )  # fmt: skip
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=audio)
    model = _randomise(Gemma4ForConditionalGeneration(config), seed=3)
    model.save_pretrained(tmp_path / "hub")
    ours_config, params = _load(tmp_path / "hub")
    assert ours_config.gemma4.per_layer_input_size == 4
    tokens = _tokens(seed=3)
    positions = np.tile(np.arange(14), (2, 1))
    ours = _apply(ours_config, params, tokens, positions, np.ones_like(tokens))
    np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=MODEL_TOL)

    out = tmp_path / "out"
    export_hf(
        params, ours_config, str(out), tokenizer_dir=str(stories_dir),
        source_model_dir=str(tmp_path / "hub"),
    )  # fmt: skip
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == ["Gemma4ForConditionalGeneration"]
    reloaded = Gemma4ForConditionalGeneration.from_pretrained(out).eval()
    towers = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")
    state = reloaded.state_dict()
    copied = [k for k in model.state_dict() if any(t in k for t in towers)]
    assert len(copied) > 10
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), ours, atol=MODEL_TOL)

    # PEFT adapters on the language model only (the towers' q/k/v stay plain), our logits.
    import peft

    experts = ("experts",) if fields.get("enable_moe_block") else ()
    adapters = _random_adapters(params, targets=(*lora.ALL_LINEAR, *experts))
    peft_config = lora.peft_config(
        adapters, rank=4, alpha=8.0, rslora=False, dropout=0.0, base=str(tmp_path / "hub"),
        language_model=True,
    )  # fmt: skip
    adapter = str(tmp_path / "adapter")
    period = len(ours_config.period)
    lora.write_peft_adapter(adapter, adapters, peft_config, language_model=True, period=period)
    with_peft = peft.PeftModel.from_pretrained(model, adapter).eval()
    adapted = {n for n, m in with_peft.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all("language_model" in n for n in adapted)
    lora_config = dataclasses.replace(ours_config, lora_scale=2.0)
    expected = _apply(lora_config, params, tokens, positions, np.ones_like(tokens), adapters)
    np.testing.assert_allclose(_hf_logits(with_peft, tokens), expected, atol=MODEL_TOL)
    back = lora.read_peft_adapter(adapter, params)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"enable_moe_block": True, "num_experts": 4, "moe_intermediate_size": 8}, "top_k_experts"),
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_activation": "silu"}, "hidden_activation"),
        ({"layer_types": [SLIDING, "linear_attention", SLIDING, FULL]}, "layer_types"),
        (
            {"rope_parameters": {SLIDING: {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2}}},
            "rope_parameters",
        ),
        ({"per_layer_config": {"0": {"head_dim": 4}, "1": {"head_dim": 16}}}, "per_layer_config"),
        ({"num_kv_shared_layers": 3}, "num_kv_shared_layers"),
    ],
)
def test_unsupported_configs_fail_naming_file_and_field(fields, named, tmp_path):
    raw = {"architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", **TINY}
    (tmp_path / "config.json").write_text(json.dumps({**raw, **fields}))
    with pytest.raises(hf.UnsupportedModelError) as info:
        hf.load_model_config(str(tmp_path), dtype="float32", param_dtype="float32", remat="none")
    assert "config.json" in str(info.value) and named in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mesh_sizes", "experts"), [((8, 1, 1), 0), ((2, 2, 2), 0), ((2, 2, 2), 4)]
)
def test_train_step_on_a_mesh_equals_one_device(mesh_sizes, experts):
    """The train step of a Gemma 4 model (packed batches; per-layer inputs, K/V sharing, full
    layers of another head shape; with `experts`, the mixture-of-experts block) gives the same
    losses and gradient norms under FSDP and a mixed mesh as on one device: its parameters
    (some axes unnamed) shard and train."""
    from sft_jax.config import MeshSection
    from sft_jax.model.gemma4_config import Gemma4Features
    from sft_jax.training.optim import make_optimizer, make_schedule
    from sft_jax.training.sharding import batch_sharding, make_mesh
    from sft_jax.training.state import StateSpec, create_train_state
    from sft_jax.training.step import StepOptions, make_train_step
    from tests.helpers import tiny_model_config
    from tests.test_step import RULES, optim_cfg, packed_batch

    features = Gemma4Features(
        global_head_dim=16, global_kv_heads=2, global_rotary_factor=0.25, kv_shared_layers=2,
        double_wide_mlp=True, per_layer_input_size=4, per_layer_vocab_size=64,
    )  # fmt: skip
    config = tiny_model_config(
        num_layers=4, local_layers=(True, False, True, False), sliding_window=5,
        local_rope_theta=10000.0, qk_norm=True, sandwich_norms=True, embed_scale=True,
        norm_scale_float32=True, mlp_activation="gelu_tanh", query_scale=1.0, gemma4=features,
        num_experts=experts, num_experts_per_tok=2 if experts else 0,
        moe_intermediate_size=12 if experts else 0, norm_topk_prob=bool(experts),
    )  # fmt: skip

    def run(sizes, devices):
        mesh = make_mesh(MeshSection(*sizes, rules=RULES), devices)
        tx = make_optimizer(optim_cfg(), total_steps=10)
        state, shardings = create_train_state(StateSpec(config, mesh, RULES, tx))
        if experts:  # a decisive router: at init its logits are near zero, and one update
            # can leave two experts tied within rounding, which a sharded sum then flips
            state = state.replace(params=jax.tree_util.tree_map_with_path(_sharpen, state.params))
        sharding = batch_sharding(mesh, RULES)
        step_fn = make_train_step(
            shardings, sharding, options=StepOptions(), schedule=make_schedule(optim_cfg(), 10)
        )
        out = []
        for i in range(2):
            batch = {k: jax.device_put(v, sharding) for k, v in packed_batch(seed=i).items()}
            state, metrics = step_fn(state, batch, np.float32(1.0))
            out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        return np.asarray(out)

    reference = run((1, 1, 1), jax.devices()[:1])
    assert np.all(np.isfinite(reference))
    actual = run(mesh_sizes, jax.devices()[:8])
    # Step 1's loss and gradient norm agree to float32 rounding of the sharded sums (~1e-6).
    # At lr 1e-2 the first update amplifies that rounding by a CPU-dependent amount (1e-5 to
    # 2e-4 seen at step 2); a parameter that did not shard and train right moves step 2 by
    # orders more.
    np.testing.assert_allclose(actual[0], reference[0], rtol=1e-5)
    np.testing.assert_allclose(actual[1], reference[1], rtol=1e-3)


def _sharpen(path, leaf):
    """Router kernels x30 (the mesh test's decisive routing); other leaves as they are."""
    name = jax.tree_util.keystr(path)
    return leaf * 30 if "router" in name and "kernel" in name else leaf


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_tuning_are_refused(loaded, method):
    _, params = loaded
    with pytest.raises(ValueError, match="same attention layer"):
        lora.prefix.make_prefix_adapters(params, method, 4, jax.random.key(0))


@pytest.fixture(scope="module")
def moe_saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma4_moe")
    model = _randomise(Gemma4ForCausalLM(Gemma4TextConfig(**MOE)), seed=3)
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def moe_loaded(moe_saved):
    return _load(moe_saved[0])


def test_moe_block_logits_match_transformers(moe_saved, moe_loaded):
    """enable_moe_block: the router on the residual stream with its own scales, the experts on
    their own pre-norm, both outputs normed and summed; every tensor read, as many parameters
    (and one layer_scalar per layer) as transformers has."""
    path, model = moe_saved
    config, params = moe_loaded
    hf.check_checkpoint(str(path), config)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (
        4, 2, 12
    )  # fmt: skip
    assert count_params(params) == model.num_parameters() + config.num_layers
    assert params["layers"]["layer_1"]["moe"]["experts"]["gate_proj"].shape == (1, 4, 32, 12)
    tokens = _tokens(seed=3)
    positions = np.stack([np.arange(14), np.arange(14) + 9])
    ours = _apply(config, params, tokens, positions, np.ones_like(tokens))
    expected = _hf_logits(model, tokens, positions)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(ours, expected, atol=MODEL_TOL)


@pytest.mark.slow  # another compile; an export and a transformers reload
def test_moe_block_packing_and_export(moe_saved, moe_loaded, tmp_path, stories_dir):
    """A packed row gives each example its own logits (routing is per token; the router
    statistics leave padding out); the export (router scales, fused experts, the three extra
    norms) loads back in transformers tensor for tensor."""
    path, model = moe_saved
    config, params = moe_loaded
    tokens = _tokens(seed=5)
    a, b = tokens[0, :9], tokens[1, 2:12]
    packed = np.concatenate([a, b, [0]])[None]
    positions = np.concatenate([np.arange(9), np.arange(10), [0]])[None]
    segments = np.asarray([[1] * 9 + [2] * 10 + [0]])
    logits, state = jax.jit(
        lambda p, t, q, s: Transformer(config).apply(
            {"params": p}, t, q, s, mutable=["intermediates"]
        )
    )(params, packed, positions, segments)
    np.testing.assert_allclose(logits[:, :9], _hf_logits(model, a[None]), atol=MODEL_TOL)
    np.testing.assert_allclose(logits[:, 9:19], _hf_logits(model, b[None]), atol=MODEL_TOL)
    (router,) = state["intermediates"]["router"]
    assert router.expert_counts.shape == (config.num_layers, 4)
    np.testing.assert_array_equal(router.tokens, np.full(config.num_layers, 19.0))
    np.testing.assert_array_equal(router.expert_counts.sum(-1), np.full(config.num_layers, 38.0))

    out = tmp_path / "out"
    export_hf(params, config, str(out), tokenizer_dir=str(stories_dir), source_model_dir=str(path))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for (name, x), y in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


@pytest.mark.slow  # compiles prefill and decode steps
def test_moe_block_greedy_generation_matches_transformers(moe_saved, moe_loaded):
    """Decoding routes each new token; the router statistics stay out of the KV cache."""
    _, model = moe_saved
    config, params = moe_loaded
    prompts = [[5, 17, 90, 3, 42, 11, 2, 80, 64, 33, 1], [7, 8]]
    ours = greedy_generate(Transformer(config), params, prompts, max_new_tokens=8, stop_ids=[])
    for prompt, generated in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8
            )
        assert generated == out[0, len(prompt) :].tolist()


@pytest.mark.slow  # compiles the forward with adapters; loads PEFT
def test_moe_block_lora_on_experts_matches_peft(moe_saved, moe_loaded, tmp_path):
    """LoRA on the experts (PEFT's target_parameters "experts.gate_up_proj" and
    "experts.down_proj": Gemma 4 keeps them in the layer, not under mlp) and on every
    projection: our logits equal PEFT's on the transformers model; the adapter reads back."""
    import peft

    path, _ = moe_saved
    config, params = moe_loaded
    adapters = _random_adapters(params, targets=(*lora.ALL_LINEAR, "experts"))
    assert set(adapters["layers"]["layer_0"]["moe"]["experts"]) == {"gate_up_proj", "down_proj"}
    peft_config = lora.peft_config(
        adapters, rank=4, alpha=8.0, rslora=False, dropout=0.0, base=str(path)
    )
    assert peft_config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    out = str(tmp_path / "adapter")
    period = len(config.period)
    lora.write_peft_adapter(out, adapters, peft_config, period=period)

    tokens = _tokens(seed=6)
    lora_config = dataclasses.replace(config, lora_scale=8.0 / 4)
    positions = np.tile(np.arange(14), (2, 1))
    ours = _apply(lora_config, params, tokens, positions, np.ones_like(tokens), adapters)
    no_experts = jax.tree.map(lambda x: x, adapters)
    for j in range(config.num_layers):
        del no_experts["layers"][f"layer_{j}"]["moe"]
    without = _apply(lora_config, params, tokens, positions, np.ones_like(tokens), no_experts)
    assert np.abs(ours - without).max() > 1e-2  # the experts' adapters change the logits
    merged = lora.merge(params, adapters, 8.0 / 4)  # what a merged export writes
    np.testing.assert_allclose(
        _apply(config, merged, tokens, positions, np.ones_like(tokens)), ours, atol=MODEL_TOL
    )
    base = AutoModelForCausalLM.from_pretrained(path)
    with_peft = peft.PeftModel.from_pretrained(base, out).eval()
    np.testing.assert_allclose(_hf_logits(with_peft, tokens), ours, atol=MODEL_TOL)
    back = lora.read_peft_adapter(out, params)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)
