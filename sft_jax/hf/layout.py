"""How a checkpoint names its tensors (`MoeLayout`), told apart by the tensors' names on
import and by the source checkpoint's family on export: the mixture-of-experts layouts (the
Hub's per-expert tensors, Mixtral's names, transformers 5's fused experts, gpt-oss's MXFP4),
Phi-3's fused projections, and where a multimodal checkpoint keeps its language model."""

from __future__ import annotations

import dataclasses
import os

from sft_jax.hf.config import read_config_json
from sft_jax.hf.config_export import hf_config_dict
from sft_jax.hf.families import PHI3, is_gemma3_multimodal
from sft_jax.hf.gemma4 import MULTIMODAL_MODULES, is_gemma4_multimodal
from sft_jax.hf.safetensors import Checkpoint
from sft_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class MoeLayout:
    """How a checkpoint names its tensors: its mixture-of-experts tensors (see the module
    docstring), and where the language model sits in a multimodal checkpoint."""

    prefix: str = "mlp"  # "block_sparse_moe": Mixtral's Hub checkpoints
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # Mixtral: w1, w3, w2
    fused: bool = False  # transformers 5's gate_up_proj [E, 2F, D] and down_proj [E, D, F]
    mxfp4: bool = False  # gpt-oss's Hub checkpoints: expert matrices as MXFP4 blocks and scales
    fused_proj: bool = False  # Phi-3: q/k/v in one qkv_proj, gate and up in one gate_up_proj
    # Gemma 3's multimodal checkpoints: the language model under "model.language_model." (or
    # the older "language_model.model.", with its head at "language_model.lm_head.weight"), and
    # the other modules' tensors (`copied`: key prefixes), which import skips and export copies
    # through from the source checkpoint untouched.
    model: str = "model."
    lm_head: str = "lm_head.weight"
    copied: tuple[str, ...] = ()


HUB_LAYOUT = MoeLayout()
MIXTRAL_LAYOUT = MoeLayout("block_sparse_moe", ("w1", "w3", "w2"))


# Gemma 3's multimodal layouts (the first also Gemma 4's, with its towers): transformers 5's,
# and the one Gemma 3's Hub checkpoints were first published in (transformers maps it on load);
# told apart by where the embedding is.
_MULTIMODAL_LAYOUTS = (
    MoeLayout(
        model="model.language_model.",
        copied=("model.vision_tower.", "model.multi_modal_projector.", *MULTIMODAL_MODULES),
    ),
    MoeLayout(
        model="language_model.model.",
        lm_head="language_model.lm_head.weight",
        copied=("vision_tower.", "multi_modal_projector."),
    ),
)


def checkpoint_layout(ckpt: Checkpoint) -> MoeLayout:
    """The layout of a checkpoint, from the names of its embedding and first layer's tensors."""
    base = HUB_LAYOUT
    for multimodal in _MULTIMODAL_LAYOUTS:
        if multimodal.model + "embed_tokens.weight" in ckpt.files:
            base = multimodal
    layer = base.model + "layers.0."
    prefix = "block_sparse_moe" if layer + "block_sparse_moe.gate.weight" in ckpt.files else "mlp"
    fused = layer + "self_attn.qkv_proj.weight" in ckpt.files  # Phi-3
    base = dataclasses.replace(base, prefix=prefix, fused_proj=fused)
    experts = f"{layer}{prefix}.experts."
    if experts + "gate_up_proj_blocks" in ckpt.files:
        return dataclasses.replace(base, mxfp4=True)
    if experts + "gate_up_proj" in ckpt.files:
        return dataclasses.replace(base, fused=True)
    if experts + "0.w1.weight" in ckpt.files:
        return dataclasses.replace(base, names=("w1", "w3", "w2"))
    return base


def export_layout(config: ModelConfig, source_model_dir: str | None) -> MoeLayout:
    """The layout an export writes: the Hub's for the family of the source checkpoint (or of
    the config.json a random init is exported with) — Mixtral's own names for Mixtral; a Gemma 3
    multimodal source's own layout, whose other modules `copied_tensors` carries over."""
    file = os.path.join(source_model_dir, "config.json") if source_model_dir else ""
    if file and os.path.isfile(file):
        raw = read_config_json(file)
        if is_gemma3_multimodal(raw) or is_gemma4_multimodal(raw):  # where the source has it
            return checkpoint_layout(Checkpoint(source_model_dir))
        if PHI3 in (raw.get("architectures") or []) or raw.get("model_type") == "phi3":
            return MoeLayout(fused_proj=True)  # Phi-3's fused projections
    elif config.is_moe:
        raw = hf_config_dict(config, bos_token_id=None, eos_token_id=None)
    else:
        return HUB_LAYOUT
    mixtral = raw.get("model_type") == "mixtral" or "MixtralForCausalLM" in (
        raw.get("architectures") or []
    )
    return MIXTRAL_LAYOUT if mixtral else HUB_LAYOUT
