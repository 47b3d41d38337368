"""OFT adapters in PEFT's format (sft_jax/lora/oft.py holds the math): one vector per module and
layer, as PEFT's OFT stores it,

    base_model.model.model.layers.{i}.self_attn.q_proj.oft_R.weight          [blocks, n]

with peft_type "OFT" and its settings (oft_block_size, block_share, coft, eps,
use_cayley_neumann, num_cayley_neumann_terms) in adapter_config.json (`oft_peft_config`).
sft_jax/lora/peft.py dispatches here by the tree's leaves and the config's peft_type.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sft_jax.lora import oft
from sft_jax.lora.peft_common import (
    PEFT_MODULE_NAME,
    PREFIX,
    PeftAdapterConfig,
    adapter_paths,
)
from sft_jax.lora.tree import SAVED, hf_layer, hf_module

OFT_SUFFIX = "oft_R.weight"
# The PEFT version whose OFT parametrisation (the Neumann series as changed in 0.18) is written;
# PEFT warns on a Neumann adapter that names none.
OFT_PEFT_VERSION = "0.21.0"


def oft_to_peft(
    path: tuple[str, ...], ad: dict[str, np.ndarray], period: int
) -> dict[str, np.ndarray]:
    """PEFT tensors of one OFT module: its stacked vectors [L, blocks, n], one per layer."""
    tensors = {}
    for layer in range(ad[oft.PARAM].shape[0]):
        key = f"{PREFIX}.{hf_layer(path, layer, period)}.{hf_module(path)}.{OFT_SUFFIX}"
        tensors[key] = ad[oft.PARAM][layer].copy()
    return tensors


def oft_stack(
    path: tuple[str, ...], per_layer: dict[int, np.ndarray], kernel: Any, n_in: int
) -> np.ndarray:
    """One OFT module's per-layer vectors [blocks, n] stacked, checked against its kernel's
    input width (blocks x b = in, or one shared block with b dividing in)."""
    vec = np.stack([per_layer[i] for i in range(len(per_layer))])
    fan_in = int(np.prod(kernel.shape[1 : 1 + n_in]))
    b = oft.block_size(vec.shape[-1])
    if fan_in % b or vec.shape[1] not in (1, fan_in // b):
        raise ValueError(
            f"PEFT OFT tensors of {'/'.join(path)} ({vec.shape[1]} blocks of {b}) do not fit "
            f"its {fan_in} input features"
        )
    return vec


def oft_peft_config(
    adapters: dict, cfg: Any, *, base: str, tied_embeddings: bool | None = None
) -> dict[str, Any]:
    """The adapter_config.json of an OFT adapter tree; `cfg`: its run's LoRA section (or that
    section as a dict) for the OFT settings. PEFT's OFTConfig cannot re-tie an LM head, so a
    trained tied embedding is refused."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    saved = sorted(adapters.get(SAVED, {}))
    if "embed_tokens" in saved and tied_embeddings is not False:
        raise ValueError(
            "an OFT adapter with a trained tied embedding cannot be written for PEFT (its "
            "OFTConfig has no ensure_weight_tying); untie it or leave embed_tokens frozen"
        )
    return {
        "peft_type": "OFT",
        "task_type": "CAUSAL_LM",
        "peft_version": OFT_PEFT_VERSION,
        "r": 0,
        "oft_block_size": int(get("oft_block_size")),
        "target_modules": sorted({p[-1] for p in adapter_paths(adapters)}),
        "module_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "coft": bool(get("oft_coft")),
        "eps": float(get("oft_eps")),
        "block_share": bool(get("oft_block_share")),
        "use_cayley_neumann": bool(get("oft_cayley_neumann")),
        "num_cayley_neumann_terms": int(get("oft_neumann_terms")),
        "base_model_name_or_path": base,
        "inference_mode": True,
        "modules_to_save": [PEFT_MODULE_NAME.get(m, m) for m in saved] or None,
    }


def oft_adapter_config(path: str, cfg: dict) -> PeftAdapterConfig:
    """An OFT adapter_config.json: its rotation settings (sizes come from the tensors).
    Settings PEFT's Linear OFT honours that sft_jax does not reproduce are refused."""
    if cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out", False):
        raise ValueError(f"{path}: OFT with bias training or fan_in_fan_out is not supported")
    neumann = bool(cfg.get("use_cayley_neumann", True))
    spec = oft.OftSpec(
        neumann_terms=int(cfg.get("num_cayley_neumann_terms", 5)) if neumann else 0,
        coft_eps=float(cfg.get("eps", 6e-5)) if cfg.get("coft", False) else None,
    )
    base = cfg.get("base_model_name_or_path") or ""
    return PeftAdapterConfig(1, 1.0, False, False, base, oft=spec, method="oft")
