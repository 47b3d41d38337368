"""gpt-oss from and to Hugging Face: logits, packed rows, KV-cache generation and the train
objective against transformers; attention sinks in every implementation that takes them
(reference, xla, blocked, splash in Pallas' interpreter) and refused by those that cannot; YaRN
RoPE as transformers computes it; the Hub's MXFP4 experts dequantized on import as transformers
dequantizes them; exports load back in transformers; the biased, clamped experts on meshes and
in both grouped layouts; a full fine-tune; a TPU compile of a gpt-oss-shaped model."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GptOssConfig, Mxfp4Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sft_jax import hf
from sft_jax.export import export_hf
from sft_jax.model.attention import (
    AttentionOptions,
    attend,
    attention_mask,
    grouped_attention,
    resolve_implementation,
    rope_attention_factor,
    rope_inv_freq,
    window_mask,
    xla_attention_with_sinks,
)
from sft_jax.model.blocked_attention import blocked_attention
from sft_jax.model.decode import greedy_generate
from sft_jax.model.decoder import RopeScaling, Transformer, count_params
from sft_jax.model.moe import (
    MoeConfig,
    MoeMlp,
    clamped_swiglu,
    expert_parallel_axes,
    grouped_swiglu,
)
from sft_jax.planning import tpu
from sft_jax.training import step
from sft_jax.training.sharding import activation_sharding, param_shardings
from tests.helpers import model_only_state
from tests.test_attention_tpu import (
    SPLASH_CALL,
    compile_forward_backward,
    cpu_mesh,
    packed_segments,
    tpu_mesh,
    tpu_model,
)
from tests.test_attention_tpu import T as SPLASH_T
from tests.test_expert_parallel import RULES, expert_mesh, run

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


@pytest.mark.parametrize("attention", ["auto", "reference", "xla", "blocked"])
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
    objective, parts = step.loss_fn(params, state, batch, jax.random.PRNGKey(0), options)

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


# --- attention sinks in each implementation -------------------------------------------------


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("kernel", [dict(block=16), dict(tile=16, loop_from=8)])
def test_blocked_and_xla_sinks_equal_the_reference(window, kernel):
    """Values and gradients (q, k, v and the sinks) of blocked attention, unrolled and looped
    (online softmax seeded with the sink), and of the XLA path, against the reference, on packed
    rows with padding."""
    b, t, n, kv, h = 2, 40, 4, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, t, kv, h))
    v = jax.random.normal(keys[2], (b, t, kv, h))
    sinks = 2.0 * jax.random.normal(keys[3], (n,))
    weights = jax.random.normal(keys[4], (b, t, n, h))
    segments = np.ones((b, t), np.int32)
    segments[0, 15:], segments[1, 30:] = 2, 0
    mask = attention_mask(jnp.asarray(segments))
    if window is not None:
        mask = window_mask(mask, jnp.arange(t), window)

    def loss(attend):
        return lambda q, k, v, s: jnp.sum(attend(q, k, v, s) * weights)

    reference = loss(lambda q, k, v, s: grouped_attention(q, k, v, mask, scale=0.3, sinks=s))
    blocked = loss(
        lambda q, k, v, s: blocked_attention(
            q, k, v, jnp.asarray(segments), scale=0.3, window=window, sinks=s, **kernel
        )
    )
    xla = loss(lambda q, k, v, s: xla_attention_with_sinks(q, k, v, mask, s, 0.3))
    args = (q, k, v, sinks)
    expected = jax.grad(reference, argnums=(0, 1, 2, 3))(*args)
    no_sinks = grouped_attention(q, k, v, mask, scale=0.3)
    assert (
        float(jnp.abs(no_sinks - grouped_attention(q, k, v, mask, scale=0.3, sinks=sinks)).max())
        > 0.1
    )
    for other in (blocked, xla):
        np.testing.assert_allclose(other(*args), reference(*args), rtol=1e-5)
        grads = jax.grad(other, argnums=(0, 1, 2, 3))(*args)
        for got, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_implementations_without_sinks_are_refused_or_avoided():
    """auto never picks one that would drop the sinks; an explicit one says why it cannot."""
    settings = dict(dtype="bfloat16", head_dim=64, softcap=None, seq_len=1024, sinks=True)
    assert resolve_implementation("auto", platform="cpu", **settings) == "blocked"
    assert resolve_implementation("auto", platform="gpu", **settings) == "xla"
    assert resolve_implementation("auto", platform="tpu", **settings) == "splash"
    assert resolve_implementation("auto", platform="gpu", **{**settings, "sinks": False}) == "cudnn"
    with pytest.raises(ValueError, match="cudnn attention has no attention sinks"):
        resolve_implementation("cudnn", platform="gpu", **settings)
    for requested in ("auto", "splash"):  # splash with gathered keys and the ring take none
        with pytest.raises(ValueError, match=r"mesh\.context=2.*sinks"):
            resolve_implementation(requested, platform="tpu", context=2, **settings)
    q = jnp.zeros((1, 128, 4, 8))
    options = AttentionOptions("cudnn")
    with pytest.raises(ValueError, match="cudnn attention has no attention sinks"):
        attend(
            q, q[:, :, :2], q[:, :, :2], jnp.ones((1, 128, 128), bool), options, sinks=q[0, 0, :, 0]
        )


# name: mesh (data, fsdp, tensor), batch rows, query heads N, kv heads K, window
SPLASH_CASES = {
    "fsdp": ((1, 8, 1), 8, 4, 2, None),
    "data_x_tensor_kv_heads_repeated": ((2, 1, 4), 2, 8, 2, None),
    "fsdp_x_tensor_sliding_window": ((1, 4, 2), 4, 4, 2, 24),
}


@pytest.mark.parametrize("case", SPLASH_CASES)
def test_sharded_splash_with_sinks_equals_reference(case):
    """The TPU kernel's own sinks, in Pallas' interpreter on the fake CPU devices, under
    shard_map (sinks split with the query heads): outputs and gradients, the sinks' summed over
    the batch shards, equal the reference on packed rows."""
    (data, fsdp, tensor), b, n, kv, window = SPLASH_CASES[case]
    mesh = cpu_mesh(data, fsdp, tensor)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, SPLASH_T, h, 16)), jnp.float32) for h in (n, kv, kv))
    sinks = jnp.asarray(2.0 * rng.normal(size=(n,)), jnp.float32)
    seg = jnp.asarray(packed_segments(b, seed=1))
    mask = attention_mask(seg)
    if window is not None:
        mask = window_mask(mask, jnp.arange(SPLASH_T), window)
    weights = jnp.asarray(rng.normal(size=(b, SPLASH_T, n, 16)), jnp.float32)
    real = (seg > 0)[:, :, None, None]  # padding rows' outputs are never trained

    def loss(impl):
        def f(q, k, v, sinks):
            options = AttentionOptions(impl, window=window, mesh=mesh, rules=RULES, interpret=True)
            local = None if window is None else jnp.asarray(True)
            out = attend(q, k, v, mask, options, segment_ids=seg, local=local, sinks=sinks)
            return jnp.sum(jnp.where(real, out * weights, 0.0)), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    (_, got), got_grads = loss("splash")(q, k, v, sinks)
    (_, want), want_grads = loss("reference")(q, k, v, sinks)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5)
    for name, a, w in zip(("q", "k", "v", "sinks"), got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, w, atol=2e-5, err_msg=f"d{name}")


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


# --- the gpt-oss expert layer on a mesh -----------------------------------------------------


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1, 8), (2, 1, 1, 1, 4), (2, 4, 1, 1, 1)])
def test_biased_clamped_experts_on_a_mesh_equal_unsharded(sizes):
    """Router and expert biases and the clamped SwiGLU under shard_map: split over an expert
    axis (each device its experts' biases) and whole on every device; outputs, router
    statistics and gradients (the biases' included) equal the single-device layer."""
    cfg = MoeConfig(16, 8, 8, 2, norm_topk_prob=True, router_bias=True, expert_bias=True)
    cfg = dataclasses.replace(cfg, swiglu_limit=0.3)
    x = jax.random.normal(jax.random.key(1), (8, 4, 16), jnp.float32)
    variables = MoeMlp(cfg).init(jax.random.key(0), x)
    params = nn.meta.unbox(variables)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(
        tree, [jax.random.normal(k, p.shape) * 0.5 for k, p in zip(keys, leaves, strict=True)]
    )
    mask = jnp.ones((8, 4), bool).at[0, -2:].set(False)
    want = run(cfg, params, x, mask)
    grads = want[0][0]["experts"]
    assert set(grads) >= {"gate_bias", "up_bias", "down_bias"}
    assert float(jnp.abs(grads["up_bias"]).max()) > 0

    mesh = expert_mesh(sizes)
    sharded = dataclasses.replace(cfg, mesh=mesh, mesh_rules=RULES)
    assert bool(expert_parallel_axes(sharded)) == (sizes[-1] > 1)
    shardings = param_shardings(nn.get_partition_spec(variables)["params"], params, mesh, RULES)
    tokens = activation_sharding(mesh, RULES)
    args = (
        jax.device_put(params, shardings),
        jax.device_put(x, tokens),
        jax.device_put(mask, NamedSharding(mesh, PartitionSpec(*tokens.spec[:2]))),
    )
    got = jax.jit(functools.partial(run, sharded))(*args)
    tol = dict(atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **tol), got, want)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_grouped_biased_clamped_experts_equal_a_per_token_reference(platform):
    """Both grouped layouts (the CPU's padded blocks; ragged_dot's rows, as TPU and GPU run
    them, here by XLA:CPU's dense ragged_dot) add each row's own expert's biases."""
    n, d, f, e, k = 37, 8, 6, 5, 2
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (n, d))
    experts = jax.random.randint(keys[1], (n, k), 0, e - 1)  # expert e - 1 gets no token
    gate, up = (jax.random.normal(kk, (e, d, f)) for kk in keys[2:4])
    down = jax.random.normal(keys[4], (e, f, d))
    shapes = ((e, f), (e, f), (e, d))
    biases = tuple(jax.random.normal(kk, s) for kk, s in zip(keys[5:], shapes, strict=True))
    got = grouped_swiglu(x, experts, gate, up, down, None, platform, biases, (0.5, 1.702))
    g = jnp.einsum("nd,nkdf->nkf", x, gate[experts]) + biases[0][experts]
    u = jnp.einsum("nd,nkdf->nkf", x, up[experts]) + biases[1][experts]
    h = clamped_swiglu(g, u, 0.5, 1.702)
    want = jnp.einsum("nkf,nkfd->nkd", h, down[experts]) + biases[2][experts]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# --- training --------------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
def v5e_devices() -> list:
    if tpu.libtpu_missing():
        pytest.skip(f"no TPU compiler: {tpu.libtpu_missing()}")
    return tpu.topology_devices("v5e:2x2")


def test_gpt_oss_model_compiles_splash_with_sinks_for_tpu(v5e_devices):
    """A gpt-oss-shaped model (sinks, biases, alternating windows, YaRN, biased clamped
    experts) compiles its train step for TPU v5e:2x2 with "auto" attention: splash with the
    sinks, the experts on ragged_dot with their per-row biases (no TPU needed: libtpu's
    compiler)."""
    yarn = RopeScaling(4.0, original_max_position_embeddings=128, rope_type="yarn")
    model = tpu_model(
        tpu_mesh(v5e_devices, 2, 1, 2),
        num_layers=2,
        attention_bias=True,
        o_proj_bias=True,
        attention_sinks=True,
        sliding_window=128,
        local_layers=(True, False),
        rope_scaling=dataclasses.replace(yarn, attention_factor=1.1),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        norm_topk_prob=True,
        router_bias=True,
        expert_bias=True,
        swiglu_limit=7.0,
    )
    compiled, hlo = compile_forward_backward(model, model.config.mesh)
    assert SPLASH_CALL in hlo and "ragged" in hlo
    assert compiled.memory_analysis().temp_size_in_bytes > 0
