"""What the PEFT conversions of every method share (sft_jax/lora/peft.py: LoRA and the entry
points; sft_jax/lora/peft_oft.py: OFT): PEFT's key prefixes and file names, the adapter paths of
a tree, the parsed adapter_config.json (`PeftAdapterConfig`), and saved modules
(`modules_to_save`) and a multimodal base's language-model keys both ways (see peft.py's
docstring for the layouts)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sft_jax.lora import oft
from sft_jax.lora.tree import SAVEABLE, config_scale, get_path, saved_module_table

PREFIX = "base_model.model.model.layers"
MODEL_PREFIX = "base_model.model."
TEXT_MODEL = "base_model.model.model."
LANGUAGE_MODEL = "base_model.model.model.language_model."  # Gemma 3's multimodal base
PEFT_MODULE_NAME = {"norm": "model.norm"}  # a suffix that matches the final norm only
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TEXT_PARTS = ["base_model", "model", "model"]  # what precedes "layers" in an adapter's key


def adapter_paths(adapters: dict) -> list[tuple[str, ...]]:
    """The paths of the adapted modules of a tree (LoRA's `a` or OFT's vector leaves)."""
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        if keys[-1] in ("a", oft.PARAM):
            paths.append(keys[:-1])
    return paths


@dataclasses.dataclass(frozen=True)
class PeftAdapterConfig:
    """What an adapter_config.json says about the adapter's shape and scale. The scale is
    derived here, never passed separately, so an adapter cannot be applied at scale 0 (the base)
    by forgetting it."""

    rank: int
    alpha: float
    rslora: bool
    dora: bool
    base: str  # base_model_name_or_path as written ("" when unset)
    target_parameters: tuple[str, ...] = ()  # PEFT's, as written: the adapted expert parameters
    oft: oft.OftSpec | None = None  # an OFT adapter's rotation settings; None: LoRA
    method: str = "lora"  # lora | oft | prefix | prompt (config.lora.method's names)

    @property
    def scale(self) -> float:
        """LoRA's scale; the other methods have none (1.0, unused by their merge)."""
        return 1.0 if self.method != "lora" else config_scale(self)


def saved_to_peft(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    """One saved module's PEFT tensors (HF layouts, one tensor per layer)."""
    key = MODEL_PREFIX + SAVEABLE[name][1]
    if "{i}" in key:
        return {key.format(i=i): value[i].copy() for i in range(value.shape[0])}
    if name == "lm_head":
        return {key: value.T.copy()}  # our kernel [D, V] -> HF Linear weight [V, D]
    return {key: value}


def saved_from_peft(tensors: dict[str, np.ndarray], params: dict) -> dict[str, np.ndarray]:
    """Saved-module tensors of a PEFT state dict (removed from `tensors`), as our leaves."""
    tied = "lm_head" not in params
    saved: dict[str, np.ndarray] = {}
    for name, (path, key) in saved_module_table(params).items():
        key = MODEL_PREFIX + key
        if tied and name == "lm_head":
            value = tensors.pop(
                MODEL_PREFIX + SAVEABLE["lm_head"][1], None
            )  # the tied copy PEFT writes; embed_tokens wins
            if value is not None and "embed_tokens" not in saved:
                saved["embed_tokens"] = value
            continue
        if "{i}" in key:
            layers = get_path(params, path).shape[0]
            found = [tensors.pop(key.format(i=i), None) for i in range(layers)]
            if all(v is None for v in found):
                continue
            if any(v is None for v in found):
                raise ValueError(f"PEFT adapter saves {name} for only some of {layers} layers")
            saved[name] = np.stack(found)
        elif key in tensors:
            value = tensors.pop(key)
            saved[name] = value.T if name == "lm_head" else value
    return saved


def from_language_model(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A multimodal base's language-model keys as a text model's; an adapter on any of its
    other modules (the vision tower, the projector) is refused: sft_jax loads none of them."""
    if not any(k.startswith(LANGUAGE_MODEL) for k in tensors):
        return dict(tensors)
    out = {}
    for key, value in tensors.items():
        if key.startswith(LANGUAGE_MODEL):
            out[TEXT_MODEL + key.removeprefix(LANGUAGE_MODEL)] = value
        elif key.startswith(TEXT_MODEL):
            module = key.removeprefix(TEXT_MODEL).split(".")[0]
            raise ValueError(
                f"PEFT tensor {key!r} adapts the base's {module}; sft_jax fine-tunes only the "
                "language model of a multimodal model"
            )
        else:
            out[key] = value
    return out
