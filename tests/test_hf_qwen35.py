"""Qwen3.5 (hybrid Gated DeltaNet + gated full attention) from and to Hugging Face: logits,
packed rows, KV-cache generation against transformers on tiny random models; the Hub's
multimodal checkpoint loads its language model; exports load back in transformers; config.json
parsing and refusals."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3_5Config, Qwen3_5TextConfig
from transformers.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

from sft_jax import hf, lora
from sft_jax.export import export_hf
from sft_jax.model.decode import greedy_generate
from sft_jax.model.decoder import Transformer, count_params

MODEL_TOL = 1e-4
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=8,  # two periods of 3 linear-attention layers + 1 full-attention layer
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # rotary on the first 4 dims (partial_rotary_factor 0.25)
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    linear_conv_kernel_dim=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)


def _randomise(model, seed):
    """Weights off init: (1 + w) norms with w != 0, a gated norm that is not all ones, decays
    and write strengths of all sizes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty_like(param).uniform_(0.01, 4).log())
            elif name.endswith("linear_attn.norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("norm.weight") or name.endswith("dt_bias"):
                param.copy_(0.3 * torch.randn_like(param))
            elif "conv1d" in name:
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model.eval()


def _save_tiny(path, seed=0, **overrides):
    config = Qwen3_5TextConfig(**{**TINY, **overrides})
    model = _randomise(Qwen3_5ForCausalLM(config), seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen35")
    return path, _save_tiny(path)


def _load(path):
    config = hf.load_model_config(str(path), dtype="float32", param_dtype="float32", remat="none")
    return config, hf.load_params(str(path), config)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, params, tokens, positions, segment_ids):
    return Transformer(config).apply({"params": params}, tokens, positions, segment_ids)


def _hf_logits(model, tokens, positions=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.asarray(tokens)),
            position_ids=None if positions is None else torch.from_numpy(np.asarray(positions)),
        )
    return out.logits.float().numpy()


def _tokens(batch=2, length=20, seed=0):
    return np.random.default_rng(seed).integers(1, TINY["vocab_size"], size=(batch, length))


def test_config_reads_the_hybrid_as_transformers_does(saved):
    path, model = saved
    config, params = _load(path)
    assert config.is_hybrid and config.period == ("linear_attention",) * 3 + ("full_attention",)
    assert config.rotary_dim == 4 and config.attn_output_gate and config.norm_offset
    assert count_params(params) == model.num_parameters()
    # The scan runs two periods; each sub-layer's leaves stack every 4th HF layer.
    assert params["layers"]["layer_0"]["linear_attn"]["conv1d"].shape == (2, 4, 2 * 16 + 48)
    assert params["layers"]["layer_3"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 4, 32)


def test_logits_packing_and_export_round_trip(saved, tmp_path, stories_dir):
    """HF -> ours: logits equal transformers' (row 1 at offset positions); a packed row gives
    each example transformers' logits for it alone (the linear-attention state and conv reset
    at the boundary); ours -> export -> transformers: the same logits and weights."""
    path, model = saved
    config, params = _load(path)
    tokens = _tokens()
    positions = np.stack([np.arange(20), np.arange(20) + 37])
    ours = np.asarray(_apply(config, params, tokens, positions, np.ones_like(tokens)))
    expected = _hf_logits(model, tokens, positions)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(ours, expected, atol=MODEL_TOL)

    # b: shorter than the conv kernel. The packed row runs beside a padding row, as long as the
    # rows above: the same compiled program.
    a, b, c = tokens[0, :9], tokens[1, :2], tokens[1, 5:11]
    packed = np.stack([np.concatenate([a, b, c, [0, 0, 0]]), np.zeros(20, int)])
    packed_pos = np.concatenate([np.arange(9), np.arange(2), np.arange(6), [0, 0, 0]])
    packed_pos = np.stack([packed_pos, np.arange(20)])
    segments = np.asarray([[1] * 9 + [2] * 2 + [3] * 6 + [0] * 3, [1] * 20])
    logits = np.asarray(_apply(config, params, packed, packed_pos, segments))[:1]
    np.testing.assert_allclose(logits[:, :9], _hf_logits(model, a[None]), atol=MODEL_TOL)
    np.testing.assert_allclose(logits[:, 9:11], _hf_logits(model, b[None]), atol=MODEL_TOL)
    np.testing.assert_allclose(logits[:, 11:17], _hf_logits(model, c[None]), atol=MODEL_TOL)

    out = tmp_path / "out"
    export_hf(params, config, str(out), tokenizer_dir=str(stories_dir), source_model_dir=str(path))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, positions), ours, atol=MODEL_TOL)
    for (name, x), y in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


def test_greedy_generation_matches_transformers(saved):
    """KV cache for the full-attention layers, recurrent and conv state for the linear ones;
    prompts of different lengths share a batch (left padding is a run of its own)."""
    path, model = saved
    config, params = _load(path)
    prompts = [[5, 17, 99, 3, 42, 11, 2, 90, 64, 33, 1], [7, 8]]
    ours = greedy_generate(Transformer(config), params, prompts, max_new_tokens=8, stop_ids=[])
    for prompt, generated in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8
            )
        assert generated == out[0, len(prompt) :].tolist()


@pytest.mark.slow
def test_hub_multimodal_checkpoint_loads_its_language_model(tmp_path, stories_dir):
    """Qwen3_5ForConditionalGeneration (how the Hub stores Qwen3.5): the language model under
    model.language_model. is read, the vision tower and mtp.* left out; text logits equal the
    wrapper's; the export is a Qwen3_5ForCausalLM with the same logits."""
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
    text = {k: v for k, v in TINY.items() if k not in ("bos_token_id", "eos_token_id")}
    config = Qwen3_5Config(text_config=text, vision_config=vision)
    model = _randomise(Qwen3_5ForConditionalGeneration(config), seed=1)
    model.save_pretrained(tmp_path / "hub")
    raw = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3_5ForConditionalGeneration"] and "text_config" in raw
    ours_config, params = _load(tmp_path / "hub")
    tokens = _tokens(seed=3)
    ours = np.asarray(
        _apply(ours_config, params, tokens, np.tile(np.arange(20), (2, 1)), np.ones_like(tokens))
    )
    # These randomised weights give larger activations than the other tests' models: on some
    # CPUs the two float32 results differ by up to 1.7e-4 (1e-4 on others).
    np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=2 * MODEL_TOL)
    out = tmp_path / "out"
    export_hf(
        params, ours_config, str(out), tokenizer_dir=str(stories_dir),
        source_model_dir=str(tmp_path / "hub"),
    )  # fmt: skip
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == ["Qwen3_5ForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded, Qwen3_5ForCausalLM)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), ours, atol=2 * MODEL_TOL)


def _write(path, fields):
    (path / "config.json").write_text(json.dumps(fields))
    return str(path)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (  # a trailing partial period
            {"num_hidden_layers": 6, "layer_types": ["linear_attention"] * 3 + ["full_attention"]
             + ["linear_attention"] * 2},
            "layer_types",
        ),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope type"),
    ],
)  # fmt: skip
def test_unsupported_qwen35_configs_fail_naming_file_and_field(fields, named, tmp_path):
    raw = {"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", **TINY}
    path = _write(tmp_path, {**raw, **fields})
    with pytest.raises(hf.UnsupportedModelError) as info:
        hf.load_model_config(path, dtype="float32", param_dtype="float32", remat="none")
    assert "config.json" in str(info.value) and named in str(info.value)


def test_default_layer_types_follow_full_attention_interval(tmp_path):
    raw = {"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", **TINY}
    raw["full_attention_interval"] = 2
    config = hf.load_model_config(
        _write(tmp_path, raw), dtype="float32", param_dtype="float32", remat="none"
    )
    assert config.period == ("linear_attention", "full_attention")
    expected = Qwen3_5TextConfig(**{**TINY, "full_attention_interval": 2}).layer_types
    assert config.layer_types == tuple(expected)


def test_lora_exports_for_peft_with_peft_names_and_logits(saved, tmp_path):
    """LoRA on every projection (attention's and the Gated DeltaNet's): the PEFT export names
    each HF layer's module as PEFT does, loads in `peft` on the transformers model with our
    logits, and imports back to the same adapters."""
    import peft

    path, _ = saved
    config, params = _load(path)
    rank, alpha = 4, 8.0
    # Random A and B: numpy noise in the adapter tree's shapes (a jax random tree compiles a
    # program for each leaf shape).
    shapes = jax.eval_shape(
        lambda p: lora.init_adapters(p, lora.ALL_LINEAR, rank, jax.random.PRNGKey(0)), params
    )
    noise = np.random.default_rng(1)
    adapters = jax.tree.map(lambda x: 0.1 * noise.standard_normal(x.shape, np.float32), shapes)
    peft_config = lora.peft_config(
        adapters, rank=rank, alpha=alpha, rslora=False, dropout=0.0, base=str(path)
    )
    assert {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "q_proj"} <= set(
        peft_config["target_modules"]
    )
    out = str(tmp_path / "adapter")
    lora.write_peft_adapter(out, adapters, peft_config, period=len(config.period))
    names = set(lora.to_peft_tensors(adapters, period=len(config.period)))
    prefix = "base_model.model.model.layers"
    assert f"{prefix}.6.linear_attn.in_proj_qkv.lora_A.weight" in names
    assert f"{prefix}.7.self_attn.q_proj.lora_B.weight" in names
    assert not any(f"{prefix}.7.linear_attn" in n or f"{prefix}.6.self_attn" in n for n in names)

    tokens = _tokens(seed=4)
    lora_config = dataclasses.replace(config, lora_scale=alpha / rank)
    positions = np.tile(np.arange(20), (2, 1))
    ours = jax.jit(Transformer(lora_config).apply)(
        {"params": params, "lora": adapters}, tokens, positions, np.ones_like(tokens)
    )
    base = AutoModelForCausalLM.from_pretrained(path)
    model = peft.PeftModel.from_pretrained(base, out).eval().double()
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    # Against transformers in float64: with noisy adapters on every projection, our float32 and
    # transformers' own float32 are each ~1e-4 from it (logits up to ~3), on some CPUs in
    # opposite directions, so the two float32 results can differ by twice MODEL_TOL.
    np.testing.assert_allclose(np.asarray(ours), expected, atol=2 * MODEL_TOL)
    back = lora.read_peft_adapter(out, params)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)


@pytest.mark.slow
def test_qwen35_moe_logits_packing_export_and_generation(tmp_path, stories_dir):
    """Qwen3.5-MoE: the hybrid with the mixture-of-experts layer (plus its gated shared
    expert) in every layer; router statistics come out per layer, in HF layer order."""
    from transformers.models.qwen3_5_moe import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    fields = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
    hf_config = Qwen3_5MoeTextConfig(**fields, **moe, shared_expert_intermediate_size=40)
    model = _randomise(Qwen3_5MoeForCausalLM(hf_config), seed=2)
    model.save_pretrained(tmp_path / "moe")
    config, params = _load(tmp_path / "moe")
    assert config.is_moe and config.is_hybrid and config.shared_expert_intermediate_size == 40
    assert count_params(params) == model.num_parameters()
    tokens = _tokens(seed=5)
    positions = np.tile(np.arange(20), (2, 1))
    ours = np.asarray(_apply(config, params, tokens, positions, np.ones_like(tokens)))
    np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=MODEL_TOL)

    a, b = tokens[0, :12], tokens[1, :8]
    packed = np.concatenate([a, b])[None]
    segments = np.asarray([[1] * 12 + [2] * 8])
    pos = np.concatenate([np.arange(12), np.arange(8)])[None]
    logits = np.asarray(_apply(config, params, packed, pos, segments))
    np.testing.assert_allclose(logits[:, :12], _hf_logits(model, a[None]), atol=MODEL_TOL)
    np.testing.assert_allclose(logits[:, 12:], _hf_logits(model, b[None]), atol=MODEL_TOL)

    _, sown = Transformer(config).apply(
        {"params": params}, tokens, positions, np.ones_like(tokens), mutable=["intermediates"]
    )
    stats = jax.tree.leaves(sown["intermediates"])
    assert all(x.shape[0] == config.num_layers for x in stats)

    out = tmp_path / "out"
    export_hf(
        params, config, str(out), tokenizer_dir=str(stories_dir),
        source_model_dir=str(tmp_path / "moe"),
    )  # fmt: skip
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), ours, atol=2 * MODEL_TOL)

    prompt = [5, 17, 99, 3, 42]
    (generated,) = greedy_generate(
        Transformer(config), params, [prompt], max_new_tokens=6, stop_ids=[]
    )
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6
        )
    assert generated == expected[0, len(prompt) :].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_hybrid_train_step_on_a_mesh_equals_one_device(mesh_sizes):
    """The train step of a hybrid model (packed batches: linear-attention resets inside rows)
    gives the same losses and gradient norms under FSDP, tensor and mixed meshes."""
    from sft_jax.config import MeshSection
    from sft_jax.model.hybrid import LinearAttention
    from sft_jax.training.optim import make_optimizer, make_schedule
    from sft_jax.training.sharding import batch_sharding, make_mesh
    from sft_jax.training.state import StateSpec, create_train_state
    from sft_jax.training.step import StepOptions, make_train_step
    from tests.helpers import tiny_model_config
    from tests.test_step import RULES, optim_cfg, packed_batch

    config = tiny_model_config(
        num_layers=4,
        layer_types=("linear_attention", "full_attention") * 2,
        linear_attention=LinearAttention(2, 4, 8, 8, chunk_size=8),
        attn_output_gate=True,
        partial_rotary_factor=0.5,
        qk_norm=True,
        norm_offset=True,
    )

    def run(sizes, devices):
        mesh = make_mesh(MeshSection(*sizes, rules=RULES), devices)
        tx = make_optimizer(optim_cfg(), total_steps=10)
        state, shardings = create_train_state(StateSpec(config, mesh, RULES, tx))
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
    np.testing.assert_allclose(run(mesh_sizes, jax.devices()[:8]), reference, rtol=1e-5)


@pytest.mark.slow
def test_lora_run_trains_and_exports_for_peft(tmp_path, stories_dir):
    """A tiny Qwen3.5 (the stories260K vocabulary) fine-tuned with LoRA through the whole
    pipeline (preflight, packed batches, train loop, generation samples, export --peft): the
    loss falls and the exported adapter applied by peft gives the logits of our run."""
    import peft

    from sft_jax import export
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.train import train_and_evaluate
    from sft_jax.training.metrics import read_metrics

    base_dir = tmp_path / "base"
    _save_tiny(base_dir, seed=3, vocab_size=512, bos_token_id=1, eos_token_id=2)
    c = load_config_file("configs/tiny.py")
    c.model.path = str(base_dir)
    c.lora.update(enabled=True, rank=4, base_dtype="float32", targets=("*_proj",))
    c.optim.learning_rate = 3e-2
    c.train.update(max_steps=6, log_every=1)
    c.checkpoint.every_steps = 0
    workdir = tmp_path / "run"
    train_and_evaluate(parse(c), str(workdir))
    records = [r for r in read_metrics(str(workdir)) if "loss" in r and "kind" not in r]
    assert records[-1]["loss"] < records[0]["loss"] - 0.1, [r["loss"] for r in records]

    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "ad"), "--peft"]) == 0
    adapter_config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert {"out_proj", "q_proj"} <= set(adapter_config["target_modules"])  # linear, full
    run = export.load_workdir(str(workdir))
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 12))
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    ours = _apply(run.model_config, run.params, tokens, positions, np.ones_like(tokens))
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "ad"
    )
    theirs = _hf_logits(model.eval().double(), tokens)
    # Against transformers in float64: the trained model (six steps at a high learning rate)
    # magnifies float32 rounding; transformers' own float32 logits can be 4e-4 from its float64,
    # ours 1.2e-4, in opposite directions (so 5.5e-4 from each other).
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=2 * MODEL_TOL)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert np.abs(_hf_logits(base, tokens) - theirs).max() > 1e-2  # the adapters changed it
