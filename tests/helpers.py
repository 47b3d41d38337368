"""Shared test builders: one tiny decoder config, overridable per test."""

from collections.abc import Callable
from typing import Any

from sft_jax.model.decoder import ModelConfig
from sft_jax.training.state import TrainState

TINY_DEFAULTS = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=False,
    qk_norm=False,
    attention_bias=False,
    max_position_embeddings=128,
    rope_scaling=None,
    dtype="float32",
    param_dtype="float32",
    remat="none",
)


def tiny_model_config(**overrides) -> ModelConfig:
    """A 2-layer GQA decoder small enough to compile in seconds on CPU."""
    return ModelConfig(**{**TINY_DEFAULTS, **overrides})


def model_only_state(apply_fn: Callable, frozen: Any = None) -> TrainState:
    """A TrainState holding only what `step.loss_fn` reads besides the params (the apply
    function and, under LoRA, the frozen base): for tests that differentiate a bare model."""
    return TrainState(
        step=None, params=None, opt_state=None, rng=None, apply_fn=apply_fn, tx=None, frozen=frozen
    )
