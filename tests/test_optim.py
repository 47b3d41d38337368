"""Learning-rate schedule and weight-decay mask."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sft_jax.config import OptimSection
from sft_jax.lora import SAVED, add_saved_modules
from sft_jax.training.optim import decay_mask, make_optimizer, make_schedule, warmup_steps


def optim(**overrides) -> OptimSection:
    values = base.get_config().optim.to_dict()
    values.update(overrides)
    return OptimSection(**values)


def test_warmup_then_cosine_to_floor():
    cfg = optim(learning_rate=1.0, warmup_steps=4, end_lr_ratio=0.1)
    schedule = make_schedule(cfg, total_steps=20)
    lrs = [float(schedule(s)) for s in range(20)]
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-6)
    assert all(a >= b - 1e-7 for a, b in itertools.pairwise(lrs[4:]))  # monotone decay
    middle = 4 + (20 - 4 - 1) / 2
    assert float(schedule(middle)) == pytest.approx(
        0.55, abs=1e-6
    )  # halfway: mean of peak and floor


def test_warmup_ratio_rounds_up():
    assert warmup_steps(optim(warmup_ratio=0.03, warmup_steps=-1), 100) == 3
    assert warmup_steps(optim(warmup_ratio=0.031, warmup_steps=-1), 100) == 4
    assert warmup_steps(optim(warmup_steps=7), 100) == 7


def test_decay_mask_skips_norms_and_biases():
    params = {
        "embed": {"embedding": jnp.ones((4, 2))},
        "layers": {
            "attn_norm": {"scale": jnp.ones(2)},
            "q": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        },
    }
    mask = decay_mask(params)
    assert mask["embed"]["embedding"] and mask["layers"]["q"]["kernel"]
    assert not mask["layers"]["attn_norm"]["scale"] and not mask["layers"]["q"]["bias"]


def test_lora_saved_modules_decay_like_the_leaves_they_copy():
    """Saved modules are keyed by HF name ("embed_tokens"), not "embedding"; they must still
    decay exactly as the same leaves do under full fine-tuning."""
    params = {
        "embed": {"embedding": jnp.ones((8, 2))},
        "lm_head": {"kernel": jnp.ones((2, 8))},
        "final_norm": {"scale": jnp.ones(2)},
        "layers": {"attn_norm": {"scale": jnp.ones((3, 2))}},
    }
    modules = ("embed_tokens", "lm_head", "norm", "input_layernorm")
    adapters = add_saved_modules(
        params, {"layers": {"q_proj": {"a": jnp.ones((3, 2, 1))}}}, modules
    )
    full, lora = decay_mask(params), decay_mask(adapters)
    saved = lora[SAVED]
    assert saved == {
        "embed_tokens": full["embed"]["embedding"],
        "lm_head": full["lm_head"]["kernel"],
        "norm": full["final_norm"]["scale"],
        "input_layernorm": full["layers"]["attn_norm"]["scale"],
    }
    assert saved["embed_tokens"] and saved["lm_head"] and not saved["norm"]
    assert lora["layers"]["q_proj"]["a"]


def test_weight_decay_leaves_norm_scales_alone():
    cfg = optim(learning_rate=0.1, weight_decay=0.5, warmup_steps=0, clip_norm=0.0)
    tx = make_optimizer(cfg, total_steps=10)
    params = {"norm": {"scale": jnp.ones(3)}, "dense": {"kernel": jnp.ones((3, 3))}}
    zeros = {"norm": {"scale": jnp.zeros(3)}, "dense": {"kernel": jnp.zeros((3, 3))}}
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5, rtol=1e-6)


def test_bfloat16_moments_are_stored_in_bfloat16_and_update_like_float32():
    """state_dtype=bfloat16 keeps Adam's mu and nu in bf16 (count stays an integer); the first
    update equals float32 Adam's up to bf16 rounding of the stored moments."""
    params = {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}}
    grads = {"dense": {"kernel": jnp.linspace(0.5, -0.3, 12).reshape(3, 4)}}
    updates = {}
    for dtype in ("float32", "bfloat16"):
        tx = make_optimizer(optim(learning_rate=0.1, warmup_steps=0, state_dtype=dtype), 10)
        state = tx.init(params)
        adam = state[1][0]
        assert adam.mu["dense"]["kernel"].dtype == jnp.dtype(dtype)
        assert adam.nu["dense"]["kernel"].dtype == jnp.dtype(dtype)
        assert jnp.issubdtype(adam.count.dtype, jnp.integer)
        updates[dtype], state = tx.update(grads, state, params)
        updates[dtype], state = tx.update(grads, state, params)  # reads the stored moments
        assert state[1][0].mu["dense"]["kernel"].dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(
        updates["bfloat16"]["dense"]["kernel"], updates["float32"]["dense"]["kernel"], rtol=1e-2
    )
