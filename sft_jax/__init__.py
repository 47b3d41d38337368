"""sft_jax: supervised fine-tuning of open LLMs in JAX/Flax."""

__version__ = "0.1.0"
