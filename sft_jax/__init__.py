"""sft_jax: supervised fine-tuning of open LLMs in JAX/Flax.

`sft_jax.load(path)` loads a workdir, a Hugging Face directory or a PEFT adapter for inference
(see sft_jax/api.py). It is imported on first use, so `import sft_jax` (and every command line)
does not pay for JAX and transformers before it needs them.
"""

import os as _os
from typing import Any

__version__ = "0.1.0"

# transformers prints "PyTorch was not found. Models won't be available ..." at import, as
# advice, in every process that imports it (tokenisation workers too). sft_jax uses only its
# tokenizers and configs, so the advice is noise; set the variable yourself to override.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from sft_jax.api import load

        return load
    raise AttributeError(f"module 'sft_jax' has no attribute {name!r}")
