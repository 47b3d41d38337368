"""Shared test builders: one tiny decoder config, overridable per test."""

from sft_jax.model import ModelConfig

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
