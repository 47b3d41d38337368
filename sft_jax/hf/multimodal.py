"""What an export of a multimodal checkpoint's language model carries over from its source:
the other modules' tensors (Gemma 3's vision tower and projector, Gemma 4's vision and audio
towers and their embedders), copied byte for byte, and
whether PEFT adapters on it name the language model's modules."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from sft_jax.hf.config import read_config_json
from sft_jax.hf.families import is_gemma3_multimodal
from sft_jax.hf.gemma4 import is_gemma4_multimodal
from sft_jax.hf.layout import MoeLayout
from sft_jax.hf.safetensors import Checkpoint


def is_multimodal(model_dir: str | None) -> bool:
    """Whether `model_dir`'s config.json is a multimodal model whose language model we load
    (Gemma3ForConditionalGeneration, Gemma4ForConditionalGeneration): its PEFT adapters then
    name that model's modules."""
    file = os.path.join(model_dir, "config.json") if model_dir else ""
    if not file or not os.path.isfile(file):
        return False
    raw = read_config_json(file)
    return is_gemma3_multimodal(raw) or is_gemma4_multimodal(raw)


def copied_tensors(
    source_model_dir: str | None, layout: MoeLayout
) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], Callable[[str], np.ndarray]]:
    """The source checkpoint's tensors an export copies through untouched (a multimodal model's
    vision tower and projector: `layout.copied`), as key -> (shape, stored dtype), and a reader
    of their stored values (so their bytes are the source's)."""
    if not layout.copied or not source_model_dir:
        return {}, lambda key: np.zeros(())
    ckpt = Checkpoint(source_model_dir)
    keys = sorted(k for k in ckpt.files if k.startswith(layout.copied))
    info = {k: (ckpt.files[k].shape(k), ckpt.files[k].dtype(k)) for k in keys}
    return info, lambda key: ckpt.get(key, info[key][0])
