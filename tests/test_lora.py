"""LoRA tree transforms: targets, zero init, merge algebra, PEFT key mapping both ways."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import lora

L, D, N, K, H, F = 2, 8, 4, 2, 2, 12


def params():
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    normal = lambda shape: jax.random.normal(next(keys), shape)
    return {
        "embed": {"embedding": normal((16, D))},
        "layers": {
            "attn": {
                "q_proj": {"kernel": normal((L, D, N, H))},
                "k_proj": {"kernel": normal((L, D, K, H))},
                "v_proj": {"kernel": normal((L, D, K, H))},
                "o_proj": {"kernel": normal((L, N, H, D))},
            },
            "attn_norm": {"scale": jnp.ones((L, D))},
            "mlp": {"down_proj": {"kernel": normal((L, F, D))}},
        },
    }


def randomised(adapters):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    values = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, values)


def test_targets_and_zero_b():
    adapters = lora.init_adapters(params(), ("q_proj", "v_proj"), rank=3, rng=jax.random.PRNGKey(0))
    assert set(adapters["layers"]["attn"]) == {"q_proj", "v_proj"}
    q = adapters["layers"]["attn"]["q_proj"]
    assert q["a"].shape == (L, D, 3) and q["b"].shape == (L, 3, N, H)
    assert not np.any(q["b"]) and np.any(q["a"])
    with pytest.raises(ValueError, match="match no layer kernel"):
        lora.init_adapters(params(), ("qkv",), rank=3, rng=jax.random.PRNGKey(0))


def test_merge_equals_low_rank_path():
    p = params()
    adapters = randomised(lora.init_adapters(p, ("*_proj",), 3, jax.random.PRNGKey(0)))
    merged = lora.merge(p, adapters, scale=0.5)
    x = jax.random.normal(jax.random.PRNGKey(2), (N, H))
    for layer in range(L):
        o, ad = p["layers"]["attn"]["o_proj"]["kernel"][layer], adapters["layers"]["attn"]["o_proj"]
        expected = x.reshape(-1) @ o.reshape(N * H, D)
        expected += 0.5 * (x.reshape(-1) @ ad["a"][layer].reshape(N * H, 3)) @ ad["b"][layer]
        got = x.reshape(-1) @ merged["layers"]["attn"]["o_proj"]["kernel"][layer].reshape(N * H, D)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(merged["embed"]["embedding"], p["embed"]["embedding"])


def test_scales():
    assert lora.lora_scale(32, 16, rslora=False) == 2.0
    assert lora.lora_scale(32, 16, rslora=True) == 8.0


def test_peft_round_trip_and_shapes():
    p = params()
    adapters = randomised(lora.init_adapters(p, ("*_proj",), 3, jax.random.PRNGKey(0)))
    tensors = lora.to_peft_tensors(adapters)
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (3, D)
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (
        N * H,
        3,
    )
    assert tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (
        3,
        N * H,
    )
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (D, 3)
    back = lora.from_peft_tensors(tensors, p)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)


def test_peft_import_rejects_unknown_or_partial():
    p = params()
    tensors = lora.to_peft_tensors(lora.init_adapters(p, ("q_proj",), 2, jax.random.PRNGKey(0)))
    partial = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    with pytest.raises(ValueError, match="all 2 layers"):
        lora.from_peft_tensors(partial, p)
    with pytest.raises(ValueError, match="does not adapt"):
        lora.from_peft_tensors(
            {"base_model.model.model.layers.0.self_attn.qkv.lora_A.weight": 1}, p
        )


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("shape", [(3, 50, 24), (2, 5, 128)])
def test_quantisation_error_within_format_bound(fmt, shape):
    """Blockwise absmax along the last axis: |x - deq(q(x))| <= the format's bound x the block's
    absmax, per block; a last dimension that is not a multiple of 64 gets smaller blocks (24:
    one block of 24; 128: two of 64), and the codes keep the leading dims (for sharding)."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape) * 0.05
    q = lora.quantize(x, fmt)
    back = lora.dequantize(q)
    assert back.shape == x.shape and back.dtype == x.dtype and q.shape == x.shape
    block = min(shape[-1], 64)
    assert q.block == block and q.scales.shape == (*shape[:-1], shape[-1] // block)
    blocks = lambda a: np.asarray(a).reshape(-1, block)
    err = np.abs(blocks(back) - blocks(x))
    absmax = np.abs(blocks(x)).max(axis=1, keepdims=True)
    bound = np.asarray(lora.quant.error_bound(fmt, absmax))
    assert np.all(err <= bound * (1 + 1e-6) + 1e-12)
    assert np.all(err.max(axis=1) > 0)  # it is lossy, so the bound is what is being tested
    one_layer = jax.tree.map(lambda a: a[1], q)  # what nn.scan hands one layer
    np.testing.assert_array_equal(lora.dequantize(one_layer), back[1])
    if fmt == "nf4":
        assert q.codes.dtype == np.uint8 and q.codes.size * 2 == q.scales.size * block  # packed
        np.testing.assert_allclose(
            lora.quant.NF4_MAX_HALF_GAP, (1.0 - 0.6961928009986877) / 2
        )  # -1 .. -0.696


def test_quantisation_block_sizes():
    """Blocks divide the last dimension: odd dims work for int8, NF4 needs an even one."""
    assert lora.quant.block_size(688, "int8") == 43 and lora.quant.block_size(8, "nf4") == 8
    assert lora.quant.block_size(7, "int8") == 7 and lora.quant.block_size(2048, "nf4") == 64
    with pytest.raises(ValueError, match="nf4 needs an even last dimension"):
        lora.quantize(jnp.ones((4, 7)), "nf4")


def test_quantize_kernels_only_layer_kernels():
    tree = lora.quantize_kernels(params(), "int8", jnp.bfloat16)
    assert isinstance(tree["layers"]["attn"]["q_proj"]["kernel"], lora.Quantized)
    assert tree["embed"]["embedding"].dtype == jnp.bfloat16
    assert lora.dequantize(tree)["layers"]["mlp"]["down_proj"]["kernel"].dtype == jnp.bfloat16


def test_rslora_scale_grows_with_sqrt_rank():
    """rsLoRA keeps the update magnitude stable as rank grows: scale x sqrt(r) is constant."""
    for rank in (4, 16, 64):
        assert lora.lora_scale(16.0, rank, rslora=True) * math.sqrt(rank) == pytest.approx(16.0)
        assert lora.lora_scale(16.0, rank, rslora=False) * rank == pytest.approx(16.0)


def test_dora_merge_matches_reference():
    """merge() under DoRA: m * (W + s a b) / ||W + s a b||, norm over the input dims (PEFT's
    weight_norm over dim 1 of the [out, in] weight), on a kernel with two input dims (o_proj)."""
    p = params()
    adapters = randomised(
        lora.init_magnitudes(p, lora.init_adapters(p, ("o_proj",), 3, jax.random.PRNGKey(0)))
    )
    merged = lora.merge(p, adapters, scale=0.5)["layers"]["attn"]["o_proj"]["kernel"]
    ad = adapters["layers"]["attn"]["o_proj"]
    for layer in range(L):
        w = (
            np.asarray(p["layers"]["attn"]["o_proj"]["kernel"][layer]).reshape(N * H, D).T
        )  # [out, in]
        lora_w = 0.5 * (np.asarray(ad["a"][layer]).reshape(N * H, 3) @ np.asarray(ad["b"][layer])).T
        full = w + lora_w
        expected = (
            np.asarray(ad["m"][layer])[:, None] * full / np.linalg.norm(full, axis=1, keepdims=True)
        )
        np.testing.assert_allclose(
            np.asarray(merged[layer]).reshape(N * H, D).T, expected, atol=1e-5
        )


def test_config_accepts_exactly_the_saveable_modules():
    """config.py keeps its own copy of the names (it does not import jax); they must agree."""
    from sft_jax.config import SAVEABLE_LORA_MODULES

    assert SAVEABLE_LORA_MODULES == lora.SAVEABLE_MODULES
