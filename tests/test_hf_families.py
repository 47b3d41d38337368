"""Families beyond the Llama core, from and to Hugging Face: Gemma 3's multimodal checkpoints
(text-only fine-tuning of their language model), SmolLM3 (NoPE layers), OLMo 2/3 (post-norm
layers, q/k norm over all heads, OLMo 3's sliding windows and YaRN), Phi-3/4 (fused projections,
LongRoPE, partial rotary factor). Each against
transformers on tiny random models built from configs: logits, packed rows, KV-cache greedy
generation, config.json as the Hub writes it, export loaded back by transformers, LoRA merged
and as a PEFT adapter."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Olmo2Config,
    Olmo3Config,
    Phi3Config,
    SiglipVisionConfig,
    SmolLM3Config,
)

from sft_jax import hf, lora
from sft_jax.api import TrainedModel
from sft_jax.export import export_hf, export_peft
from sft_jax.model.decode import greedy_generate
from sft_jax.model.decoder import Transformer, count_params

MODEL_TOL = 1e-4
VOCAB = 128


def _perturb(model, seed=0):
    """Weights off their init: norms around 1 (Gemma's are stored as w, applied as 1 + w, so
    around 0 would do too, but not all equal), everything else small and random."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def _load(path, param_dtype="float32"):
    config = hf.load_model_config(str(path), dtype="float32", param_dtype=param_dtype, remat="none")
    return config, hf.load_params(str(path), config)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, variables, tokens, positions, segment_ids):
    return Transformer(config).apply(variables, tokens, positions, segment_ids)


def _ours(config, params, tokens, positions=None, segments=None, adapters=None):
    """Our logits; a one-row batch runs beside a padding row, so that it shares the two-row
    batches' compiled program (rows do not interact)."""
    positions = (
        np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
        if positions is None
        else positions
    )
    segments = np.ones_like(tokens) if segments is None else segments
    rows = len(tokens)
    if rows == 1:
        tokens = np.concatenate([tokens, np.zeros_like(tokens)])
        positions, segments = np.concatenate([positions] * 2), np.concatenate([segments] * 2)
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    return np.asarray(_apply(config, variables, tokens, positions, segments))[:rows]


def _hf_logits(model, tokens, positions=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.asarray(tokens)),
            position_ids=None if positions is None else torch.from_numpy(np.asarray(positions)),
        )
    return out.logits.float().numpy()


def _hf_rows(model, tokens, positions):
    """transformers' logits for each row run alone: LongRoPE picks its factors per sequence
    here, per call (by the whole batch's largest position) there."""
    rows = [_hf_logits(model, tokens[i : i + 1], positions[i : i + 1]) for i in range(len(tokens))]
    return np.concatenate(rows)


def _tokens(batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, size=(batch, length))


def _check_logits_and_packing(config, params, model):
    """Logits equal transformers' (row 1 at offset positions, past a LongRoPE model's original
    context where row 0 is not); a packed row gives each example transformers' logits for it
    alone."""
    tokens = _tokens()
    positions = np.stack([np.arange(12), np.arange(12) + 37])
    ours = _ours(config, params, tokens, positions)
    expected = _hf_rows(model, tokens, positions)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(ours, expected, atol=MODEL_TOL)
    a, b = tokens[0, :7], tokens[1, :5]
    packed = np.concatenate([a, b])[None]
    packed_pos = np.concatenate([np.arange(7), np.arange(5)])[None]
    segments = np.asarray([[1] * 7 + [2] * 5])
    logits = _ours(config, params, packed, packed_pos, segments)
    np.testing.assert_allclose(logits[:, :7], _hf_logits(model, a[None]), atol=MODEL_TOL)
    np.testing.assert_allclose(logits[:, 7:], _hf_logits(model, b[None]), atol=MODEL_TOL)
    return tokens, positions, ours


def _check_greedy(config, params, model):
    """KV-cache greedy generation: token for token transformers' greedy generate."""
    prompts = [[5, 17, 99, 3, 42], [7, 8]]
    ours = greedy_generate(Transformer(config), params, prompts, max_new_tokens=6, stop_ids=[])
    for prompt, generated in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6
            )
        assert generated == out[0, len(prompt) :].tolist()


def _random_adapters(params, rank=4, seed=1):
    """Adapters of every linear layer, random (B too): numpy noise in the adapter tree's shapes
    (a jax random tree compiles a program for each leaf shape)."""
    init = functools.partial(lora.init_adapters, targets=lora.ALL_LINEAR, rank=rank)
    shapes = jax.eval_shape(lambda p: init(p, rng=jax.random.PRNGKey(0)), params)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape, np.float32), shapes)


# --- Gemma 3 multimodal (Gemma3ForConditionalGeneration) -------------------------------------

GEMMA3_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    sliding_window=5,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0},
    },
    query_pre_attn_scalar=24,
    final_logit_softcapping=3.0,  # ignored by Gemma3ForConditionalGeneration
    pad_token_id=0,
)
SIGLIP = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=7,
)


def _gemma3_multimodal(seed=0):
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**GEMMA3_TEXT),
        vision_config=SiglipVisionConfig(**SIGLIP),
        mm_tokens_per_image=4,
    )
    torch.manual_seed(seed)
    return _perturb(Gemma3ForConditionalGeneration(config), seed)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(directory, model): a tiny Gemma3ForConditionalGeneration as transformers saves it (the
    Hub's language_model.model.* layout), and (directory, _) in transformers 5's own
    (model.language_model.*)."""
    model = _gemma3_multimodal()
    hub = tmp_path_factory.mktemp("gemma3_hub")
    model.save_pretrained(hub)
    own = tmp_path_factory.mktemp("gemma3_own")
    model.save_pretrained(own, save_original_format=False)
    return hub, own, model


def _keys(path):
    index = path / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return set(f.keys())


def _stored(path):
    """key -> (dtype name, raw bytes) of every tensor of a checkpoint directory."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        raw = file.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + size])
        header.pop("__metadata__", None)
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            out[key] = (entry["dtype"], raw[8 + size + begin : 8 + size + end])
    return out


def _vision_keys(keys):
    return {k for k in keys if "vision_tower" in k or "multi_modal_projector" in k}


@pytest.mark.parametrize("layout", ["hub", "own"])
def test_gemma3_multimodal_logits_packing_export(layout, gemma3, tmp_path, stories_dir):
    """The language model of a Gemma3ForConditionalGeneration checkpoint (either layout) loads:
    logits and packed rows equal transformers'; the export (sharded) keeps the source's layout,
    copies the vision tower and projector byte for byte, and loads back in transformers as
    Gemma3ForConditionalGeneration with the same logits and every tensor equal."""
    hub, own, model = gemma3
    path = hub if layout == "hub" else own
    keys = _keys(path)
    assert ("language_model.model.embed_tokens.weight" in keys) == (layout == "hub")
    assert ("model.language_model.embed_tokens.weight" in keys) == (layout == "own")
    config, params = _load(path)
    hf.check_checkpoint(str(path), config)
    assert (
        config.tie_embeddings and config.norm_offset and config.local_layers == (True, False, True)
    )
    assert config.query_scale == 24
    assert config.final_softcap is None  # in text_config, but the multimodal class ignores it
    assert count_params(params) == model.model.language_model.num_parameters()
    tokens, positions, ours = _check_logits_and_packing(config, params, model)

    out = tmp_path / "out"
    export_hf(
        params,
        config,
        str(out),
        tokenizer_dir=str(stories_dir),
        source_model_dir=str(path),
        max_shard_bytes=64 * 1024,
    )
    assert len(list(out.glob("*.safetensors"))) > 1
    assert _keys(out) == keys
    source, exported = _stored(path), _stored(out)
    vision = _vision_keys(keys)
    assert len(vision) > 10 and all(exported[k] == source[k] for k in vision)
    written = json.loads((out / "config.json").read_text())
    original = json.loads((path / "config.json").read_text())
    assert written["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert written["vision_config"] == original["vision_config"]
    assert written["text_config"] == original["text_config"]
    reloaded = Gemma3ForConditionalGeneration.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_rows(reloaded, tokens, positions), ours, atol=MODEL_TOL)
    for (name, x), y in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


def test_gemma3_multimodal_bf16_vision_stays_as_stored(gemma3, tmp_path, stories_dir):
    """A bfloat16 source exported in float32: the language model is written in float32, the
    vision tower and projector stay the source's bfloat16 bytes."""
    _, _, model = gemma3
    src = tmp_path / "src"
    model.to(torch.bfloat16).save_pretrained(src)
    model.to(torch.float32)
    config, params = _load(src)
    out = tmp_path / "out"
    export_hf(params, config, str(out), tokenizer_dir=str(stories_dir), source_model_dir=str(src))
    source, exported = _stored(src), _stored(out)
    assert exported["language_model.model.norm.weight"][0] == "F32"
    for key in _vision_keys(source):
        assert exported[key] == source[key] and source[key][0] == "BF16", key


def test_gemma3_multimodal_greedy_generation(gemma3):
    hub, _, model = gemma3
    config, params = _load(hub)
    _check_greedy(config, params, model)


def test_gemma3_multimodal_hub_config_read_as_transformers_reads_it(tmp_path):
    """A config.json as gemma-3-4b-it's (tiny sizes): text_config gives only a few fields, the
    rest are Gemma3TextConfig's defaults; every field we use equals transformers' reading."""
    fields = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "eos_token_id": [1, 106],
        "image_token_index": 262144,
        "mm_tokens_per_image": 256,
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 96,
            "model_type": "gemma3_text",
            "num_hidden_layers": 8,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "torch_dtype": "bfloat16",
        "vision_config": {"model_type": "siglip_vision_model", **SIGLIP},
    }
    (tmp_path / "config.json").write_text(json.dumps(fields))
    ours = hf.load_model_config(str(tmp_path), dtype="float32", param_dtype="float32", remat="none")
    theirs = AutoConfig.from_pretrained(tmp_path).text_config
    assert ours.vocab_size == theirs.vocab_size == 262_208
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        theirs.num_attention_heads,
        theirs.num_key_value_heads,
        theirs.head_dim,
    )
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.query_scale == theirs.query_pre_attn_scalar
    assert ours.sliding_window == theirs.sliding_window == 1024
    assert ours.local_layers == tuple(t == "sliding_attention" for t in theirs.layer_types)
    full, local = (
        theirs.rope_parameters["full_attention"],
        theirs.rope_parameters["sliding_attention"],
    )
    assert ours.rope_theta == full["rope_theta"] and ours.local_rope_theta == local["rope_theta"]
    assert ours.rope_scaling.rope_type == "linear" and ours.rope_scaling.factor == full["factor"]
    assert ours.tie_embeddings and ours.final_softcap is None


def test_gemma3_multimodal_refusals(tmp_path):
    base = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}
    for fields, match in (
        ({"text_config": {"model_type": "llama"}}, "text_config of model_type 'llama'"),
        ({"tie_word_embeddings": False}, "untied LM head"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**base, **fields}))
        with pytest.raises(hf.UnsupportedModelError, match=match) as info:
            hf.load_model_config(
                str(tmp_path), dtype="float32", param_dtype="float32", remat="none"
            )
        assert "config.json" in str(info.value)


def _trained(config, params, path, adapters, stories_dir, scale):
    merged = jax.jit(lambda p, a: lora.merge(p, a, scale))(params, adapters)
    return TrainedModel(
        params=merged,
        model_config=config,
        step=None,
        tokenizer_dir=str(stories_dir),
        source_model_dir=str(path),
        chat_template=None,
        adapters=adapters,
        lora={"rank": 4, "alpha": 8.0, "rslora": False},
    )


def test_gemma3_multimodal_lora_merged_and_peft(gemma3, tmp_path, stories_dir):
    """LoRA on the language model: our forward with adapters equals PEFT's on the multimodal
    base; the PEFT export targets the language model only (the vision tower's q/k/v stay
    plain) and reads back identically; the merged export loads as the multimodal class with
    the same logits and the vision tensors untouched; an adapter on the vision tower is
    refused."""
    hub, _, _ = gemma3
    config, params = _load(hub)
    adapters = _random_adapters(params)
    scale = lora.lora_scale(8.0, 4, False)
    tokens = _tokens()
    ours = _ours(dataclasses.replace(config, lora_scale=scale), params, tokens, adapters=adapters)
    assert np.abs(ours - _ours(config, params, tokens)).max() > 1e-2
    run = _trained(config, params, hub, adapters, stories_dir, scale)

    export_peft(run, str(tmp_path / "adapter"))
    base = Gemma3ForConditionalGeneration.from_pretrained(hub).eval()
    with_peft = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    adapted = {n for n, m in with_peft.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all("language_model" in n for n in adapted)
    assert len(adapted) == 7 * config.num_layers
    np.testing.assert_allclose(_hf_logits(with_peft, tokens), ours, atol=MODEL_TOL)
    back = lora.read_peft_adapter(str(tmp_path / "adapter"), params)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)

    export_hf(
        run.params, config, str(tmp_path / "merged"), tokenizer_dir=str(stories_dir),
        source_model_dir=str(hub),
    )  # fmt: skip
    merged = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_hf_logits(merged, tokens), ours, atol=MODEL_TOL)
    source, exported = _stored(hub), _stored(tmp_path / "merged")
    assert all(exported[k] == source[k] for k in _vision_keys(source))

    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    key = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = np.zeros((4, 32), np.float32)
    save_file(tensors, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="adapts the base's vision_tower"):
        lora.read_peft_adapter(str(tmp_path / "adapter"), params)


# --- decoder-only families (AutoModelForCausalLM) ---------------------------------------------

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
# Each family with what sets it apart, and what our config must show of it.
FAMILIES = {
    "smollm3": (  # default NoPE pattern: every 4th layer; untied head
        SmolLM3Config,
        dict(
            rope_parameters={"rope_type": "default", "rope_theta": 1e4}, tie_word_embeddings=False
        ),
        lambda c: c.nope_layers == (False, False, False, True) and not c.has_local_layers,
    ),
    "smollm3_windows": (  # explicit NoPE layers, sliding windows on them (shorter than inputs)
        SmolLM3Config,
        dict(no_rope_layers=[1, 0, 0, 1], use_sliding_window=True, sliding_window=5),
        lambda c: (
            c.nope_layers == (False, True, True, False)
            and c.local_layers == (False, True, True, False)
            and c.sliding_window == 5
            and c.tie_embeddings
        ),
    ),
    "smollm3_yarn": (  # YaRN (SmolLM3's long-context setting) with the NoPE layers
        SmolLM3Config,
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1e4,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
        lambda c: c.rope_scaling.rope_type == "yarn" and c.rope_scaling.attention_factor > 1,
    ),
    "olmo2": (
        Olmo2Config,
        dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
        lambda c: c.qk_norm_full and not c.pre_norms and c.sandwich_norms,
    ),
    "olmo3": (  # sliding layers 0-2 (window shorter than inputs), YaRN on the full layer
        Olmo3Config,
        dict(
            sliding_window=5,
            rope_parameters={
                "full_attention": {
                    "rope_type": "yarn",
                    "rope_theta": 5e5,
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "attention_factor": 1.2,
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
        lambda c: (
            c.local_layers == (True, True, True, False)
            and c.local_rope_theta == 1e4
            and c.rope_scaling.rope_type == "yarn"
            and not c.pre_norms
        ),
    ),
    "phi3": (  # LongRoPE: original context 8, so 12-token rows take the long factors
        Phi3Config,
        dict(
            max_position_embeddings=32,
            original_max_position_embeddings=8,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.6],
                "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 11.0, 15.0],
            },
        ),
        lambda c: (
            c.rope_scaling.rope_type == "longrope"
            and c.rope_scaling.original_max_position_embeddings == 8
            and abs(c.rope_scaling.attention_factor - (1 + np.log(4) / np.log(8)) ** 0.5) < 1e-12
        ),
    ),
    "phi4_mini": (  # partial rotary factor 0.75 (12 of 16 dims), a window on every layer
        Phi3Config,
        dict(
            partial_rotary_factor=0.75,
            sliding_window=5,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "short_factor": [1.0, 1.2, 1.5, 2.0, 2.6, 3.0],
                "long_factor": [1.0, 2.0, 3.0, 5.0, 7.0, 9.0],
            },
            tie_word_embeddings=True,
        ),
        lambda c: c.rotary_dim == 12 and c.local_layers == (True,) * 4 and c.tie_embeddings,
    ),
}


def _params(default):
    """Every family, those outside `default` in the slow tier (they repeat its code paths)."""
    return [f if f in default else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """family -> (its directory, the transformers model): each saved once."""
    cache = {}

    def get(family):
        if family not in cache:
            config_cls, fields, _ = FAMILIES[family]
            config = config_cls(**{**TINY, **fields})
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
            model = _perturb(model)
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            cache[family] = (path, model)
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_packing_export(family, family_model, tmp_path, stories_dir):
    """Logits and packed rows equal transformers'; the export (sharded) loads back in
    transformers with the same logits and every tensor equal."""
    path, model = family_model(family)
    config, params = _load(path)
    hf.check_checkpoint(str(path), config)  # preflight: every tensor, nothing left over
    assert FAMILIES[family][2](config)
    assert count_params(params) == model.num_parameters()
    tokens, positions, ours = _check_logits_and_packing(config, params, model)
    out = tmp_path / "out"
    export_hf(
        params,
        config,
        str(out),
        tokenizer_dir=str(stories_dir),
        source_model_dir=str(path),
        max_shard_bytes=64 * 1024,
    )
    assert _keys(out) == _keys(path)
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(_hf_rows(reloaded, tokens, positions), ours, atol=MODEL_TOL)
    for (name, x), y in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


# Decoding's family-specific paths: NoPE layers with windowed caches (smollm3_windows), post-norm
# layers with sliding windows and YaRN (olmo3), LongRoPE past the original context (phi3); the
# others repeat those paths (qwen35's greedy test decodes a partial rotary factor).
GREEDY_DEFAULT = ("smollm3_windows", "olmo3", "phi3")


@pytest.mark.parametrize("family", _params(GREEDY_DEFAULT))
def test_family_greedy_generation(family, family_model):
    path, model = family_model(family)
    config, params = _load(path)
    _check_greedy(config, params, model)


# PEFT's module names are Llama's in every family but Phi-3's fused projections; olmo3 stands
# for the former (post-norm layers, sliding windows), phi3 for the latter.
LORA_DEFAULT = ("olmo3", "phi3")


@pytest.mark.parametrize("family", _params(LORA_DEFAULT))
def test_family_lora_peft_and_merged(family, family_model, tmp_path, stories_dir):
    """Our forward with adapters equals PEFT's on the base; the adapter reads back identically;
    the merged export loads in transformers with the same logits."""
    path, _ = family_model(family)
    config, params = _load(path)
    adapters = _random_adapters(params)
    scale = lora.lora_scale(8.0, 4, False)
    tokens = _tokens()
    ours = _ours(dataclasses.replace(config, lora_scale=scale), params, tokens, adapters=adapters)
    assert np.abs(ours - _ours(config, params, tokens)).max() > 1e-2
    run = _trained(config, params, path, adapters, stories_dir, scale)
    export_peft(run, str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    with_peft = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(_hf_logits(with_peft, tokens), ours, atol=MODEL_TOL)
    back = lora.read_peft_adapter(str(tmp_path / "adapter"), params)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    merged_dir = tmp_path / "merged"
    export_hf(
        run.params, config, str(merged_dir), tokenizer_dir=str(stories_dir),
        source_model_dir=str(path),
    )  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
    np.testing.assert_allclose(_hf_logits(merged, tokens), ours, atol=MODEL_TOL)


def test_smollm3_nope_layers_matter(family_model):
    """The NoPE flags change the logits (the test models would not catch a dropped flag
    otherwise)."""
    path, _ = family_model("smollm3")
    config, params = _load(path)
    tokens = _tokens()
    rotated = dataclasses.replace(config, nope_layers=())
    assert np.abs(_ours(config, params, tokens) - _ours(rotated, params, tokens)).max() > 1e-3


def _write_config(path, fields):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))
    return hf.load_model_config(str(path), dtype="float32", param_dtype="float32", remat="none")


SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@pytest.mark.parametrize(
    "fields",
    [
        {},  # transformers' defaults: every 4th layer NoPE, theta 2e6, tied
        {"no_rope_layer_interval": 3, "rope_theta": 5e6, "tie_word_embeddings": False},
        {"no_rope_layers": [1, 1, 0, 1, 1, 0, 1, 1, 1], "use_sliding_window": False},
        {"use_sliding_window": True, "sliding_window": 16},
        {"use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention"] * 8},
    ],
)
def test_smollm3_config_read_as_transformers_reads_it(fields, tmp_path):
    """As SmolLM3-3B's config.json has it (top-level rope_theta, rope_scaling null), at tiny
    sizes, with fields omitted or set."""
    raw = {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", **SIZES}
    ours = _write_config(tmp_path, {**raw, "rope_scaling": None, **fields})
    theirs = AutoConfig.from_pretrained(tmp_path)
    flags = theirs.no_rope_layers[: theirs.num_hidden_layers]
    assert ours.nope_layers == tuple(not f for f in flags)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.tie_embeddings == theirs.tie_word_embeddings
    sliding = tuple(
        theirs.use_sliding_window and t == "sliding_attention" for t in theirs.layer_types
    )
    assert ours.local_layers == (sliding if any(sliding) else ())
    assert ours.sliding_window == (theirs.sliding_window if any(sliding) else None)


def test_smollm3_refusals(tmp_path):
    raw = {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", **SIZES}
    for fields, match in (
        ({"no_rope_layers": [1, 0]}, "no_rope_layers"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"attention_bias": True}, "attention_bias"),
    ):
        with pytest.raises(hf.UnsupportedModelError, match=match) as info:
            _write_config(tmp_path, {**raw, **fields})
        assert "config.json" in str(info.value)


OLMO_HUB = {  # as OLMo-2-1124-7B's and Olmo-3-7B's config.json have them, at tiny sizes
    "olmo2": dict(
        architectures=["Olmo2ForCausalLM"],
        model_type="olmo2",
        rope_theta=500000,
        rope_scaling=None,
        rms_norm_eps=1e-6,
        attention_bias=False,
        tie_word_embeddings=False,
    ),
    "olmo3": dict(
        architectures=["Olmo3ForCausalLM"],
        model_type="olmo3",
        rope_theta=500000,
        rope_scaling={
            "attention_factor": 1.2079441541679836,
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "rope_type": "yarn",
        },
        sliding_window=16,
        layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 4,
        rms_norm_eps=1e-6,
        attention_bias=False,
    ),
}


@pytest.mark.parametrize("family", list(OLMO_HUB))
@pytest.mark.parametrize("omit", [False, True])
def test_olmo_config_read_as_transformers_reads_it(family, omit, tmp_path):
    raw = {**SIZES, **OLMO_HUB[family]}
    if omit:  # transformers' defaults: eps 1e-5, OLMo 3's window 4096 and layer pattern
        raw = {
            k: v
            for k, v in raw.items()
            if k not in ("rms_norm_eps", "sliding_window", "layer_types", "rope_theta")
        }
    ours = _write_config(tmp_path, raw)
    theirs = AutoConfig.from_pretrained(tmp_path)
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.qk_norm_full and not ours.pre_norms and not ours.tie_embeddings
    if family == "olmo2":
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and not ours.local_layers
        return
    full = theirs.rope_parameters["full_attention"]
    sliding = theirs.rope_parameters["sliding_attention"]
    assert ours.local_layers == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert ours.sliding_window == theirs.sliding_window
    assert ours.rope_theta == full["rope_theta"] and ours.local_rope_theta == sliding["rope_theta"]
    assert ours.rope_scaling.factor == full["factor"] and sliding["rope_type"] == "default"
    assert ours.rope_scaling.attention_factor == full["attention_factor"]
    assert ours.rope_scaling.original_max_position_embeddings == 32


def test_olmo_refusals(tmp_path):
    for fields, match in (
        ({**OLMO_HUB["olmo2"], "attention_bias": True}, "attention_bias"),
        ({**OLMO_HUB["olmo2"], "sliding_window": 16}, "sliding_window"),
        ({**OLMO_HUB["olmo3"], "layer_types": ["full_attention"]}, "1 layer_types for 8 layers"),
        ({**OLMO_HUB["olmo2"], "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ):
        with pytest.raises(hf.UnsupportedModelError, match=match) as info:
            _write_config(tmp_path, {**SIZES, **fields})
        assert "config.json" in str(info.value)


@pytest.mark.parametrize("dora", [False, True])
def test_phi3_peft_fused_adapter_imports_exactly(dora, family_model, tmp_path):
    """An adapter PEFT itself made on Phi-3's fused qkv_proj / gate_up_proj (rank r, shared A)
    imports as our split adapters with PEFT's logits; a partly adapted fused module cannot be
    exported (PEFT adapts it whole)."""
    path, _ = family_model("phi3")
    config, params = _load(path)
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora)
    model = peft.get_peft_model(base, peft_config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(
                    (1.0 if "magnitude" in name else 0.0) * param + 0.1 * torch.randn_like(param)
                )
    model.eval().save_pretrained(tmp_path / "adapter")
    adapters = lora.read_peft_adapter(str(tmp_path / "adapter"), params, dora=dora)
    assert set(adapters["layers"]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    scale = lora.lora_scale(8.0, 4, False)
    tokens = _tokens()
    ours = _ours(dataclasses.replace(config, lora_scale=scale), params, tokens, adapters=adapters)
    np.testing.assert_allclose(_hf_logits(model, tokens), ours, atol=MODEL_TOL)
    partial = {k: v for k, v in adapters["layers"]["attn"].items() if k != "v_proj"}
    with pytest.raises(ValueError, match=r"v_proj of .* is not adapted here"):
        lora.to_peft_tensors({"layers": {"attn": partial}}, fused=True)


SHORT, LONG = [1.0 + 0.1 * i for i in range(8)], [1.0 + 2.0 * i for i in range(8)]
PHI3_HUB = {  # as the Hub's Phi-3/4 config.json files have them, at tiny sizes
    "phi3_mini_4k": dict(sliding_window=2047, max_position_embeddings=4096, rope_scaling=None),
    "phi3_mini_128k": dict(  # the old "su" type
        sliding_window=262144,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={"type": "su", "short_factor": SHORT, "long_factor": LONG},
    ),
    "phi3_5_mini": dict(
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG},
    ),
    "phi4_mini": dict(
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        partial_rotary_factor=0.75,
        rope_scaling={"type": "longrope", "short_factor": SHORT[:6], "long_factor": LONG[:6]},
        tie_word_embeddings=True,
    ),
    "phi4": dict(max_position_embeddings=16384, rope_theta=250000, rope_scaling=None),
}


@pytest.mark.parametrize("name", list(PHI3_HUB))
def test_phi3_config_read_as_transformers_reads_it(name, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sft_jax.model.attention import rope_inv_freq

    raw = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **SIZES, **PHI3_HUB[name]}
    ours = _write_config(tmp_path, raw)
    if (raw["rope_scaling"] or {}).get("type") == "su":
        # transformers 5 validates before it renames "su" to "longrope", and refuses the file;
        # it is LongRoPE (what transformers 4 read): compare with the renamed file.
        raw["rope_scaling"] = {**raw["rope_scaling"], "type": "longrope"}
        assert _write_config(tmp_path / "renamed", raw) == ours
        tmp_path = tmp_path / "renamed"
    theirs = AutoConfig.from_pretrained(tmp_path)
    rope = theirs.rope_parameters
    assert ours.rope_theta == rope["rope_theta"] and ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.rotary_dim == int(16 * rope["partial_rotary_factor"])
    assert ours.tie_embeddings == theirs.tie_word_embeddings
    window = theirs.sliding_window
    assert ours.local_layers == ((True,) * 8 if window and window < 4096 else ())
    if rope["rope_type"] == "default":
        assert ours.rope_scaling is None
        return
    short, attention = ROPE_INIT_FUNCTIONS["longrope"](theirs, None)
    original = rope["original_max_position_embeddings"]
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](theirs, None, seq_len=original + 1)
    assert ours.rope_scaling.original_max_position_embeddings == original
    assert ours.rope_scaling.attention_factor == pytest.approx(attention, rel=1e-12)
    np.testing.assert_allclose(rope_inv_freq(ours), short.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(ours, long=True), long.numpy(), rtol=1e-6)


def test_phi3_refusals(tmp_path):
    raw = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **SIZES}
    for fields, error, match in (
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, hf.UnsupportedModelError, "linear"),
        (
            {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": LONG}},
            hf.ModelFileError,
            "short_factor must be a list of 8 numbers",
        ),
        ({"attention_bias": True}, hf.UnsupportedModelError, "attention_bias"),
    ):
        with pytest.raises(error, match=match) as info:
            _write_config(tmp_path, {**raw, **fields})
        assert "config.json" in str(info.value)


def _saved_for_run(family, path):
    """A tiny model of `family` with the stories tokenizer's 512 ids, saved for model.path."""
    if family == "gemma3":
        text = Gemma3TextConfig(**{**GEMMA3_TEXT, "vocab_size": 512})
        config = Gemma3Config(
            text_config=text, vision_config=SiglipVisionConfig(**SIGLIP), mm_tokens_per_image=4
        )
        torch.manual_seed(0)
        model = _perturb(Gemma3ForConditionalGeneration(config))
    else:
        config_cls, fields, _ = FAMILIES[family]
        config = config_cls(**{**TINY, **fields, "vocab_size": 512})
        torch.manual_seed(0)
        model = _perturb(AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
    model.save_pretrained(path)
    return type(model)


@pytest.mark.slow  # end to end: a LoRA run on the family's checkpoint, both exports
@pytest.mark.parametrize("family", ["gemma3", "phi3", "olmo3"])
def test_lora_run_on_family_exports_merged_and_peft(family, tmp_path):
    """A LoRA run with model.path a family's checkpoint trains; its merged export (found
    through the run's model.path) loads in transformers as the source's class, with the
    vision tower copied untouched; its PEFT export on the source gives the merged logits."""
    from sft_jax import export
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.train import train_and_evaluate

    model_cls = _saved_for_run(family, tmp_path / "base")
    c = load_config_file("configs/tiny.py")
    c.model.path = str(tmp_path / "base")
    c.lora.enabled, c.lora.rank, c.lora.base_dtype = True, 2, "float32"
    c.optim.learning_rate = 3e-2
    c.train.max_steps, c.data.max_eval_examples = 2, 8
    train_and_evaluate(parse(c), str(tmp_path / "run"))
    workdir = str(tmp_path / "run")
    assert export.main(["--workdir", workdir, "--out", str(tmp_path / "merged")]) == 0
    assert export.main(["--workdir", workdir, "--out", str(tmp_path / "ad"), "--peft"]) == 0
    merged = model_cls.from_pretrained(tmp_path / "merged").eval()
    base = model_cls.from_pretrained(tmp_path / "base")
    tokens = _tokens() * 3
    with_peft = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    np.testing.assert_allclose(_hf_logits(merged, tokens), _hf_logits(with_peft, tokens), atol=1e-4)
    plain = model_cls.from_pretrained(tmp_path / "base").eval()
    assert np.abs(_hf_logits(merged, tokens) - _hf_logits(plain, tokens)).max() > 1e-4
    if family == "gemma3":
        source, exported = _stored(tmp_path / "base"), _stored(tmp_path / "merged")
        assert all(exported[k] == source[k] for k in _vision_keys(source))


@pytest.mark.slow  # compiles ring attention
def test_new_layer_features_under_context_parallelism():
    """NoPE layers, post-norm layers with q/k norm over all heads, a partial rotary factor and
    LongRoPE (some packed segments past the original context, some not, rows permuted for load
    balancing) give the unsharded model's logits with rows split over 8 context shards."""
    from sft_jax.model.config import RopeScaling
    from sft_jax.model.context_attention import restore_order
    from sft_jax.training import sharding, step
    from tests.helpers import tiny_model_config
    from tests.test_context_parallel import RULES, TOL, T, context_mesh, packed_batch

    scaling = RopeScaling(
        factor=4.0,
        original_max_position_embeddings=8,
        rope_type="longrope",
        attention_factor=1.2,
        short_factor=(1.0, 1.5, 2.0),
        long_factor=(2.0, 4.0, 8.0),
    )
    config = tiny_model_config(
        head_dim=8,
        partial_rotary_factor=0.75,
        rope_scaling=scaling,
        nope_layers=(False, True),
        pre_norms=False,
        sandwich_norms=True,
        qk_norm=True,
        qk_norm_full=True,
    )
    batch = packed_batch()
    lengths = [np.bincount(np.asarray(s))[1:] for s in batch["segment_ids"]]
    assert max(max(x) for x in lengths) > 8 and min(min(x[x > 0]) for x in lengths) <= 8
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    model = Transformer(dataclasses.replace(config, attention="reference"))
    params = model.init(jax.random.PRNGKey(0), *inputs)["params"]
    params = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params
    )
    expected = jax.jit(model.apply)({"params": params}, *inputs)
    mesh = context_mesh(1, 1, 1, 8)
    sharded = Transformer(sharding.pin_model_activations(config, mesh, RULES))

    def logits_fn(p, b):
        b = step.context_order(b, 8)
        out = sharded.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"],
                            slots=step.context_slots(T, 8))  # fmt: skip
        return restore_order(out, 8)

    logits = jax.jit(logits_fn)(params, batch)
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=TOL)


def test_olmo2_norm_numerics_in_bfloat16():
    """OLMo 2's RMSNorm multiplies by its weight in float32 and casts once; so does ours with
    norm_scale_float32 (Llama's casts first, then multiplies in bfloat16: other roundings)."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    from sft_jax.model.layers import RMSNorm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64, 256)).astype(np.float32)
    w = (1 + 0.3 * rng.normal(size=(256,))).astype(np.float32)
    torch_norm = Olmo2RMSNorm(256, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        torch_norm.weight.copy_(torch.from_numpy(w))
        expected = torch_norm(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)

    def ours(scale_float32):
        norm = RMSNorm(1e-6, ("embed",), "bfloat16", "bfloat16", scale_float32=scale_float32)
        return np.asarray(norm.apply({"params": {"scale": wb}}, xb), np.float32)

    assert (ours(True) != expected).mean() < 1e-3
    assert (ours(False) != expected).mean() > 0.05
