"""sft_jax: supervised fine-tuning of open LLMs in JAX/Flax."""

__version__ = "0.1.0"

import os as _os

# transformers prints "PyTorch was not found. Models won't be available ..." at import, as
# advice, in every process that imports it (tokenisation workers too). sft_jax uses only its
# tokenizers and configs, so the advice is noise; set the variable yourself to override.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
