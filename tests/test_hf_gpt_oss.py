"""gpt-oss from and to Hugging Face: config.json (YaRN as transformers computes it), logits per
attention implementation, packed rows, KV-cache generation and the train objective against
transformers; the Hub's MXFP4 experts dequantized on import as transformers dequantizes them;
exports load back in transformers; a full fine-tune. The layers on their own (sinks in each
attention implementation, the experts on meshes, a TPU compile): tests/test_gpt_oss_layers.py."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GptOssConfig, Mxfp4Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sft_jax import hf
from sft_jax.export import export_hf
from sft_jax.model.attention import (
    rope_attention_factor,
    rope_inv_freq,
)
from sft_jax.model.decode import greedy_generate
from sft_jax.model.decoder import Transformer, count_params
from sft_jax.training import step
from tests.helpers import model_only_state

MODEL_TOL = 1e-4
AUX_COEF = 0.25
# Tiny, with every gpt-oss feature able to change the logits: a window (4) shorter than the
# inputs on the first layer; YaRN whose ramp falls inside head_dim 16 (factor 4 over an original
# 64 positions); a swiglu_limit the expert activations exceed.
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
    max_position_embeddings=256,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=150000.0,
        factor=4.0,
        beta_fast=32.0,
        beta_slow=1.0,
        truncate=False,
        original_max_position_embeddings=64,
    ),
    swiglu_limit=0.5,
    router_aux_loss_coef=AUX_COEF,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)


def _tiny_model(seed=0, **overrides):
    """A tiny random transformers gpt-oss with every weight off its init: sinks and biases
    (zeros at init) random, norms not all ones, routers peaked (top-k choices not near ties)."""
    torch.manual_seed(seed)
    config = GptOssConfig(**{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(("router.weight", "sinks")):
                param.copy_(torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory, transformers model) of the tiny model, saved as transformers saves it."""
    path = tmp_path_factory.mktemp("gpt_oss")
    model = _tiny_model()
    model.save_pretrained(path)
    return path, model


def _load(path, **overrides):
    config = hf.load_model_config(str(path), dtype="float32", param_dtype="float32", remat="none")
    return dataclasses.replace(config, **overrides), hf.load_params(str(path), config)


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


def _tokens(batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(1, TINY["vocab_size"], size=(batch, length))


POSITIONS = np.stack([np.arange(12), np.arange(12) + 37])


# --- config.json ----------------------------------------------------------------------------


def test_config_reads_every_gpt_oss_feature(saved):
    path, model = saved
    config, params = _load(path)
    assert config.attention_sinks and config.o_proj_bias and config.attention_bias
    assert config.router_bias and config.expert_bias and config.norm_topk_prob
    assert (config.swiglu_limit, config.swiglu_alpha) == (0.5, model.config.swiglu_alpha)
    assert config.local_layers == (True, False) and config.sliding_window == 4
    assert config.num_experts == 4 and config.moe_intermediate_size == 32
    assert config.router_aux_loss_coef == AUX_COEF
    assert count_params(params) == model.num_parameters()


@pytest.mark.parametrize(
    "rope",
    [
        dict(truncate=False),
        dict(truncate=True),
        dict(truncate=True, attention_factor=1.25),
        dict(truncate=False, mscale=2.0, mscale_all_dim=1.0, beta_fast=8.0, beta_slow=2.0),
        dict(truncate=True, factor=8.0, beta_fast=4.0, original_max_position_embeddings=32),
    ],
)
def test_yarn_matches_transformers(rope, tmp_path):
    """Inverse frequencies and the attention factor (on cos and sin) of transformers' YaRN,
    `truncate` included (transformers rounds the ramp's bounds unless it is false)."""
    params = {**TINY["rope_parameters"], **rope}
    fields = {**TINY, "rope_parameters": params, "architectures": ["GptOssForCausalLM"]}
    fields["model_type"] = "gpt_oss"
    (tmp_path / "config.json").write_text(json.dumps(fields))
    theirs = AutoConfig.from_pretrained(tmp_path)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](theirs)
    ours = hf.load_model_config(str(tmp_path), dtype="float32", param_dtype="float32", remat="none")
    np.testing.assert_allclose(rope_inv_freq(ours), inv_freq.numpy(), rtol=1e-6)
    assert rope_attention_factor(ours) == pytest.approx(factor, rel=1e-12)


def test_hub_config_without_rope_and_window_takes_gpt_oss_defaults(tmp_path):
    fields = {k: v for k, v in TINY.items() if k not in ("rope_parameters", "sliding_window")}
    fields |= dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss")
    fields["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    theirs = AutoConfig.from_pretrained(tmp_path)
    ours = hf.load_model_config(str(tmp_path), dtype="float32", param_dtype="float32", remat="none")
    assert ours.sliding_window == theirs.sliding_window == 128
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](theirs)
    np.testing.assert_allclose(rope_inv_freq(ours), inv_freq.numpy(), rtol=1e-6)
    assert rope_attention_factor(ours) == pytest.approx(factor)
    fields["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(hf.UnsupportedModelError, match=r"config\.json: .*bitsandbytes"):
        hf.load_model_config(str(tmp_path), dtype="float32", param_dtype="float32", remat="none")


# --- logits, packing, generation, objective -------------------------------------------------


# "auto" is blocked on the CPU: the explicit "blocked" runs the same program, in the slow tier.
@pytest.mark.parametrize(
    "attention", ["auto", "reference", "xla", pytest.param("blocked", marks=pytest.mark.slow)]
)
def test_logits_equal_transformers(attention, saved):
    """Every implementation that takes sinks ("auto" is blocked on the CPU); row 1 at offset
    positions. Without the window, the sinks or the clamp the logits would differ."""
    path, model = saved
    config, params = _load(path, attention=attention)
    tokens = _tokens()
    ours = np.asarray(_apply(config, params, tokens, POSITIONS, np.ones_like(tokens)))
    expected = _hf_logits(model, tokens, POSITIONS)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(ours, expected, atol=MODEL_TOL)
    if attention != "auto":
        return
    changes = [
        dict(sliding_window=None, local_layers=()),
        dict(attention_sinks=False),
        dict(swiglu_limit=1e6),
    ]
    for change in changes:
        other = dataclasses.replace(config, **change)
        params_ = params
        if not other.attention_sinks:
            params_ = jax.tree.map(lambda x: x, params)
            del params_["layers"]["attn"]["sinks"]
        logits = np.asarray(_apply(other, params_, tokens, POSITIONS, np.ones_like(tokens)))
        assert np.abs(logits - ours).max() > 1e-3, change  # each feature matters here


def test_packed_row_gives_each_example_its_own_logits(saved):
    path, model = saved
    config, params = _load(path)
    tokens = _tokens()
    a, b = tokens[0, :7], tokens[1, :5]
    packed = np.concatenate([a, b])[None]
    positions = np.concatenate([np.arange(7), np.arange(5)])[None]
    segments = np.asarray([[1] * 7 + [2] * 5])
    logits = np.asarray(_apply(config, params, packed, positions, segments))
    np.testing.assert_allclose(logits[:, :7], _hf_logits(model, a[None]), atol=MODEL_TOL)
    np.testing.assert_allclose(logits[:, 7:], _hf_logits(model, b[None]), atol=MODEL_TOL)


def test_greedy_generation_matches_transformers(saved):
    path, model = saved
    config, params = _load(path)
    prompts = [[5, 17, 99, 3, 42], [7, 8]]
    ours = greedy_generate(Transformer(config), params, prompts, max_new_tokens=8, stop_ids=[])
    for prompt, generated in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8
            )
        assert generated == out[0, len(prompt) :].tolist()


def test_train_objective_equals_transformers_loss(saved):
    """Objective / loss tokens = transformers' loss with output_router_logits=True (mean
    cross-entropy plus router_aux_loss_coef x the load-balancing loss over unpadded tokens)."""
    path, model = saved
    config, params = _load(path)
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, TINY["vocab_size"], size=(2, 12))
    segment_ids = np.ones((2, 12), np.int32)
    inputs[1, 8:], segment_ids[1, 8:] = 0, 0
    loss_mask = (rng.random((2, 12)) < 0.8) & (segment_ids > 0)
    loss_mask[:, -1] = loss_mask[1, 7] = False  # target t = input t + 1
    targets = np.concatenate([inputs[:, 1:], np.zeros((2, 1), inputs.dtype)], axis=1)
    batch = dict(
        inputs=inputs,
        targets=targets,
        positions=np.broadcast_to(np.arange(12), (2, 12)).copy(),
        segment_ids=segment_ids,
        loss_mask=loss_mask,
    )
    options = step.StepOptions(router_stats=True, router_aux_coef=config.router_aux_loss_coef)
    state = model_only_state(Transformer(config).apply)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_fn = jax.jit(step.loss_fn, static_argnums=4)  # the MoE model op by op is far slower
    objective, parts = loss_fn(params, state, batch, jax.random.PRNGKey(0), options)

    labels = np.full_like(inputs, -100)
    labels[:, 1:] = np.where(loss_mask[:, :-1], inputs[:, 1:], -100)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(inputs),
            attention_mask=torch.from_numpy(segment_ids.astype(np.int64)),
            labels=torch.from_numpy(labels),
            output_router_logits=True,
        )
    assert float(AUX_COEF * out.aux_loss) > 1e-2  # the router term is not negligible
    np.testing.assert_allclose(float(objective) / float(parts.tokens), float(out.loss), rtol=1e-5)


# --- weights: MXFP4, the layouts transformers writes, export --------------------------------

_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _quantize_mxfp4(w):
    """w [E, C, R] (transformers' layout) -> (blocks [E, R, C/32, 16], scales [E, R, C/32]) uint8:
    each group of 32 values along C scaled by a power of two so its largest magnitude fits 6
    (e2m1's largest), each value rounded to the nearest e2m1 code, two codes a byte (low nibble
    first), the exponent stored plus 127."""
    rows = np.swapaxes(w, 1, 2).astype(np.float32)  # [E, R, C]
    e, r, c = rows.shape
    groups = rows.reshape(e, r, c // 32, 32)
    peak = np.max(np.abs(groups), axis=-1)
    exponent = np.ceil(np.log2(np.maximum(peak, 1e-30) / 6.0)).astype(np.int32)
    scaled = groups / np.exp2(exponent)[..., None]
    magnitude = np.argmin(np.abs(np.abs(scaled)[..., None] - _E2M1), axis=-1)
    codes = (magnitude | np.where(scaled < 0, 8, 0)).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    # Contiguous: safetensors' numpy writer stores the raw buffer whatever the strides.
    return np.ascontiguousarray(blocks), np.ascontiguousarray(exponent + 127, np.uint8)


@pytest.fixture(scope="module")
def quantized(saved, tmp_path_factory):
    """The tiny model saved as the Hub saves gpt-oss (MXFP4 experts and a quantization_config),
    and transformers' own load of that directory (its MXFP4 reader, dequantizing)."""
    path, _ = saved
    out = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    tensors = load_file(str(path / "model.safetensors"))
    for i in range(TINY["num_hidden_layers"]):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{i}.mlp.experts.{name}"
            blocks, scales = _quantize_mxfp4(tensors.pop(key))
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (out / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(
        out,
        quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.float32,
        attn_implementation="eager",
    )
    return out, model.eval()


def test_mxfp4_experts_load_dequantized(saved, quantized):
    """Ours from the MXFP4 directory gives the logits of transformers' load of it."""
    _, original = saved
    qpath, model = quantized
    config, params = _load(qpath)
    hf.check_checkpoint(str(qpath), config)
    tokens = _tokens()
    ours = np.asarray(_apply(config, params, tokens, POSITIONS, np.ones_like(tokens)))
    np.testing.assert_allclose(ours, _hf_logits(model, tokens, POSITIONS), atol=MODEL_TOL)
    # The quantization is coarse enough to show: the original weights give other logits.
    assert np.abs(_hf_logits(original, tokens, POSITIONS) - ours).max() > 1e-3


def test_export_round_trip(saved, quantized, tmp_path, stories_dir):
    """ours -> export (transformers' fused layout, dequantized, sharded) -> transformers: the
    same logits; from the transformers checkpoint, bit-identical weights; from the MXFP4 one,
    no quantization_config (transformers would otherwise expect blocks)."""
    tokens = _tokens()
    for (path, model), name in ((saved, "plain"), (quantized, "mxfp4")):
        config, params = _load(path)
        ours = np.asarray(_apply(config, params, tokens, POSITIONS, np.ones_like(tokens)))
        out = tmp_path / name
        export_hf(
            params,
            config,
            str(out),
            tokenizer_dir=str(stories_dir),
            source_model_dir=str(path),
            max_shard_bytes=64 * 1024,
        )
        written = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in written
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        with safe_open(str(saved[0] / "model.safetensors"), "np") as f:
            assert set(index["weight_map"]) == set(f.keys())  # the layout save_pretrained writes
        reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        np.testing.assert_allclose(_hf_logits(reloaded, tokens, POSITIONS), ours, atol=MODEL_TOL)
        for (key, x), y in zip(
            model.state_dict().items(), reloaded.state_dict().values(), strict=True
        ):
            assert torch.equal(x, y), key


def test_random_init_with_gpt_oss_features_is_not_exported_without_its_source(saved):
    config, _ = _load(saved[0])
    with pytest.raises(hf.UnsupportedModelError, match="gpt-oss features"):
        hf.hf_config_dict(config, bos_token_id=1, eos_token_id=2)


# --- training --------------------------------------------------------------------------------


@pytest.mark.slow  # end to end; the objective, the export round trip and the layers' gradients
# (tests/test_gpt_oss_layers.py) stay in the default tier
def test_full_fine_tune_trains_and_exports(tmp_path, stories_dir):
    """A gpt-oss checkpoint (the stories260K vocabulary) fine-tuned in full on the default
    mesh of the test devices: the loss falls, router statistics are logged, and the export of
    the run loads in transformers with the logits of our trained model."""
    from sft_jax import export
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.train import train_and_evaluate
    from sft_jax.training.metrics import read_metrics

    base_dir = tmp_path / "base"
    _tiny_model(vocab_size=512, bos_token_id=1, eos_token_id=2).save_pretrained(base_dir)
    c = load_config_file("configs/tiny.py")
    c.model.path = str(base_dir)
    c.optim.learning_rate = 1e-2
    c.train.update(max_steps=6, log_every=1)
    c.eval.generate_examples = 0
    c.checkpoint.every_steps = 0
    workdir = tmp_path / "run"
    train_and_evaluate(parse(c), str(workdir))
    records = [r for r in read_metrics(str(workdir)) if "loss" in r and "kind" not in r]
    assert records[-1]["loss"] < records[0]["loss"] - 0.1, [r["loss"] for r in records]
    assert all(len(r["expert_load"]) == 4 for r in records)

    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "out")]) == 0
    run = export.load_workdir(str(workdir))
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 12))
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    ours = _apply(run.model_config, run.params, tokens, positions, np.ones_like(tokens))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    np.testing.assert_allclose(_hf_logits(model.eval(), tokens), np.asarray(ours), atol=MODEL_TOL)
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    assert np.abs(_hf_logits(base, tokens) - np.asarray(ours)).max() > 1e-2  # it trained
